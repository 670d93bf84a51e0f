#!/bin/sh
# Time from QEMU start to provisioned-and-connected, Azure provisioning vs NoCloud, on the
# same image: two `kiln build`s of one template run side by side (same host load), N rounds.
# Prints one line per build and writes the `provisioned` events to $OUT/results.jsonl.
#
# Usage: scripts/bench-provisioning.sh [DISK.qcow2] [ROUNDS]
#   DISK defaults to the `debian` test guest (cargo xtask images --only debian).
set -eu
cd "$(dirname "$0")/.."
disk=${1:-$(cargo xtask images --only debian)}
rounds=${2:-2}
kiln=${KILN:-target/debug/kiln}
[ -x "$kiln" ] || cargo build -p kiln-engine --bin kiln
OUT=${OUT:-$(mktemp -d /tmp/kiln-bench-provisioning.XXXXXX)}
mkdir -p "$OUT"
export KILN_HOME="$OUT/home"
[ -d "$KILN_HOME/catalog/kiln/bench" ] || "$kiln" image import --publisher kiln --offer bench --sku gen1 --version 1.0.0 "$disk" >/dev/null
cat >"$OUT/t.json" <<'JSON'
{"type": "Microsoft.VirtualMachineImages/imageTemplates", "apiVersion": "2022-07-01", "location": "westus2",
 "identity": {"type": "UserAssigned", "userAssignedIdentities": {"/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/kiln/providers/Microsoft.ManagedIdentity/userAssignedIdentities/aib": {}}},
 "properties": {"vmProfile": {"vmSize": "Standard_D2s_v3"},
  "source": {"type": "PlatformImage", "publisher": "kiln", "offer": "bench", "sku": "gen1", "version": "latest"},
  "customize": [{"type": "Shell", "name": "noop", "inline": ["true"]}],
  "distribute": [{"type": "VHD", "runOutputName": "vhd"}]}}
JSON
for r in $(seq "$rounds"); do
  for m in azure nocloud; do
    "$kiln" build --accel tcg --output json --provisioning "$m" --name "bench-$m-$r" "$OUT/t.json" >"$OUT/$m-$r.jsonl" 2>"$OUT/$m-$r.err" &
  done
  wait
  for m in azure nocloud; do
    line=$(grep '"event":"provisioned"' "$OUT/$m-$r.jsonl" || echo '{"event":"provisioned","failed":true}')
    echo "$line" >>"$OUT/results.jsonl"
    echo "round $r $m: $line"
  done
  rm -rf "$KILN_HOME/staging"
done
echo "results: $OUT/results.jsonl"
