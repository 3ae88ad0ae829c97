"""Storage's column lists, derived from the model's dataclasses (the contract).

Kept apart from :mod:`kzprobe.storage` so that worker processes (the OONI import pipeline) can
build row values without importing SQLAlchemy.
"""

from __future__ import annotations

import dataclasses

from kzprobe.model import Observation, Verdict

#: An observation row's columns besides ``id`` and ``run_id``.
OBS_COLUMNS = tuple(f.name for f in dataclasses.fields(Observation) if f.name != "id")
#: A verdict row's columns besides ``id`` and ``run_id``.
VERDICT_COLUMNS = tuple(f.name for f in dataclasses.fields(Verdict))
