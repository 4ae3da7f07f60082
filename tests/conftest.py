"""Fixtures shared by every test file: real peers from ``peers/``, each in its own temp folder."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from peers import Orthanc, RedisServer, StoreSCP


@pytest.fixture
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A running Orthanc (AE ``ORTHANC``, any called AE accepted) with REST helpers; killed at teardown."""
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as peer:
        yield peer


@pytest.fixture
def dcmtk_storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    """A running dcmtk storescp (AE ``STORESCP``, all transfer syntaxes) writing to ``.output_dir``."""
    with StoreSCP(tmp_path_factory.mktemp("storescp")) as peer:
        yield peer


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A running redis-server on a free loopback port; ``.url`` is ``redis://127.0.0.1:<port>/0``."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as peer:
        yield peer


@pytest.fixture(autouse=True)
def _root_logging_as_before() -> Iterator[None]:
    """A command run in-process (``raddraft.cli.main``) points the root logger at the stream pytest captures for
    that test; afterwards that stream is closed, and a record from a thread still running (a server's) would end
    in "--- Logging error ---". Handlers a test added are removed again and the root level restored."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in before and type(handler) is logging.StreamHandler:  # basicConfig's, not pytest's
            root.removeHandler(handler)
    root.setLevel(level)
