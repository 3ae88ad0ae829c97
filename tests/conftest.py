"""Fixtures shared by the test modules.

The loopback network simulator itself lives in :mod:`kzprobe.tests.support.loopnet` (a module a
test can import, unlike a conftest under ``--import-mode=importlib``); this file only starts it
once per session.
"""

from __future__ import annotations

from collections.abc import Iterator
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
