#!/usr/bin/env bash
# Sets up everything on a fresh Debian machine and runs kiln on the shipped examples.
# Today that is `kiln validate` (the build pipeline lands with the linux-build issue);
# the example templates are the ones the build will run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -eq 0 ]; then scripts/setup-host.sh; else sudo scripts/setup-host.sh; fi
cargo build --release -p kiln-engine --bin kiln
kiln=target/release/kiln
"$kiln" validate examples/tiny-vhd.json
"$kiln" validate examples/arm-deployment.json --parameters examples/arm-deployment.parameters.json
"$kiln" validate --print-normalized examples/tiny-vhd.json
