"""fp16 loss scaling through a recipe's loop (utils.loop), and exact resume of the grad scaler's state.

accelerate sets fp16 up (autocast + a GradScaler) only on an accelerator device: on CPU,
Accelerator(mixed_precision="fp16") has no scaler and autocasts nothing. These tests give the
accelerator what it builds on a GPU -- native AMP, so prepared models and `accelerator.autocast()`
run under torch.autocast(<device>, dtype=torch.float16) (CPU autocast supports fp16), and a real
torch.amp.GradScaler -- and train with it as a recipe does (`for batch in loop.TrainLoop(...)`, then
loop.apply_gradients): the project's accelerator, optimizer, LR schedule and data loader, a tiny model, and
one sample whose huge loss overflows the fp16 backward, so the scaler skips steps and backs off as well as grows.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from helpers import assert_same

from utils import checkpoint, flags, loop
from utils.data import make_train_dataloader

pytestmark = pytest.mark.usefixtures("one_thread")

N_SAMPLES, BATCH = 10, 2  # 5 batches an epoch
STEPS, EVERY, STOP_IN = 12, 3, 5  # checkpoints every 3 steps; the interrupted run dies during step 5
INIT_SCALE, GROWTH_INTERVAL = 2.0 ** 10, 2  # the scale moves within a few steps
SPIKE = "spike"  # the caption of the sample whose loss overflows the fp16 backward at any sane scale


def reset_accelerate() -> None:
    """accelerate's states are process-wide singletons: forget them, as a new process would start."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    reset_accelerate()
    yield
    reset_accelerate()


class Killed(Exception):
    """Stands in for the process being killed mid-step."""


def samples() -> list[dict]:
    g = torch.Generator().manual_seed(7)
    return [{"pixel_values": torch.randn(3, 2, 2, generator=g), "caption": SPIKE if i == 3 else f"sample {i}",
             "original_size": (2, 2), "crop_top_left": (0, 0)} for i in range(N_SAMPLES)]


def build(output_dir: str, resume: str | None = None, stop_in: int | None = None, fused: bool = True) -> dict:
    """A fresh fp16 run (as a new process would build it) and the pieces needed to drive and inspect it.

    fused: AdamW's fused kernel (what make_optimizer picks on CUDA) takes the scaler's found-inf flag and
    skips an overflowing update itself; the unfused one is skipped by GradScaler.step not calling it.
    """
    reset_accelerate()
    parser = flags.Parser()
    parser.add_training_args()
    argv = ["--output_dir", output_dir, "--mixed_precision", "fp16", "--report_to", "none", "--seed", "3",
             "--train_batch_size", str(BATCH), "--max_train_steps", str(STEPS), "--checkpointing_steps", str(EVERY),
             "--learning_rate", "1e-2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "0",
             "--max_grad_norm", "1.0", "--validation_steps", "1000"]
    args = parser.parse_args(argv + (["--resume_from_checkpoint", resume] if resume else []))
    accelerator = loop.make_accelerator(args)
    # what Accelerator(mixed_precision="fp16") sets up on a GPU, before anything is prepared
    assert accelerator.mixed_precision == "fp16"
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler(accelerator.device.type, init_scale=INIT_SCALE,
                                              growth_interval=GROWTH_INTERVAL)
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.SiLU(), torch.nn.Linear(16, 12))
    args.fused_adamw = fused  # the recipes' --fused_adamw / --no-fused_adamw
    optimizer, lr_scheduler = loop.make_optimizer(model.parameters(), args, STEPS, accelerator.num_processes)
    assert bool(optimizer.defaults["fused"]) is fused
    loader = make_train_dataloader(samples(), args.train_batch_size, 0, args.seed)
    model, optimizer, lr_scheduler, loader = accelerator.prepare(model, optimizer, lr_scheduler, loader)
    rng = loop.TrainingRNG(args.seed, accelerator.device, accelerator.process_index)
    accelerator.register_for_checkpointing(rng)
    run = {"accelerator": accelerator, "args": args, "model": model, "optimizer": optimizer,
           "lr_scheduler": lr_scheduler, "loader": loader, "rng": rng, "calls": 0, "history": [], "before": None,
           "forward_dtypes": set()}
    # the dtype the first layer computes in: float16 under the autocast accelerate wraps the forward in
    accelerator.unwrap_model(model)[0].register_forward_hook(lambda _m, _i, y: run["forward_dtypes"].add(y.dtype))

    def loss_fn(batch: dict) -> torch.Tensor:
        run["calls"] += 1
        if stop_in is not None and run["calls"] == stop_in:
            raise Killed
        run["before"] = [p.detach().clone() for p in model.parameters()]
        x = batch["pixel_values"].flatten(1).to(accelerator.device)
        noise = torch.randn(x.shape, generator=rng.generator, device=rng.generator.device)
        with accelerator.autocast():
            out = model(x + 0.1 * noise)
        assert out.dtype == torch.float32  # accelerate returns fp32 outputs of the fp16 forward
        loss = torch.nn.functional.mse_loss(out, x)
        return loss * (1e4 if SPIKE in batch["captions"] else 1.0)

    def after_step() -> None:  # (weights updated?, scale, growth tracker) after each optimizer step
        updated = any(not torch.equal(a, b) for a, b in zip(run["before"], model.parameters()))
        scaler = accelerator.scaler.state_dict()
        run["history"].append((updated, scaler["scale"], scaler["_growth_tracker"]))

    def train() -> int:
        """A recipe's loop over the run; returns the optimizer steps it ended at."""
        params = list(model.parameters())
        steps = loop.TrainLoop(accelerator, loader, STEPS, args, "fp16", lr_scheduler)
        for batch in steps:
            with accelerator.accumulate(model):
                loss = loss_fn(batch)
                updated = loop.apply_gradients(accelerator, loss, params, optimizer, lr_scheduler, args.max_grad_norm)
            if not steps.step_done(loss, updated):
                continue
            after_step()
            if steps.checkpoint_due:
                steps.save_checkpoint()
        return steps.global_step

    run["train"] = train
    return run


def state_of(run: dict) -> dict:
    """Everything an exact continuation must reproduce, copied."""
    return copy.deepcopy({
        "model": run["accelerator"].unwrap_model(run["model"]).state_dict(),
        "optimizer": run["optimizer"].state_dict(),
        "lr_scheduler": run["lr_scheduler"].state_dict(),
        "scaler": run["accelerator"].scaler.state_dict(),
        "rng": run["rng"].state_dict(),
    })


@pytest.mark.parametrize("fused", [True, False], ids=["fused_adamw", "adamw"])
def test_fp16_run_resumed_after_a_kill_matches_an_uninterrupted_run(tmp_path: Any, fused: bool) -> None:
    straight = build(str(tmp_path / "straight"), fused=fused)
    assert straight["train"]() == STEPS
    expected, history = state_of(straight), straight["history"]
    # the scenario is worth testing: the scaler skipped overflowing steps (and backed off) before and after
    # the checkpoint the resume uses, grew in between, and was mid-interval, off its initial scale, when saved
    assert len(history) == STEPS and straight["forward_dtypes"] == {torch.float16}
    skipped = [step for step, (updated, _, _) in enumerate(history, 1) if not updated]
    assert any(s <= EVERY for s in skipped) and any(s > EVERY for s in skipped), history
    for step, (updated, scale, tracker) in enumerate(history, 1):
        previous = history[step - 2][1] if step > 1 else INIT_SCALE
        assert (scale < previous and tracker == 0) == (not updated), history  # skipped exactly on overflow
    assert max(scale for _, scale, _ in history) > INIT_SCALE, history
    assert history[EVERY - 1][1] != INIT_SCALE and history[EVERY - 1][2] > 0, history
    assert history[EVERY][0], history  # so the restored growth count decides whether the scale grows next
    assert all(torch.isfinite(p).all() for p in straight["model"].parameters())
    # the LR schedule advances on applied updates only, fused kernel or not (a fused AdamW skips inside
    # its kernel, where accelerate's scheduler wrapper does not see it)
    assert straight["lr_scheduler"].scheduler.last_epoch == STEPS - len(skipped), (fused, skipped)

    out = str(tmp_path / "interrupted")
    killed = build(out, stop_in=STOP_IN, fused=fused)
    with pytest.raises(Killed):
        killed["train"]()
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(out)] == [f"checkpoint-{EVERY}"]
    assert killed["history"] == history[: STOP_IN - 1]

    resumed = build(out, resume="latest", fused=fused)
    assert resumed["train"]() == STEPS
    assert resumed["history"] == history[EVERY:]  # the same skips, scales and growth counts after it
    assert_same(expected, state_of(resumed))


def test_checkpoint_holds_the_grad_scaler_state_and_loading_restores_it(tmp_path: Any) -> None:
    out = str(tmp_path)
    run = build(out, stop_in=EVERY + 1)
    with pytest.raises(Killed):
        run["train"]()
    saved = run["accelerator"].scaler.state_dict()  # the scaler as it was when checkpoint-3 was saved
    path = os.path.join(out, f"checkpoint-{EVERY}")
    assert os.path.isfile(os.path.join(path, "scaler.pt"))
    on_disk = torch.load(os.path.join(path, "scaler.pt"), weights_only=True)
    assert on_disk == saved
    assert saved["scale"] != INIT_SCALE and saved["_growth_tracker"] > 0  # not what a fresh scaler holds

    fresh = build(out, resume="latest")  # a new process (one that does not resume is refused this folder)
    scaler = fresh["accelerator"].scaler
    assert (scaler.get_scale(), scaler.state_dict()["_growth_tracker"]) == (INIT_SCALE, 0)
    state = checkpoint.load_checkpoint(fresh["accelerator"], path)
    assert state["global_step"] == EVERY
    assert scaler.get_scale() == saved["scale"]
    assert scaler.state_dict()["_growth_tracker"] == saved["_growth_tracker"]
    assert scaler.state_dict() == saved
