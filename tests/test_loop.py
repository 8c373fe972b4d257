"""utils.loop: apply_gradients under fp16 loss scaling (simulated on CPU with a real GradScaler), --scale_lr."""

from __future__ import annotations

import pytest
import torch


def test_fp16_overflow_lowers_the_loss_scale_and_training_recovers():
    """A gradient overflow under loss scaling is the scaler's to handle: the step is skipped, the scale
    drops, and later steps update the weights (skipping it ourselves would keep the scale, and overflow, forever)."""
    from accelerate import Accelerator

    from utils.loop import apply_gradients

    accelerator = Accelerator(cpu=True)
    # what Accelerator(mixed_precision="fp16") sets up on a GPU: native AMP (fp16 autocast) with a grad scaler
    accelerator.native_amp, accelerator.state._mixed_precision = True, "fp16"
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24, growth_interval=1000)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    params = list(model.parameters())
    x = torch.randn(8, 4)  # the fp16 backward overflows until the scale has come down
    first_scale, updated_at = accelerator.scaler.get_scale(), None
    for step in range(40):
        before = [p.detach().clone() for p in params]
        assert apply_gradients(accelerator, model(x).square().mean(), params, optimizer, scheduler, 1.0)
        if any(not torch.equal(a, b) for a, b in zip(before, params)):
            updated_at = step
            break
        assert optimizer.step_was_skipped
    assert updated_at is not None and updated_at > 0  # overflowing steps first, then real updates
    assert accelerator.scaler.get_scale() < first_scale
    assert all(torch.isfinite(p).all() for p in params)


def test_scale_lr_multiplies_by_the_samples_per_optimizer_step():
    import argparse

    from utils.loop import make_optimizer

    args = argparse.Namespace(learning_rate=1e-4, scale_lr=True, train_batch_size=4, gradient_accumulation_steps=2,
                              adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0, adam_epsilon=1e-8,
                              use_8bit_adam=False, lr_scheduler="constant", lr_warmup_steps=0)
    params = list(torch.nn.Linear(2, 1).parameters())
    optimizer, _ = make_optimizer(params, args, 10, num_processes=3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 4 * 2 * 3)
    args.scale_lr = False
    assert make_optimizer(params, args, 10, num_processes=3)[0].param_groups[0]["lr"] == pytest.approx(1e-4)
