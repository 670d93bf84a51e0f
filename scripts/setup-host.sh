#!/usr/bin/env bash
# Install the host packages that kiln's test guests (`cargo xtask images`) and the
# integration tests (`cargo test -p kiln-tests`) need: QEMU + firmware, the tools that
# assemble disks without mounting anything, and the Debian packages the tiny guest is
# made of (kernel, busybox, dropbear, ...).
#
# Idempotent and fast when everything is present: it asks dpkg first and only runs
# `apt-get update` + `apt-get install` when something is missing.
#
# QEMU: machines of this project's kind ship qemu-utils (qemu-img) from
# bookworm-backports (10.x). bookworm's qemu-system-x86 7.2 would force apt to *remove*
# that qemu-utils (it Breaks qemu-system-common << 8), so when the installed qemu-utils
# is a backport we take qemu-system-x86 (and the seabios it needs) from
# bookworm-backports too, adding that suite to apt's sources if it is missing. On a
# machine without a backported qemu-utils, bookworm's QEMU is used.
#
# Usage: sudo scripts/setup-host.sh      (run as root; CI runs as root)
set -euo pipefail

PKGS=(
  # disk assembly without mounts
  e2fsprogs fdisk dosfstools mtools cpio gzip kmod
  # boot loaders and firmware (one disk boots both ways)
  syslinux syslinux-common systemd-boot-efi ovmf
  # what the tiny guest is made of
  linux-image-amd64 busybox-static dropbear-bin openssh-sftp-server gcc libc6-dev lz4 xz-utils
  gnu-efi binutils
  # the debian guest
  mmdebstrap
  # NoCloud seeds and SSH for the tests
  genisoimage openssh-client
  # kiln-agents tests run real sshd and dropbear servers; debugfs/sfdisk read exported VHDs
  openssh-server
  # WinRM: Debian's pywinrm (0.3.0, NTLM through requests-ntlm/ntlm-auth) is one of the
  # independent clients run against kiln's WinRS test server; python3-venv holds the other
  # (pywinrm 0.5 + pyspnego from PyPI, see install_pywinrm_venv below)
  python3-winrm python3-venv
)
QEMU_PKGS=(qemu-system-x86 qemu-utils seabios)

log() { printf 'setup-host: %s\n' "$*" >&2; }

missing_of() { # prints the packages of "$@" that are not installed
  local p
  for p in "$@"; do
    if ! dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii'; then
      printf '%s\n' "$p"
    fi
  done
}

if [ "$(id -u)" -ne 0 ]; then
  log "must run as root (apt-get install)"; exit 1
fi

# The current pywinrm (and pyspnego, its NTLM) from PyPI in a venv outside the checkout, for
# tests/tests/winrm_clients.rs. Pinned versions; the venv is rebuilt when they change.
PYWINRM_VENV=${KILN_PYWINRM_VENV:-$HOME/.cache/kiln/pywinrm-venv}
PYWINRM_REQS="pywinrm==0.5.0 pyspnego==0.12.4 requests-ntlm==1.3.0"
install_pywinrm_venv() {
  if [ -x "$PYWINRM_VENV/bin/python" ] && [ "$(cat "$PYWINRM_VENV/kiln-reqs" 2>/dev/null)" = "$PYWINRM_REQS" ]; then
    return 0
  fi
  log "creating $PYWINRM_VENV ($PYWINRM_REQS)"
  rm -rf "$PYWINRM_VENV"
  /usr/bin/python3 -m venv "$PYWINRM_VENV"
  "$PYWINRM_VENV/bin/pip" install -q --disable-pip-version-check $PYWINRM_REQS
  echo "$PYWINRM_REQS" > "$PYWINRM_VENV/kiln-reqs"
}

missing=$(missing_of "${PKGS[@]}")
missing_qemu=$(missing_of "${QEMU_PKGS[@]}")
if [ -z "$missing" ] && [ -z "$missing_qemu" ]; then
  log "all host packages present"
  install_pywinrm_venv
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
qemu_utils_version=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
use_bpo=0
case "$qemu_utils_version" in *bpo12*) use_bpo=1 ;; esac

if [ "$use_bpo" = 1 ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  log "adding bookworm-backports (qemu-utils $qemu_utils_version is a backport)"
  cat > /etc/apt/sources.list.d/kiln-bookworm-backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi

log "missing: $(echo $missing $missing_qemu)"
apt-get update -q
if [ -n "$missing_qemu" ]; then
  if [ "$use_bpo" = 1 ]; then
    apt-get install -y -q --no-install-recommends -t bookworm-backports "${QEMU_PKGS[@]}"
  else
    apt-get install -y -q --no-install-recommends "${QEMU_PKGS[@]}"
  fi
fi
if [ -n "$missing" ]; then
  apt-get install -y -q --no-install-recommends $missing
fi
install_pywinrm_venv
log "done"
