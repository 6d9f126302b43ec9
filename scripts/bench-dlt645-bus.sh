#!/usr/bin/env bash
# DL/T 645 bus efficiency: the collector against simulated gateways on
# 127.0.0.1 whose meters pace every byte at 2400 baud (8E1, 11 bits/char) and
# answer after a 20 ms turnaround. Prints the reads per second for 1 bus and
# for 8 buses, the efficiency of each against what the wire allows, and the
# 8-bus / 1-bus scaling.
#
#   scripts/bench-dlt645-bus.sh [SECONDS]   (default 20 per run)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
cargo build --release --quiet --bin meterflow
bin=${CARGO_TARGET_DIR:-target}/release/meterflow
common=(--baud 2400 --turnaround-ms 20 --silent-gap-ms 5 --meters-per-bus 4 --seconds "$secs")

echo "== 1 bus =="
one=$("$bin" --log warn dlt645 bench-bus --buses 1 "${common[@]}")
echo "$one"
echo "== 8 buses =="
eight=$("$bin" --log warn dlt645 bench-bus --buses 8 "${common[@]}")
echo "$eight"

rate() { sed -n 's/.* = \([0-9.]*\) reads\/s.*/\1/p' <<<"$1" | head -1; }
r1=$(rate "$one"); r8=$(rate "$eight")
awk -v a="$r1" -v b="$r8" 'BEGIN { printf "scaling: 8 buses read %.2fx as fast as 1 bus (ideal 8x)\n", b / a }'
