"""The players of TLCM's extras stage besides the student: the reward model (utils/rewards.py), the DMD fake score
adapter, the GAN discriminator head, and their optimizers (the losses are in utils/losses.py).

DMD's fake score is a second LoRA adapter ("fake_score") on the student's own model. GAN: features of the frozen
teacher (FLUX: the input of its final norm layer; a UNet: its mid-block output) at a re-noised sample feed a small
trainable head (ours).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import fail
from .sharding import is_sharded, shard_like, whole_values, write_whole


class DiscriminatorHead(nn.Module):
    """logit = w2 . mean_tokens(SiLU(W1 h_token)) + b: a 1x1 (per-token) projection, SiLU, token mean, linear; it
    reads `features` = (module name, "input" or "output") of the frozen teacher (`reading`)."""

    def __init__(self, width: int, features: tuple[str, str], hidden: int = 256, seed: int = 0) -> None:
        super().__init__()
        self.features = features
        with torch.random.fork_rng(devices=[]):  # its initialisation is a function of the seed alone
            torch.manual_seed(seed)
            self.proj = nn.Linear(width, hidden)
            self.out = nn.Linear(hidden, 1)

    def forward(self, features: Tensor) -> Tensor:
        """features (B, tokens, width) -> logits (B,)."""
        h = F.silu(self.proj(features.float()))
        return self.out(h.mean(1))[:, 0]

    @contextmanager
    def reading(self, model: nn.Module) -> Iterator[list[Tensor]]:
        """A list that receives the head's features in each forward call of `model` inside the block: the first
        positional input, or the output, of its module `features[0]`."""
        name, which = self.features
        seen: list[Tensor] = []
        module = model.get_submodule(name)
        if which == "input":
            handle = module.register_forward_pre_hook(lambda _mod, args: seen.append(args[0]))
        else:
            handle = module.register_forward_hook(lambda _mod, _args, out: seen.append(out))
        try:
            yield seen
        finally:
            handle.remove()


FAKE_SCORE = "fake_score"  # the adapter name of the DMD fake score model


def add_fake_score(model: nn.Module, rank: int, alpha: float, targets: list[str], dropout: float = 0.0,
                   adapter_name: str = FAKE_SCORE) -> dict[str, nn.Parameter]:
    """A second LoRA adapter (B = 0, so it starts equal to the base) in fp32, "default" staying the active one: its
    weights by their names in `model`."""
    import warnings

    from . import lora

    with warnings.catch_warnings():  # PEFT warns that a second adapter is being added: that is the point
        warnings.simplefilter("ignore", UserWarning)
        lora.add_lora(model, rank, alpha, targets, dropout, adapter_name)
    model.set_adapter("default")  # PEFT: only the active adapter's weights require grad
    params = {name: p for name, p in model.named_parameters() if f".{adapter_name}." in name}
    for p in params.values():  # fp32 like the student's adapter (the frozen base may be fp16/bf16)
        p.data = p.data.float()
    return params


@contextmanager
def adapter_active(model: nn.Module, adapter_name: str = FAKE_SCORE) -> Iterator[None]:
    """Only `adapter_name` acts (and requires grad) inside the block; the adapters active before are active again
    afterwards. A loss built inside must also be back-propagated inside: outside, its weights require no grad."""
    from .lora import requires_grad_kept

    previous = model.active_adapters()
    with requires_grad_kept(model):
        model.set_adapter(adapter_name)
        try:
            yield
        finally:
            model.set_adapter(previous)


class AuxOptimizer:
    """An extra trainable piece (fake-score LoRA, discriminator head) with its own AdamW and constant learning rate.

    Stepped after the student's update: `step(loss)` back-propagates into these parameters only (their .grad
    is cleared before and after, so nothing leaks into or out of the student's update), averages the
    gradients over processes, skips a non-finite update, clips and steps. `state_dict` holds the weights
    and the optimizer state, so accelerator.register_for_checkpointing makes it resumable.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, eps: float = 1e-8, max_grad_norm: float = 0.0,
                 names: list[str] | None = None) -> None:
        self.params = list(params)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
        self.max_grad_norm = max_grad_norm
        self.names = names  # the parameters' names in the model that holds them, for retarget

    def retarget(self, model: nn.Module) -> None:
        """Train the parameters `names` of `model` as it now holds them (FSDP2's prepare() puts new, sharded,
        objects in place), with a fresh optimizer state."""
        held = dict(model.named_parameters())
        self.params = [held[name] for name in self.names]
        self.optimizer.param_groups[0]["params"] = self.params
        self.optimizer.state.clear()

    def step(self, loss: Tensor) -> bool:
        """One update from `loss`; returns False when it was skipped (non-finite loss or gradient)."""
        for p in self.params:
            p.grad = None
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for g in grads:
                if not is_sharded(g):  # FSDP2 has averaged a sharded parameter's gradient over processes already
                    dist.all_reduce(g)
                    g /= dist.get_world_size()
        finite = bool(torch.isfinite(loss.detach()))
        for full in whole_values(grads):  # every process reads every gradient whole: all decide alike
            finite = finite and bool(torch.isfinite(full).all())
        if finite:
            for p, g in zip(self.params, grads):
                p.grad = g
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
        for p in self.params:
            p.grad = None
        return finite

    def state_dict(self) -> dict:
        """Weights and optimizer state as whole tensors (gathered when sharded: every process calls this)."""
        optimizer = self.optimizer.state_dict()
        # new dicts: the packed state's dicts are the optimizer's own, which must keep their shards
        optimizer["state"] = {i: dict(st) for i, st in optimizer["state"].items()}
        moments = [(st, k) for st in optimizer["state"].values() for k, v in st.items() if isinstance(v, torch.Tensor)]
        for (st, k), full in zip(moments, whole_values([st[k] for st, k in moments])):
            st[k] = full.cpu().clone()
        return {"params": [full.cpu().clone() for full in whole_values(self.params)], "optimizer": optimizer}

    def load_state_dict(self, state: dict) -> None:
        if len(state["params"]) != len(self.params):
            raise ValueError(f"the checkpoint holds {len(state['params'])} tensors of this extra, "
                             f"the model {len(self.params)}")
        for p, saved in zip(self.params, state["params"]):
            write_whole(p, saved)
        optimizer = dict(state["optimizer"])  # the moments follow their parameter's sharding
        optimizer["state"] = {i: {k: shard_like(v, self.params[int(i)]) for k, v in st.items()}
                              for i, st in optimizer["state"].items()}
        self.optimizer.load_state_dict(optimizer)


class Extras(NamedTuple):
    """The extras stage's players, each None when its flag is off."""

    scorer: Any  # --reward_model: score(images, prompts) -> (B,), differentiable in the images
    fake_opt: AuxOptimizer | None  # --dmd: the fake score adapter's optimizer
    head: DiscriminatorHead | None  # --gan
    disc_opt: AuxOptimizer | None  # --gan: the head's optimizer


def add_extras(args, model: nn.Module, device: torch.device | str, head_width: int,
               features: tuple[str, str]) -> Extras:
    """The extras --reward_model, --dmd and --gan ask for: the reward model on `device`; the fake score adapter added
    to `model` (call it where the student's adapter was just added) and its optimizer; the GAN head reading
    `features` = (module name, "input" or "output"), of width head_width, of the model, and its optimizer. The
    optimizers take the run's Adam settings and the flags' own learning rates."""
    if args.gan and getattr(model, features[0], None) is None:
        fail(f"--gan reads the {features[1]} of the model's {features[0]}, and "
             f"{args.pretrained_teacher_model} has none")
    from .rewards import load_reward_model

    scorer = load_reward_model(args.reward_model, device) if args.reward_model else None
    aux = dict(betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
               max_grad_norm=args.max_grad_norm)
    fake_opt = head = disc_opt = None
    if args.dmd:
        fake = add_fake_score(model, args.lora_rank, args.lora_alpha, args.lora_targets)
        fake_opt = AuxOptimizer(fake.values(), args.dmd_learning_rate, **aux, names=list(fake))
    if args.gan:
        head = DiscriminatorHead(head_width, features, seed=args.seed).to(device)
        disc_opt = AuxOptimizer(head.parameters(), args.gan_learning_rate, **aux)
    return Extras(scorer, fake_opt, head, disc_opt)
