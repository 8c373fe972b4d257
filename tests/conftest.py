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


def unit_of(item) -> str:
    """The name of the item's xdist_group, read as pytest-xdist reads it."""
    mark = item.get_closest_marker("xdist_group")
    return mark.args[0] if mark.args else mark.kwargs.get("name", "default")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook turns the xdist_group marks into its work units
def pytest_collection_modifyitems(config, items) -> None:
    """For pytest-xdist's `--dist loadgroup`: a test module goes to one worker whole (its module-scoped fixtures
    are built once), except where a test names its own `xdist_group`. The longest units are handed out first (the
    order pytest.ini keeps with --no-loadscope-reorder), so that no long unit starts last: the multi-process
    tests (a unit each), then the modules with slow tests, then the rest, each kind by its number of tests."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    if not hasattr(config, "workerinput"):  # not a pytest-xdist worker (whose collection order the scheduler keeps)
        return
    units: dict[str, list] = {}
    for index, item in enumerate(items):
        name = unit_of(item)
        slow = item.get_closest_marker("slow") is not None
        unit = units.setdefault(name, [2, 0, index])  # kind, tests, first position
        unit[0] = min(unit[0], (0 if name != item.module.__name__ else 1) if slow else 2)
        unit[1] += 1
    order = {name: (kind, -tests, first) for name, (kind, tests, first) in units.items()}
    items.sort(key=lambda item: order[unit_of(item)])
