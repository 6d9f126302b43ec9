"""Reads a bill run's outputs with DuckDB, pyarrow and polars and prints, per
engine, the sum and the count of values of each decimal column meterflow
writes itself (docs/data-model.md): the test compares them with its own.

    .venv/bin/python scripts/outputs_check.py RUN_DIR
"""
import sys

import duckdb
import polars as pl
import pyarrow.compute as pc
import pyarrow.parquet as pq

COLUMNS = [
    ("bills", "kwh"),
    ("bills", "ytd_kwh_before"),
    ("bills", "max_demand_kw"),
    ("bill_lines", "quantity"),
    ("arrears", "credit"),
    ("arrears", "paid_sum"),
]

run = sys.argv[1]
for engine in ["duckdb", "pyarrow", "polars"]:
    out = []
    for f, c in COLUMNS:
        p = f"{run}/{f}.parquet"
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
