#!/usr/bin/env bash
# Prepayment performance:
#  * streaming: `meterflow stream` deductions/s on SQLite and on PostgreSQL
#    (readings published to Mosquitto by `meterflow mqtt publish-sim`, one
#    deduction per reading after each meter's first; goal >= 20,000/s on SQLite);
#  * batch: daily deductions (`prepay run`) for a fleet of prepaid accounts
#    over one day, printed beside the bill run (`bill`) time for the same
#    fleet (goal: no more than 1.5x), and again for a second day on the same
#    ledger (the nightly steady state: a cursor per meter, deductions stored).
# usage: scripts/bench-prepay.sh [ACCOUNTS] [STREAM_READINGS]   (default 1000000 200000)
# env: MF_BIN, BENCH_DIR, DAY2 (1: also the second day, the default), WORST (1: also an empty ledger), BROKER (private: own mosquitto; external: MQTT_URL), DATABASE_URL (postgres://postgres@127.0.0.1:5432/test)
set -euo pipefail
cd "$(dirname "$0")/.."
ACCOUNTS=${1:-1000000}
READINGS=${2:-200000}
METERS=1000
BROKER=${BROKER:-private}
DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
WORK=${BENCH_DIR:-/var/tmp/meterflow-bench}/prepay
# MF_BIN=path/to/meterflow skips the release build (e.g. a quick check with a debug binary).
if [ -z "${MF_BIN:-}" ]; then cargo build --release --quiet; fi
BIN=${MF_BIN:-${CARGO_TARGET_DIR:-/var/tmp/meterflow-target}/release/meterflow}
rm -rf "$WORK"; mkdir -p "$WORK/master"

# A private mosquitto with an unbounded queue (the default max_queued_messages
# 1000 drops a QoS 1 backlog the stream has not drained yet); BROKER=external
# uses MQTT_URL with that broker's own limits.
broker_pid=
trap '[[ -n "$broker_pid" ]] && kill "$broker_pid" 2>/dev/null || true' EXIT
if [[ "$BROKER" == private ]]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 1000\n' "$port" > "$WORK/mosquitto.conf"
  mosquitto -c "$WORK/mosquitto.conf" 2> "$WORK/mosquitto.log" &
  broker_pid=$!
  MQTT_URL="mqtt://127.0.0.1:$port"
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
else
  MQTT_URL=${MQTT_URL:-mqtt://127.0.0.1:1883}
fi

# ---------- streaming ----------
{
  echo "account_id,customer_class,tariff_id,payment_mode"
  for i in $(seq 0 $((METERS - 1))); do printf 'S%06d,residential,bj-residential-monthly,prepaid\n' "$i"; done
} > "$WORK/master/accounts.csv"
{
  echo "meter_id,account_id,ct_ratio,pt_ratio,installed_on"
  for i in $(seq 0 $((METERS - 1))); do printf 'SIM%06d,S%06d,1,1,2015-01-01\n' "$i" "$i"; done
} > "$WORK/master/meters.csv"
DEDUCTIONS=$((READINGS - METERS))
START_MS=1790800000000   # 2026-10-01T00:26:40Z: inside one bill month

stream_bench() { # $1 = label, $2 = ledger url
  local label=$1 ledger=$2 run=$RANDOM
  cat > "$WORK/stream-$run.toml" <<TOML
ledger = "$ledger"
master = "master"
tariffs = "$(pwd)/tariffs"
[mqtt]
url = "$MQTT_URL"
client_id = "bench-prepay-$run"
topic = "bench/prepay/$run"
[batch]
max_messages = 200
max_wait_ms = 20
TOML
  "$BIN" stream --config "$WORK/stream-$run.toml" --stop-after "$DEDUCTIONS" --idle-exit-secs 30 > "$WORK/stream-$run.out" 2> "$WORK/stream-$run.err" &
  local pid=$!
  for _ in $(seq 1 100); do grep -q "subscription confirmed" "$WORK/stream-$run.err" 2>/dev/null && break; sleep 0.1; done
  local t0; t0=$(date +%s.%N)
  "$BIN" mqtt publish-sim --url "$MQTT_URL" --topic "bench/prepay/$run" --readings "$READINGS" --meters "$METERS" \
    --per-message 100 --client-id "bench-pub-$run" --start-ms "$START_MS" > /dev/null
  wait "$pid"
  local t1; t1=$(date +%s.%N)
  local n; n=$(grep -o '[0-9]* deductions' "$WORK/stream-$run.out" | cut -d' ' -f1)
  printf 'stream %-10s %9d deductions in %6.2f s = %9.0f deductions/s\n' "$label" "$n" "$(echo "$t1 - $t0" | bc)" "$(echo "$n / ($t1 - $t0)" | bc -l)"
}
stream_bench sqlite "$WORK/stream.sqlite"
if "$BIN" ledger migrate --ledger "$DATABASE_URL?schema=bench_$$" > /dev/null 2>&1; then
  stream_bench postgres "$DATABASE_URL?schema=bench_$$"
else
  echo "stream postgres: skipped (no PostgreSQL at $DATABASE_URL)"
fi

# ---------- batch: one day of a prepaid fleet, beside the bill run ----------
# The ledger first gets the fleet's top-ups (master/payments.csv, timed on
# its own line), as a nightly run finds it; WORST=1 also runs the day on an
# empty ledger, where every account falls through 50, 20 and zero at once
# (about 3.6 alerts per account).
"$BIN" sim fleet --meters "$ACCOUNTS" --days 1 --prepaid-percent 100 --out "$WORK/fleet" > /dev/null
# Each timed command starts with the previous one's writes on disk, so that
# it is not charged for the kernel writing them back meanwhile.
sync
t0=$(date +%s.%N)
"$BIN" --log error bill --lake "$WORK/fleet" --master "$WORK/fleet/master" --tariffs tariffs \
  --period 2026-10-01..2026-10-02 --out "$WORK/bills" > /dev/null
t1=$(date +%s.%N)
"$BIN" --log error ledger import-payments --ledger "$WORK/batch.sqlite" "$WORK/fleet/master/payments.csv" > "$WORK/import.out" 2>&1
t2=$(date +%s.%N)
sync
t2s=$(date +%s.%N)
prepay_run() { # $1 = ledger, $2 = output
  "$BIN" --log error prepay run --ledger "$1" --lake "$WORK/fleet" --master "$WORK/fleet/master" --tariffs tariffs \
    --through 2026-10-01T24:00 --chunk 5000 > "$2" 2>&1
}
prepay_run "$WORK/batch.sqlite" "$WORK/prepay-run.out"
t3=$(date +%s.%N)
BILL=$(echo "$t1 - $t0" | bc); IMPORT=$(echo "$t2 - $t1" | bc); PREPAY=$(echo "$t3 - $t2s" | bc)
echo "batch: $ACCOUNTS accounts, one day"
printf '  bill run         %8.1f s\n' "$BILL"
printf '  import top-ups   %8.1f s  (%s)\n' "$IMPORT" "$(tail -1 "$WORK/import.out")"
printf '  prepay run       %8.1f s  (%.2fx the bill run; goal <= 1.5x)\n' "$PREPAY" "$(echo "$PREPAY / $BILL" | bc -l)"
echo "    $(cat "$WORK/prepay-run.out")"
# The steady state of a nightly run: a second day on a ledger that holds the
# first day's deductions and a cursor per meter (DAY2=0 skips it). The bill
# run and prepay run of day 2 read the same two partitions (the bill run's
# opening readings, the prepay run's 40-day window).
if [[ "${DAY2:-1}" == 1 ]]; then
  "$BIN" sim fleet --meters "$ACCOUNTS" --days 2 --prepaid-percent 100 --out "$WORK/fleet2" > /dev/null
  "$BIN" --log error ledger import-payments --ledger "$WORK/day2.sqlite" "$WORK/fleet2/master/payments.csv" > /dev/null 2>&1
  "$BIN" --log error prepay run --ledger "$WORK/day2.sqlite" --lake "$WORK/fleet2" --master "$WORK/fleet2/master" \
    --tariffs tariffs --through 2026-10-01T24:00 --chunk 5000 > /dev/null 2>&1
  sync
  t6=$(date +%s.%N)
  "$BIN" --log error bill --lake "$WORK/fleet2" --master "$WORK/fleet2/master" --tariffs tariffs \
    --period 2026-10-02..2026-10-03 --out "$WORK/bills2" > /dev/null
  t7=$(date +%s.%N)
  sync
  t7s=$(date +%s.%N)
  "$BIN" --log error prepay run --ledger "$WORK/day2.sqlite" --lake "$WORK/fleet2" --master "$WORK/fleet2/master" \
    --tariffs tariffs --through 2026-10-02T24:00 --chunk 5000 > "$WORK/prepay-day2.out" 2>&1
  t8=$(date +%s.%N)
  BILL2=$(echo "$t7 - $t6" | bc); PREPAY2=$(echo "$t8 - $t7s" | bc)
  echo "batch: $ACCOUNTS accounts, the second day (first day deducted)"
  printf '  bill run, day 2  %8.1f s\n' "$BILL2"
  printf '  prepay run, day 2 %7.1f s  (%.2fx the bill run; goal <= 1.5x)\n' "$PREPAY2" "$(echo "$PREPAY2 / $BILL2" | bc -l)"
  echo "    $(head -1 "$WORK/prepay-day2.out")"
fi
if [[ "${WORST:-0}" == 1 ]]; then
  sync
  t4=$(date +%s.%N)
  prepay_run "$WORK/empty.sqlite" "$WORK/prepay-empty.out"
  t5=$(date +%s.%N)
  W=$(echo "$t5 - $t4" | bc)
  printf '  prepay run, no top-ups %8.1f s  (%.2fx the bill run)\n' "$W" "$(echo "$W / $BILL" | bc -l)"
  echo "    $(cat "$WORK/prepay-empty.out")"
fi
