"""Crash-safe training checkpoints shared by all recipes.

Layout: ``<output_dir>/checkpoint-<step>/`` holds what ``accelerator.save_state`` writes (prepared
models, optimizers, LR schedulers, per-process RNG states, registered objects) plus
``training_state.json`` with ``global_step``, ``epoch``, ``batches_in_epoch`` and any extra keys
the recipe passes. A checkpoint is written to ``checkpoint-<step>.partial/`` and renamed only when
complete, so a process killed mid-save leaves the previous checkpoint as the latest. Only
directories named exactly ``checkpoint-<int>`` that contain ``training_state.json`` count.

Typical use in a recipe::

    model, optimizer, lr_scheduler, loader = accelerator.prepare(model, optimizer, lr_scheduler, loader)
    accelerator.register_for_checkpointing(ema_model)   # before save_state / load_state
    path = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if path is not None:
        state = load_checkpoint(accelerator, path)
        global_step, first_epoch = state["global_step"], state["epoch"]
        ...
    for epoch in range(first_epoch, num_epochs):
        batches = skip_batches_for_resume(accelerator, loader, skip) if epoch == first_epoch else loader
        ...
        save_checkpoint(accelerator, args.output_dir, global_step,
                        {"epoch": epoch, "batches_in_epoch": i + 1}, total_limit=args.checkpoints_total_limit)

Extra objects: anything that is not prepared (an EMA/target ``nn.Module``, a custom counter, a
GradScaler-like helper) is saved and restored if it has ``state_dict``/``load_state_dict`` and is
passed to ``accelerator.register_for_checkpointing(obj)`` once, in the same order in the saving and
the loading run (accelerate stores them by position as ``custom_checkpoint_<i>.pkl``). An EMA copy
therefore needs no wrapper. Plain Python values (a best metric, a config echo) go in the ``state``
dict of ``save_checkpoint`` instead and come back from ``load_checkpoint``.

Exact data order on resume needs a seeded sampler (``DataLoader(..., shuffle=True,
generator=torch.Generator().manual_seed(seed))``) built identically in both runs, and
``skip_batches_for_resume`` for the epoch the checkpoint was taken in.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from typing import TYPE_CHECKING, Any

from utils import files
from utils.errors import UserError, write_failure

if TYPE_CHECKING:  # accelerate is heavy to import; only the annotations need it
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.json"
FAULT_ENV = "DISTILL_FAULT_DURING_SAVE"
_NAME_RE = re.compile(r"^checkpoint-(\d+)$")
# Suffixes of directories that are never complete checkpoints: being written, being replaced, being deleted.
_PARTIAL, _OLD, _DELETING = ".partial", ".old", ".deleting"
_REQUIRED_KEYS = ("epoch", "batches_in_epoch")
FLAGS_KEY = "flags"  # the flags below, as the run that saved the checkpoint had them
# A resume with another value of one of these is refused: the weights were trained for the old one, and going on
# mixes two objectives (or two layouts) in one model; why, for each:
REFUSED_CHANGES = {
    "num_ddim_timesteps": "the skip grid: which timestep pairs the consistency loss links, and the saved sampler's",
    "timestep_scaling_factor": "the boundary condition c_skip/c_out the weights were trained against",
    "num_segments": "TLCM's segments: the consistency targets and the sampler's milestones",
    "skip": "TLCM's skip: the consistency targets",
    "lora_rank": "the LoRA's shape",
    "lora_alpha": "the LoRA's scale: the same weights would mean another update",
    "lora_target_modules": "which layers the LoRA adapts",
    "unet_time_cond_proj_dim": "the guidance embedding's shape",
}
# Another value of one of these only changes the course of the training from here on: warned, one line; an
# exact continuation needs the old value. (--train_batch_size keeps the position in the epoch in samples.)
WARNED_CHANGES = ("train_batch_size", "gradient_accumulation_steps", "resolution", "seed", "learning_rate",
                  "stage1_learning_rate", "stage2_learning_rate", "loss_type", "huber_c", "w_min", "w_max",
                  "guidance_scale", "mixed_precision", "center_crop", "random_flip", "proportion_empty_prompts",
                  "max_train_samples", "ema_decay", "lr_scheduler", "lr_warmup_steps", "max_grad_norm")


def _is_writer(accelerator: Accelerator) -> bool:
    """Whether this process owns the file system moves (the node's main process when saving on each node)."""
    if getattr(accelerator.project_configuration, "save_on_each_node", False):
        return accelerator.is_local_main_process
    return accelerator.is_main_process


def _step_of(name: str) -> int | None:
    """The step of a directory named ``checkpoint-<step>``, else None."""
    match = _NAME_RE.match(name)
    return int(match.group(1)) if match else None


def _is_complete(path: str) -> bool:
    """Whether path is a finished checkpoint directory (renamed into place, with its state file)."""
    return _step_of(os.path.basename(os.path.normpath(path))) is not None and os.path.isfile(
        os.path.join(path, STATE_FILE)
    )


def _remove(path: str) -> None:
    """Delete a directory by first renaming it out of the checkpoint namespace, so a kill mid-delete is harmless."""
    if not os.path.exists(path):
        return
    doomed = path + _DELETING
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fault_delay() -> float:
    """Seconds to stall between writing and renaming, from DISTILL_FAULT_DURING_SAVE (0 when unset)."""
    raw = os.environ.get(FAULT_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        return max(0.0, float(raw))
    except ValueError as exc:
        raise ValueError(f"{FAULT_ENV} must be a number of seconds, got {raw!r}") from exc


def _state_json(global_step: int, state: dict) -> str:
    """Serialise the training state, failing before anything is written if it is incomplete or not JSON."""
    missing = [key for key in _REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"checkpoint state is missing {missing}")
    payload = {**state, "global_step": int(global_step)}
    return json.dumps(payload, indent=2, sort_keys=True)


def _prune(output_dir: str, keep: str, total_limit: int) -> None:
    """Delete the oldest complete checkpoints so at most total_limit remain, always keeping `keep`."""
    others = [path for path in list_checkpoints(output_dir) if os.path.normpath(path) != os.path.normpath(keep)]
    # `keep` takes one slot; the newest of the rest fill the others.
    excess = len(others) - (total_limit - 1)
    for path in others[: max(0, excess)]:
        _remove(path)


def _clean_leftovers(output_dir: str) -> None:
    """Remove debris of earlier crashes (.partial/.old/.deleting dirs); called only after our own rename."""
    for name in os.listdir(output_dir):
        base, ext = os.path.splitext(name)
        if ext in (_PARTIAL, _OLD, _DELETING) and _step_of(base) is not None:
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator, output_dir: str, global_step: int, state: dict, total_limit: int | None = None
) -> str:
    """Atomically write ``<output_dir>/checkpoint-<global_step>`` and prune old ones; returns its path.

    Every process must call this (accelerate writes each process's RNG state, and some backends
    gather weights collectively); only the main process creates, renames and prunes directories.
    ``state`` must hold ``epoch`` and ``batches_in_epoch`` (batches of that epoch already trained)
    and may hold any other JSON-serialisable values. With ``total_limit`` set, the oldest complete
    checkpoints are deleted until at most that many remain; the new one is never deleted.

    A failed write (an OSError: a full disk, a quota) removes the half-written folder and raises a UserError
    naming output_dir; the previous checkpoint stays the latest.

    Testing aid: if the environment variable ``DISTILL_FAULT_DURING_SAVE`` holds a number of
    seconds, every process sleeps that long after ``save_state`` and before the rename, so a test
    can kill the process while the checkpoint is still ``.partial``.
    """
    if total_limit is not None and total_limit < 1:
        raise ValueError(f"total_limit must be >= 1 or None, got {total_limit}")
    if accelerator.project_configuration.automatic_checkpoint_naming:
        # save_state would ignore our directory and write under project_dir/checkpoints.
        raise ValueError("save_checkpoint needs ProjectConfiguration(automatic_checkpoint_naming=False)")
    text = _state_json(global_step, state)
    delay = _fault_delay()
    final = os.path.join(output_dir, f"checkpoint-{int(global_step)}")
    partial = final + _PARTIAL
    writer = _is_writer(accelerator)

    try:
        if writer:
            os.makedirs(output_dir, exist_ok=True)
            # A stale .partial of this step is from a crashed save; never mix its files with ours.
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        accelerator.wait_for_everyone()  # nobody writes before the clean directory exists
        accelerator.save_state(partial)
        if delay:
            time.sleep(delay)
        accelerator.wait_for_everyone()  # every process's files (RNG states) are in before the rename
        if writer:
            with files.atomic_write(os.path.join(partial, STATE_FILE)) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
    except Exception as exc:  # a full disk, a quota, a lost mount: the half-written checkpoint goes
        if not isinstance(exc, OSError) and write_failure(exc) is None:
            raise  # torch and safetensors report a full disk in their own classes; any other is a bug
        shutil.rmtree(partial, ignore_errors=True)
        latest = list_checkpoints(output_dir)
        kept = f"{latest[-1]} stays the latest checkpoint" if latest else "no earlier checkpoint exists"
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
        raise UserError(f"cannot write checkpoint-{int(global_step)} in {output_dir}: {why}; "
                        f"{kept} (--output_dir)") from None

    if writer:
        # an existing checkpoint of this step waits as .old (which list_checkpoints ignores) while ours goes in
        files.install(partial, final, aside=final + _OLD)
        _clean_leftovers(output_dir)
        if total_limit is not None:
            _prune(output_dir, final, total_limit)
    accelerator.wait_for_everyone()  # nobody proceeds (or loads) before the checkpoint is in place
    return final


def remove_checkpoints(output_dir: str) -> int:
    """Delete every checkpoint folder in output_dir, complete or not (.partial/.old/.deleting); returns how many."""
    if not os.path.isdir(output_dir):
        return 0
    names = [n for n in os.listdir(output_dir) if _step_of(os.path.splitext(n)[0]) is not None]
    for name in names:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return len(names)


def list_checkpoints(output_dir: str) -> list[str]:
    """Paths of the complete checkpoints in output_dir, oldest (lowest step) first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        step = _step_of(name)
        path = os.path.join(output_dir, name)
        if step is not None and os.path.isdir(path) and _is_complete(path):
            found.append((step, path))
    return [path for _step, path in sorted(found)]


def resolve_resume(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """The checkpoint to resume from: None, the newest for "latest" (None if there is none), or a checked path."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    given = os.path.expanduser(resume_from_checkpoint)
    path = given if os.path.isabs(given) else os.path.join(output_dir, given)
    if not os.path.exists(path) and os.path.exists(given):
        path = given  # a path relative to the working directory, e.g. out/checkpoint-100
    if not os.path.isdir(path):
        raise UserError(f"checkpoint not found: {path} (--resume_from_checkpoint)")
    if not _is_complete(path):
        raise UserError(f"not a complete checkpoint (partial, or no {STATE_FILE}): {path} (--resume_from_checkpoint)")
    return path


def recorded_flags(args: Any) -> dict:
    """The flags of REFUSED_CHANGES and WARNED_CHANGES this run has, as a checkpoint records them (JSON values)."""
    names = [*REFUSED_CHANGES, *WARNED_CHANGES]
    return {n: json.loads(json.dumps(getattr(args, n), default=str)) for n in names if hasattr(args, n)}


def _shown(value: Any) -> str:
    """A flag's value as a command line would give it."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def compare_flags(path: str, saved: dict | None, current: dict) -> list[str]:
    """Refuse (UserError naming the flag) a resume whose flags change one of REFUSED_CHANGES from what the checkpoint
    at `path` recorded; returns one warning line per changed flag of WARNED_CHANGES. A checkpoint that recorded no
    flags (older versions) is not compared."""
    if not saved:
        return []
    changed = [n for n in current if n in saved and saved[n] != current[n]]
    for name in changed:
        if name in REFUSED_CHANGES:
            raise UserError(f"{path} was trained with --{name} {_shown(saved[name])}, this run has "
                            f"{_shown(current[name])}: it changes {REFUSED_CHANGES[name]}; resume with --{name} {_shown(saved[name])} "
                            f"or start over (--resume_from_checkpoint, --{name})")
    return [f"resuming {path} with --{n} {_shown(current[n])} (it was trained with {_shown(saved[n])}): the run goes "
            "on from there, but not as an exact continuation" for n in changed]


def load_checkpoint(accelerator: Accelerator, path: str, run: str | None = None, flags: dict | None = None) -> dict:
    """Restore everything save_checkpoint saved into the prepared/registered objects; returns the training state.

    Every problem is a UserError naming --resume_from_checkpoint: an unreadable (truncated) or missing file, a
    checkpoint saved by another run (`run`: the name this one's state must carry, e.g. TrainLoop's) or of other
    shapes, or of flags that change the math (`compare_flags`: `flags` are this run's, `recorded_flags`). Missing or
    unreadable random states, and flags that change only the course of training, warn: the resume is then not an
    exact continuation.
    """
    flag = "(--resume_from_checkpoint)"
    if not _is_complete(path):
        raise UserError(f"not a complete checkpoint: {path} {flag}")
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}/{STATE_FILE} cannot be read ({exc}) {flag}") from None
    saved_by = state.get("run")
    if run is not None and saved_by is not None and saved_by != run:
        raise UserError(f"{path} is a checkpoint of another run ({saved_by}), not of this one ({run}) {flag}")
    for line in compare_flags(path, state.get(FLAGS_KEY), flags or {}):
        logger.warning(line)
    _warn_unless_random_states(path, accelerator.process_index)
    try:
        accelerator.load_state(path)
    except FileNotFoundError as exc:
        missing = os.path.basename(str(exc.filename)) if exc.filename else str(exc)
        raise UserError(f"{path} is an incomplete checkpoint: {missing} is missing {flag}") from None
    except Exception as exc:  # safetensors, torch.load and load_state_dict fail in many classes
        raise UserError(f"{path}: {_load_problem(exc)} {flag}") from None
    return state


def _warn_unless_random_states(path: str, process_index: int) -> None:
    """Warn when this process's random states are missing or unreadable (accelerate skips them without a word)."""
    import torch

    name = f"random_states_{process_index}.pkl"
    try:
        torch.load(os.path.join(path, name), weights_only=False)
        return
    except FileNotFoundError:
        problem = "is missing"
    except Exception:  # a truncated pickle fails in many classes
        problem = "cannot be read"
    logger.warning(f"{path}: {name} {problem}, so the random state of the run is not restored: resuming, but the "
                   "resumed run is not an exact continuation")


def _load_problem(exc: BaseException) -> str:
    """What a failed accelerator.load_state says about the checkpoint, in a line."""
    text = str(exc)
    mismatch = next((line.strip() for line in text.splitlines() if line.strip().startswith("size mismatch")), None)
    if mismatch:
        return (f"its weights have other shapes than this run's model (another --lora_rank, --lora_target_modules "
                f"or teacher?), e.g. {mismatch}")
    if "Missing key" in text or "Unexpected key" in text or "parameter group" in text:
        return "it holds another model than this run's (another recipe, --lora_target_modules or teacher?)"
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    return f"cannot be read (truncated or corrupt?): {first}"


def skip_batches_for_resume(accelerator: Accelerator, dataloader: Any, batches_in_epoch: int) -> Any:
    """The dataloader with the first batches_in_epoch batches skipped (the dataloader itself when 0)."""
    if batches_in_epoch < 0:
        raise ValueError(f"batches_in_epoch must be >= 0, got {batches_in_epoch}")
    if batches_in_epoch == 0:
        return dataloader
    return accelerator.skip_first_batches(dataloader, batches_in_epoch)


def check_checkpoint(path: str, flag: str = "checkpoint") -> None:
    """UserError unless path is a complete checkpoint folder (with its state file)."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist ({flag})")
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise UserError(f"{path} is not a complete training checkpoint (no {STATE_FILE}; a .partial one?) ({flag})")


def _model_paths(path: str, index: int) -> tuple[str, str, str, str]:
    """Where a checkpoint keeps its index-th prepared model: accelerate's model[_i].safetensors and
    pytorch_model[_i].bin, FSDP's pytorch_model_fsdp_<i>/, DeepSpeed's pytorch_model[_i]/."""
    suffix = f"_{index}" if index else ""
    return (os.path.join(path, f"model{suffix}.safetensors"), os.path.join(path, f"pytorch_model{suffix}.bin"),
            os.path.join(path, f"pytorch_model_fsdp_{index}"), os.path.join(path, f"pytorch_model{suffix}"))


def holds_model(path: str, index: int = 0) -> bool:
    """Whether the checkpoint holds an index-th prepared model (in any engine's layout)."""
    safe, pickled, shards, zero = _model_paths(path, index)
    return os.path.isfile(safe) or os.path.isfile(pickled) or os.path.isdir(shards) or os.path.isdir(zero)


def read_model_state(path: str, index: int = 0) -> dict:
    """State dict of the index-th prepared model of a checkpoint, whole: accelerate's model[_i].safetensors / .bin,
    FSDP's shards (pytorch_model_fsdp_<i>/) or DeepSpeed's partitions (pytorch_model[_i]/, fp32 master weights)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    safe, pickled, shards, zero = _model_paths(path, index)
    try:
        if os.path.isfile(safe):
            return load_file(safe)
        if os.path.isfile(pickled):
            return torch.load(pickled, map_location="cpu", weights_only=True)
        if os.path.isdir(shards):
            return _read_fsdp_shards(shards)
        if os.path.isdir(zero):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(path, tag=os.path.basename(zero))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: cannot read the model weights (truncated or corrupt?): {first}") from None
    raise UserError(f"{path} holds no {os.path.basename(safe)} or {os.path.basename(pickled)} "
                    "(not an accelerate checkpoint?)")


def _read_fsdp_shards(folder: str) -> dict:
    """The whole state dict of an FSDP sharded checkpoint folder (torch.distributed.checkpoint), in this process."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(folder, os.path.join(tmp, "whole.pt"))
        state = torch.load(os.path.join(tmp, "whole.pt"), map_location="cpu", weights_only=True)
    return state["model"] if set(state) == {"model"} else state  # accelerate nests the weights under "model"


def read_registered_states(path: str) -> list:
    """The state dicts of the objects registered with register_for_checkpointing, in registration order
    (None for one that is not plain tensors and containers)."""
    import torch

    states, i = [], 0
    while os.path.isfile(os.path.join(path, f"custom_checkpoint_{i}.pkl")):
        try:
            states.append(torch.load(os.path.join(path, f"custom_checkpoint_{i}.pkl"), map_location="cpu",
                                     weights_only=True))
        except Exception:  # unpickling errors come in many classes; such an object is not a model's weights
            states.append(None)
        i += 1
    return states
