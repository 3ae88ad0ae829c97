"""``import-ooni --out DIR``: the import's rows as Parquet, for analysis elsewhere (pandas, DuckDB,
Spark), instead of a kzprobe database.

Two tables, each a folder of Parquet files that any engine reads as one dataset:

- ``verdicts/``: one row per measurement and target: the measurement's key, file and line, input,
  start time, probe country/ASN/network, OONI's own ``blocking``, and kzprobe's verdict (status,
  mechanism, detail, rule, confidence, sentence, and the evidence as positions in ``observations``);
- ``observations/``: one row per step, keyed by (``key``, ``seq``), ``data`` as JSON text.

There is no de-duplication here (that needs the whole key set; a database has it, a folder of
files does not): de-duplicate downstream on ``key``, which is stable across imports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kzprobe.storage.columns import OBS_COLUMNS

if TYPE_CHECKING:
    from kzprobe.ooni.pipeline import Row

#: Rows buffered per table before a row group is written (a few MB).
GROUP_ROWS = 20_000
#: Rows per file before the next file is started (files stay easy to move and split).
FILE_ROWS = 1_000_000


class ParquetSink:
    """Writes batches of rows as they come; ``close()`` flushes."""

    def __init__(self, out: Path) -> None:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ImportError("--out needs pyarrow: install kzprobe[scale]") from None
        self.out = out
        import pyarrow as pa

        text, f64, i64 = pa.string(), pa.float64(), pa.int64()
        verdicts = pa.schema([
            ("key", text), ("file", text), ("input", text), ("started", f64), ("ended", f64), ("probe_cc", text),
            ("probe_asn", text), ("probe_network_name", text), ("ooni_blocking", text), ("status", text),
            ("mechanism", text), ("detail", text), ("rule", text), ("confidence", f64), ("sentence", text),
            ("evidence", pa.list_(i64))])
        # The observation model's columns, in storage's order (data and packets as JSON text).
        types = {"port": i64, "t_start": f64, "t_end": f64, "attempt": i64}
        observations = pa.schema([("key", text), ("seq", i64), *((c, types.get(c, text)) for c in OBS_COLUMNS)])
        self._tables: dict[str, _Table] = {"verdicts": _Table(out / "verdicts", verdicts),
                                            "observations": _Table(out / "observations", observations)}

    def write(self, rows: list[Row]) -> list[tuple[int, Row, list[dict[str, Any]]]]:
        verdicts, observations = self._tables["verdicts"], self._tables["observations"]
        for r in rows:
            for v in r.verdicts:
                verdicts.add({
                    "key": r.key, "file": r.where, "input": r.input, "started": r.started, "ended": r.ended,
                    "probe_cc": r.vantage.get("probe_cc"), "probe_asn": r.vantage.get("probe_asn"),
                    "probe_network_name": r.vantage.get("probe_network_name"),
                    "ooni_blocking": json.dumps(r.options.get("ooni_blocking")),
                    "status": v["status"], "mechanism": v.get("mechanism"), "detail": v.get("detail"),
                    "rule": v["rule"], "confidence": float(v["confidence"]), "sentence": v["sentence"],
                    "evidence": list(v.get("observations") or []),
                })
            for seq, values in enumerate(r.observations, 1):
                row = dict(zip(OBS_COLUMNS, values, strict=True))
                row.update(key=r.key, seq=seq)
                observations.add(row)
        return [(0, r, r.verdicts) for r in rows]

    def close(self) -> None:
        for t in self._tables.values():
            t.close()


class _Table:
    def __init__(self, folder: Path, schema: Any) -> None:
        self.folder = folder
        self.buffer: list[dict[str, Any]] = []
        self.writer: Any = None
        self.schema = schema
        self.rows_in_file = 0
        self.files = 0

    def add(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(self.buffer, schema=self.schema)
        if self.writer is None or self.rows_in_file >= FILE_ROWS:
            if self.writer is not None:
                self.writer.close()
            self.folder.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.folder / f"part-{self.files:05d}.parquet", self.schema,
                                           compression="zstd")
            self.files += 1
            self.rows_in_file = 0
        self.writer.write_table(table)
        self.rows_in_file += len(self.buffer)
        self.buffer = []

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
