"""Helpers the benchmark scripts share: importing a recipe by path, timing, memory, JSON output."""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys
import time
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the scripts run as `python benchmarks/x.py`: make `utils` and the recipes importable
    sys.path.insert(0, ROOT)

from utils.errors import UserError, fail  # noqa: E402

BIG = str(10**9)  # a step interval that never comes: no checkpoint or validation inside a benchmark
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def split_at_dashes(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the benchmark's own flags, the flags after `--` that go to the recipe)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def flag_value(argv: list[str], name: str) -> str | None:
    """The value of `--name X` or `--name=X` in an argument list (the last one wins, as in argparse)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def resolve_recipe(path: str) -> str:
    """A recipe script's path: as given, or relative to the repository root."""
    for candidate in (path, os.path.join(ROOT, path)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    fail(f"recipe {path} not found (--recipe; e.g. train_lcm_distill_lora_sdxl.py)")


def import_recipe(path: str):
    """The recipe script as a module (its `main` and `parse_args`), imported from its file."""
    path = resolve_recipe(path)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import does: a dataclass in the recipe looks its module up there
    spec.loader.exec_module(module)
    for attr in ("main", "parse_args"):
        if not hasattr(module, attr):
            fail(f"{path} has no {attr}(): not a recipe of this repository (--recipe)")
    return module


def recipe_kind(module) -> str:
    """"tlcm" (staged TLCM LoRA, FLUX or SDXL), "lora" (LCM-LoRA) or "lcm" (full student UNet)."""
    if hasattr(module, "stage1_loss"):
        return "tlcm"
    if hasattr(module, "make_student"):
        return "lcm"
    if hasattr(module, "lcm_lora_loss"):
        return "lora"
    fail(f"{module.__file__}: unknown recipe (expected an LCM, LCM-LoRA or TLCM recipe)")


def quiet_libraries() -> None:
    """No per-file loading bars or cast notes from diffusers/transformers: stdout is for the JSON."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def synchronize() -> None:
    """Wait for queued GPU work, so a wall-clock stamp covers it (no-op on CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def now() -> float:
    synchronize()
    return time.perf_counter()


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(who).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def peak_memory() -> tuple[float, str]:
    """(MiB, what it is): CUDA max allocated when on a GPU, else this process's peak RSS."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max allocated"
    return peak_rss_mb(), "peak RSS"


def device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment() -> dict:
    """torch version and threads: what every JSON line carries besides its numbers."""
    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads()}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def emit(record: dict, append: str | None = None) -> None:
    """Print the record as one JSON line on stdout and, with --append, add it to a .jsonl file."""
    line = json.dumps(record)
    print(line, flush=True)
    if append:
        folder = os.path.dirname(os.path.abspath(append))
        os.makedirs(folder, exist_ok=True)
        with open(append, "a") as f:
            f.write(line + "\n")


@contextmanager
def closing_bar(bar):
    """A UserError inside a progress bar: close the bar first, so the one-line error is the last line."""
    try:
        yield bar
    except UserError as exc:
        bar.close()
        fail(str(exc))


def check_positive(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}")
