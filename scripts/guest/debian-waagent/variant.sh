#!/bin/sh
# kiln debian-waagent guest (run in the chroot after debian/customize.sh): no cloud-init;
# the Azure Linux agent provisions the VM itself (Provisioning.Agent=waagent) from
# ovf-env.xml on the CD and the wireserver (kiln build --provisioning azure).
set -eu
conf=/etc/waagent.conf
set_conf() {
  if grep -q "^$1=" "$conf"; then sed -i "s|^$1=.*|$1=$2|" "$conf"; else echo "$1=$2" >>"$conf"; fi
}
set_conf Provisioning.Agent waagent
# Host keys are regenerated at provisioning (RegenerateSshHostKeyPair=y, Debian's default);
# ed25519 only, because an RSA key takes ~40 s to generate under TCG.
set_conf Provisioning.SshHostKeyPairType ed25519
# A kiln build VM has no Azure resource disk.
set_conf ResourceDisk.Format n

# Debian's unit runs only on Hyper-V (ConditionVirtualization=microsoft); kiln's build VM
# is QEMU/KVM, so the test guest drops the condition (Azure itself runs on Hyper-V).
mkdir -p /etc/systemd/system/walinuxagent.service.d
cat >/etc/systemd/system/walinuxagent.service.d/kiln.conf <<'UNIT'
[Unit]
ConditionVirtualization=
UNIT
systemctl enable walinuxagent.service

# Without cloud-init nothing renders the network: DHCP on the first NIC (net.ifnames=0).
# Nothing else: waagent finds the wireserver in the DHCP lease (option 245, and the route to
# 168.63.129.16 that Azure's DHCP sends), which kiln's DHCP gives as Azure's does
# (docs/provisioning.md, "waagent-provisioned images").
cat >/etc/network/interfaces.d/eth0 <<'IFACE'
auto eth0
allow-hotplug eth0
iface eth0 inet dhcp
IFACE

# sshd needs a host key before waagent provisions (cloud-init makes them on the other
# images; deprovisioning deletes them again).
cat >/etc/systemd/system/kiln-ssh-hostkey.service <<'UNIT'
[Unit]
Description=kiln: an SSH host key on first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key

[Install]
WantedBy=multi-user.target
UNIT
systemctl enable kiln-ssh-hostkey.service
