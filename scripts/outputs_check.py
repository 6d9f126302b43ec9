"""Reads a bill run's columns with DuckDB, pyarrow and polars and prints, per
engine, each decimal column's sum and count of values, and each text
column's count of values, distinct values, least and greatest (the test
compares them with meterflow's own reading).

    .venv/bin/python scripts/outputs_check.py RUN_DIR FILE.COLUMN...
    e.g. ... runs/2026-10 bills.kwh bill_lines.quantity
"""
import sys

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

run = sys.argv[1]
COLUMNS = [a.split(".", 1) for a in sys.argv[2:]]
for engine in ["duckdb", "pyarrow", "polars"]:
    out = []
    for f, c in COLUMNS:
        p = f"{run}/{f}.parquet"
        if pa.types.is_string(pq.read_schema(p).field(c).type):
            if engine == "duckdb":
                n, d, lo, hi = duckdb.sql(
                    f"select count({c}), count(distinct {c}), min({c}), max({c}) "
                    f"from read_parquet('{p}')"
                ).fetchall()[0]
            elif engine == "pyarrow":
                a = pq.read_table(p, columns=[c])[c]
                n, d = len(a) - a.null_count, len(pc.unique(a.drop_null()))
                mm = pc.min_max(a)
                lo, hi = mm["min"].as_py(), mm["max"].as_py()
            else:
                col = pl.read_parquet(p, columns=[c])[c]
                n, d = len(col) - col.null_count(), col.drop_nulls().n_unique()
                lo, hi = col.min(), col.max()
            out.append(f"{f}.{c}={n}/{d}/{lo}/{hi}")
            continue
        if engine == "duckdb":
            s, n = duckdb.sql(
                f"select sum({c})::varchar, count({c}) from read_parquet('{p}')"
            ).fetchall()[0]
        elif engine == "pyarrow":
            a = pq.read_table(p, columns=[c])[c]
            s, n = pc.sum(a).as_py(), len(a) - a.null_count
        else:
            col = pl.read_parquet(p, columns=[c])[c]
            s, n = col.sum(), len(col) - col.null_count()
        out.append(f"{f}.{c}={s if s is not None and n else 0}/{n}")
    print(engine, " ".join(out))
