#!/usr/bin/env bash
# Bill-run benchmark: `meterflow bill` against an equivalent DuckDB query on
# the standard fleet (1,000,000 meters x 31 days x 5 registers by default).
# Prints both wall times, the ratio (target <= 0.2), both peak RSS (target
# <= 1.5 GB for meterflow) and checks that DuckDB's DECIMAL totals equal
# meterflow's on the accounts both compute (single meter, tiered and TOU
# tariffs, no estimated boundary).
#
#   scripts/bench-bill.sh                 # 1M meters
#   METERS=10000 scripts/bench-bill.sh    # quick
#   BIN=path/to/meterflow scripts/bench-bill.sh   # skip the release build
set -euo pipefail
cd "$(dirname "$0")/.."
METERS=${METERS:-1000000}
DAYS=${DAYS:-31}
WORK=${WORK:-/var/tmp/meterflow-bench}
TARGET=${CARGO_TARGET_DIR:-target}
mkdir -p "$WORK"

bash scripts/venv.sh >/dev/null
PY=.venv/bin/python
command -v /usr/bin/time >/dev/null || { echo "needs /usr/bin/time (apt-get install time)"; exit 1; }

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

RUN="$WORK/run-$METERS"
rm -rf "$RUN"
/usr/bin/time -v -o "$WORK/meterflow.time" \
  "$BIN" bill --lake "$FLEET" --master "$FLEET/master" --tariffs tariffs --period 2026-10 --out "$RUN" --json \
  > "$WORK/meterflow.json"

rm -f "$WORK/duckdb_bills.parquet"
cat > "$WORK/duckdb_bill.py" <<'PYEOF'
import sys, time, duckdb
fleet, run, out = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.time()
con = duckdb.connect()
start, end = "2026-09-30 16:00:00+00", "2026-10-31 16:00:00+00"   # local midnights (UTC+8)
con.execute(f"""
COPY (
WITH b AS (
  SELECT meter_id, channel,
         max(value) FILTER (WHERE ts = TIMESTAMPTZ '{start}') AS v0,
         max(value) FILTER (WHERE ts = TIMESTAMPTZ '{end}')   AS v1
  FROM read_parquet('{fleet}/readings/*/*.parquet')
  WHERE channel IN ('import_active_total','import_active_t1','import_active_t2','import_active_t3','import_active_t4')
    AND ts BETWEEN TIMESTAMPTZ '{start}' AND TIMESTAMPTZ '{end}'
  GROUP BY ALL),
d AS (SELECT meter_id, channel,
             CASE WHEN v1 >= v0 THEN v1 - v0 ELSE v1 + 1000000 - v0 END AS reg
      FROM b WHERE v0 IS NOT NULL AND v1 IS NOT NULL),
m AS (SELECT meter_id, account_id, CAST(ct_ratio AS DECIMAL(18,4)) * CAST(pt_ratio AS DECIMAL(18,4)) AS mult
      FROM read_csv('{fleet}/master/meters.csv', all_varchar = true)),
single AS (SELECT account_id FROM m GROUP BY account_id HAVING count(*) = 1),
a AS (SELECT account_id, tariff_id FROM read_csv('{fleet}/master/accounts.csv', all_varchar = true)),
u AS (
  SELECT m.account_id, a.tariff_id,
         sum(reg * mult) FILTER (WHERE channel = 'import_active_total') AS tot,
         sum(reg * mult) FILTER (WHERE channel = 'import_active_t1') AS t1,
         sum(reg * mult) FILTER (WHERE channel = 'import_active_t2') AS t2,
         sum(reg * mult) FILTER (WHERE channel = 'import_active_t3') AS t3,
         sum(reg * mult) FILTER (WHERE channel = 'import_active_t4') AS t4
  FROM d JOIN m USING (meter_id) JOIN a USING (account_id)
  WHERE m.account_id IN (SELECT account_id FROM single)
  GROUP BY ALL)
SELECT account_id, tariff_id,
  CASE tariff_id
    WHEN 'bj-residential-monthly' THEN
        round(least(tot, 240) * 0.4783, 2)
      + round(least(greatest(tot - 240, 0), 160) * 0.5283, 2)
      + round(greatest(tot - 400, 0) * 0.7783, 2)
      + round(tot * 0.0023, 2) + round(tot * 0.0062, 2) + round(tot * 0.001, 2) + round(tot * 0.0005, 2)
    WHEN 'gd-tou-commercial' THEN
        round(t1 * 1.35995, 2) + round(t2 * 1.0837, 2) + round(t3 * 0.6287, 2) + round(t4 * 0.2257, 2)
      + round((t1 + t2 + t3 + t4) * 0.0023, 2) + round((t1 + t2 + t3 + t4) * 0.019, 2)
  END AS total
FROM u WHERE tariff_id IN ('bj-residential-monthly', 'gd-tou-commercial')
ORDER BY account_id
) TO '{out}' (FORMAT parquet)
""")
elapsed = time.time() - t0
cmp = con.execute(f"""
SELECT count(*), sum(d.total), sum(b.total), count(*) FILTER (WHERE d.total <> b.total)
FROM read_parquet('{out}') d JOIN read_parquet('{run}/bills.parquet') b USING (account_id)
WHERE NOT b.estimated AND b.flags NOT LIKE '%meter_exchange%'
""").fetchone()
print(f"{elapsed:.3f} {cmp[0]} {cmp[1]} {cmp[2]} {cmp[3]}")
PYEOF
/usr/bin/time -v -o "$WORK/duckdb.time" "$PY" "$WORK/duckdb_bill.py" "$FLEET" "$RUN" "$WORK/duckdb_bills.parquet" > "$WORK/duckdb.out"

wall() { awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,p,":"); s=0; for(i=1;i<=n;i++) s=s*60+p[i]; print s}' "$1"; }
rss_mb() { awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2/1024}' "$1"; }
MF_S=$(wall "$WORK/meterflow.time")
DK_S=$(wall "$WORK/duckdb.time")
read -r DK_QUERY N DK_SUM MF_SUM DIFF < "$WORK/duckdb.out"
echo "fleet:      $METERS meters x $DAYS days ($FLEET)"
echo "meterflow:  ${MF_S} s wall, peak RSS $(rss_mb "$WORK/meterflow.time") MB"
echo "duckdb:     ${DK_S} s wall (query ${DK_QUERY} s), peak RSS $(rss_mb "$WORK/duckdb.time") MB"
echo "ratio:      $(awk -v a="$MF_S" -v b="$DK_S" 'BEGIN { printf "%.3f", a / b }') (meterflow / duckdb; target <= 0.2)"
echo "totals:     $N accounts compared; duckdb $DK_SUM, meterflow $MF_SUM, $DIFF differing"
if [[ "$DIFF" != "0" || "$DK_SUM" != "$MF_SUM" ]]; then
  echo "MISMATCH: DuckDB's DECIMAL totals differ from meterflow's"
  exit 1
fi
echo "totals equal to the fen"
