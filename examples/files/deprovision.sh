#!/bin/sh
# Installed as /tmp/DeprovisioningScript.sh: AIB runs this instead of the default
# `waagent -force -deprovision+user` when it exists.
set -e
rm -f /etc/ssh/ssh_host_* /var/lib/dhcp/* 2>/dev/null || true
sync
