"""A bug while measuring one target is reported by its cause (not trio's nursery group), with its
traceback in the log, and the other targets are still measured and classified."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from kzprobe.model import Target
from kzprobe.probes.engine import Engine, ProbeConfig
from kzprobe.probes.runner import Runner
from kzprobe.storage import Store


def test_internal_error_names_its_leaf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    async def measure(self: Engine, target: Target, *args: Any, **kw: Any) -> list[str]:
        if target.host == "bug.test":
            try:
                {}["missing"]
            except KeyError as exc:
                raise RuntimeError("step failed") from exc
        return []

    monkeypatch.setattr(Engine, "measure", measure)
    config = ProbeConfig(system_resolver=False, timeout=0.5)
    runner = Runner(Store(tmp_path / "r.db"), config)
    with caplog.at_level(logging.ERROR, logger="kzprobe.runner"):
        result = runner.run([Target("https://bug.test/"), Target("https://fine.test/")])
    assert result.internal_errors == ["https://bug.test/: KeyError: 'missing'"]
    assert {v.target for v in result.verdicts} == {"https://bug.test/", "https://fine.test/"}
    record = next(r for r in caplog.records if "bug.test" in r.getMessage())
    assert record.exc_info is not None  # the traceback goes to the log
