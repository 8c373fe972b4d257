"""Run a training script with memory and step stamps: what bench_memory.py measures any script with.

    python benchmarks/memory_probe.py --log stamps.jsonl [--stop_after N] -- SCRIPT.py [its flags ...]
    python benchmarks/memory_probe.py --log stamps.jsonl --baseline

The script runs unmodified in this process (as `python SCRIPT.py ...` would run it); three hooks append one JSON
line each to --log:
  - "train_start": the first module forward with autograd on (the first training forward: loading, caching and
    the frozen passes before it run without gradients), so the peak so far is what loading took;
  - "step": after every optimizer step from then on (torch's global optimizer hook: plain, fused and bitsandbytes
    optimizers; a step before the first training forward, e.g. a probe of the optimizer, is not one);
  - "exit": when the process ends (after the save and any final validation), or "stop" after the N-th step with
    --stop_after N, which then ends the process at once (no save, no final validation).
Each line: t (seconds since start), rss_mb (resident now), peak_rss_mb (the process's peak so far), and on a GPU
cuda_mb / cuda_peak_mb (allocated now / max allocated so far). --baseline imports the libraries a recipe imports
and exits: the idle process whose memory bench_memory.py subtracts.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import time

PATH = list(sys.path)  # as Python set it for this file; common (below) adds the repository root
from common import peak_rss_mb, split_at_dashes  # noqa: E402

T0 = time.perf_counter()


def rss_mb() -> float | None:
    """Resident set size now, in MiB (None where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return None


def stamp(log: str, event: str, **extra) -> None:
    """Append one JSON line: the event, the time since start and the memory now and at its peak."""
    record = {"event": event, "t": round(time.perf_counter() - T0, 3), "rss_mb": rss_mb(),
              "peak_rss_mb": peak_rss_mb(), **extra}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        record["cuda_mb"] = torch.cuda.memory_allocated() / 2**20
        record["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    with open(log, "a") as f:
        f.write(json.dumps(record) + "\n")


def install(log: str, stop_after: int | None) -> None:
    """The train_start, step and exit hooks (module docstring)."""
    import torch
    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook

    started = [False]

    def first_training_forward(module, inputs):
        if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters(recurse=False)):
            handle.remove()  # once: a global hook on every forward would cost time in the steps measured
            started[0] = True
            stamp(log, "train_start")

    handle = register_module_forward_pre_hook(first_training_forward)
    steps = [0]

    def after_step(optimizer, args, kwargs):
        if not started[0]:  # not a training step (e.g. a script trying an optimizer out while it sets up)
            return
        steps[0] += 1
        if stop_after is not None and steps[0] >= stop_after:
            stamp(log, "stop", step=steps[0])
            os._exit(0)  # the measured part is over: no save, no final validation
        stamp(log, "step", step=steps[0])

    register_optimizer_step_post_hook(after_step)
    atexit.register(lambda: stamp(log, "exit", step=steps[0]))


def main(argv: list[str]) -> None:
    own, script = split_at_dashes(argv)
    log = own[own.index("--log") + 1] if "--log" in own else None
    stop_after = int(own[own.index("--stop_after") + 1]) if "--stop_after" in own else None
    if log is None or (not script and "--baseline" not in own):
        sys.exit(__doc__.split("\n\n")[1])
    if "--baseline" in own:  # what every recipe imports, then nothing
        import importlib

        for name in ("torch", "diffusers", "transformers", "accelerate", "peft"):
            importlib.import_module(name)
        stamp(log, "exit", step=0)
        return
    install(log, stop_after)
    path = os.path.abspath(script[0])
    sys.argv = [path, *script[1:]]
    sys.path[:] = [os.path.dirname(path), *PATH[1:]]  # as `python SCRIPT.py` sets it: the script's own imports resolve
    runpy.run_path(path, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
