"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: sharding.whole_values, the bucketed gather of
FSDP2 shards, gives each tensor's full_tensor() on every process, for parts of unequal and empty sizes, mixed dtypes,
a replicated DTensor and a plain tensor among the shards, and buckets of one tensor each. Prints OK."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.sharding import part_copy, whole_values, write_part  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    gen = torch.Generator().manual_seed(0)  # the same values on every process
    shapes = [(5, 3), (1, 4), (7,), (4, 2, 3), (3, 5)]  # 3 rows on 2 processes: parts of 2 and 1; 1 row: 1 and 0
    values = [torch.randn(s, generator=gen) for s in shapes]
    values[3] = values[3].to(torch.bfloat16)  # another dtype: a bucket of its own
    tensors = [distribute_tensor(v, mesh, [Shard(0)]) for v in values]
    tensors.insert(2, distribute_tensor(torch.arange(6.0), mesh, [Replicate()]))
    tensors.insert(4, torch.full((2,), 7.0))
    for bucket_bytes in (2**27, 1):  # everything in as few buckets as the dtypes allow; one tensor per bucket
        got = list(whole_values(tensors, bucket_bytes))
        assert len(got) == len(tensors)
        for t, full in zip(tensors, got):
            want = t.full_tensor() if hasattr(t, "full_tensor") else t
            assert full.dtype == want.dtype and torch.equal(full, want), (t.shape, bucket_bytes)
    saved = part_copy(tensors[0])  # this process's part only: restoring it sends nothing
    assert saved.shape == tensors[0].to_local().shape
    tensors[0].to_local().zero_()
    write_part(tensors[0], saved)
    assert torch.equal(tensors[0].full_tensor(), values[0])
    dist.destroy_process_group()
    print("OK")


if __name__ == "__main__":
    main()
