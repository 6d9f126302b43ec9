#!/usr/bin/env bash
# Bill-run scaling: the same binary bills the 1M and the 10M fleet
# (1,000,000 and 10,000,000 meters x 31 days), alternating, and prints each
# wall time and peak RSS, the 10M / 1M time ratio (target <= 11) and the 10M
# peak (target <= 4 GB). The 10M fleet is 7.2 GB of readings and 3.1 GB of
# master data, and takes 6 to 12 minutes to generate on 2 cores.
#
#   scripts/bench-bill-scale.sh                      # one round
#   ROUNDS=2 scripts/bench-bill-scale.sh             # 1M, 10M, 1M, 10M
#   SMALL=100000 LARGE=1000000 scripts/bench-bill-scale.sh   # quick
#   BIN=path/to/meterflow scripts/bench-bill-scale.sh         # skip the build
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL=${SMALL:-1000000}
LARGE=${LARGE:-10000000}
DAYS=${DAYS:-31}
ROUNDS=${ROUNDS:-1}
WORK=${WORK:-/var/tmp/meterflow-bench}
TARGET=${CARGO_TARGET_DIR:-target}
mkdir -p "$WORK"
command -v /usr/bin/time >/dev/null || { echo "needs /usr/bin/time (apt-get install time)"; exit 1; }

if [[ -z "${BIN:-}" ]]; then
  cargo build --release --quiet
  BIN="$TARGET/release/meterflow"
fi

fleet() {
  local dir="$WORK/fleet-$1-$DAYS"
  if [[ ! -f "$dir/master/accounts.csv" ]]; then
    echo "generating fleet: $1 meters x $DAYS days -> $dir" >&2
    "$BIN" sim fleet --meters "$1" --days "$DAYS" --start 2026-10-01 --out "$dir" >&2
  fi
  echo "$dir"
}

wall() { awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,p,":"); s=0; for(i=1;i<=n;i++) s=s*60+p[i]; print s}' "$1"; }
rss_mb() { awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2/1024}' "$1"; }

# Bills fleet $1 into $WORK/scale-run-$1; prints "seconds peak_mb passes".
bill() {
  local dir run
  dir=$(fleet "$1")
  run="$WORK/scale-run-$1"
  rm -rf "$run"
  sync
  /usr/bin/time -v -o "$WORK/scale-$1.time" \
    "$BIN" bill --lake "$dir" --master "$dir/master" --tariffs tariffs --period 2026-10 --out "$run" --json \
    > "$WORK/scale-$1.json"
  local passes
  passes=$(awk -F': ' '/"passes"/ {gsub(/[ ,]/, "", $2); print $2}' "$WORK/scale-$1.json")
  echo "$(wall "$WORK/scale-$1.time") $(rss_mb "$WORK/scale-$1.time") $passes"
}

fleet "$SMALL" >/dev/null
fleet "$LARGE" >/dev/null
small=()
large=()
for ((r = 1; r <= ROUNDS; r++)); do
  read -r s s_mb s_p <<< "$(bill "$SMALL")"
  read -r l l_mb l_p <<< "$(bill "$LARGE")"
  small+=("$s")
  large+=("$l")
  echo "round $r: $SMALL meters ${s} s (peak ${s_mb} MB, $s_p pass(es)); $LARGE meters ${l} s (peak ${l_mb} MB, $l_p passes)"
  echo "         ratio $(awk -v a="$l" -v b="$s" 'BEGIN { printf "%.2f", a / b }') (target <= 11); large peak ${l_mb} MB (target <= 4096)"
done
mean() { printf '%s\n' "$@" | awk '{s+=$1} END {printf "%.2f", s/NR}'; }
echo "mean:    $SMALL meters $(mean "${small[@]}") s; $LARGE meters $(mean "${large[@]}") s; ratio $(awk -v a="$(mean "${large[@]}")" -v b="$(mean "${small[@]}")" 'BEGIN { printf "%.2f", a / b }')"
