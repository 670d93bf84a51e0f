#!/bin/sh
# Run by the Shell customizer of examples/tiny-vhd.json (fetched by the host, checksum verified
# before anything runs in the guest).
set -e
echo "kiln example: built $(date -u +%Y-%m-%dT%H:%M:%SZ)" | sudo tee /etc/kiln-example >/dev/null
