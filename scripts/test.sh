#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: host packages, the test guests (built once
# and cached outside the checkout), then every test of the workspace — the fast unit and
# data-driven tests and the integration tests that boot real QEMU guests.
#
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -eq 0 ]; then scripts/setup-host.sh; else sudo scripts/setup-host.sh; fi
cargo build --workspace --all-targets
cargo xtask images
cargo test --workspace "$@"
# The benchmark harness's smoke run (kiln + floor once, small micro-benchmarks; BENCH.md untouched):
# benchmarks are not tests, but the harness must keep working (docs/bench.md).
cargo xtask bench --quick
