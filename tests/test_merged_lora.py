"""utils/merged_lora.py: the merged-weight LoRA forward computes what PEFT's branch computes, and is chosen by FLOPs."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from utils import lora, merged_lora, models

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lora_delta_is_the_closed_form_for_linear_and_conv():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=g)
    base = nn.Linear(6, 7)
    a, b = torch.randn(3, 6, generator=g), torch.randn(7, 3, generator=g)
    expected = base(x) + 0.5 * (x @ a.T) @ b.T
    merged = nn.functional.linear(x, base.weight + merged_lora.lora_delta(a, b, 0.5), base.bias)
    assert torch.allclose(merged, expected, atol=1e-5)

    img = torch.randn(2, 4, 9, 9, generator=g)
    conv = nn.Conv2d(4, 5, 3, stride=2, padding=1)
    a_conv, b_conv = torch.randn(3, 4, 3, 3, generator=g), torch.randn(5, 3, 1, 1, generator=g)
    branch = nn.functional.conv2d(nn.functional.conv2d(img, a_conv, stride=2, padding=1), b_conv)
    merged = nn.functional.conv2d(img, conv.weight + merged_lora.lora_delta(a_conv, b_conv, 0.25), conv.bias,
                                  stride=2, padding=1)
    assert torch.allclose(merged, conv(img) + 0.25 * branch, atol=1e-5)


def test_merge_pays_by_the_flop_count():
    # a toy layer: width 64, rank 64, 16 images of 8x8
    assert merged_lora.merge_pays(64, 64, 64, 1024, needs_grad=False)
    assert merged_lora.merge_pays(64, 64, 64, 1024, needs_grad=True)
    # a full-size SDXL layer (width 1280, rank 64, 64x64 tokens): merged without grad, PEFT's branch with it
    assert merged_lora.merge_pays(1280, 1280, 64, 4096, needs_grad=False)
    assert not merged_lora.merge_pays(1280, 1280, 64, 4096, needs_grad=True)
    # the time embedding sees one row per image: forming B A costs more than the branch
    assert not merged_lora.merge_pays(256, 1280, 64, 2, needs_grad=False)


def test_positions_of_a_strided_conv_and_a_linear():
    conv = lora_layers(lora_model(nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1))))[0]
    assert merged_lora.positions(conv, torch.zeros(3, 4, 9, 9)) == 3 * 5 * 5
    lin = lora_layers(lora_model(nn.Sequential(nn.Linear(6, 8))))[0]
    assert merged_lora.positions(lin, torch.zeros(3, 7, 6)) == 21


def lora_model(model: nn.Module, dropout: float = 0.0) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=names, lora_dropout=dropout), model)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if merged_lora.supported(m)]


def toy_unet_with_lora(world: str, rank: int = 64):
    torch.manual_seed(0)
    unet = models.load_denoiser(os.path.join(world, "models/sdxl")).requires_grad_(False)
    lora.add_trainable_lora(unet, rank, 8, lora.LCM_LORA_TARGETS)
    with torch.no_grad():  # a trained-looking LoRA: B is zero at initialisation
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return unet


def unet_call(unet, grad: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, 8, 8, generator=g)
    emb = torch.randn(16, 16, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(16, 32, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 16)}
    t = torch.randint(0, 1000, (16,), generator=g)
    unet.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        out = unet(x, t, emb, added_cond_kwargs=added).sample
    if not grad:
        return out, {}
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def test_toy_unet_outputs_and_lora_gradients_match_peft_and_the_branch_is_skipped(toy_world):
    unet = toy_unet_with_lora(toy_world)
    reference, _ = unet_call(unet, grad=False)
    ref_out, ref_grads = unet_call(unet, grad=True)
    with lora.adapters_disabled(unet):
        teacher, _ = unet_call(unet, grad=False)

    branch_calls = []
    for m in lora_layers(unet):
        m.lora_A["default"].register_forward_hook(lambda *_: branch_calls.append(1))
    assert merged_lora.enable(unet) > 50
    out, _ = unet_call(unet, grad=False)
    assert torch.allclose(out, reference, atol=1e-4), (out - reference).abs().max()
    # rank 64 on a 32-64 wide UNet at 8x8: merging pays in every conv and attention layer, not in time_emb_proj
    # (one row per image), so only those few layers still run their rank-64 branch
    n_time_emb = sum(1 for n, m in unet.named_modules() if n.endswith("time_emb_proj") and merged_lora.supported(m))
    assert n_time_emb > 0 and len(branch_calls) == n_time_emb
    out, grads = unet_call(unet, grad=True)
    assert torch.allclose(out, ref_out, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) > 100
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-3, atol=1e-6), name
    with lora.adapters_disabled(unet):  # the teacher stays exactly the base UNet
        assert torch.equal(unet_call(unet, grad=False)[0], teacher)

    merged_lora.disable(unet)
    assert not any("forward" in m.__dict__ for m in unet.modules())
    assert torch.equal(unet_call(unet, grad=False)[0], reference)


def test_adapters_with_dropout_keep_peft_forward_exactly():
    torch.manual_seed(0)
    model = lora_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), dropout=0.5).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    x = torch.randn(64, 8)
    torch.manual_seed(1)
    reference = model(x)
    assert merged_lora.enable(model) == 2
    torch.manual_seed(1)
    assert torch.equal(model(x), reference)  # same dropout draws: PEFT's own forward ran


def test_two_active_adapters_are_both_merged():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    for name in ("one", "two"):
        model = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=["0"]), model,
                                        adapter_name=name)
    layer = model[0]
    for p in layer.lora_B.parameters():
        p.data.normal_()
    layer.set_adapter(["one", "two"])
    x = torch.randn(256, 16)
    with torch.no_grad():
        reference = model(x)
        merged_lora.enable(model)
        assert torch.allclose(model(x), reference, atol=1e-5)
