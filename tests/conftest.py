"""Fixtures shared by the test modules.

The loopback network simulator itself lives in :mod:`kzprobe.tests.support.loopnet` (a module a
test can import, unlike a conftest under ``--import-mode=importlib``); this file only starts it
once per session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from kzprobe.tests.support import loopnet as _loopnet
from kzprobe.tests.support.loopnet import LoopNet, build_loopnet


@pytest.fixture(scope="session")
def loopnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopNet]:
    net = build_loopnet(tmp_path_factory.mktemp("loopnet"))
    try:
        yield net
    finally:
        net.close()


@pytest.fixture(scope="session")
def loopnet_lib() -> ModuleType:
    """The simulator module, for its constants and helpers."""
    return _loopnet


# --- ../shared: the data folder beside the clone (real pcaps, OONI QA files, the report) -----------
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_ABSENT = f"needs {SHARED} (the shared data folder beside the clone, see README), which is absent"


def _uses_shared(item: pytest.Item, text: str) -> bool:
    if str(SHARED) in text:
        return True
    module = getattr(item, "module", None)
    return any(isinstance(v, Path) and v.is_relative_to(SHARED) for v in vars(module).values()) if module else False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Without ../shared, a test that needed it is skipped with that reason, in every module alike
    (whether or not the module remembered its own skipif); with ../shared, nothing changes."""
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.failed and not SHARED.is_dir() and _uses_shared(item, rep.longreprtext):
        rep.outcome = "skipped"
        rep.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {SHARED_ABSENT}")
