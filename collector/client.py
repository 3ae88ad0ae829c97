"""The volunteer's uploader: every run and observation the collector has not acknowledged.

The local database is the queue.  ``uploads`` keeps, per (run, collector), the highest
observation id the collector acknowledged; observations go in id order, each batch one
idempotent request keyed by (run uid, seq = local observation id).  Whatever kills the uploader
(Ctrl-C, kill -9, a collector that dies mid-batch), the next upload asks the collector what it
has (opening a run returns its highest stored seq) and sends the rest: nothing is lost, nothing
is stored twice.  Measuring never depends on any of this (offline first).

Retries: connection errors, 429 and 5xx wait ``Retry-After`` when the collector says so, else
exponential backoff with full jitter (a crowd of volunteers does not come back in step).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from kzprobe import __version__
from kzprobe.storage import Store
from kzprobe.storage.classifier import classifier_version
from kzprobe.storage.models import ObservationRow, RunRow, TargetRow, UploadRow

TOKEN_ENV = "KZPROBE_UPLOAD_TOKEN"
#: An observation's columns as sent (``seq`` is the local id; ``run_id`` and ``seq`` are not sent).
_OBS_WIRE_COLUMNS = tuple(c for c in ObservationRow.__table__.columns.keys() if c not in ("id", "run_id", "seq"))
_PLAIN_WIRE_COLUMNS = tuple(c for c in _OBS_WIRE_COLUMNS if c not in ("data", "packets"))
#: A batch from a SQLite queue.  "+run_id": walk the primary key from the last acknowledged id on;
#: otherwise SQLite picks the (run_id, target) index and sorts the whole run for every batch, which
#: is quadratic in the run's size.
SQLITE_BATCH = (f"SELECT id, {', '.join(_PLAIN_WIRE_COLUMNS)}, data, packets FROM observations "
                "WHERE +run_id = ? AND id > ? ORDER BY id LIMIT ?")
FINAL_STATES = ("done", "interrupted", "deadline", "failed")


class UploadError(Exception):
    """An upload that cannot go on now; the message is one line."""


class TokenRefused(UploadError):
    pass


class Unreachable(UploadError):
    """The collector did not answer usefully within the retries: try again later."""


class Rejected(UploadError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Options:
    url: str
    token: str
    batch: int = 1000
    max_tries: int = 8
    base_delay: float = 0.5
    max_delay: float = 60.0
    timeout: float = 60.0
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)


@dataclass
class RunStatus:
    run_id: int
    uid: str
    state: str
    observations: int
    acked: int  # observations acknowledged
    closed: bool

    @property
    def pending(self) -> int:
        return self.observations - self.acked


@dataclass
class Report:
    runs: int = 0
    sent: int = 0
    stored: int = 0
    duplicates: int = 0
    closed: int = 0
    problems: list[str] = field(default_factory=list)


def collector_key(url: str) -> str:
    return url.rstrip("/")


def retry_after(value: str | None, cap: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), capped; None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), cap)
    try:
        return min(max(0.0, parsedate_to_datetime(value).timestamp() - time.time()), cap)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class Uploader:
    def __init__(self, store: Store, opts: Options) -> None:
        import httpx

        self.store, self.opts = store, opts
        self.key = collector_key(opts.url)
        self.http = httpx.Client(base_url=self.key, timeout=opts.timeout, trust_env=False,
                                 headers={"authorization": f"Bearer {opts.token}",
                                          "content-type": "application/json",
                                          "user-agent": f"kzprobe/{__version__}"})

    def close(self) -> None:
        self.http.close()

    # --- HTTP with retries ---------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                timeout: float | None = None, content: bytes | None = None) -> dict[str, Any]:
        import httpx

        if body is not None:
            content = _dumps(body)
        reason = ""
        for attempt in range(self.opts.max_tries):
            delay: float | None = None
            try:
                r = self.http.request(method, path, content=content, timeout=timeout or self.opts.timeout)
            except httpx.TransportError as exc:  # refused, reset, timeout: the collector may be restarting
                reason = f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:120] or 'no answer'}"
            else:
                if r.status_code == 200:
                    try:
                        answer = r.json()
                    except ValueError:
                        answer = None
                    if isinstance(answer, dict):
                        return answer
                    reason = "the answer is not a JSON object"
                else:
                    message = _error_of(r)
                    if r.status_code == 401:
                        raise TokenRefused(f"{self.key}: token refused (401): {message}")
                    if r.status_code in (429, 503) or r.status_code >= 500:
                        reason = f"HTTP {r.status_code}: {message}"
                        delay = retry_after(r.headers.get("retry-after"), max(self.opts.max_delay, 1.0) * 10)
                    else:
                        raise Rejected(r.status_code, f"{self.key}{path}: HTTP {r.status_code}: {message}")
            if attempt + 1 < self.opts.max_tries:
                if delay is None:  # full jitter: uniform in [0, base * 2^attempt], capped
                    delay = self.opts.rng.uniform(0, min(self.opts.max_delay, self.opts.base_delay * 2**attempt))
                self.opts.sleep(delay)
        raise Unreachable(f"{self.key}: no answer after {self.opts.max_tries} tries ({reason})")

    # --- the queue -----------------------------------------------------------------------------
    def _record(self, run_id: int, **fields: Any) -> None:
        for attempt in range(2):
            try:
                with self.store.session() as s, s.begin():
                    row = s.scalars(select(UploadRow).where(UploadRow.run_id == run_id,
                                                            UploadRow.collector == self.key)).first()
                    if row is None:
                        row = UploadRow(run_id=run_id, collector=self.key, acked_seq=0, opened=False,
                                        closed=False)
                        s.add(row)
                    for k, v in fields.items():
                        setattr(row, k, v)
                    row.updated = time.time()
                return
            except IntegrityError:
                # Another uploader of this database (run --upload's background upload, still
                # retrying, and a `kzprobe upload` started by hand) created the queue row between
                # our read and our insert: read it again and update it.  Seen in CI as a crash.
                if attempt:
                    raise

    def _open_body(self, run: RunRow) -> dict[str, Any]:
        with self.store.session() as s:
            targets = [{"url": u, "category": c or ""} for u, c in s.execute(
                select(TargetRow.url, TargetRow.category).where(TargetRow.run_id == run.id)
                .order_by(TargetRow.position, TargetRow.id))]
        v = run.vantage or {}
        vantage: dict[str, Any] = {k: (str(v[k]) if v.get(k) is not None else None)
                                   for k in ("network_name", "asn", "country")}
        if "no_network" in v:
            vantage["no_network"] = bool(v["no_network"])
        opts = run.options or {}
        # Whether a control was configured (the classifier's context), never the helpers' URLs.
        vantage["control_configured"] = bool(opts.get("helpers") or opts.get("doh"))
        # Only what the collector's schema allows: never the resolvers (addresses) or options.
        return {"uid": run.uid, "software": run.software, "software_version": run.software_version,
                "classifier_version": classifier_version(), "source": run.source, "started": run.started,
                "vantage": vantage, "targets": targets}

    def _batch(self, run_id: int, after: int, limit: int) -> tuple[bytes, int, int]:
        """The next batch's body after ``after``: (JSON body, observations, last seq); (b"", 0, 0)
        when there are none."""
        if self.store.engine.dialect.name == "sqlite":
            return self._sqlite_batch(run_id, after, limit)
        cols = [c for c in ObservationRow.__table__.columns.keys() if c not in ("run_id", "seq")]
        with self.store.session() as s:
            rows = s.execute(select(*[getattr(ObservationRow, c) for c in cols])
                             .where(ObservationRow.run_id == run_id, ObservationRow.id > after)
                             .order_by(ObservationRow.id).limit(limit)).all()
        out = []
        for r in rows:
            d = dict(zip(cols, r, strict=True))
            d["seq"] = d.pop("id")
            out.append(d)
        if not out:
            return b"", 0, 0
        return _dumps({"observations": out}), len(out), int(out[-1]["seq"])

    def _sqlite_batch(self, run_id: int, after: int, limit: int) -> tuple[bytes, int, int]:
        # The hot path of a large upload: the JSON columns are sent as the text they are stored as
        # (SQLAlchemy's JSON type wrote them with json.dumps), not decoded and encoded again, and
        # the other columns are encoded in one call per row.  Half of the uploader's time before.
        with self.store.engine.connect() as c:
            rows = c.exec_driver_sql(SQLITE_BATCH, (run_id, after, limit)).fetchall()
        if not rows:
            return b"", 0, 0
        keys = ("seq", *_PLAIN_WIRE_COLUMNS)
        n = len(keys)
        parts = []
        for r in rows:
            head = json.dumps(dict(zip(keys, r[:n], strict=True)), ensure_ascii=False, separators=(",", ":"))
            parts.append(f'{head[:-1]},"data":{r[n] or "null"},"packets":{r[n + 1] or "null"}}}')
        return ('{"observations":[' + ",".join(parts) + "]}").encode(), len(rows), int(rows[-1][0])

    def upload_run(self, run: RunRow, report: Report) -> None:
        ack = self.request("POST", "/v1/runs", self._open_body(run))
        # The collector's count is the truth: it may have stored a batch whose answer we never got.
        acked = int(ack.get("acked", 0))
        self._record(run.id, opened=True, acked_seq=acked, last_error=None)
        batch = self.opts.batch
        while True:
            body, count, last = self._batch(run.id, acked, batch)
            if not count:
                break
            try:
                answer = self.request("POST", f"/v1/runs/{run.uid}/observations", content=body)
            except Rejected as exc:
                if exc.status == 413 and batch > 1:
                    batch = max(1, batch // 2)  # the collector's body limit is smaller than our batch
                    continue
                raise
            report.sent += count
            report.stored += int(answer.get("stored", 0))
            report.duplicates += int(answer.get("duplicates", 0))
            new_acked = int(answer.get("acked", 0))
            if new_acked < last:
                raise UploadError(f"{self.key}: acknowledged {new_acked}, less than the batch sent")
            acked = new_acked
            self._record(run.id, acked_seq=acked)
        if run.state in FINAL_STATES:
            # Closing makes the collector classify the whole run: minutes for a very large one.
            self.request("POST", f"/v1/runs/{run.uid}/close", {"ended": run.ended or run.started, "state": run.state},
                         timeout=max(self.opts.timeout, 900.0))
            self._record(run.id, closed=True)
            report.closed += 1

    def upload_all(self) -> Report:
        report = Report()
        done = self._closed_run_ids()
        with self.store.session() as s:
            runs = [r for r in s.scalars(select(RunRow).order_by(RunRow.id)) if r.id not in done]
        for run in runs:
            report.runs += 1
            try:
                self.upload_run(run, report)
            except Rejected as exc:  # this run's data is refused: say so, keep going with the others
                self._record(run.id, last_error=str(exc)[:500])
                report.problems.append(f"run {run.id}: {exc}")
        return report

    def _closed_run_ids(self) -> set[int]:
        with self.store.session() as s:
            return set(s.scalars(select(UploadRow.run_id).where(UploadRow.collector == self.key,
                                                                UploadRow.closed.is_(True))))


def status(store: Store, url: str | None = None) -> list[RunStatus]:
    """Per run: observations, how many ``url``'s collector acknowledged (any collector's
    best when ``url`` is None), and whether the run is closed there."""
    key = collector_key(url) if url else None
    with store.session() as s:
        counts = dict(s.execute(select(ObservationRow.run_id, func.count()).group_by(ObservationRow.run_id)).all())
        q = select(UploadRow)
        if key:
            q = q.where(UploadRow.collector == key)
        ups: dict[int, UploadRow] = {}
        for row in s.scalars(q):
            best = ups.get(row.run_id)
            if best is None or (row.closed, row.acked_seq) > (best.closed, best.acked_seq):
                ups[row.run_id] = row
        out = []
        for run in s.scalars(select(RunRow).order_by(RunRow.id)):
            u: UploadRow | None = ups.get(run.id)
            acked = 0
            if u is not None and u.acked_seq:
                acked = int(s.scalar(select(func.count()).where(ObservationRow.run_id == run.id,
                                                                ObservationRow.id <= u.acked_seq)) or 0)
            out.append(RunStatus(run.id, run.uid, run.state, int(counts.get(run.id, 0)), acked,
                                 bool(u and u.closed)))
        return out


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _error_of(r: Any) -> str:
    try:
        d = r.json()
        if isinstance(d, dict) and isinstance(d.get("error"), str):
            return " ".join(d["error"].split())[:200]
    except ValueError:
        pass
    return (r.reason_phrase or "error")[:100]


__all__ = ["TOKEN_ENV", "Options", "Rejected", "Report", "RunStatus", "TokenRefused",
           "Unreachable", "UploadError", "Uploader", "retry_after", "status"]
