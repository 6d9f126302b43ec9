#!/usr/bin/env python3
"""Reads a meterflow lake with DuckDB, pyarrow and polars and checks that row
counts, decimal values, timestamps and the Hive partition column come out
exactly as written (compared with an expected CSV written by the Rust test).

usage: interop_check.py LAKE_DIR EXPECTED_CSV
"""
import csv
import sys
from decimal import Decimal

lake, expected_path = sys.argv[1], sys.argv[2]
glob = f"{lake}/readings/*/*.parquet"
with open(expected_path) as f:
    expected = sorted(
        (r["meter_id"], int(r["ts_ms"]), r["date"], Decimal(r["value"]), r["quality"])
        for r in csv.DictReader(f)
    )
failed = False


def check(engine, rows):
    global failed
    rows = sorted(rows)
    if rows == expected:
        print(f"{engine}: ok ({len(rows)} rows)")
    else:
        failed = True
        print(f"{engine}: MISMATCH")
        for a, b in zip(rows, expected):
            if a != b:
                print(f"  got      {a}\n  expected {b}")
        if len(rows) != len(expected):
            print(f"  got {len(rows)} rows, expected {len(expected)}")


def ms(dt):
    # exact integer milliseconds from a timezone-aware datetime
    import datetime
    delta = dt - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    return (delta.days * 86400 + delta.seconds) * 1000 + delta.microseconds // 1000


import duckdb

con = duckdb.connect()
con.execute("SET TimeZone='UTC'")
res = con.execute(
    f"""SELECT meter_id, epoch_ms(ts) AS ts_ms, CAST(date AS VARCHAR), value, quality,
               typeof(value) AS vt
        FROM read_parquet('{glob}', hive_partitioning = true)"""
).fetchall()
assert all(r[5] == "DECIMAL(18,4)" for r in res), {r[5] for r in res}
check("duckdb", [(r[0], int(r[1]), r[2], Decimal(r[3]), r[4]) for r in res])

import pyarrow as pa
import pyarrow.dataset as ds

t = ds.dataset(f"{lake}/readings", format="parquet", partitioning="hive").to_table()
assert t.schema.field("value").type == pa.decimal128(18, 4), t.schema.field("value").type
assert t.schema.field("ts").type == pa.timestamp("ms", tz="UTC"), t.schema.field("ts").type
d = t.to_pydict()
check(
    "pyarrow",
    [
        (m, ms(ts), str(dt), v, q)
        for m, ts, dt, v, q in zip(d["meter_id"], d["ts"], d["date"], d["value"], d["quality"])
    ],
)

import polars as pl

df = pl.read_parquet(glob, hive_partitioning=True)
assert df.schema["value"] == pl.Decimal(18, 4), df.schema["value"]
rows = []
for r in df.iter_rows(named=True):
    rows.append((r["meter_id"], ms(r["ts"]), str(r["date"]), Decimal(r["value"]), r["quality"]))
check("polars", rows)

sys.exit(1 if failed else 0)
