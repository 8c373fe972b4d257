"""Crash-safe checkpoints: layout, pruning, resume resolution, exact round trip and resume, kill mid-save."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from helpers import assert_same
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from utils.checkpoint import (
    STATE_FILE,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    skip_batches_for_resume,
)
from utils.ema import ema_update
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_SAMPLES, BATCH = 16, 4  # 4 batches per epoch


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    """AcceleratorState is a process-wide singleton; reset it so every test builds its own Accelerator."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@dataclass
class Run:
    """Everything a tiny training run holds, prepared by one Accelerator."""

    accelerator: Accelerator
    model: nn.Module
    ema: nn.Module
    optimizer: Any
    scheduler: Any
    loader: Any


def build(seed: int = 0) -> Run:
    """A fresh Accelerator, Linear model, EMA copy, AdamW, LR schedule and seeded shuffled loader."""
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    data = torch.Generator().manual_seed(123)
    dataset = TensorDataset(torch.randn(N_SAMPLES, 4, generator=data), torch.randn(N_SAMPLES, 2, generator=data))
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.register_for_checkpointing(ema)
    return Run(accelerator, model, ema, optimizer, scheduler, loader)


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimiser step; the input noise makes the result depend on the global torch RNG too."""
    noisy = x + 0.1 * torch.randn_like(x)
    loss = nn.functional.mse_loss(run.model(noisy), y)
    run.accelerator.backward(loss)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad()
    ema_update(run.ema, run.model, 0.9)


def train(run: Run, step: int, stop: int, epoch: int = 0, batches_in_epoch: int = 0) -> tuple[int, int]:
    """Train from (step, epoch, batches_in_epoch) to global step `stop`; returns the (epoch, batches) to resume at."""
    while True:
        loader = skip_batches_for_resume(run.accelerator, run.loader, batches_in_epoch)
        for x, y in loader:
            train_step(run, x, y)
            step, batches_in_epoch = step + 1, batches_in_epoch + 1
            if step == stop:
                if batches_in_epoch == len(run.loader):
                    return epoch + 1, 0
                return epoch, batches_in_epoch
        epoch, batches_in_epoch = epoch + 1, 0


def snapshot(run: Run) -> dict:
    """Deep copies of every piece of state a checkpoint must restore."""
    return copy.deepcopy(
        {
            "model": run.accelerator.unwrap_model(run.model).state_dict(),
            "ema": run.ema.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
        }
    )


def names(paths: list[str]) -> list[str]:
    """Base names of checkpoint paths."""
    return [os.path.basename(p) for p in paths]


def test_total_limit_keeps_newest(tmp_path: Any) -> None:
    run = build()
    out = str(tmp_path)
    for step in range(1, 6):
        path = save_checkpoint(run.accelerator, out, step, {"epoch": 0, "batches_in_epoch": step}, total_limit=2)
        assert os.path.basename(path) == f"checkpoint-{step}"
    assert names(list_checkpoints(out)) == ["checkpoint-4", "checkpoint-5"]
    assert sorted(os.listdir(out)) == ["checkpoint-4", "checkpoint-5"]  # no .partial / .deleting debris
    state = load_checkpoint(run.accelerator, os.path.join(out, "checkpoint-5"))
    assert state == {"global_step": 5, "epoch": 0, "batches_in_epoch": 5}
    with pytest.raises(ValueError):
        save_checkpoint(run.accelerator, out, 6, {"epoch": 0, "batches_in_epoch": 0}, total_limit=0)
    with pytest.raises(ValueError):
        save_checkpoint(run.accelerator, out, 6, {"epoch": 0}, total_limit=None)
    assert names(list_checkpoints(out)) == ["checkpoint-4", "checkpoint-5"]


def test_partial_and_incomplete_dirs_are_ignored(tmp_path: Any) -> None:
    run = build()
    out = str(tmp_path)
    for step in (1, 5):
        save_checkpoint(run.accelerator, out, step, {"epoch": 0, "batches_in_epoch": 0})
    # Debris of a crash: a .partial that even has its state file, and a final-looking dir without one.
    os.makedirs(tmp_path / "checkpoint-6.partial")
    (tmp_path / "checkpoint-6.partial" / STATE_FILE).write_text('{"global_step": 6}')
    os.makedirs(tmp_path / "checkpoint-7")
    os.makedirs(tmp_path / "checkpoint-x")
    assert names(list_checkpoints(out)) == ["checkpoint-1", "checkpoint-5"]
    assert os.path.basename(resolve_resume(out, "latest")) == "checkpoint-5"


def test_resolve_resume(tmp_path: Any) -> None:
    out = str(tmp_path / "out")
    assert resolve_resume(out, None) is None
    assert resolve_resume(out, "latest") is None  # output_dir does not exist yet: a fresh start
    os.makedirs(out)
    assert resolve_resume(out, "latest") is None
    run = build()
    save_checkpoint(run.accelerator, out, 3, {"epoch": 0, "batches_in_epoch": 3})
    full = os.path.join(out, "checkpoint-3")
    assert resolve_resume(out, "checkpoint-3") == full
    assert resolve_resume(out, full) == full
    missing = os.path.join(out, "checkpoint-9")
    with pytest.raises(UserError, match="--resume_from_checkpoint") as info:
        resolve_resume(out, "checkpoint-9")
    assert missing in str(info.value)
    os.makedirs(os.path.join(out, "checkpoint-4.partial"))
    with pytest.raises(UserError, match="--resume_from_checkpoint"):
        resolve_resume(out, "checkpoint-4.partial")
    os.makedirs(os.path.join(out, "checkpoint-5"))
    with pytest.raises(UserError, match="checkpoint-5"):
        resolve_resume(out, "checkpoint-5")


def test_round_trip_restores_everything(tmp_path: Any) -> None:
    run = build()
    epoch, batches = train(run, 0, 2)
    save_checkpoint(run.accelerator, str(tmp_path), 2, {"epoch": epoch, "batches_in_epoch": batches, "best": 0.5})
    saved = snapshot(run)
    draw_after_save = torch.rand(5)
    train(run, 2, 5, epoch, batches)  # move every piece of state on
    with pytest.raises(AssertionError):
        assert_same(saved, snapshot(run))
    state = load_checkpoint(run.accelerator, os.path.join(str(tmp_path), "checkpoint-2"))
    assert state == {"global_step": 2, "epoch": 0, "batches_in_epoch": 2, "best": 0.5}
    assert_same(saved, snapshot(run))
    assert torch.equal(torch.rand(5), draw_after_save)


def test_resume_is_bit_identical(tmp_path: Any) -> None:
    straight = build()
    train(straight, 0, 6)
    expected = snapshot(straight)

    first = build()
    epoch, batches = train(first, 0, 3)
    assert (epoch, batches) == (0, 3)  # mid-epoch, so the resumed run must skip batches
    save_checkpoint(first.accelerator, str(tmp_path), 3, {"epoch": epoch, "batches_in_epoch": batches})

    second = build(seed=0)
    state = load_checkpoint(second.accelerator, resolve_resume(str(tmp_path), "latest"))
    train(second, state["global_step"], 6, state["epoch"], state["batches_in_epoch"])
    assert_same(expected, snapshot(second))


KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    import torch
    from accelerate import Accelerator
    from utils.checkpoint import save_checkpoint

    out = sys.argv[1]
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(4, 2))
    save_checkpoint(accelerator, out, 1, {{"epoch": 0, "batches_in_epoch": 1}})
    os.environ["DISTILL_FAULT_DURING_SAVE"] = "30"
    print("saving-2", flush=True)
    save_checkpoint(accelerator, out, 2, {{"epoch": 0, "batches_in_epoch": 2}})
    print("finished", flush=True)
    """
)


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(tmp_path: Any) -> None:
    script = tmp_path / "saver.py"
    script.write_text(KILL_SCRIPT.format(root=ROOT))
    out = tmp_path / "out"
    env = {**os.environ, "DISTILL_FAULT_DURING_SAVE": ""}
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "saving-2"
        # save_state has finished once the registered files are there; the script is now asleep.
        rng_file = out / "checkpoint-2.partial" / "random_states_0.pkl"
        deadline = time.monotonic() + 20
        while not rng_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "saver never reached the fault window"
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert (out / "checkpoint-2.partial").is_dir()
    assert names(list_checkpoints(str(out))) == ["checkpoint-1"]
    assert resolve_resume(str(out), "latest") == str(out / "checkpoint-1")
