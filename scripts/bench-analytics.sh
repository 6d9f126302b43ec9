#!/usr/bin/env bash
# Analytics and report benchmark on the standard fleet (1,000,000 meters x
# 31 days by default): times `meterflow bill`, `meterflow analyze` and
# `meterflow report` on the same fleet and prints them side by side, with
# the ratio analyze / bill and peak RSS of each.
# Goals (issue 8): analyze under 2x the bill run, report under 10 s.
#
#   scripts/bench-analytics.sh                # 1M meters
#   METERS=10000 scripts/bench-analytics.sh   # quick
#   BIN=path/to/meterflow scripts/bench-analytics.sh   # skip the release build
#   FLEET=/path/to/fleet scripts/bench-analytics.sh    # an existing fleet (read only)
set -euo pipefail
cd "$(dirname "$0")/.."
METERS=${METERS:-1000000}
DAYS=${DAYS:-31}
WORK=${WORK:-/var/tmp/meterflow-bench}
TARGET=${CARGO_TARGET_DIR:-target}
mkdir -p "$WORK"
command -v /usr/bin/time >/dev/null || { echo "needs /usr/bin/time (apt-get install time)"; exit 1; }

if [[ -z "${BIN:-}" ]]; then
  cargo build --release --quiet
  BIN="$TARGET/release/meterflow"
fi

# The fleet is only read: an existing one (FLEET) is never modified.
FLEET=${FLEET:-$WORK/fleet-$METERS-$DAYS}
if [[ ! -f "$FLEET/master/accounts.csv" ]]; then
  echo "generating fleet: $METERS meters x $DAYS days -> $FLEET"
  "$BIN" sim fleet --meters "$METERS" --days "$DAYS" --start 2026-10-01 --out "$FLEET"
fi
sync

# command... -> "wall_seconds peak_rss_mb" on stdout
measure() {
  local log
  log=$(mktemp)
  /usr/bin/time -f '%e %M' -o "$log" "$@" >/dev/null
  awk '{ printf "%.2f %d\n", $1, $2 / 1024 }' "$log"
  rm -f "$log"
}

RUNS="$WORK/analytics-runs-$METERS"
OUT="$WORK/analytics-out-$METERS"
rm -rf "$RUNS" "$OUT"
mkdir -p "$RUNS"
export RUST_LOG=warn
read -r t_bill m_bill < <(measure "$BIN" bill --lake "$FLEET" --master "$FLEET/master" --tariffs tariffs --period 2026-10 --out "$RUNS/2026-10")
read -r t_analyze m_analyze < <(measure "$BIN" analyze --lake "$FLEET" --master "$FLEET/master" --runs "$RUNS" --out "$OUT")
read -r t_report m_report < <(measure "$BIN" report "$RUNS/2026-10" --analytics "$OUT" --out "$WORK/report-$METERS.html")
read -r t_report_lake m_report_lake < <(measure "$BIN" report "$RUNS/2026-10" --lake "$FLEET" --out "$WORK/report-lake-$METERS.html")

ratio=$(echo "$t_analyze / $t_bill" | bc -l | xargs printf '%.2f')
printf '%-30s %s\n' "fleet" "$METERS meters x $DAYS days ($FLEET)"
printf '%-30s %9ss  %6s MB peak RSS\n' "bill run (meterflow bill)" "$t_bill" "$m_bill"
printf '%-30s %9ss  %6s MB peak RSS  (%sx the bill run; goal < 2x)\n' "analytics (meterflow analyze)" "$t_analyze" "$m_analyze" "$ratio"
printf '%-30s %9ss  %6s MB peak RSS  (goal < 10 s; --analytics OUT)\n' "report (meterflow report)" "$t_report" "$m_report"
printf '%-30s %9ss  %6s MB peak RSS  (scanning the lake itself)\n' "report --lake" "$t_report_lake" "$m_report_lake"
printf '%-30s %s\n' "analytics.json" "$OUT/analytics.json"
printf '%-30s %s\n' "report file" "$WORK/report-$METERS.html"
