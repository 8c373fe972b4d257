"""A faster LoRA forward: one matmul / conv with the merged weight W + s B A where that costs fewer FLOPs.

PEFT computes a LoRA layer as ``W x + s B (A x)``: the base op plus a rank-r branch whose cost grows
with the number of positions P the layer sees (tokens, or batch x pixels). The same output is
``(W + s B A) x``, whose extra cost is forming ``B A`` once per call, independent of P. Which is
cheaper depends on the layer and the call:

    branch  (forward):          P r (n_in + n_out)
    merged  (forward):          r n_in n_out                      (forming s B A)
    branch  (forward+backward): 3 P r (n_in + n_out)               (backward ~ twice the forward)
    merged  (forward+backward): 3 r n_in n_out + P n_in n_out      (+ the gradient of the merged weight)

with n_in = in_features (a conv: in_channels x kernel area) and n_out = out_features. A forward under
no_grad (the LCM target, validation sampling, a frozen LoRA) almost always gains; a forward that
trains the LoRA gains only when r is large next to the layer's width (r > ~n/4), e.g. rank 64 on a
small model. `enable` picks per layer and per call by this count, so a full-size SDXL keeps PEFT's
branch where it is cheaper. The outputs equal PEFT's up to float rounding; gradients reach A and B
through the merged weight. Layers with dropout, DoRA or other variants keep PEFT's forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """delta W = s B A, shaped like the base weight (conv: B is 1x1, A has the base kernel)."""
    delta = lora_B.flatten(1) @ lora_A.flatten(1)
    return (delta * scaling).view(lora_B.shape[0], *lora_A.shape[1:])


def positions(layer: nn.Module, x: torch.Tensor) -> int:
    """P: the rows a linear layer multiplies, or the output pixels x batch of a conv."""
    base = layer.base_layer
    if isinstance(base, nn.Conv2d):
        h, w = (
            (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
            for size, pad, dil, k, stride in zip(x.shape[-2:], base.padding, base.dilation, base.kernel_size,
                                                 base.stride)
        )
        return int(x.shape[0]) * h * w
    return x.numel() // base.in_features


def merge_pays(n_in: int, n_out: int, rank: int, p: int, needs_grad: bool) -> bool:
    """Whether the merged weight costs fewer multiply-adds than the LoRA branch (module docstring)."""
    branch = p * rank * (n_in + n_out)
    merged = rank * n_in * n_out
    if needs_grad:
        branch, merged = 3 * branch, 3 * merged + p * n_in * n_out
    return merged < branch


def _plain_adapters(layer: nn.Module, active: tuple[str, ...]) -> list[str] | None:
    """The active adapters when all are plain LoRA (no dropout, DoRA or other variant), else None."""
    adapters = [a for a in active if a in layer.lora_A]
    variants = getattr(layer, "lora_variant", {})
    if any(a in variants or not isinstance(layer.lora_dropout[a], nn.Identity) for a in adapters):
        return None
    return adapters


def _plan(layer: nn.Module, x: torch.Tensor, active: tuple[str, ...], grad_enabled: bool) -> list[str] | None:
    """The adapters to merge for a call with this input shape and grad mode, or None for PEFT's branch."""
    adapters = _plain_adapters(layer, active)
    if not adapters:
        return None
    weight_A = [layer.lora_A[a].weight for a in adapters]
    weight_B = [layer.lora_B[a].weight for a in adapters]
    n_out, n_in = weight_B[0].shape[0], weight_A[0][0].numel()
    needs_grad = grad_enabled and any(w.requires_grad for w in weight_A + weight_B)
    rank = sum(w.shape[0] for w in weight_A)
    return adapters if merge_pays(n_in, n_out, rank, positions(layer, x), needs_grad) else None


def _forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Bound as the instance `forward` of a PEFT lora.Linear / lora.Conv2d by `enable`."""
    if args or kwargs or self.disable_adapters or self.merged:
        return type(self).forward(self, x, *args, **kwargs)
    # the plan depends only on these (per-call Python work must stay small next to a small layer's op)
    key = (tuple(self.active_adapters), tuple(x.shape), torch.is_grad_enabled())
    if torch.compiler.is_compiling():  # traced once per shape anyway; a cache would only add guards
        adapters = _plan(self, x, *key[::2])
    else:
        plans = self.__dict__["_merged_lora_plans"]  # set by `enable`
        if key not in plans:
            plans[key] = _plan(self, x, *key[::2])
        adapters = plans[key]
    if adapters is None:
        return type(self).forward(self, x)
    base = self.base_layer
    weight = base.weight.to(self.lora_A[adapters[0]].weight.dtype)  # formed in the LoRA's (fp32) precision
    for a in adapters:
        weight = weight + lora_delta(self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a])
    weight = weight.to(x.dtype)
    bias = None if base.bias is None else base.bias.to(x.dtype)
    if isinstance(base, nn.Conv2d):
        return base._conv_forward(x, weight, bias)
    return F.linear(x, weight, bias)


def supported(layer: nn.Module) -> bool:
    """A PEFT LoRA Linear / Conv2d over a plain nn.Linear / ungrouped nn.Conv2d (whether its active adapters
    have dropout or DoRA is checked when a call's plan is made: those keep PEFT's forward)."""
    from peft.tuners.lora import layer as peft_layer

    if type(layer) not in (peft_layer.Linear, peft_layer.Conv2d) or getattr(layer, "fan_in_fan_out", False):
        return False
    base = layer.base_layer
    return type(base) is nn.Linear or (type(base) is nn.Conv2d and base.groups == 1)


def enable(model: nn.Module) -> int:
    """Give every supported LoRA layer of `model` the merged-or-branch forward; returns how many."""
    count = 0
    for module in model.modules():
        if supported(module):
            module.forward = types.MethodType(_forward, module)
            module.__dict__["_merged_lora_plans"] = {}  # (active adapters, input shape, grad mode) -> plan
            count += 1
    return count


def disable(model: nn.Module) -> None:
    """Back to PEFT's own forward everywhere."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), types.MethodType) and module.forward.__func__ is _forward:
            del module.forward
        module.__dict__.pop("_merged_lora_plans", None)
