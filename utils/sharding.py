"""Weights split across processes (accelerate's FSDP2, DeepSpeed ZeRO-3) and whole views of them.

Under these engines a prepared model's parameter holds only this process's part: an FSDP2 parameter is
a DTensor sharded over the processes, a ZeRO-3 parameter an empty tensor whose part lives in
`ds_tensor`. The recipes are the same under every engine; where a step needs whole tensors (the EMA
of a student, saving a LoRA) it goes through this module, which leaves plain tensors (one process,
DDP, ZeRO-1/2) as they are. Reading or writing a split tensor whole is a collective: all processes do
it, in the same order.

The EMA copies of the recipes are kept whole on every process (a full-UNet target must be whole to
run; a LoRA's EMA is small), so reading a sharded source whole is all an update needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn


def _is_dtensor(t: Tensor) -> bool:
    """Whether t is a DTensor (an FSDP2 shard); False where torch.distributed is not built."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _is_zero3(t: Tensor) -> bool:
    """Whether t is a parameter partitioned by DeepSpeed ZeRO-3 (it carries a ZeRO id)."""
    return hasattr(t, "ds_id")


def _gathered(params: list[Tensor], modifier_rank: int | None = None):
    """DeepSpeed's block in which these ZeRO-3 parameters are whole (with modifier_rank: written back from that
    process); no block without any."""
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def is_sharded(t: Tensor) -> bool:
    """Whether t holds only this process's part of a parameter."""
    return _is_dtensor(t) or _is_zero3(t)


def engine(accelerator) -> str:
    """The run's engine as accelerate set it up: "single", "ddp", "fsdp1", "fsdp2", or "zero0".."zero3" (DeepSpeed)."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind == "FSDP":
        return f"fsdp{accelerator.state.fsdp_plugin.fsdp_version}"
    if kind == "DEEPSPEED":
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def splits_weights(accelerator) -> bool:
    """Whether the run shards model weights (FSDP, DeepSpeed ZeRO-3): then every forward is a collective."""
    return engine(accelerator) in ("fsdp1", "fsdp2", "zero3")


def same_everywhere(value: int) -> int:
    """Process 0's value on every process (a broadcast); the value itself outside a distributed run."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def staging_device(accelerator) -> torch.device:
    """Where a model waits for accelerator.prepare(): the run's device, or the CPU when prepare() splits the model
    (FSDP, ZeRO-3), which then moves each process's part: moved whole to every GPU first, the model would need
    the very memory the split saves."""
    return torch.device("cpu") if splits_weights(accelerator) else accelerator.device


@contextmanager
def loaded_whole(accelerator) -> Iterator[None]:
    """A block whose model loading keeps every model whole. Under DeepSpeed, accelerate registers its config
    with transformers, which then splits each model as it loads (zero.Init at ZeRO-3), the frozen ones too:
    never prepared, they would stay empty. (accelerate's zero3_init_context_manager leaves it registered.)"""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


@contextmanager
def whole(t: Tensor) -> Iterator[Tensor]:
    """t's whole value, to read inside the block: gathered when t is a shard, t itself otherwise."""
    if _is_dtensor(t):
        yield t.detach().full_tensor()
        return
    with _gathered([t] if _is_zero3(t) else []):
        yield t.detach()


def _dim0_shard(t: Tensor) -> bool:
    """Whether t is an FSDP2 shard: a DTensor split along dim 0 over a 1-D mesh, whose whole value is its processes'
    parts in rank order, each as torch.chunk cuts it."""
    return (_is_dtensor(t) and t.device_mesh.ndim == 1 and len(t.placements) == 1
            and t.placements[0].is_shard(0))


def _gather_dim0(shards: list[Tensor]) -> list[Tensor]:
    """The whole values of FSDP2 shards of one dtype and mesh, in one all_gather: each process sends its parts
    padded to the largest part and cuts every process's parts out of what comes back."""
    mesh = shards[0].device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    rows = [[len(c) for c in torch.arange(t.shape[0]).chunk(world)] for t in shards]
    rows = [r + [0] * (world - len(r)) for r in rows]  # torch.chunk may give fewer parts than processes
    row_numel = [math.prod(t.shape[1:]) for t in shards]
    width = [max(r) * n for r, n in zip(rows, row_numel)]
    local = [t.detach().to_local() for t in shards]
    buf = torch.zeros(sum(width), dtype=local[0].dtype, device=local[0].device)
    offset = 0
    for part, r, w in zip(local, rows, width):
        assert part.shape[0] == r[rank], "an FSDP2 part other than torch.chunk's"
        buf[offset:offset + part.numel()] = part.reshape(-1)
        offset += w
    received = [torch.empty_like(buf) for _ in range(world)]
    torch.distributed.all_gather(received, buf, group=mesh.get_group())
    out, offset = [], 0
    for t, r, n, w in zip(shards, rows, row_numel, width):
        out.append(torch.cat([received[k][offset:offset + r[k] * n] for k in range(world)]).view(t.shape))
        offset += w
    return out


def whole_values(tensors: Sequence[Tensor], bucket_bytes: int = 2**27) -> Iterator[Tensor]:
    """The whole value of each tensor in order, to read as it comes (a collective: every process iterates all).

    FSDP2's shards are gathered in buckets whose whole values take at most `bucket_bytes` (or one tensor), one
    collective per bucket instead of one per tensor (hundreds per step for a LoRA's EMA); others as `whole`
    reads them. A gathered value is a new tensor, a plain tensor comes as itself (detached).
    """
    bucket: list[Tensor] = []
    size = 0  # bytes of the bucket's whole values
    for t in tensors:
        shard, nbytes = _dim0_shard(t), t.numel() * t.element_size()
        if bucket and not (shard and t.dtype == bucket[0].dtype and t.device_mesh == bucket[0].device_mesh
                           and size + nbytes <= bucket_bytes):
            yield from _gather_dim0(bucket)
            bucket, size = [], 0
        if shard:
            bucket.append(t)
            size += nbytes
            continue
        with whole(t) as full:
            yield full
    if bucket:
        yield from _gather_dim0(bucket)


def part_copy(t: Tensor) -> Tensor:
    """A copy of what restoring t later needs: this process's part of an FSDP2 shard (nothing sent), the whole
    value of other tensors (gathered under ZeRO-3). Put back with write_part."""
    if _is_dtensor(t):
        return t.detach().to_local().clone()
    with whole(t) as full:
        return full.clone()


@torch.no_grad()
def write_part(t: Tensor, saved: Tensor) -> None:
    """t <- what part_copy(t) returned."""
    if _is_dtensor(t):
        t.detach().to_local().copy_(saved)
    else:
        write_whole(t, saved)


def shard_like(value, like: Tensor):
    """A whole tensor (the same on every process) cut into this process's part as FSDP2 shards `like`
    (nothing is sent); any other value, or one of another shape, as it is."""
    if not (isinstance(value, Tensor) and _is_dtensor(like) and value.shape == like.shape):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


@torch.no_grad()
def write_whole(t: Tensor, value: Tensor) -> None:
    """t <- value, value being the whole tensor (the same on every process); each process keeps its part."""
    value = value.to(dtype=t.dtype)
    if _is_dtensor(t):
        t.to_local().copy_(shard_like(value, t).to_local())
        return
    with _gathered([t] if _is_zero3(t) else [], modifier_rank=0):  # every process holds value: take process 0's
        t.data.copy_(value.to(t.device))


def settle(model: nn.Module) -> None:
    """Have `model` hold its sharded parameters again: FSDP2 keeps gathered copies on it between forwards (the
    root module's, by accelerate's choice). Only where no backward is pending (it frees what one would need)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the module holding parameter `name` of model, the parameter's attribute name)."""
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


@contextmanager
def whole_parameters(model: nn.Module, select: Callable[[str], bool] = lambda name: True) -> Iterator[None]:
    """Inside the block the selected parameters of `model` (by name) are whole tensors on every process.

    For reading (e.g. the usual writers saving a LoRA): the shards are put back afterwards and a change
    made inside is lost. Selecting few parameters (a LoRA's) gathers only those. No backward may be pending
    (FSDP2's gathered copies are dropped first: see settle).
    """
    settle(model)
    named = [(n, p) for n, p in model.named_parameters() if select(n)]
    sharded = [(n, p) for n, p in named if _is_dtensor(p)]
    swapped = []
    for (name, p), full in zip(sharded, whole_values([p for _, p in sharded])):
        module, attr = owner(model, name)
        setattr(module, attr, nn.Parameter(full, requires_grad=p.requires_grad))
        swapped.append((module, attr, p))
    try:
        with _gathered([p for _, p in named if _is_zero3(p)]):
            yield
    finally:
        for module, attr, p in swapped:
            setattr(module, attr, p)


def prepared_parameters(model: nn.Module, names: list[str], optimizer) -> list[nn.Parameter]:
    """The parameters `names` of a prepared model as it now keeps them (FSDP2 puts new, sharded, objects in place),
    with the model's fresh optimizer pointed at them: accelerate (1.15) maps a second prepare() of an FSDP2 model
    (a later TLCM stage) to wrong objects, matching parameters by their shards' data pointers, some of which
    coincide. Other engines' optimizers are left as they are (DeepSpeed's hold flat partitions of their own)."""
    settle(model)
    held = dict(model.named_parameters())
    params = [held[name] for name in names]
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    if any(_is_dtensor(p) for p in params) and isinstance(inner, torch.optim.Optimizer):
        if len(inner.param_groups) != 1 or inner.state:
            raise ValueError("prepared_parameters expects a fresh optimizer with one parameter group")
        inner.param_groups[0]["params"] = params
    return params
