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
    if hasattr(config, "workerinput"):
        # a pytest-xdist worker: the workers share the cores, so each (and every process it starts) computes on
        # its share of them; torch reads this when it is first imported, after this hook
        share = (os.cpu_count() or 1) // config.workerinput["workercount"]
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, share)))  # unless the user chose


def pytest_collection_finish(session) -> None:
    import gc

    gc.freeze()  # the test modules and the libraries they imported live to the end: collections need not scan them


def pytest_collection_modifyitems(config, items) -> None:
    """For pytest-xdist's `--dist loadgroup`: a test module goes to one worker whole (its module-scoped fixtures
    are built once), except where a test names its own `xdist_group`; the slow tests are handed out first, so
    that no long test starts last."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    if getattr(config.option, "numprocesses", None):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
