"""Shared fixtures: the repo root on sys.path and the toy world, built once per test session."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def toy_world() -> str:
    """Path of a built toy world: $TOY_WORLD if set, else built (or reused) under the repo's toy_world/."""
    from utils.toy.build import build

    path = os.environ.get("TOY_WORLD", os.path.join(ROOT, "toy_world"))
    return build(path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls are far faster on one thread than two contending ones; the setting is restored afterwards.

    A test module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: multi-process runs of the recipes (minutes on 2 CPU cores); "
                                       "deselect with -m 'not slow'")
