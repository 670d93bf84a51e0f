#!/bin/sh
# kiln debian guest: run inside the mmdebstrap chroot (customize hook) to turn the
# fresh Debian 12 tree into a cloud-style image: cloud-init (NoCloud + Azure) and the
# Azure Linux agent provision users; nothing per-instance is left behind (SSH host keys,
# machine-id, logs), as on Azure Marketplace images.
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

echo debian >/etc/hostname
cat >/etc/hosts <<'HOSTS'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
HOSTS

# The disk: GPT, ESP (FAT, label KILN-ESP) + ext4 root (label kiln-root).
cat >/etc/fstab <<'FSTAB'
# <file system>  <mount point>  <type>  <options>                         <dump> <pass>
LABEL=kiln-root  /              ext4    rw,discard,errors=remount-ro      0      1
LABEL=KILN-ESP   /boot/efi      vfat    umask=0077,nofail                 0      0
FSTAB
mkdir -p /boot/efi

echo 'LANG=C.UTF-8' >/etc/default/locale

# Networking: ifupdown; cloud-init writes /etc/network/interfaces.d/50-cloud-init.
cat >/etc/network/interfaces <<'IFACES'
# interfaces(5) file used by ifup(8) and ifdown(8); cloud-init renders the NICs into
# /etc/network/interfaces.d/.
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback
IFACES

# Keep the ESP's kernel and initrd (booted by syslinux and systemd-boot) current.
install -m 0755 /tmp/kiln/esp-sync /usr/local/sbin/kiln-esp-sync
mkdir -p /etc/kernel/postinst.d /etc/initramfs/post-update.d
ln -sf /usr/local/sbin/kiln-esp-sync /etc/kernel/postinst.d/zz-kiln-esp-sync
ln -sf /usr/local/sbin/kiln-esp-sync /etc/initramfs/post-update.d/zz-kiln-esp-sync

# (variants without cloud-init have no /etc/cloud)
if [ -d /etc/cloud/cloud.cfg.d ]; then install -m 0644 /tmp/kiln/90_kiln.cfg /etc/cloud/cloud.cfg.d/90_kiln.cfg; fi

# A small initramfs: only the drivers a VM boots from (QEMU's virtio/IDE/SCSI, Hyper-V's
# storvsc/netvsc, NVMe) instead of MODULES=most. It is read by the firmware and
# unpacked and probed under TCG on every boot, so size is boot time.
sed -i 's/^MODULES=.*/MODULES=list/' /etc/initramfs-tools/initramfs.conf
install -m 0644 /tmp/kiln/initramfs-modules /etc/initramfs-tools/modules
update-initramfs -u -k all

# e2scrub_reap only cleans up after e2scrub (LVM snapshots, unused here) and costs
# ~10 s of CPU at every boot under TCG.
systemctl mask e2scrub_reap.service

# Per-instance state must not be baked in: cloud-init makes new host keys on first
# boot, systemd a new machine-id.
rm -f /etc/ssh/ssh_host_*
: >/etc/machine-id
rm -f /var/lib/dbus/machine-id
rm -rf /var/lib/cloud/* /var/log/cloud-init*.log
apt-get clean
