#!/usr/bin/env bash
# Sets up everything on a fresh Debian machine and runs a real kiln build end to end:
# host packages → kiln → the `tiny` test guest (built from Debian packages, cached) imported into
# kiln's local PlatformImage catalog as kiln:tiny:gen1 → `kiln build examples/tiny-vhd.json`
# (Shell inline + scriptUri with sha256 + File + a deprovisioning override) → a fixed VHD and
# its runOutput on stdout.
#
# Also validates the ARM deployment example. Set KILN_HOME to keep state elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
if [ "$(id -u)" -eq 0 ]; then scripts/setup-host.sh; else sudo scripts/setup-host.sh; fi
cargo build -p kiln-engine --bin kiln
kiln=target/debug/kiln
"$kiln" doctor || true
tiny=$(cargo xtask images --only tiny)
version=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$(dirname "$tiny")/meta.json" 2>/dev/null || echo 1.0.0)
if ! "$kiln" image list --output json | grep -q "\"kiln:tiny:gen1:$version\""; then
  "$kiln" image import --publisher kiln --offer tiny --sku gen1 --version "$version" --hyper-v-generation V1 "$tiny"
fi
"$kiln" validate examples/arm-deployment.json --parameters examples/arm-deployment.parameters.json
"$kiln" build examples/tiny-vhd.json
