"""The training loop's parts: accelerator, optimizer and LR schedule, the loss's random stream, the
gradient step, and `TrainLoop`, the bookkeeping a recipe's own `for batch in loop:` leaves out.

A recipe reads::

    loop = TrainLoop(accelerator, dataloader, max_steps, args, "lcm", lr_scheduler)
    for batch in loop:                      # resumes mid-epoch, counts epochs, shows progress
        with accelerator.accumulate(model):
            loss = my_loss(batch, ...)
            updated = apply_gradients(accelerator, loss, params, optimizer, lr_scheduler, args.max_grad_norm)
        if not loop.step_done(loss, updated):   # mid-accumulation, or a skipped non-finite update
            continue
        ema_update(...)                          # whatever follows an optimizer step
        if loop.checkpoint_due:
            loop.save_checkpoint()
        if loop.validation_due:
            validate(loop.validation_prompts, loop.global_step)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch

from . import checkpoint, outputs, sharding
from .errors import UserError, fail

logger = logging.getLogger(__name__)

# Testing aid: when set to a path, every process appends one JSON line per batch it trains on
# ({"epoch", "batch", "captions"}) to `<path>.<process index>`, so a test can see what each process read.
BATCH_LOG_ENV = "DISTILL_LOG_BATCHES"


def make_accelerator(args: argparse.Namespace):
    """An Accelerator with the run's precision, accumulation and tracker; logging set up on every process; the
    output folder claimed for the run (outputs.claim: its lock, an earlier run's refusal, stop signals)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration

    # stderr, as Python's own logging: a warning reaches whoever watches the errors, stdout stays for results
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        stream=sys.stderr, force=True)
    config = ProjectConfiguration(project_dir=args.output_dir,
                                  logging_dir=os.path.join(args.output_dir, args.logging_dir))
    report_to = None if args.report_to == "none" else args.report_to
    # a seedable sampler makes epoch e's order a function of (seed, e): exact resume mid-run needs it
    loader_config = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed)
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    # torchrun (or `accelerate launch --multi_gpu`) on a machine without a GPU: accelerate only picks its
    # multi-CPU (gloo) mode when told to use the CPU; otherwise each process would run alone, as a
    # duplicate of the others writing to the same output folder
    on_cpu = world_size > 1 and not torch.accelerator.is_available()
    # DeepSpeed (its CPU accelerator) is picked only when accelerate is NOT told to use the CPU: then gloo is named
    deepspeed = on_cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, log_with=report_to, project_config=config,
                              dataloader_config=loader_config, cpu=on_cpu and not deepspeed,
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if deepspeed else None)
    if accelerator.num_processes != world_size:
        fail(f"{world_size} processes were launched (WORLD_SIZE) but accelerate set up {accelerator.num_processes}; "
             "launch with `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`")
    check_engine(accelerator, args)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    # accelerate logs every file of every checkpoint at INFO; the libraries warn about casts we do on purpose
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()  # per-file loading bars; the run has its own
    import datasets

    datasets.disable_progress_bars()  # "Generating train split" bars of a first imagefolder load
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    outputs.claim(args, accelerator)
    return accelerator


def check_engine(accelerator, args: argparse.Namespace) -> None:
    """Refuse, in one line, an engine the recipes cannot use as asked (FSDP asked for but not set up, FSDP version 1;
    sharded engines prepare one model per run, --train_text_encoder_lora needs three; the TLCM extras --dmd and --gan
    under ZeRO-3; --lora_dtype bf16 outside bf16 mixed precision, known only once accelerate has read its config, or
    under a sharded engine) and make a DeepSpeed config follow the recipe's flags (deepspeed_settings)."""
    engine = sharding.engine(accelerator)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not engine.startswith("fsdp"):
        # accelerate 1.15 silently runs DDP instead (every process holding everything): not what was asked for
        fail(f"the accelerate config asks for FSDP but accelerate set up {engine}: it runs FSDP on GPUs only "
             "(on CPU use a DDP config, e.g. `accelerate launch --multi_gpu`; docs/distributed.md)")
    if getattr(args, "train_text_encoder_lora", False) and engine not in ("single", "ddp"):
        fail("--train_text_encoder_lora trains the UNet and the text encoders, three prepared models: accelerate's "
             f"{engine} prepares one per run; use DDP (docs/distributed.md)")
    if (getattr(args, "dmd", False) or getattr(args, "gan", False)) and engine == "zero3":
        fail("--dmd and --gan do not run under DeepSpeed ZeRO-3 (the DMD fake score's own optimizer steps outside "
             "DeepSpeed's engine, whose split weights hold no whole gradient; the GAN loss back-propagates through "
             "the split teacher a second time, which its hooks refuse): use FSDP or ZeRO-2 (docs/distributed.md)")
    if getattr(args, "lora_dtype", "fp32") == "bf16" and (accelerator.mixed_precision != "bf16"
                                                          or engine not in ("single", "ddp")):
        # bf16 weights need bf16 autocast around them (fp16's loss scaler refuses half-precision weights); the
        # sharded engines keep their own master weights and mixed-precision policy
        fail(f"--lora_dtype bf16 needs --mixed_precision bf16 on one process or DDP (this run: mixed precision "
             f"{accelerator.mixed_precision}, {engine})")
    if engine == "fsdp1":
        fail("FSDP version 1 is not supported: set `fsdp_version: 2` in the accelerate config "
             "(configs/accelerate/fsdp.yaml; the recipes read sharded weights as FSDP2's DTensors)")
    if engine.startswith("zero"):
        accelerator.state.deepspeed_plugin.deepspeed_config.update(deepspeed_settings(args, accelerator.num_processes))


def deepspeed_settings(args: argparse.Namespace, num_processes: int) -> dict:
    """The DeepSpeed config entries the recipe's flags decide, whatever the config file says ("auto" or not):
    micro batch = --train_batch_size, accumulation, global batch = their product x processes, and clipping
    at --max_grad_norm (DeepSpeed clips inside its step; 0 is off)."""
    return {"train_micro_batch_size_per_gpu": args.train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "train_batch_size": args.train_batch_size * args.gradient_accumulation_steps * num_processes,
            "gradient_clipping": args.max_grad_norm}


def eight_bit_adam_runs_on(devices: set[str]) -> bool:
    """Whether bitsandbytes' AdamW8bit takes a step on parameters of these device types (older releases: CUDA only)."""
    import bitsandbytes as bnb

    for device in devices:
        p = torch.nn.Parameter(torch.zeros(4096, device=device))  # big enough for the blockwise 8-bit state
        p.grad = torch.ones_like(p)
        try:
            bnb.optim.AdamW8bit([p]).step()
        except Exception:  # noqa: BLE001 - any failure means "not on this device"
            return False
    return True


def make_optimizer(params: Iterable[torch.nn.Parameter], args: argparse.Namespace, max_steps: int,
                   num_processes: int = 1, lr: float | None = None) -> tuple[torch.optim.Optimizer, Any]:
    """(optimizer, lr_scheduler): AdamW (fused per --fused_adamw) or bitsandbytes' 8-bit AdamW with the run's
    hyper-parameters, and diffusers' --lr_scheduler over max_steps optimizer steps, --lr_warmup_steps of them
    linear warm-up.

    --scale_lr multiplies the learning rate by the samples per optimizer step (batch x accumulation x processes).
    """
    from diffusers.optimization import get_scheduler

    params = [p for p in params if p.requires_grad]
    lr = args.learning_rate if lr is None else lr
    if args.scale_lr:
        lr *= args.train_batch_size * args.gradient_accumulation_steps * num_processes
    kwargs = dict(lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            fail("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
        devices = {p.device.type for p in params}
        if devices - {"cuda"} and not eight_bit_adam_runs_on(devices - {"cuda"}):
            fail(f"--use_8bit_adam: this bitsandbytes ({bnb.__version__}) has no 8-bit AdamW for "
                 f"{', '.join(sorted(devices - {'cuda'}))} parameters (0.50 runs it on the CPU; older releases need CUDA)")
        optimizer = bnb.optim.AdamW8bit(params, **kwargs)
    else:
        # --fused_adamw unset: fused wherever every parameter lives on a device with the fused kernel (CPU, CUDA); on
        # CPU it is ~6x faster than the per-tensor loop for a LoRA's hundreds of small tensors (docs/benchmarks.md,
        # "Training speed-ups")
        fused = getattr(args, "fused_adamw", None)
        if fused is None:
            fused = all(p.device.type in ("cpu", "cuda") for p in params)
        optimizer = torch.optim.AdamW(params, fused=fused or None, **kwargs)
    # accelerate's wrapper steps the scheduler once per process per optimizer step
    return optimizer, get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                    num_warmup_steps=args.lr_warmup_steps * num_processes,
                                    num_training_steps=max_steps * num_processes)


def train_steps(max_train_steps: int | None, num_train_epochs: int, batches_per_epoch: int | None,
                gradient_accumulation_steps: int) -> int:
    """Optimizer steps of the run: --max_train_steps, else epochs x updates per epoch (a stream needs the former)."""
    if max_train_steps is not None:
        return max_train_steps
    if batches_per_epoch is None:
        fail("--max_train_steps is required with --train_shards_path_or_url (a stream has no epoch length)")
    return num_train_epochs * max(1, math.ceil(batches_per_epoch / gradient_accumulation_steps))


def make_train_data(args: Any, accelerator: Any, vae: Any = None) -> tuple[Any, int, list[str] | None]:
    """(dataloader prepared for the processes, optimizer steps of the run, the dataset's captions or None).

    The data flags of flags.Parser.add_data_args pick the source; with --cache_latents (pass the VAE) the samples
    are cached VAE posteriors instead of pixels; the captions are listed for --cache_text_embeddings.
    """
    from . import cache, data

    transform = data.ImageTransform(args.resolution, args.center_crop, args.random_flip)
    dataset = data.load_image_caption_dataset(args.dataset_name, args.train_data_dir, args.train_shards_path_or_url,
                                         args.image_column, args.caption_column, args.max_train_samples,
                                         args.cache_dir, args.seed, transform)
    captions = cache.dataset_captions(dataset) if getattr(args, "cache_text_embeddings", False) else None
    if getattr(args, "cache_latents", False):
        dataset = cache.cached_latent_dataset(args, dataset, vae, accelerator)
    dataloader = data.make_train_dataloader(dataset, args.train_batch_size, args.dataloader_num_workers, args.seed)
    if isinstance(dataset, torch.utils.data.IterableDataset):  # webdataset shards: no epoch length, and the stream
        shards = getattr(dataset, "shards", None)  # already splits itself across processes, by shard
        if shards is not None and len(shards) < accelerator.num_processes:
            raise UserError(f"{len(shards)} webdataset shard(s) for {accelerator.num_processes} processes: each "
                            "process reads whole shards, so give at least one per process (--train_shards_path_or_url)")
        batches_per_epoch = None
    else:
        dataloader = accelerator.prepare(dataloader)
        batches_per_epoch = len(dataloader)  # after prepare: each of N processes gets 1/N of the batches
    steps = train_steps(args.max_train_steps, args.num_train_epochs, batches_per_epoch,
                        args.gradient_accumulation_steps)
    return dataloader, steps, captions


class TrainingRNG:
    """The generator of every random draw of the loss (timesteps, w, noise, dropout), checkpointed with the run.

    A dedicated generator, not torch's global one: data loaders and libraries draw from the global
    RNG at moments that differ between a resumed and an uninterrupted run (a new loader iterator,
    for one), which would make the resumed run diverge.

    Each process draws from its own stream (seeded with its index). accelerate writes a registered
    object from the main process only, so with several processes `state_dict` (called on every
    process by `save_state`) gathers all the streams and `load_state_dict` takes back this one's.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu", process_index: int = 0) -> None:
        self.generator = torch.Generator(device).manual_seed(seed * 1000 + process_index)

    @staticmethod
    def _world() -> tuple[int, int]:
        """(this process's rank, number of processes) of the running distributed job, (0, 1) outside one."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def state_dict(self) -> dict:
        state = self.generator.get_state()
        _, world = self._world()
        if world == 1:
            return {"state": state}
        states: list = [None] * world
        torch.distributed.all_gather_object(states, state)  # a collective: every process calls save_state
        return {"states": states}

    def load_state_dict(self, state: dict) -> None:
        rank, world = self._world()
        states = state["states"] if "states" in state else [state["state"]]
        if len(states) == world:
            self.generator.set_state(states[rank])
            return
        # saved by another number of processes: no exact continuation exists; keep the streams distinct
        logger.warning(f"the checkpoint's random streams are from {len(states)} process(es), this run has {world}: "
                       "the resumed run is not an exact continuation")
        self.generator.set_state(states[0])
        offset = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device))
        self.generator.manual_seed(offset + rank)


def grads_are_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    """True if every gradient is finite (a NaN/inf step must be skipped, not applied)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return bool(torch.isfinite(torch.stack(norms)).all()) if norms else True


def apply_gradients(accelerator, loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer, lr_scheduler,
                    max_grad_norm: float) -> bool:
    """Backward, then (on a sync step) clip and step, unless the loss or a gradient is not finite.

    `params` must be a list: a generator would be exhausted by the finiteness check and the
    clipping would then silently do nothing (a known defect of the reference scripts).
    Returns False when the update was skipped because of a non-finite value.
    """
    if sharding.engine(accelerator).startswith("zero"):
        # DeepSpeed steps inside backward (clipping per its config): a non-finite loss must not get there;
        # a non-finite gradient of a finite loss is DeepSpeed's to handle (fp16: its loss scaler skips the step)
        finite = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=accelerator.device)
        if int(accelerator.reduce(finite, reduction="sum").item()) != accelerator.num_processes:
            return False
        accelerator.backward(loss)
        return True
    accelerator.backward(loss)
    if getattr(accelerator, "scaler", None) is not None and bool(torch.isfinite(loss.detach())):
        # fp16 loss scaling: an overflowing gradient is expected now and then, and the grad scaler
        # owns it (it skips that step and lowers the scale); skipping here instead would never let
        # the scale come down, so every later step would overflow too
        if accelerator.sync_gradients and max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, max_grad_norm)  # unscales first
        scale = accelerator.scaler.get_scale()
        optimizer.step()
        # the scaler lowers its scale exactly when it skipped the update; accelerate's scheduler wrapper
        # sees that skip for unfused optimizers only (a fused one skips inside its kernel), so ask the scale
        if accelerator.scaler.get_scale() >= scale:
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return True
    finite = bool(torch.isfinite(loss.detach())) and grads_are_finite(params)
    if accelerator.num_processes > 1:  # all processes must skip or step together, or the replicas drift apart
        votes = accelerator.reduce(torch.tensor([float(finite)], device=accelerator.device), reduction="sum")
        finite = int(votes.item()) == accelerator.num_processes
    if finite:
        if accelerator.sync_gradients and max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return finite



class StopSignals:
    """SIGTERM / SIGINT during training, remembered (`signum`) for the loop to stop at a safe point; a second
    one stops at once (`before_exit()`, e.g. closing the progress bar, then outputs.stop_now)."""

    def __init__(self, before_exit: Callable[[], None]) -> None:
        self.signum: int | None = None
        self.before_exit = before_exit

    def handle(self, signum: int, frame: Any = None) -> None:
        if self.signum is not None:
            self.before_exit()
            outputs.stop_now(signum)
        self.signum = signum
        logger.warning(f"{signal.Signals(signum).name}: stopping after this step (send it again to stop at once)")

    @contextmanager
    def active(self) -> Iterator[None]:
        """Handle the stop signals inside the block (main thread only); afterwards the handlers found are back,
        unless another took over meanwhile (outputs.release at the end of the run)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        found = {signum: signal.signal(signum, self.handle) for signum in outputs.STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in found.items():
                if signal.getsignal(signum) == self.handle:
                    signal.signal(signum, handler)


def start_notes(args: argparse.Namespace) -> list[str]:
    """What a run says of its flags as training starts (after every input check, so that bad input stays one line
    on stderr): the LoRA scale alpha / r where it is not 1."""
    if getattr(args, "lora_alpha", None) in (None, getattr(args, "lora_rank", None)):
        return []
    from .lora import lora_scale_note

    return [lora_scale_note(args.lora_rank, args.lora_alpha)]


class TrainLoop:
    """Iterate training batches and keep the loop's books; the recipe does the loss, the step and what follows.

    Iterating yields the batches of the run: from the resume point (a checkpoint of `--resume_from_checkpoint`
    restores every prepared and registered object, the step, the epoch and the position in it), over as many
    epochs as it takes to reach `max_steps` optimizer steps. `step_done` counts an optimizer step, logs it and
    stops the run after `--max_nan_steps` skipped non-finite updates in a row. `checkpoint_due`,
    `save_checkpoint`, `validation_due` say and do the rest. SIGTERM or SIGINT while iterating stops the run at
    the end of the current optimizer step (every process at the same one): a checkpoint of that step unless it
    has one, then one line and exit status 128 + the signal; a second signal stops at once. Reads (never writes)
    the flags of flags.Parser.add_training_args from `args`; `output_dir` and `resume` override theirs (one loop per
    TLCM stage).
    """

    def __init__(self, accelerator, dataloader, max_steps: int, args: argparse.Namespace, name: str,
                 lr_scheduler: Any = None, output_dir: str | None = None, resume: str | None = "flag") -> None:
        self.accelerator, self.dataloader, self.max_steps, self.args, self.name = (
            accelerator, dataloader, max_steps, args, name)
        self.lr_scheduler = lr_scheduler
        self.output_dir = output_dir or args.output_dir
        self.global_step, self.epoch, self.batches_done, self.nan_streak, self.skipped_images = 0, 0, 0, 0, 0
        self.validation_prompts = args.validation_prompts
        self.progress = None  # shown from the first usable batch: bad data found before it ends as one line, no bar
        self.trackers_started = False  # at the first logged step: a run that fails before it leaves no logs
        self.stop_signals = StopSignals(self.close)
        resume = args.resume_from_checkpoint if resume == "flag" else resume
        path = checkpoint.resolve_resume(self.output_dir, resume)
        if path:
            state = checkpoint.load_checkpoint(accelerator, path, run=name, flags=checkpoint.recorded_flags(args))
            self.global_step, self.epoch, self.batches_done = (
                state["global_step"], state["epoch"], state["batches_in_epoch"])
            saved_batch = state.get(checkpoint.FLAGS_KEY, {}).get("train_batch_size", args.train_batch_size)
            if saved_batch != args.train_batch_size:  # the position in the epoch is kept in samples, rounded down
                self.batches_done = self.batches_done * saved_batch // args.train_batch_size
            self.nan_streak, self.skipped_images = state.get("nan_streak", 0), state.get("skipped_images", 0)
            logger.info(f"resumed from {path} at step {self.global_step}")
        elif resume:
            logger.info("no checkpoint to resume from: starting fresh")
        self.saved_step = self.global_step  # the last step a checkpoint holds (the resumed one's)
        log_path = os.environ.get(BATCH_LOG_ENV)
        self.batch_log = open(f"{log_path}.{accelerator.process_index}", "a") if log_path else None

    def __iter__(self) -> Iterator[dict]:
        with self.stop_signals.active():  # a stop signal is acted on at the end of the step (stop_requested)
            yield from self._batches()
        self.close()

    def _batches(self) -> Iterator[dict]:
        """The body of the iteration: epochs of batches from the resume point until max_steps."""
        from tqdm.auto import tqdm

        from .data import check_not_all_corrupt

        while self.global_step < self.max_steps:
            if hasattr(self.dataloader, "set_epoch"):
                self.dataloader.set_epoch(self.epoch)
            for batch in checkpoint.skip_batches_for_resume(self.accelerator, self.dataloader, self.batches_done):
                self.batches_done += 1
                self.skipped_images += batch["num_skipped"]
                if self.batch_log is not None:
                    entry = {"epoch": self.epoch, "batch": self.batches_done, "captions": batch["captions"]}
                    self.batch_log.write(json.dumps(entry) + "\n")
                    self.batch_log.flush()
                if len(batch["captions"]) == 0:
                    continue
                if self.validation_prompts is None:
                    self.validation_prompts = batch["captions"][:4]
                if self.progress is None:  # the first usable batch: every input check has passed
                    for note in start_notes(self.args):
                        logger.info(note)
                    self.progress = tqdm(total=self.max_steps, initial=self.global_step, desc=self.name,
                                         disable=not self.accelerator.is_local_main_process)
                yield batch
                signum = self.stop_requested()
                if signum:
                    self.stop(signum)
                if self.global_step >= self.max_steps:
                    break
            else:  # the epoch ran out: a first epoch of nothing but undecodable images is fatal
                if self.batches_done == 0:  # and so is one with no batch at all: the loop would never end
                    fail(f"process {self.accelerator.process_index} of {self.accelerator.num_processes} got no "
                         f"training batch in epoch {self.epoch} (fewer webdataset shards than processes?) "
                         "(--train_shards_path_or_url)")
                if self.epoch == 0:
                    check_not_all_corrupt(self.batches_done * self.args.train_batch_size, self.skipped_images)
                self.epoch, self.batches_done = self.epoch + 1, 0

    def step_done(self, loss: torch.Tensor, updated: bool) -> bool:
        """True when this micro-batch ended an optimizer update (counted and logged); False mid-accumulation
        or when a non-finite update was skipped (counted; after --max_nan_steps in a row the run stops)."""
        if not self.accelerator.sync_gradients:
            return False
        if not updated:
            self.nan_streak += 1
            logger.warning(f"step {self.global_step}: non-finite loss or gradients, update skipped "
                           f"({self.nan_streak} in a row)")
            if self.nan_streak >= self.args.max_nan_steps:
                self.progress.close()  # the error gets a line of its own
                fail(f"{self.nan_streak} consecutive non-finite steps (--max_nan_steps); the last good checkpoint "
                     f"is kept in {self.output_dir}")
            return False
        self.nan_streak = 0
        self.global_step += 1
        self.progress.update(1)
        logs = {"loss": loss.detach().item(), "skipped_images": self.skipped_images}
        if self.lr_scheduler is not None:
            logs["lr"] = self.lr_scheduler.get_last_lr()[0]
        self.progress.set_postfix(loss=f"{logs['loss']:.4f}")
        if not self.trackers_started and self.accelerator.is_main_process:
            config = {k: str(v) for k, v in outputs.public_vars(self.args).items()}
            self.accelerator.init_trackers(self.name, config=config)
        self.trackers_started = True
        self.accelerator.log(logs, step=self.global_step)
        return True

    def log(self, values: dict) -> None:
        """Log more values (e.g. the learning rate, a second loss) at the current step."""
        self.accelerator.log(values, step=self.global_step)

    @property
    def checkpoint_due(self) -> bool:
        """At multiples of --checkpointing_steps (as diffusers' scripts); the last step with --checkpoint_at_end."""
        return self.global_step % self.args.checkpointing_steps == 0 or (
            self.args.checkpoint_at_end and self.global_step == self.max_steps)

    def save_checkpoint(self) -> str:
        """Everything an exact resume needs (accelerate's state + the loop's position), crash-safe. A failed write
        (a full disk) ends the run with one line; the previous checkpoint stays the latest."""
        state = {"epoch": self.epoch, "batches_in_epoch": self.batches_done, "nan_streak": self.nan_streak,
                 "skipped_images": self.skipped_images, "run": self.name,
                 checkpoint.FLAGS_KEY: checkpoint.recorded_flags(self.args)}
        try:
            path = checkpoint.save_checkpoint(self.accelerator, self.output_dir, self.global_step, state,
                                              self.args.checkpoints_total_limit)
        except UserError as exc:
            self.close()  # the error gets a line of its own
            fail(str(exc))
        self.saved_step = self.global_step
        logger.info(f"saved {path}")
        return path

    def stop_requested(self) -> int:
        """The stop signal to act on now (0: none): only at the end of an optimizer step (mid-accumulation the
        gradients so far would be lost), and the same on every process (a checkpoint save is collective)."""
        if not self.accelerator.sync_gradients:
            return 0
        signum = self.stop_signals.signum or 0
        if self.accelerator.num_processes > 1:
            signum = int(self.accelerator.gather(torch.tensor([signum], device=self.accelerator.device)).max())
        return signum

    def stop(self, signum: int) -> None:
        """End the run after this step for a stop signal: a checkpoint of the step (unless it has one), one line,
        exit status 128 + signal."""
        if self.global_step > self.saved_step:
            self.save_checkpoint()
        self.close()
        latest = checkpoint.resolve_resume(self.output_dir, "latest")
        kept = (f"{latest} is kept (continue with --resume_from_checkpoint latest)" if latest
                else "no checkpoint was written")
        fail(f"stopped by {signal.Signals(signum).name} after step {self.global_step}: {kept}", 128 + signum)

    @property
    def samples_here(self) -> bool:
        """Whether this process runs validation sampling: the main one, or every one when the weights are
        sharded (FSDP, ZeRO-3: a forward is then a collective; the main process alone writes the grid)."""
        return self.accelerator.is_main_process or sharding.splits_weights(self.accelerator)

    @property
    def validation_due(self) -> bool:
        return self.samples_here and self.global_step % self.args.validation_steps == 0

    def close(self) -> None:
        """Close the progress bar and batch log; report undecodable images. Called when the iteration ends."""
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self.batch_log is not None:
            self.batch_log.close()
            self.batch_log = None
        if self.skipped_images:
            logger.warning(f"{self.skipped_images} undecodable image(s) were skipped "
                           f"(process {self.accelerator.process_index})")
