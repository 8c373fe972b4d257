"""Where a program writes: the output rule every program follows, and a training run's output folder (one run at
a time, tidied when the run ends early, published to the hub at the end with --push_to_hub).

The rule, for the recipes, convert_lora.py, inference.py, utils.evaluate and demo.py alike: an output that is,
contains or lies inside an input is refused, even when asked to overwrite (`check_output_not_input`); a folder that
holds what the program did not write (a user's files, another program's output) is refused unless asked, and then
written among: the files of the names the program writes are replaced, nothing else is deleted (`foreign`,
`refuse_foreign`; files.atomic_write(into=True) moves a finished folder in entry by entry). A program's own folder
is known by the MARKER file it writes there (`mark`, `owner`). Every program calls `prepare_output` (the others)
or, through flags.check_training_args and loop.make_accelerator, `check_not_an_input`, `check_others_files`,
`make_output_dir` and `claim` (the recipes) where its output enters.

A run's life: those checks (before any model is loaded); `claim` (loop.make_accelerator: the folder's lock, the
earlier-run rule, --overwrite_output_dir, the marker); the recipe's work; `publish` (the model card, then
--push_to_hub); `release` (at exit, or after an in-process run): the lock dropped, the signal handlers restored,
and the folders the run created but left empty removed.

SIGTERM or SIGINT outside the training loop ends the program at once with one line (a SystemExit, so `release`
still runs); inside it, loop.TrainLoop stops after the current step and keeps a checkpoint of it.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
from typing import Any, Callable

from . import checkpoint, errors, files
from .errors import UserError, fail, user_errors

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"  # {"pid", "host"} of the run writing to the folder
# {"program"}: the folder is an output of ours, written by that program ("training" for every recipe); a folder
# without it, not empty, holds what someone else wrote (see `foreign`)
MARKER = ".distill_output.json"
TRAINING = "training"
FINAL_FILES = ("model_index.json", "pytorch_lora_weights.safetensors")  # what the recipes write when a run is done
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# where a run reads (local paths only: a hub id names no folder of this machine)
INPUT_FLAGS = ("pretrained_teacher_model", "pretrained_vae_model_name_or_path", "train_data_dir", "dataset_name",
               "train_shards_path_or_url", "prompts_file", "init_lora", "latent_lpips_path", "reward_model")
# never uploaded: resumable state (large, and of no use on the hub) and the lock
HUB_IGNORE = ["checkpoint-*", "*/checkpoint-*", LOCK_FILE]
SECRET_ARGS = ("hub_token",)  # never written to a model card or a tracker

_created: list[str] = []  # folders this process created, parents first; removed again if left empty
_locks: list[str] = []  # lock files this process holds
_handlers: dict[int, Any] = {}  # the signal handlers found before ours, restored by release()
_stop_signals: list[int] = []  # the stop signals stop_now acted on
_excepthooks: list[Any] = []  # the excepthook found before stop_now's, restored by release()
_marked: list[str] = []  # folders this process marked as its output; unmarked again if it wrote nothing there


# ----------------------------------------------------------------------------- inputs


def _local_path(value: str) -> str | None:
    """The real path of an input that is a local file or folder (of a shard pattern: its fixed folder), else None."""
    if "://" in value or value.startswith("pipe:"):
        return None
    path = os.path.expanduser(value)
    wild = min((i for i in (path.find(c) for c in "*?[{") if i >= 0), default=-1)
    if wild >= 0:  # a shard pattern: the folder its fixed part names
        path = os.path.dirname(path[:wild])
    return os.path.realpath(path) if path and os.path.exists(path) else None


def _inside(path: str, folder: str) -> bool:
    """Whether `path` lies strictly inside `folder` (both real paths)."""
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def _earlier_stage_lora(args: argparse.Namespace, out: str, path: str) -> bool:
    """Whether `path` is in the folder of a TLCM stage this run does not train (`out/stage<k>`, left as it is)."""
    stages = getattr(args, "stages", None)
    return stages is not None and any(_inside(path, os.path.join(out, f"stage{k}")) for k in ("1", "2", "extras")
                                      if k not in stages)


def check_not_an_input(args: argparse.Namespace) -> None:
    """Refuse an --output_dir that is, contains or lies inside a local input of the run (teacher, VAE, data, prompts,
    init LoRA, latent LPIPS net, reward model): the run would write over or among the user's files."""
    out = os.path.realpath(os.path.expanduser(args.output_dir))
    inputs = {}
    for name in INPUT_FLAGS:
        value = getattr(args, name, None)
        path = _local_path(str(value)) if value else None
        if path is not None and not (name == "init_lora" and _earlier_stage_lora(args, out, path)):
            inputs[f"--{name}"] = value
    check_output_not_input(args.output_dir, "--output_dir", inputs)


def check_output_not_input(output: str, flag: str, inputs: dict[str, Any]) -> None:
    """Refuse an output (file or folder) that is, contains or lies inside one of `inputs` ({flag or argument name:
    local path, a list of them (a repeated flag), or None}), whatever --overwrite says: a program never writes over
    or among what it reads."""
    out = os.path.realpath(os.path.expanduser(output))
    pairs = [(name, v) for name, value in inputs.items() for v in (value if isinstance(value, (list, tuple)) else [value])]
    for name, value in pairs:
        path = _local_path(str(value)) if value else None
        if path is None:
            continue
        if path == out:
            fail(f"{flag} {output} is the {name} input: the run would write over it; choose another {flag}")
        if _inside(path, out):
            fail(f"{flag} {output} contains the {name} input {value}: choose a folder of its own")
        if _inside(out, path):
            fail(f"{flag} {output} lies inside the {name} input {value}: choose a folder outside it")


# ----------------------------------------------------------------------------- folders of our own


def _internal(name: str) -> bool:
    """Whether a folder entry is bookkeeping of ours: the marker, a run's lock, a hidden temporary name."""
    return name in (MARKER, LOCK_FILE) or (name.startswith(".") and any(
        tag in name for tag in (".write_test.", ".partial-", ".old-", ".partial", ".deleting")))


def owner(folder: str) -> str | None:
    """The program whose output `folder` is, as its MARKER says (None: no marker, or unreadable)."""
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
            return str(json.load(f)["program"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark(folder: str, program: str) -> None:
    """Record in `folder` that it is `program`'s output (the MARKER file), unless it says so already."""
    if owner(folder) != program:
        with files.atomic_write(os.path.join(folder, MARKER)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump({"program": program}, f)
        _marked.append(folder)


def foreign(folder: str, program: str, own: Callable[[str], bool] | None = None) -> str | None:
    """What in `folder` is not `program`'s own, in words, or None: a missing or empty folder, or one MARKER names
    `program`'s, is its own; one marked by another program is that program's output; else its entries are a user's
    (but those `own(name)` says the program writes: its folders from before the marker)."""
    if not os.path.isdir(folder):
        return None
    names = sorted(n for n in os.listdir(folder) if not _internal(n) and not (own and own(n)))
    marked = owner(folder)
    if not names or marked == program:
        return None
    if marked is not None:
        return f"the output of {marked}"
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"files it did not write ({shown})"


def refuse_foreign(folder: str, flag: str, program: str, overwrite: bool, overwrite_flag: str | None,
                   own: Callable[[str], bool] | None = None) -> None:
    """The rule for a folder holding what another wrote (`foreign`): refused unless `overwrite`, then written among
    (files of the names the program writes are replaced, the others kept)."""
    what = foreign(folder, program, own)
    if what is None or overwrite:
        return
    how = (f", or pass {overwrite_flag} to write into it (files of the names it writes are replaced, "
           "the others kept)") if overwrite_flag else ""
    fail(f"{flag} {folder} holds {what}: choose a new or empty folder{how}")


def prepare_output(path: str, flag: str, inputs: dict[str, Any], program: str, overwrite: bool = False,
                   overwrite_flag: str | None = "--overwrite", folder: bool = True,
                   own: Callable[[str], bool] | None = None) -> None:
    """The output rule for the programs that are not training recipes, called where the output enters: stop signals
    end the program with one line (SIGTERM, Ctrl-C); an output that is, holds or lies inside an input is refused;
    a folder output (folder=True) that is a file, or holds what another wrote (unless `overwrite`), is refused, else
    created (`release` removes it again if the program ends before writing into it) and marked as `program`'s."""
    handle_stop_signals()
    errors.note_output(path, flag)
    check_output_not_input(path, flag, inputs)
    if not folder:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"{flag} {path} is a file, not a folder")
    refuse_foreign(path, flag, program, overwrite, overwrite_flag, own)
    make_output_dir(path, flag)
    mark(path, program)


def remove_if_unused(folder: str) -> None:
    """Remove `folder` if it holds nothing but our bookkeeping (the marker, a lock of ours, a write probe)."""
    try:
        names = os.listdir(folder)
        if all(_internal(n) for n in names):
            for name in names:  # the marker, and this process's write probe (a stop can land while it exists)
                if name in (MARKER, f".write_test.{os.getpid()}"):
                    os.remove(os.path.join(folder, name))
            os.rmdir(folder)
    except OSError:
        pass


# ----------------------------------------------------------------------------- creating, claiming, releasing


def make_output_dir(path: str, flag: str = "--output_dir") -> None:
    """Create `path` (and missing parents), checked writable; what it creates is removed by `release` if left empty."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"{flag} {path} is a file, not a folder")
    missing, head = [], os.path.abspath(path)
    while not os.path.exists(head):
        missing.append(head)
        head = os.path.dirname(head)
    if missing:  # a stop signal from now on must still remove them
        _install(stop_now)
    _created.extend(reversed(missing))
    try:
        os.makedirs(path, exist_ok=True)
        # a name of this process's own: the processes of a multi-process run probe at the same time
        probe = os.path.join(path, f".write_test.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as exc:
        fail(f"{flag} {path} is not writable ({exc.strerror})")


def claim(args: argparse.Namespace, accelerator: Any) -> None:
    """Start a run in args.output_dir: stop signals end it with one line; the main process takes the folder's lock,
    refuses an earlier run's folder unless --resume_from_checkpoint or --overwrite_output_dir says what to do with
    it, and for --overwrite_output_dir deletes that run's checkpoints."""
    _install(stop_now)
    errors.note_output(args.output_dir, "--output_dir")
    make_output_dir(args.output_dir)  # done already where the flags were checked; not every caller runs it
    if accelerator.is_main_process:
        with user_errors():
            lock(args.output_dir)
            what = earlier_run(args)
            if what and not args.overwrite_output_dir and args.resume_from_checkpoint is None:
                raise UserError(f"--output_dir {args.output_dir} already holds {what}: continue it with "
                                "--resume_from_checkpoint latest, or start over with --overwrite_output_dir")
            if what and args.resume_from_checkpoint is not None and nothing_to_resume(args):
                raise UserError(f"--output_dir {args.output_dir} already holds {what} and no checkpoint to resume "
                                "from (--resume_from_checkpoint); start over with --overwrite_output_dir")
        check_others_files(args)
        if args.overwrite_output_dir:
            clear_earlier_run(args)
        mark(args.output_dir, TRAINING)
    accelerator.wait_for_everyone()  # no process looks at the folder before the earlier run's state is gone


def release() -> None:
    """End of a run (at exit, or after an in-process one): drop its locks, restore the signal handlers (and excepthook)
    found before, and remove the folders it created and left empty (deepest first)."""
    while _locks:
        path = _locks.pop()
        if lock_owner(path) == _me():
            try:
                os.remove(path)
            except OSError:
                pass
    if threading.current_thread() is threading.main_thread():
        for signum, handler in _handlers.items():
            signal.signal(signum, handler)
        _handlers.clear()
    if _excepthooks:  # an in-process run that was stopped leaves the caller's excepthook as it found it
        sys.excepthook = _excepthooks.pop()
    while _marked:
        folder = _marked.pop()
        if os.path.isdir(folder) and all(_internal(n) for n in os.listdir(folder)):
            try:
                os.remove(os.path.join(folder, MARKER))
            except OSError:
                pass
    while _created:
        remove_if_unused(_created.pop())  # only ever removes a folder holding nothing but our bookkeeping
    errors._outputs.clear()


atexit.register(release)


# ----------------------------------------------------------------------------- stop signals


def handle_stop_signals() -> None:
    """From now on SIGTERM and SIGINT end the program at once with one line (`stop_now`); call it first thing."""
    _install(stop_now)


def _install(handler) -> None:
    """Handle SIGTERM and SIGINT with `handler` (main thread only), remembering the handlers found first."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        previous = signal.signal(signum, handler)
        _handlers.setdefault(signum, previous)


def stop_now(signum: int, frame: Any = None) -> None:
    """A stop signal outside a training step: end at once (exit 128 + signal), one line; `release` tidies up."""
    _stop_signals.append(signum)
    if not _excepthooks:
        _excepthooks.append(sys.excepthook)
        sys.excepthook = _exit_after_stop
    fail(f"stopped by {signal.Signals(signum).name}; finished checkpoints and outputs are kept", 128 + signum)


def _exit_after_stop(exc_type, exc, tb) -> None:
    """The end of an exception that escapes after stop_now: the signal arrived inside a library's bare `except:`
    (datasets' `multiprocess` import has one), which swallowed the SystemExit and raised something else. The stop's
    line is printed already: tidy up and exit with the stop's status, without that traceback."""
    release()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + _stop_signals[-1])


# ----------------------------------------------------------------------------- the lock


def _me() -> dict:
    """This process, as a lock file names its owner."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def lock_owner(path: str) -> dict | None:
    """The {"pid", "host"} a lock file names, or None if it is gone or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            owner = json.load(f)
        return {"pid": int(owner["pid"]), "host": str(owner["host"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_gone(owner: dict) -> bool:
    """Whether the lock's owner is known to have ended: a process of this host that no longer exists."""
    if owner["host"] != socket.gethostname():
        return False  # another machine's process cannot be looked at from here
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def lock(output_dir: str) -> None:
    """Take `output_dir`'s lock for this process; a stale one (its run ended without removing it) is taken over."""
    path = os.path.join(output_dir, LOCK_FILE)
    for _attempt in range(3):
        try:
            with files.atomic_write(path, overwrite=False) as tmp, open(tmp, "w", encoding="utf-8") as f:
                json.dump(_me(), f)
        except FileExistsError:
            owner = lock_owner(path)
            if owner is None or owner == _me() or _is_gone(owner):
                try:
                    os.remove(path)  # ours from an earlier in-process run, or of a run that crashed
                except FileNotFoundError:
                    pass
                continue
            raise UserError(f"--output_dir {output_dir} is in use by another run (pid {owner['pid']} on "
                            f"{owner['host']}); wait for it to end, or delete {path} if that run is gone") from None
        if path not in _locks:
            _locks.append(path)
        return
    raise UserError(f"--output_dir {output_dir} is in use by another run (its lock {path} keeps changing)")


# ----------------------------------------------------------------------------- earlier runs


def _run_folders(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(checkpoint folder, folder of the final files) of each part of the run: one, or one per TLCM stage."""
    stages = getattr(args, "stages", None)
    if stages is None:
        return [(args.output_dir, args.output_dir)]
    return [(os.path.join(args.output_dir, f"stage{k}"), os.path.join(args.output_dir, f"stage{k}", "lora"))
            for k in stages]


def _final_file(folder: str) -> str | None:
    """The name of the first of FINAL_FILES in folder, or None."""
    return next((name for name in FINAL_FILES if os.path.isfile(os.path.join(folder, name))), None)


def earlier_run(args: argparse.Namespace) -> str | None:
    """What a new run in args.output_dir would replace or mix with: a finished run (the final files of every part it
    trains are there), or an unfinished run's checkpoints; None if neither."""
    parts = _run_folders(args)
    finals = [_final_file(final) for _, final in parts]
    if all(finals):
        return f"a finished run ({os.path.relpath(os.path.join(parts[-1][1], finals[-1]), args.output_dir)})"
    for (folder, _), final in zip(parts, finals):
        found = checkpoint.list_checkpoints(folder)
        if not final and found:
            return f"checkpoints of an unfinished run ({os.path.relpath(found[-1], args.output_dir)})"
    return None


def _parts_begun(args: argparse.Namespace) -> set[str]:
    """The top-level names in args.output_dir of the run's parts that hold their final files or checkpoints: a TLCM
    stage folder a run continues from ("stage 1 already finished"), copied in by hand or left by an earlier run."""
    return {os.path.relpath(folder, args.output_dir).split(os.sep)[0] for folder, final in _run_folders(args)
            if folder != args.output_dir and (_final_file(final) or checkpoint.list_checkpoints(folder))}


def check_others_files(args: argparse.Namespace) -> None:
    """Refuse an --output_dir holding files no training run wrote (a user's README.md, another program's output)
    unless --overwrite_output_dir; the folder of an earlier run is a run's own, marked or not (older versions), and so
    are the stage folders it would continue from."""
    if not earlier_run(args):
        begun = _parts_begun(args)
        refuse_foreign(args.output_dir, "--output_dir", TRAINING, args.overwrite_output_dir, "--overwrite_output_dir",
                       own=begun.__contains__)


def nothing_to_resume(args: argparse.Namespace) -> bool:
    """Whether --resume_from_checkpoint latest finds no checkpoint in any part of the run."""
    return args.resume_from_checkpoint == "latest" and not any(
        checkpoint.list_checkpoints(folder) for folder, _ in _run_folders(args))


def clear_earlier_run(args: argparse.Namespace) -> None:
    """--overwrite_output_dir: delete the earlier run's state that a resume would pick up (its checkpoints; a TLCM
    stage's whole folder, so the stage is trained again); its final files are replaced when this run ends."""
    stages = getattr(args, "stages", None)
    if stages is None:
        removed = checkpoint.remove_checkpoints(args.output_dir)
    else:
        folders = [os.path.join(args.output_dir, f"stage{k}") for k in stages]
        removed = sum(os.path.isdir(f) for f in folders)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    if removed:
        logger.warning(f"--overwrite_output_dir: deleted {removed} checkpoint or stage folder(s) of the earlier run "
                       f"in {args.output_dir}")


# ----------------------------------------------------------------------------- the model card and the hub


def public_vars(args: argparse.Namespace) -> dict:
    """The run's flags without the secret ones (--hub_token): what a model card or a tracker may record."""
    return {k: v for k, v in vars(args).items() if k not in SECRET_ARGS}


def publish(args: argparse.Namespace, title: str, body: str = "") -> None:
    """The end of a run, on the main process once its outputs are written: <output_dir>/README.md (title, body:
    how to load and sample the result, then every training flag but the secret ones), then --push_to_hub."""
    lines = [f"# {title}", "", body.strip(), "", "## Training arguments", "", "```json",
             json.dumps(public_vars(args), indent=2, default=str), "```", ""]
    with files.atomic_write(os.path.join(args.output_dir, "README.md")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines))
    push_to_hub(args)


def push_to_hub(args: argparse.Namespace) -> None:
    """--push_to_hub: create the hub repo --hub_model_id (default: the output folder's name) if needed and upload the
    output folder to it, checkpoints left out. Call it on the main process, once the outputs are written."""
    if not args.push_to_hub:
        return
    import huggingface_hub

    name = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    try:
        repo_id = huggingface_hub.create_repo(name, exist_ok=True, token=args.hub_token).repo_id
        huggingface_hub.upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="End of training",
                                      token=args.hub_token, ignore_patterns=HUB_IGNORE)
    except Exception as exc:  # HTTP, authentication and connection errors come in many classes
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"uploading {args.output_dir} to the hub repo {name} failed: {first} (--push_to_hub); "
                        "the outputs are kept") from None
    logger.info(f"pushed {args.output_dir} to the hub: {repo_id}")
