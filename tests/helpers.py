"""Small helpers shared by several test modules (import with `from helpers import ...`)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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


# What the recipes import from the libraries (the slow part of a new interpreter's start, ~7 s of CPU on 2 cores).
LIBRARIES = ["torch", "accelerate", "diffusers.models.unets.unet_2d_condition",
             "diffusers.models.autoencoders.autoencoder_kl", "diffusers.pipelines.stable_diffusion",
             "diffusers.pipelines.stable_diffusion_xl", "diffusers.pipelines.flux", "transformers.models.clip",
             "transformers.models.t5", "peft", "safetensors.torch", "datasets"]


class ScriptProcess:
    """A repo script running as a process of its own (start_script); the parts of subprocess.Popen the tests use."""

    def __init__(self, process, stderr_path: str) -> None:
        self.process, self.stderr_path, self.pid = process, stderr_path, process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode  # a signal's number negated, as Popen's

    def poll(self) -> int | None:
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        import os

        if self.process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise TimeoutError(f"process {self.pid} still running after {timeout} s")
        return self.process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[None, str]:
        """Waits for the end; (None, its stderr)."""
        self.wait(timeout)
        with open(self.stderr_path) as f:
            return None, f.read()


def _run_as_main(path: str, args: list[str], env: dict, cwd: str, stderr_path: str) -> None:
    """In the new process: what `python path args` does once the interpreter is up, then exit with its status."""
    import atexit
    import os
    import runpy
    import sys

    os.environ.update(env)
    os.chdir(cwd)
    sys.path[0] = os.path.dirname(path)  # the script's folder, as `python path` puts it
    sys.argv = [path, *args]
    null, err = os.open(os.devnull, os.O_WRONLY), os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(null, 1)
    os.dup2(err, 2)
    code = 0
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())  # as the interpreter ends on an uncaught exception: a traceback by default
        code = 1
    atexit._run_exitfuncs()  # as the interpreter's exit would (os._exit below skips it)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_warm_context = None
_started: list = []


def _end_leftovers() -> None:
    """At this process's exit: kill what start_script started and a failed test left running (multiprocessing would
    wait for it)."""
    for process in _started:
        if process.exitcode is None:
            process.kill()
            process.join()


def start_script(script: str, args: list[str], env: dict | None = None, stderr_path: str | None = None) -> ScriptProcess:
    """Start `python script args` (a repo script, or an absolute path) from the repo root as a process of its own,
    to be signalled or killed; its stdout is dropped, its stderr goes to stderr_path.

    The process is forked from a server process (multiprocessing's forkserver) that has imported LIBRARIES and
    nothing of this project, so it starts in about a second instead of the ~7 s a new interpreter spends importing
    them: from there it runs the script's `__main__` block as `python` would (its folder first on sys.path, the
    exit status of SystemExit, sys.excepthook and status 1 for an uncaught exception, the atexit functions at
    the end). `env` is set in the new process after those libraries were imported, so a variable they read only at
    import (OMP_NUM_THREADS for torch's thread pool) keeps the server's value, which it took from this process.
    A real process: a signal reaches it and a kill ends it mid-write. What needs a new interpreter itself
    (a command line as a user types it, several processes under a launcher, memory measured from the start)
    runs through subprocess instead.
    """
    import atexit
    import multiprocessing
    import os
    import tempfile

    global _warm_context
    if _warm_context is None:
        _warm_context = multiprocessing.get_context("forkserver")
        _warm_context.set_forkserver_preload(LIBRARIES)
        atexit.register(_end_leftovers)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if stderr_path is None:
        handle, stderr_path = tempfile.mkstemp(suffix=".stderr")
        os.close(handle)
    process = _warm_context.Process(target=_run_as_main, args=(os.path.join(root, script), list(args), env or {},
                                                               root, stderr_path))
    process.start()
    _started.append(process)
    return ScriptProcess(process, stderr_path)


def kill_while_saving(script: str, args: list[str], partial_dir: str, timeout: float = 300) -> None:
    """Start a run whose checkpoint saves stall (the fault hook), SIGKILL it once partial_dir appears."""
    import os
    import signal
    import time

    proc = start_script(script, args, env={"DISTILL_FAULT_DURING_SAVE": "4"})
    deadline = time.time() + timeout
    while not os.path.isdir(partial_dir):
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"run ended before the injected fault\n{open(proc.stderr_path).read()[-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    os.remove(proc.stderr_path)


def assert_lora_moves_the_weights(pipeline_cls, teacher: str, lora_dir: str) -> None:
    """The LoRA of lora_dir loads into the teacher's pipeline, fuses, and changes its denoiser's weights."""
    pipe = pipeline_cls.from_pretrained(teacher)
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    before = {k: v.clone() for k, v in denoiser.state_dict().items()}
    pipe.load_lora_weights(lora_dir)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay, under the base model's own names
    after = denoiser.state_dict()
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


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


class RecipeRun:
    """What an in-process recipe run left: exit status and its captured output (like subprocess's result)."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def import_script(script: str):
    """The repo script `script` (e.g. "train_lcm_distill_sd.py") as a module; imported once per test session."""
    import importlib

    return importlib.import_module(script.removesuffix(".py"))


@contextmanager
def as_a_process(env: dict | None = None) -> Iterator[RecipeRun]:
    """Run the block in this process the way a fresh `python ...` process would run it; yields its RecipeRun,
    filled in when the block ends.

    Meanwhile: `env` added to the environment, stdout/stderr captured (the loggers of diffusers and transformers
    too), the root logger without handlers (a warning reaches stderr, as in a new process, not pytest's log
    capture); SystemExit gives the exit status. Before and after: accelerate's process-wide state reset. At the
    end, what the interpreter's exit does (utils.outputs.release): the run's lock dropped, its signal handlers
    undone, output folders it created and left empty removed.
    """
    import io
    import logging
    import os
    from contextlib import redirect_stderr, redirect_stdout

    from accelerate.state import AcceleratorState, GradientState

    from utils.outputs import release

    run = RecipeRun(0, "", "")
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved_logging = root.handlers[:], root.level
    root.handlers, root.level = [], logging.WARNING
    library_handlers = [h for name in ("diffusers", "transformers") for h in logging.getLogger(name).handlers
                        if isinstance(h, logging.StreamHandler)]
    saved_streams = [h.setStream(err) for h in library_handlers]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    threads = torch.get_num_threads()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            yield run
    except SystemExit as exc:
        run.returncode = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):  # sys.exit("message"): the interpreter prints it
            err.write(f"{exc.code}\n")
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        release()
        root.handlers, root.level = saved_logging
        for handler, stream in zip(library_handlers, saved_streams):
            handler.setStream(stream)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        run.stdout, run.stderr = out.getvalue(), err.getvalue()


def run_recipe(script: str, args: list[str], env: dict | None = None, check: bool = True) -> RecipeRun:
    """Run a recipe as `python script args` would, but in this process (`as_a_process`): parse_args + main
    under user_errors.

    Several seconds faster than a process per call (no interpreter and library start-up). Use run_script for
    what needs a real process: a kill, several processes, a command line as a user types it.
    """
    from utils.errors import user_errors

    module = import_script(script)
    with as_a_process(env) as run, user_errors():
        module.main(module.parse_args(args))
    if check and run.returncode != 0:
        raise AssertionError(f"exit {run.returncode}\n{run.stderr[-3000:]}")
    return run


def listing(folder) -> list[str]:
    """The sorted entries of a folder but the output marker every program writes (utils.outputs.MARKER)."""
    import os

    from utils.outputs import MARKER

    return sorted(n for n in os.listdir(folder) if n != MARKER)


def run_command(argv: list[str], env: dict | None = None) -> RecipeRun:
    """`python *argv` (a script of the repo and its arguments, or `-m module ...`) run in this process
    (`as_a_process`), its `if __name__ == "__main__":` block included: an uncaught exception prints its
    traceback and exits 1, as the interpreter would."""
    import os
    import runpy
    import sys
    import traceback

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved_argv, cwd = sys.argv, os.getcwd()
    module = argv[1] if argv[0] == "-m" else None
    imported = sys.modules.pop(module, None) if module else None  # `python -m` runs a module not imported before
    try:
        with as_a_process(env) as run:
            os.chdir(root)
            try:
                if module:
                    sys.argv = [module, *argv[2:]]
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
                else:
                    sys.argv = list(argv)
                    runpy.run_path(os.path.join(root, argv[0]), run_name="__main__")
            except Exception:  # not SystemExit: the exit status of as_a_process
                traceback.print_exc()
                raise SystemExit(1) from None
    finally:
        sys.argv = saved_argv
        os.chdir(cwd)
        if imported is not None:
            sys.modules[module] = imported
    return run


class Spy:
    """Wraps a function, recording each call's arguments; the call itself goes through unchanged."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append(args)
        return self.fn(*args, **kwargs)


def capture_distance(calls: list):
    """An L2 distance that records its (pred, target) pairs."""
    def d(a, b, gen=None):
        calls.append((a, b))
        return (a - b).pow(2).mean()
    return d


def random_lora(model, targets: list[str], seed: int = 0) -> torch.Generator:
    """A trainable rank-4 LoRA (alpha 8) on `targets` whose B weights are drawn N(0, 0.01^2) from `seed`, so that it
    acts; returns the generator, for the caller's further draws."""
    from utils import lora

    lora.add_trainable_lora(model.requires_grad_(False), 4, 8, targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return g


def write_flux_start_lora(world: str, out: str) -> str:
    """A rank-4 FLUX LoRA folder (written as the recipes write theirs), standing in for stage 2's output."""
    import os

    from diffusers import FluxTransformer2DModel

    from utils import lora, lora_files

    model = FluxTransformer2DModel.from_pretrained(os.path.join(world, "models/flux"), subfolder="transformer")
    random_lora(model, lora.FLUX_LORA_TARGETS)
    os.makedirs(out)
    lora_files.save_lora_outputs(model, out, "transformer", peft_dir=out)
    return out


def assert_one_line_error(run, needle: str, never_written: str) -> None:
    """Exit status 2, one line on stderr that names `needle`, no traceback, and the file never_written absent."""
    import os

    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert not os.path.exists(never_written)


def toy_flux_flow(world: str, output_dir: str, extra_args: list[str] = (), batch: int = 2, seed: int = 0):
    """(flow, cond, uncond): train_tlcm_flux.FluxFlow on the toy FLUX teacher (fp32, CPU, 32 px: 16 tokens) with a
    rank-4 LoRA whose lora_B is random (a trained student), and random prompt conditions of `batch` prompts.

    For direct calls of the recipe's stage losses; `extra_args` are recipe flags (e.g. ["--num_segments", "4"]).
    """
    import os

    from diffusers import FluxTransformer2DModel

    from utils import lora, models

    recipe = import_script("train_tlcm_flux.py")
    path = os.path.join(world, "models/flux")
    args = recipe.parse_args(["--pretrained_teacher_model", path, "--prompts_file", "unused.txt",
                              "--output_dir", output_dir, "--lora_rank", "4", *extra_args])
    base = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer")
    g = random_lora(base, lora.FLUX_LORA_TARGETS, seed)
    flow = recipe.FluxFlow(base, models.load_noise_scheduler_config(path), 8, args, torch.float32,
                           torch.device("cpu"))
    c = base.config

    def condition(n: int) -> dict:
        return {"embeds": torch.randn(n, 8, c.joint_attention_dim, generator=g),
                "pooled": torch.randn(n, c.pooled_projection_dim, generator=g), "text_ids": torch.zeros(8, 3)}
    return flow, condition(batch), condition(1)


def save_tiny_clip(folder: str) -> str:
    """A small random transformers CLIP (32 px images, 16-d embeddings) and its processor, saved as a folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from utils.toy.tokenizers import build_clip_tokenizer

    tok = build_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(folder)
    return folder
