#!/usr/bin/env bash
# Regenerates the committed sample fleet (300 meters, October 2026) in sample-data/.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf sample-data/readings sample-data/master
cargo run --quiet -- sim fleet --meters 300 --days 31 --start 2026-10-01 --seed 2026 \
  --anomaly-per-mille 30 --out sample-data
