#!/usr/bin/env bash
# MQTT ingest throughput against a discarding subscriber, same broker, same stream.
#
# For each message size in PERS (readings per message):
#   1. two persistent QoS 1 sessions subscribe to one topic filter: the
#      discarding subscriber's and the ingest's;
#   2. N readings are published once (canonical JSON, QoS 1): the broker
#      queues the identical stream for both sessions;
#   3. `meterflow mqtt discard` drains its queue (rumqttc, PUBACK on receipt);
#   4. `meterflow ingest mqtt` drains its queue into the lake (PUBACK only
#      after the fsynced spool write), stopping after the final Parquet commit.
# Both are timed from the first message received to the last message
# received (discard) / the final Parquet commit (ingest); the ratio compares
# them. Publishing is outside both timings, so the publisher's rate does not
# cap either consumer.
#
# By default a private mosquitto runs on a free loopback port with
# max_queued_messages 0 (unbounded queue: the default of 1000 would drop most
# of the backlog) and max_inflight_messages INFLIGHT (default 1000; mosquitto's
# default of 20 allows only 20 unacknowledged messages, which caps any
# ack-after-fsync consumer at 20 messages per fsync). MQTT_URL=... BROKER=external
# uses an existing broker instead: its limits then apply.
#
#   scripts/bench-mqtt.sh                       # N=1000000, PERS="4 100 1000"
#   N=200000 PERS=10 REPEAT=1 scripts/bench-mqtt.sh
#   BIN=target/release/meterflow INFLIGHT=20 scripts/bench-mqtt.sh
#   FLUSH=500000 scripts/bench-mqtt.sh          # larger lake segments
#
# Each size runs REPEAT times (default 3; each run a fresh pair of sessions)
# and the median ratio is printed last: on a shared 2-core machine single
# runs of the same binary vary by up to 1.8x.
#
# CPU seconds are printed too: the broker's while each consumer drains (private
# broker only, from /proc) and each consumer's own (user + system). When the
# cores are saturated, ingest's wall time is at least (broker CPU + ingest CPU)
# / cores, so the ingest CPU that a 0.8 ratio allows is
#   cores x discard_s / 0.8 - broker CPU while ingesting
# ("budget" below): the figure to compare ingest's CPU with.
set -euo pipefail

N=${N:-1000000}
PERS=${PERS:-"4 100 1000"}
METERS=${METERS:-1000}
INFLIGHT=${INFLIGHT:-1000}
REPEAT=${REPEAT:-3}
TIMEOUT=${TIMEOUT:-300}
# Readings per lake segment (ingest's `flush_readings`; its default is 200000).
FLUSH=${FLUSH:-200000}
BROKER=${BROKER:-private}
TARGET=${CARGO_TARGET_DIR:-target}
BIN=${BIN:-$TARGET/release/meterflow}

command -v /usr/bin/time >/dev/null || { echo "needs /usr/bin/time (apt-get install time)"; exit 1; }

if [[ ! -x "$BIN" ]]; then
  echo "building $BIN (release)..." >&2
  cargo build --release --bin meterflow >&2
fi

work=$(mktemp -d)
broker_pid=
cleanup() {
  [[ -n "$broker_pid" ]] && kill "$broker_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

if [[ "$BROKER" == private ]]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat > "$work/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 0
max_inflight_messages $INFLIGHT
log_dest stderr
CONF
  mosquitto -c "$work/mosquitto.conf" 2> "$work/mosquitto.log" &
  broker_pid=$!
  URL="mqtt://127.0.0.1:$port"
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  version=$(mosquitto -h 2>&1 | awk 'NR==1 {print $3}' || true)
  limits="private mosquitto $version, max_inflight_messages $INFLIGHT, max_queued_messages 0"
else
  URL=${MQTT_URL:-mqtt://127.0.0.1:1883}
  limits="external broker (its own limits)"
fi

echo "broker $URL ($limits); $N readings per run, $METERS meters, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
summary=()
cpus=()
medians=()
cores=$(nproc)
# Broker CPU seconds so far (user + system), or empty for an external broker.
broker_cpu() {
  [[ -n "$broker_pid" ]] || return 0
  awk -v t="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$broker_pid/stat"
}
for PER in $PERS; do
 ratios=()
 for rep in $(seq "$REPEAT"); do
  tag="bench-$$-$PER-$rep"
  msgs=$(( (N + PER - 1) / PER ))
  # 1. Both sessions exist (and subscribe) before anything is published.
  "$BIN" mqtt discard --url "$URL" --filter "$tag/#" --client-id "$tag-discard" \
    --persistent --subscribe-only > /dev/null
  "$BIN" mqtt discard --url "$URL" --filter "$tag/#" --client-id "$tag-ingest" \
    --persistent --subscribe-only > /dev/null
  # 2. One stream, queued for both.
  "$BIN" mqtt publish-sim --url "$URL" --topic "$tag/r" --readings "$N" \
    --meters "$METERS" --per-message "$PER" --client-id "$tag-pub" > "$work/pub.out"
  # 3. The discarding subscriber drains its queue.
  b0=$(broker_cpu)
  /usr/bin/time -f "%U %S" -o "$work/discard.cpu" "$BIN" mqtt discard --url "$URL" --filter "$tag/#" --client-id "$tag-discard" \
    --persistent --messages "$msgs" --idle-secs 20 > "$work/discard.out"
  b1=$(broker_cpu)
  d_secs=$(awk '/^discarded/ { for (i = 1; i <= NF; i++) if ($i == "s") print $(i-1) }' "$work/discard.out")
  bytes=$(awk '/^discarded/ { gsub(/\(/, "", $4); print $4 }' "$work/discard.out")
  # 4. Ingest drains the same stream into the lake.
  cat > "$work/ingest.toml" <<TOML
[mqtt]
url = "$URL"
client_id = "$tag-ingest"
[ingest]
flush_secs = 5
flush_readings = $FLUSH
[[source]]
name = "bench"
filter = "$tag/#"
format = "canonical"
TOML
  if ! /usr/bin/time -f "%U %S" -o "$work/ingest.cpu" timeout "$TIMEOUT" \
      "$BIN" --log warn ingest mqtt --config "$work/ingest.toml" \
      --out "$work/lake-$PER" --stop-after-readings "$N" > "$work/ingest.out"; then
    echo "ingest did not receive all $N readings within ${TIMEOUT}s" >&2
    exit 1
  fi
  b2=$(broker_cpu)
  i_secs=$(awk '/^mqtt ingest/ { for (i = 1; i <= NF; i++) if ($i == "s") print $(i-1) }' "$work/ingest.out")
  committed=$(awk '/^mqtt ingest/ { for (i = 1; i <= NF; i++) if ($i == "committed") print $(i-2) }' "$work/ingest.out")
  files=$(find "$work/lake-$PER/readings" -name '*.parquet' | wc -l)
  line=$(awk -v n="$N" -v per="$PER" -v m="$msgs" -v b="$bytes" -v d="$d_secs" -v i="$i_secs" -v c="$committed" -v f="$files" 'BEGIN {
    dr = n / d; ir = n / i;
    printf "%6d %8d %6.0f %10.0f %10.0f %6.2f   (%d committed, %d files; discard %.3f s, ingest %.3f s)",
      per, m, b / m, dr, ir, ir / dr, c, f, d, i;
  }')
  cpu=$(awk -v per="$PER" -v cores="$cores" -v d="$d_secs" -v b0="$b0" -v b1="$b1" -v b2="$b2" \
    -v dc="$(awk '{ print $1 + $2 }' "$work/discard.cpu")" \
    -v ic="$(awk '{ print $1 + $2 }' "$work/ingest.cpu")" 'BEGIN {
    if (b0 == "") {
      printf "%6d %10s %10.2f %10s %10.2f %10s", per, "-", dc, "-", ic, "-";
    } else {
      printf "%6d %10.2f %10.2f %10.2f %10.2f %10.2f", per, b1 - b0, dc, b2 - b1, ic, cores * d / 0.8 - (b2 - b1);
    }
  }')
  cpus+=("$cpu")
  echo "$(sed 's/^/  /' "$work/pub.out")"
  summary+=("$line")
  ratios+=("$(awk -v d="$d_secs" -v i="$i_secs" 'BEGIN { printf "%.2f", d / i }')")
  rm -rf "$work/lake-$PER"
 done
 medians+=("$(printf "%s\n" "${ratios[@]}" | sort -n | awk -v per="$PER" '{ a[NR] = $1 } END {
   printf "%6d  median ratio %.2f of %d runs (min %.2f, max %.2f)", per, a[int((NR + 1) / 2)], NR, a[1], a[NR] }')")
done

echo
printf "%6s %8s %6s %10s %10s %6s\n" "per" "messages" "bytes" "discard/s" "ingest/s" "ratio"
printf "%s\n" "${summary[@]}"
echo "(readings/s, first message received -> last message received / final Parquet commit)"
echo
echo "CPU seconds (user + system) while each consumer drains its queue:"
printf "%6s %10s %10s %10s %10s %10s\n" "per" "broker(d)" "discard" "broker(i)" "ingest" "budget"
printf "%s\n" "${cpus[@]}"
echo "(budget: the ingest CPU a 0.8 ratio allows on $cores cores, $cores x discard_s / 0.8 - broker(i); '-': external broker)"
if [[ "$REPEAT" -gt 1 ]]; then
  printf "%s\n" "${medians[@]}"
fi
