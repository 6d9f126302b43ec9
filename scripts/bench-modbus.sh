#!/usr/bin/env bash
# Modbus loopback benchmark: N simulated meters (default 1000) on 127.0.0.1,
# each polled with its coalesced requests once per cycle. Prints p50/p99
# cycle time and the requests issued versus one request per register.
# The cycle target is 1 s for 1000 devices.
#
# Usage: scripts/bench-modbus.sh [DEVICES] [CYCLES] [CONCURRENCY_PER_GATEWAY]
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=${1:-1000}
CYCLES=${2:-30}
CONC=${3:-8}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/meterflow-target}
cargo build --release --bin meterflow >&2
echo "== planner/decoder micro-benchmarks: cargo bench --bench modbus_plan" >&2
"$CARGO_TARGET_DIR/release/meterflow" --log warn modbus bench \
  --devices "$DEVICES" --cycles "$CYCLES" --concurrency "$CONC" --per-gateway 200
