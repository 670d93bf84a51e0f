/*
 * kiln tiny guest: pvhboot, a Multiboot kernel that boots Linux through its PVH entry.
 *
 * Why: Debian's kernel is an XZ-compressed bzImage. Under TCG (QEMU without KVM) its
 * decompressor needs ~6 s of CPU before Linux prints a line. pvhboot instead loads the
 * uncompressed vmlinux, stored LZ4-compressed per segment, which takes a fraction of
 * that, and enters Linux the way QEMU's direct PVH boot does.
 *
 * Chain (BIOS): gptmbr.bin -> syslinux -> mboot.c32 -> pvhboot (this, at 1 MiB) with two
 * modules: the "KILNVMLX" kernel image (built by xtask from the vmlinux ELF) and the
 * initrd. pvhboot moves the modules to the top of low RAM, decompresses each PT_LOAD
 * segment to its physical address, zero-fills the rest, builds the PVH start_info
 * (command line, initrd, memory map from Multiboot, ACPI RSDP) and jumps to the
 * XEN_ELFNOTE_PHYS32_ENTRY point in 32-bit protected mode with paging off.
 *
 * Built with the host gcc: -m32 -ffreestanding -nostdlib -static (see tiny.rs).
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define MB_MAGIC 0x1BADB002u
#define MB_FLAGS 0x00000003u /* page-align modules, memory info */

__attribute__((section(".multiboot"), used, aligned(4)))
static const u32 mb_header[3] = {MB_MAGIC, MB_FLAGS, (u32)(-(MB_MAGIC + MB_FLAGS))};

struct mb_info {
	u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
	u32 syms[4];
	u32 mmap_length, mmap_addr;
};
struct mb_module { u32 start, end, string, reserved; };
struct mb_mmap { u32 size; u64 addr, len; u32 type; } __attribute__((packed));

struct hvm_start_info {
	u32 magic, version, flags, nr_modules;
	u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
	u32 memmap_entries, reserved;
};
struct hvm_modlist_entry { u64 paddr, size, cmdline_paddr, reserved; };
struct hvm_memmap_entry { u64 addr, size; u32 type, reserved; };

/* The kernel image module, written by xtask (little endian). */
struct kimg_seg { u32 paddr, memsz, datasz, offset, size; };
struct kimg { char magic[8]; u32 version, entry, nsegs, reserved; struct kimg_seg seg[]; };

#define MAX_MMAP 64
static struct hvm_start_info start_info;
static struct hvm_modlist_entry modlist;
static struct hvm_memmap_entry memmap[MAX_MMAP];
static char cmdline[2048];

/* ---- serial console (COM1) for errors ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static void putc_(char c)
{
	for (int i = 0; i < 100000 && !(inb(0x3f8 + 5) & 0x20); i++)
		;
	outb(0x3f8, (u8)c);
}
static void puts_(const char *s) { while (*s) { if (*s == '\n') putc_('\r'); putc_(*s++); } }
static void puthex(u32 v) { for (int i = 28; i >= 0; i -= 4) putc_("0123456789abcdef"[(v >> i) & 15]); }
static void __attribute__((noreturn)) die(const char *msg)
{
	puts_("pvhboot: ");
	puts_(msg);
	puts_("\n");
	for (;;) __asm__ volatile("cli; hlt");
}

/* ---- memory helpers (rep string instructions are fast under TCG) ---- */
static void *memmove_(void *dst, const void *src, u32 n)
{
	if (dst < src || (u8 *)dst >= (const u8 *)src + n) {
		__asm__ volatile("cld; rep movsb" : "+D"(dst), "+S"(src), "+c"(n)::"memory");
	} else {
		u8 *d = (u8 *)dst + n - 1;
		const u8 *s = (const u8 *)src + n - 1;
		__asm__ volatile("std; rep movsb; cld" : "+D"(d), "+S"(s), "+c"(n)::"memory");
	}
	return dst;
}
static void memset0(void *dst, u32 n) { __asm__ volatile("cld; rep stosb" : "+D"(dst), "+c"(n) : "a"(0) : "memory"); }
static int memeq(const void *a, const void *b, u32 n)
{
	const u8 *x = a, *y = b;
	while (n--) if (*x++ != *y++) return 0;
	return 1;
}
static u32 rd32(const u8 *p) { return p[0] | p[1] << 8 | p[2] << 16 | (u32)p[3] << 24; }

/* ---- LZ4 (frame format, as written by `lz4`) ---- */
static u8 *lz4_block(const u8 *src, u32 n, u8 *dst)
{
	const u8 *end = src + n;
	for (;;) {
		u8 tok = *src++;
		u32 lit = tok >> 4, ml;
		if (lit == 15) { u8 b; do { b = *src++; lit += b; } while (b == 255); }
		memmove_(dst, src, lit);
		dst += lit;
		src += lit;
		if (src >= end)
			return dst;
		u32 off = src[0] | src[1] << 8;
		src += 2;
		ml = tok & 15;
		if (ml == 15) { u8 b; do { b = *src++; ml += b; } while (b == 255); }
		ml += 4;
		const u8 *m = dst - off;
		if (off >= ml) {
			memmove_(dst, m, ml);
			dst += ml;
		} else {
			while (ml--) *dst++ = *m++;
		}
	}
}
static u8 *lz4_frame(const u8 *src, u8 *dst)
{
	if (rd32(src) != 0x184D2204u) die("kernel segment is not an LZ4 frame");
	u8 flg = src[4];
	src += 6;
	if (flg & 0x08) src += 8; /* content size */
	if (flg & 0x01) src += 4; /* dictionary id */
	src += 1;                 /* header checksum */
	for (;;) {
		u32 bs = rd32(src);
		src += 4;
		if (bs == 0) break;
		if (bs & 0x80000000u) {
			bs &= 0x7fffffffu;
			memmove_(dst, src, bs);
			dst += bs;
		} else {
			dst = lz4_block(src, bs, dst);
		}
		src += bs;
		if (flg & 0x10) src += 4; /* block checksum */
	}
	return dst;
}

static u32 find_rsdp(void)
{
	const volatile u16 *bda_ebda;
	__asm__("" : "=r"(bda_ebda) : "0"(0x40e)); /* (hide the constant address from gcc) */
	u32 ebda = (u32)*bda_ebda << 4;
	for (u32 p = ebda; ebda && p < ebda + 1024; p += 16)
		if (memeq((void *)p, "RSD PTR ", 8)) return p;
	for (u32 p = 0xe0000; p < 0x100000; p += 16)
		if (memeq((void *)p, "RSD PTR ", 8)) return p;
	return 0;
}

void pvhboot_main(u32 magic, struct mb_info *mbi)
{
	if (magic != 0x2BADB002u) die("not started by a Multiboot loader");
	if (!(mbi->flags & (1u << 3)) || mbi->mods_count < 2) die("need 2 modules: kernel image and initrd");
	if (!(mbi->flags & (1u << 6))) die("no memory map from the loader");
	struct mb_module *mods = (struct mb_module *)mbi->mods_addr;

	/* command line: drop the first word (our own file name) */
	const char *c = (mbi->flags & (1u << 2)) ? (const char *)mbi->cmdline : "";
	while (*c && *c != ' ') c++;
	while (*c == ' ') c++;
	u32 n = 0;
	while (c[n] && n < sizeof cmdline - 1) { cmdline[n] = c[n]; n++; }
	cmdline[n] = 0;

	/* memory map; the top of the usable RAM region that contains 1 MiB */
	u32 nmap = 0, top = 0;
	for (u32 p = mbi->mmap_addr; p < mbi->mmap_addr + mbi->mmap_length && nmap < MAX_MMAP;) {
		struct mb_mmap *e = (struct mb_mmap *)p;
		memmap[nmap].addr = e->addr;
		memmap[nmap].size = e->len;
		memmap[nmap].type = e->type;
		memmap[nmap].reserved = 0;
		nmap++;
		if (e->type == 1 && e->addr <= 0x100000 && e->addr + e->len > 0x100000) {
			u64 end = e->addr + e->len;
			top = end > 0xfffff000ull ? 0xfffff000u : (u32)end;
		}
		p += e->size + 4;
	}
	if (!top) die("no usable RAM above 1 MiB");

	/* move both modules to the top of RAM, out of the kernel's way (higher one first) */
	u32 ksz = mods[0].end - mods[0].start, isz = mods[1].end - mods[1].start;
	u32 idst = (top - isz) & ~0xfffu;
	u32 kdst = (idst - ksz) & ~0xfffu;
	if (mods[1].start > mods[0].start) {
		memmove_((void *)idst, (void *)mods[1].start, isz);
		memmove_((void *)kdst, (void *)mods[0].start, ksz);
	} else {
		memmove_((void *)kdst, (void *)mods[0].start, ksz);
		memmove_((void *)idst, (void *)mods[1].start, isz);
	}

	struct kimg *k = (struct kimg *)kdst;
	if (!memeq(k->magic, "KILNVMLX", 8) || k->version != 1) die("module 1 is not a KILNVMLX kernel image");
	for (u32 i = 0; i < k->nsegs; i++) {
		struct kimg_seg *s = &k->seg[i];
		if (s->paddr + s->memsz > kdst) die("not enough RAM for the kernel");
		u8 *end = lz4_frame((u8 *)kdst + s->offset, (u8 *)s->paddr);
		if ((u32)end != s->paddr + s->datasz) {
			puts_("pvhboot: segment ");
			puthex(s->paddr);
			die("decompressed to the wrong size");
		}
		memset0(end, s->memsz - s->datasz);
	}

	modlist.paddr = idst;
	modlist.size = isz;
	start_info.magic = 0x336ec578u;
	start_info.version = 1;
	start_info.nr_modules = 1;
	start_info.modlist_paddr = (u32)&modlist;
	start_info.cmdline_paddr = (u32)cmdline;
	start_info.rsdp_paddr = find_rsdp();
	start_info.memmap_paddr = (u32)memmap;
	start_info.memmap_entries = nmap;

	__asm__ volatile("cli; jmp *%0" ::"r"(k->entry), "b"(&start_info) : "memory");
	for (;;)
		;
}

__asm__(".text\n"
	".globl _start\n"
	"_start:\n"
	"  cli\n"
	"  cld\n"
	"  mov $stack_top, %esp\n"
	"  push %ebx\n"
	"  push %eax\n"
	"  call pvhboot_main\n"
	"1: hlt\n"
	"  jmp 1b\n"
	".bss\n"
	".align 16\n"
	"stack: .skip 16384\n"
	"stack_top:\n");
