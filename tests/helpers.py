"""Small helpers shared by several test modules (import with `from helpers import ...`)."""

from __future__ import annotations

import torch


def unet_output(unet, seed: int = 0, zero_cond: bool = False) -> torch.Tensor:
    """The UNet at fixed random inputs; zero_cond: a UNet without guidance input, compared to one with it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 16, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                   "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    if unet.config.time_cond_proj_dim is not None and not zero_cond:
        kw["timestep_cond"] = torch.randn(2, unet.config.time_cond_proj_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([999, 259]), emb, **kw).sample


def run_script(script: str, args: list[str], env: dict | None = None, check: bool = True):
    """Run a repo script as a user would (a subprocess from the repo root); raise with its stderr if it fails."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, script), *args], capture_output=True, text=True,
                          cwd=root, env={**os.environ, **(env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def kill_while_saving(script: str, args: list[str], partial_dir: str, timeout: float = 300) -> None:
    """Start a run whose checkpoint saves stall (the fault hook), SIGKILL it once partial_dir appears."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, os.path.join(root, script), *args], cwd=root,
                            env={**os.environ, "DISTILL_FAULT_DURING_SAVE": "4"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not os.path.isdir(partial_dir):
        assert proc.poll() is None and time.time() < deadline, "run ended before the injected fault"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_same(a, b, where: str = "state") -> None:
    """Exact (bit-for-bit, same dtype) equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
