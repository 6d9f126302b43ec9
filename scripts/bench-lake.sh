#!/usr/bin/env bash
# Lake write performance, side by side with DuckDB:
#  * `sim fleet` for the standard fleet (METERS x DAYS): wall time, readings/s,
#    readings/s per core, peak RSS;
#  * Parquet size per million readings: meterflow's files vs the same rows
#    written by DuckDB COPY ... (FORMAT parquet, COMPRESSION zstd).
# usage: scripts/bench-lake.sh [METERS] [DAYS]     (default 1000000 31)
set -euo pipefail
cd "$(dirname "$0")/.."
METERS=${1:-1000000}
DAYS=${2:-31}
WORK=${BENCH_DIR:-/var/tmp/meterflow-bench}/fleet-$METERS-$DAYS
scripts/venv.sh
if [[ -z "${BIN:-}" ]]; then   # BIN=path/to/meterflow skips the build
  cargo build --release --quiet
  BIN=${CARGO_TARGET_DIR:-/var/tmp/meterflow-target}/release/meterflow
fi
rm -rf "$WORK"; mkdir -p "$WORK"
CORES=$(nproc)

/usr/bin/time -v -o "$WORK/time.txt" "$BIN" sim fleet --meters "$METERS" --days "$DAYS" --out "$WORK" --json > "$WORK/fleet.json"
read -r READINGS BYTES MS < <(.venv/bin/python -c "import json,sys; s=json.load(open('$WORK/fleet.json')); print(s['readings'], s['bytes'], s['elapsed_ms'])")
RSS=$(awk -F': ' '/Maximum resident/ {print $2}' "$WORK/time.txt")

.venv/bin/python - "$WORK" "$READINGS" "$BYTES" "$MS" "$RSS" "$CORES" <<'PY'
import duckdb, os, sys, time
work, readings, mf_bytes, ms, rss_kb, cores = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
out = os.path.join(work, "duckdb.parquet")
con = duckdb.connect()
t = time.time()
con.execute(f"COPY (SELECT * FROM read_parquet('{work}/readings/*/*.parquet')) TO '{out}' (FORMAT parquet, COMPRESSION zstd)")
dk_s = time.time() - t
dk_bytes = os.path.getsize(out)
secs = ms / 1000
print(f"fleet: {readings:,} readings in {secs:.1f} s = {readings/secs:,.0f} readings/s "
      f"({readings/secs/cores:,.0f} per core on {cores} cores), peak RSS {rss_kb/1024:.0f} MB")
print(f"{'':28}{'bytes/M readings':>18}")
print(f"{'meterflow (zstd, sorted)':28}{mf_bytes*1e6/readings:>18,.0f}")
print(f"{'duckdb COPY zstd':28}{dk_bytes*1e6/readings:>18,.0f}   (COPY took {dk_s:.1f} s)")
print(f"size ratio meterflow/duckdb: {mf_bytes/dk_bytes:.3f}")
PY
