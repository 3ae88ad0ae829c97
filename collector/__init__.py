"""The collector: volunteers' runs and observations uploaded into one store (SQLite or PostgreSQL).

- :mod:`.tokens`: per-volunteer upload tokens, stored as salted scrypt hashes;
- :mod:`.wire`: the versioned API's bodies, validated (observations by :mod:`kzprobe.contract`);
- :mod:`.ingest`: idempotent writes keyed by (run uid, observation seq), bulk inserts;
- :mod:`.app` / :mod:`.server`: the ASGI app on hypercorn/trio; :mod:`.cli`: ``kzprobe collector``;
- :mod:`.client`: the volunteer's uploader (``kzprobe upload``, ``kzprobe run --upload``).
"""
