#!/usr/bin/env bash
# Analytics and report benchmark on the standard fleet (1,000,000 meters x
# 31 days by default): times `meterflow bill`, `meterflow analyze` and
# `meterflow report` on the same fleet and prints them side by side.
# Goals (issue 8): analyze under 2x the bill run, report under 10 s.
#
#   scripts/bench-analytics.sh                # 1M meters
#   METERS=10000 scripts/bench-analytics.sh   # quick
#   BIN=path/to/meterflow scripts/bench-analytics.sh   # skip the release build
set -euo pipefail
cd "$(dirname "$0")/.."
METERS=${METERS:-1000000}
DAYS=${DAYS:-31}
WORK=${WORK:-/var/tmp/meterflow-bench}
TARGET=${CARGO_TARGET_DIR:-target}
mkdir -p "$WORK"

if [[ -z "${BIN:-}" ]]; then
  cargo build --release --quiet
  BIN="$TARGET/release/meterflow"
fi

FLEET="$WORK/fleet-$METERS-$DAYS"
if [[ ! -f "$FLEET/master/accounts.csv" ]]; then
  echo "generating fleet: $METERS meters x $DAYS days -> $FLEET"
  "$BIN" sim fleet --meters "$METERS" --days "$DAYS" --start 2026-10-01 --out "$FLEET"
fi
sync

secs() { # command... -> wall seconds on stdout
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc -l | xargs printf '%.2f'
}

RUNS="$WORK/analytics-runs-$METERS"
OUT="$WORK/analytics-out-$METERS"
rm -rf "$RUNS" "$OUT"
mkdir -p "$RUNS"
export RUST_LOG=warn
t_bill=$(secs "$BIN" bill --lake "$FLEET" --master "$FLEET/master" --tariffs tariffs --period 2026-10 --out "$RUNS/2026-10")
t_analyze=$(secs "$BIN" analyze --lake "$FLEET" --master "$FLEET/master" --runs "$RUNS" --out "$OUT")
t_report=$(secs "$BIN" report "$RUNS/2026-10" --out "$WORK/report-$METERS.html")

ratio=$(echo "$t_analyze / $t_bill" | bc -l | xargs printf '%.2f')
printf '%-28s %10s\n' "fleet" "$METERS meters x $DAYS days"
printf '%-28s %9ss\n' "bill run" "$t_bill"
printf '%-28s %9ss  (%sx the bill run; goal < 2x)\n' "analytics (meterflow analyze)" "$t_analyze" "$ratio"
printf '%-28s %9ss  (goal < 10 s)\n' "report (meterflow report)" "$t_report"
printf '%-28s %s\n' "report file" "$WORK/report-$METERS.html"
