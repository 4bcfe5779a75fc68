from __future__ import annotations

import signal
from pathlib import Path

import pytest

from helpers import NodeProcess, Orthanc, require_tools


def pytest_sessionstart(session: pytest.Session) -> None:
    # A missing peer is a broken set-up, never a skipped test.
    require_tools()
    # A terminated run (a CI timeout, a killed make) tears its fixtures down
    # like Ctrl-C, so the nodes, Orthancs and Triton servers they started
    # are stopped instead of left running with their ports.
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@pytest.fixture
def node_factory(tmp_path: Path):
    nodes: list[NodeProcess] = []

    def make(name: str = "node", **kwargs) -> NodeProcess:
        node = NodeProcess(tmp_path / name, **kwargs)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.kill9()


@pytest.fixture
def orthanc(tmp_path: Path):
    pacs = Orthanc(tmp_path / "orthanc").start()
    yield pacs
    pacs.stop()
