/*
 * kiln tiny guest: efiboot, the UEFI twin of pvhboot.c.
 *
 * Debian's bzImage decompresses itself (XZ) in ~6 s of CPU under TCG. efiboot loads the
 * uncompressed kernel from the "KILNVMLX" image (LZ4 per segment, see xtask's pvh.rs)
 * and starts it through the 64-bit boot protocol, like Firecracker or cloud-hypervisor:
 * segments at a 2 MiB-aligned physical base, a zero page (boot_params) with the command
 * line, the initrd, an e820 map converted from the UEFI memory map and the ACPI RSDP,
 * then ExitBootServices and a jump to startup_64 with %rsi = boot_params. Linux then
 * runs without EFI runtime services (as after a BIOS boot); ACPI works as usual.
 *
 * Started by systemd-boot (entry loader/entries/kiln.conf: "efi /EFI/kiln/efiboot.efi",
 * the kernel command line in "options"); reads \vmlinux.kimg and \initrd.img from the
 * same partition. Built with gnu-efi.
 */
#include <efi.h>
#include <efilib.h>

struct kimg_seg { UINT32 paddr, memsz, datasz, offset, size; };
struct kimg { CHAR8 magic[8]; UINT32 version, entry_pvh, nsegs, entry64; struct kimg_seg seg[]; };

#define LINK_BASE 0x1000000ULL
#define ALIGN_2M 0x200000ULL

static void fail(CHAR16 *what, EFI_STATUS st)
{
	Print(L"efiboot: %s: %r\n", what, st);
	uefi_call_wrapper(BS->Stall, 1, 5000000);
	Exit(st ? st : EFI_LOAD_ERROR, 0, NULL);
}

static void copy(void *dst, const void *src, UINTN n)
{
	__asm__ volatile("cld; rep movsb" : "+D"(dst), "+S"(src), "+c"(n)::"memory");
}
static void zero(void *dst, UINTN n) { __asm__ volatile("cld; rep stosb" : "+D"(dst), "+c"(n) : "a"(0) : "memory"); }
static UINT32 rd32(const UINT8 *p) { return p[0] | p[1] << 8 | p[2] << 16 | (UINT32)p[3] << 24; }

static UINT8 *lz4_block(const UINT8 *src, UINT32 n, UINT8 *dst)
{
	const UINT8 *end = src + n;
	for (;;) {
		UINT8 tok = *src++;
		UINT32 lit = tok >> 4, ml;
		if (lit == 15) { UINT8 b; do { b = *src++; lit += b; } while (b == 255); }
		copy(dst, src, lit);
		dst += lit;
		src += lit;
		if (src >= end)
			return dst;
		UINT32 off = src[0] | src[1] << 8;
		src += 2;
		ml = tok & 15;
		if (ml == 15) { UINT8 b; do { b = *src++; ml += b; } while (b == 255); }
		ml += 4;
		const UINT8 *m = dst - off;
		if (off >= ml) { copy(dst, m, ml); dst += ml; }
		else while (ml--) *dst++ = *m++;
	}
}
static UINT8 *lz4_frame(const UINT8 *src, UINT8 *dst)
{
	if (rd32(src) != 0x184D2204u) return NULL;
	UINT8 flg = src[4];
	src += 6;
	if (flg & 0x08) src += 8;
	if (flg & 0x01) src += 4;
	src += 1;
	for (;;) {
		UINT32 bs = rd32(src);
		src += 4;
		if (bs == 0) break;
		if (bs & 0x80000000u) { bs &= 0x7fffffffu; copy(dst, src, bs); dst += bs; }
		else dst = lz4_block(src, bs, dst);
		src += bs;
		if (flg & 0x10) src += 4;
	}
	return dst;
}

static void *read_file(EFI_FILE_HANDLE root, CHAR16 *name, UINTN *size)
{
	EFI_FILE_HANDLE f;
	EFI_STATUS st = uefi_call_wrapper(root->Open, 5, root, &f, name, EFI_FILE_MODE_READ, 0);
	if (EFI_ERROR(st)) fail(name, st);
	EFI_FILE_INFO *info = LibFileInfo(f);
	if (!info) fail(L"file info", EFI_LOAD_ERROR);
	*size = info->FileSize;
	FreePool(info);
	EFI_PHYSICAL_ADDRESS addr = 0xffffffff; /* below 4 GiB: boot_params has 32-bit fields */
	st = uefi_call_wrapper(BS->AllocatePages, 4, AllocateMaxAddress, EfiLoaderData, EFI_SIZE_TO_PAGES(*size) + 1, &addr);
	if (EFI_ERROR(st)) fail(L"allocating a file buffer", st);
	UINTN n = *size;
	st = uefi_call_wrapper(f->Read, 3, f, &n, (void *)addr);
	if (EFI_ERROR(st) || n != *size) fail(name, st);
	uefi_call_wrapper(f->Close, 1, f);
	return (void *)addr;
}

static UINT32 e820_type(UINT32 t)
{
	switch (t) {
	case EfiLoaderCode: case EfiLoaderData: case EfiBootServicesCode: case EfiBootServicesData:
	case EfiConventionalMemory:
		return 1;
	case EfiACPIReclaimMemory: return 3;
	case EfiACPIMemoryNVS: return 4;
	case EfiUnusableMemory: return 5;
	case 14 /* EfiPersistentMemory */: return 7;
	default: return 2;
	}
}

EFI_STATUS efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *systab)
{
	EFI_STATUS st;
	InitializeLib(image, systab);

	EFI_LOADED_IMAGE *li;
	st = uefi_call_wrapper(BS->HandleProtocol, 3, image, &LoadedImageProtocol, (void **)&li);
	if (EFI_ERROR(st)) fail(L"loaded image", st);
	EFI_FILE_HANDLE root = LibOpenRoot(li->DeviceHandle);
	if (!root) fail(L"opening the ESP", EFI_LOAD_ERROR);

	UINTN ksize, isize;
	struct kimg *k = read_file(root, L"\\vmlinux.kimg", &ksize);
	UINT8 *initrd = read_file(root, L"\\initrd.img", &isize);
	if (CompareMem(k->magic, "KILNVMLX", 8) || k->version != 1 || !k->entry64)
		fail(L"vmlinux.kimg is not a KILNVMLX v1 image", EFI_LOAD_ERROR);

	/* the kernel: 2 MiB aligned, preferably where it was linked */
	UINT64 lo = ~0ULL, hi = 0;
	for (UINT32 i = 0; i < k->nsegs; i++) {
		if (k->seg[i].paddr < lo) lo = k->seg[i].paddr;
		if (k->seg[i].paddr + k->seg[i].memsz > hi) hi = k->seg[i].paddr + k->seg[i].memsz;
	}
	UINTN pages = EFI_SIZE_TO_PAGES(hi - LINK_BASE);
	EFI_PHYSICAL_ADDRESS base = LINK_BASE;
	st = uefi_call_wrapper(BS->AllocatePages, 4, AllocateAddress, EfiLoaderData, pages, &base);
	if (EFI_ERROR(st)) {
		base = 0xffffffff;
		st = uefi_call_wrapper(BS->AllocatePages, 4, AllocateMaxAddress, EfiLoaderData, pages + ALIGN_2M / 4096, &base);
		if (EFI_ERROR(st)) fail(L"allocating memory for the kernel", st);
		base = (base + ALIGN_2M - 1) & ~(ALIGN_2M - 1);
	}
	INT64 delta = (INT64)base - (INT64)LINK_BASE;
	for (UINT32 i = 0; i < k->nsegs; i++) {
		struct kimg_seg *s = &k->seg[i];
		UINT8 *dst = (UINT8 *)(UINTN)(s->paddr + delta);
		UINT8 *end = lz4_frame((UINT8 *)k + s->offset, dst);
		if (end != dst + s->datasz) fail(L"kernel segment decompressed to the wrong size", EFI_LOAD_ERROR);
		zero(end, s->memsz - s->datasz);
	}

	/* zero page + command line (from systemd-boot's "options", UCS-2) */
	EFI_PHYSICAL_ADDRESS bpa = 0xffffffff;
	st = uefi_call_wrapper(BS->AllocatePages, 4, AllocateMaxAddress, EfiLoaderData, 2, &bpa);
	if (EFI_ERROR(st)) fail(L"allocating boot_params", st);
	UINT8 *bp = (UINT8 *)(UINTN)bpa;
	zero(bp, 8192);
	char *cmd = (char *)bp + 4096;
	CHAR16 *opt = li->LoadOptions;
	UINTN nopt = li->LoadOptionsSize / 2, n = 0;
	for (UINTN i = 0; i < nopt && opt[i] && n < 4095; i++) cmd[n++] = opt[i] < 128 ? (char)opt[i] : '?';
	cmd[n] = 0;

	*(UINT16 *)(bp + 0x1fe) = 0xaa55;      /* boot_flag */
	*(UINT32 *)(bp + 0x202) = 0x53726448;  /* "HdrS" */
	*(UINT16 *)(bp + 0x206) = 0x020f;      /* protocol 2.15 */
	*(UINT8 *)(bp + 0x210) = 0xff;         /* type_of_loader: undefined */
	*(UINT8 *)(bp + 0x211) = 0x01;         /* loadflags: LOADED_HIGH */
	*(UINT32 *)(bp + 0x218) = (UINT32)(UINTN)initrd;
	*(UINT32 *)(bp + 0x21c) = (UINT32)isize;
	*(UINT32 *)(bp + 0x228) = (UINT32)(UINTN)cmd;
	*(UINT32 *)(bp + 0x230) = ALIGN_2M;    /* kernel_alignment */
	*(UINT32 *)(bp + 0x238) = 4095;        /* cmdline_size */

	/* ACPI RSDP from the configuration table */
	EFI_GUID acpi20 = ACPI_20_TABLE_GUID, acpi10 = ACPI_TABLE_GUID;
	for (UINTN i = 0; i < ST->NumberOfTableEntries; i++) {
		EFI_CONFIGURATION_TABLE *t = &ST->ConfigurationTable[i];
		if (!CompareGuid(&t->VendorGuid, &acpi20) ||
		    (!*(UINT64 *)(bp + 0x70) && !CompareGuid(&t->VendorGuid, &acpi10)))
			*(UINT64 *)(bp + 0x70) = (UINT64)(UINTN)t->VendorTable;
	}

	/* memory map -> e820, then ExitBootServices (retry if the map changed; the buffer
	 * is allocated once, before, so that retrying does not change the map again) */
	UINTN mapsize = 0, cap, key, dsize;
	UINT32 dver;
	uefi_call_wrapper(BS->GetMemoryMap, 5, &mapsize, NULL, &key, &dsize, &dver);
	cap = mapsize + 16 * dsize;
	EFI_MEMORY_DESCRIPTOR *map = AllocatePool(cap);
	if (!map) fail(L"allocating the memory map", EFI_OUT_OF_RESOURCES);
	for (int tries = 0; tries < 4; tries++) {
		mapsize = cap;
		st = uefi_call_wrapper(BS->GetMemoryMap, 5, &mapsize, map, &key, &dsize, &dver);
		if (EFI_ERROR(st)) continue;
		UINT8 *e820 = bp + 0x2d0;
		UINT32 ne = 0;
		for (UINTN off = 0; off < mapsize; off += dsize) {
			EFI_MEMORY_DESCRIPTOR *d = (EFI_MEMORY_DESCRIPTOR *)((UINT8 *)map + off);
			UINT64 a = d->PhysicalStart, sz = d->NumberOfPages * 4096;
			UINT32 ty = e820_type(d->Type);
			if (ne > 0) {
				UINT8 *prev = e820 + (ne - 1) * 20;
				if (*(UINT32 *)(prev + 16) == ty && *(UINT64 *)prev + *(UINT64 *)(prev + 8) == a) {
					*(UINT64 *)(prev + 8) += sz;
					continue;
				}
			}
			if (ne == 128) break;
			*(UINT64 *)(e820 + ne * 20) = a;
			*(UINT64 *)(e820 + ne * 20 + 8) = sz;
			*(UINT32 *)(e820 + ne * 20 + 16) = ty;
			ne++;
		}
		*(UINT8 *)(bp + 0x1e8) = (UINT8)ne;
		st = uefi_call_wrapper(BS->ExitBootServices, 2, image, key);
		if (!EFI_ERROR(st)) {
			UINT64 entry = k->entry64 + delta;
			__asm__ volatile("cli; jmp *%0" ::"r"(entry), "S"(bp) : "memory");
		}
	}
	fail(L"ExitBootServices", st);
	return EFI_LOAD_ERROR;
}
