#!/usr/bin/env bash
# MQTT ingest throughput: publish N readings at QoS 1 to the broker and
# measure (1) a subscriber that discards them and (2) `meterflow ingest mqtt`
# writing them into committed Parquet. Prints both rates and their ratio.
#
# Mosquitto drops QoS 1 messages queued for a subscriber beyond
# max_queued_messages (default 1000): keep N/PER at or below that, or raise
# it in mosquitto.conf, or the ingest run stalls (TIMEOUT) short of N.
#
#   scripts/bench-mqtt.sh                 # N=1000000, 1000 readings per message
#   N=200000 PER=200 scripts/bench-mqtt.sh
#   MQTT_URL=mqtt://127.0.0.1:1883 BIN=target/release/meterflow scripts/bench-mqtt.sh
set -euo pipefail

N=${N:-1000000}
PER=${PER:-1000}
TIMEOUT=${TIMEOUT:-120}
METERS=${METERS:-1000}
URL=${MQTT_URL:-mqtt://127.0.0.1:1883}
TARGET=${CARGO_TARGET_DIR:-target}
BIN=${BIN:-$TARGET/release/meterflow}

if [[ ! -x "$BIN" ]]; then
  echo "building $BIN (release)..." >&2
  cargo build --release --bin meterflow >&2
fi

work=$(mktemp -d)
tag="bench-$$-$(date +%s)"
cleanup() { [[ -n "${ingest_pid:-}" ]] && kill "$ingest_pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

msgs=$(( (N + PER - 1) / PER ))
echo "broker $URL: $N readings, $PER per message ($msgs messages), $METERS meters"

# 1. Baseline: the broker delivering the stream to a subscriber that discards it.
"$BIN" mqtt discard --url "$URL" --filter "$tag/discard/#" --messages "$msgs" \
  --client-id "$tag-discard" --idle-secs 10 > "$work/discard.out" &
discard_pid=$!
sleep 1
"$BIN" mqtt publish-sim --url "$URL" --topic "$tag/discard/r" --readings "$N" \
  --meters "$METERS" --per-message "$PER" --client-id "$tag-pub1" > "$work/pub1.out"
wait "$discard_pid"
d_secs=$(awk '/^discarded/ { print $(NF-1) }' "$work/discard.out")

# 2. Ingest into the lake, committed to Parquet (the timer stops after the final commit).
cat > "$work/ingest.toml" <<TOML
[mqtt]
url = "$URL"
client_id = "$tag-ingest"
[ingest]
flush_secs = 5
flush_readings = 500000
[[source]]
name = "bench"
filter = "$tag/ingest/#"
format = "canonical"
TOML
timeout "$TIMEOUT" "$BIN" --log warn ingest mqtt --config "$work/ingest.toml" --out "$work/lake" \
  --stop-after-readings "$N" > "$work/ingest.out" &
ingest_pid=$!
sleep 1
"$BIN" mqtt publish-sim --url "$URL" --topic "$tag/ingest/r" --readings "$N" \
  --meters "$METERS" --per-message "$PER" --client-id "$tag-pub2" > "$work/pub2.out"
if ! wait "$ingest_pid"; then
  ingest_pid=
  echo "ingest did not receive all $N readings within ${TIMEOUT}s: did the broker drop" >&2
  echo "messages (mosquitto max_queued_messages)? Try a larger PER or a smaller N." >&2
  exit 1
fi
ingest_pid=
i_secs=$(awk '/^mqtt ingest/ { for (i = 1; i <= NF; i++) if ($i == "s") print $(i-1) }' "$work/ingest.out")
files=$(find "$work/lake/readings" -name '*.parquet' | wc -l)

awk -v n="$N" -v d="$d_secs" -v i="$i_secs" -v f="$files" 'BEGIN {
  dr = n / d; ir = n / i;
  printf "discarding subscriber: %10.0f readings/s (%.3f s)\n", dr, d;
  printf "ingest to Parquet:     %10.0f readings/s (%.3f s, %d files)\n", ir, i, f;
  printf "ratio ingest/discard:  %10.2f\n", ir / dr;
}'
