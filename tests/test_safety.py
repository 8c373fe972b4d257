"""Nothing a user owns is destroyed or silently replaced, and every way a run can end early ends in one line.

The output folder (utils/outputs.py): an earlier run's folder needs --resume_from_checkpoint or
--overwrite_output_dir, a folder in use by another run is refused (a crashed run's lock is taken over), the
hub upload leaves checkpoints and secrets out. The training loop (utils/loop.py TrainLoop): SIGTERM / SIGINT
stop after the current step with a checkpoint of it; a full disk during a save keeps the previous checkpoint;
checkpoints as diffusers' scripts write them. Resuming (utils/checkpoint.py): a truncated, incomplete or foreign
checkpoint is one line, missing random states a warning. Most tests drive TrainLoop on a tiny model in this
process; one recipe run covers --overwrite_output_dir and --push_to_hub end to end, and one real process the
signals as a user sends them (slow).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from helpers import import_script, listing, run_recipe, start_script

from utils import checkpoint, flags, loop, outputs
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _fresh_state():
    """accelerate's process-wide state reset; the run's lock, signal handlers and empty folders released after."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    outputs.release()


def training_args(out: str, *extra: str):
    parser = flags.Parser()
    parser.add_training_args()
    return parser.parse_args(["--output_dir", out, "--max_train_steps", "10", "--checkpointing_steps", "3",
                              "--validation_steps", "100", "--train_batch_size", "1", "--report_to", "none", *extra])


class ToyRun:
    """A recipe's loop on a Linear model: prepared model, optimizer, schedule, the loss's RNG registered."""

    def __init__(self, args, width: int = 1, name: str = "toy", model: torch.nn.Module | None = None) -> None:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        self.args = args
        self.accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.gradient_accumulation_steps)
        torch.manual_seed(0)
        model = model if model is not None else torch.nn.Linear(2, width)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        self.model, self.optimizer, self.schedule = self.accelerator.prepare(model, optimizer, schedule)
        self.rng = loop.TrainingRNG(args.seed)
        self.accelerator.register_for_checkpointing(self.rng)
        batches = torch.utils.data.DataLoader(range(40), collate_fn=lambda b: {"captions": ["a"], "num_skipped": 0})
        self.train = loop.TrainLoop(self.accelerator, batches, args.max_train_steps, args, name, self.schedule)
        self.steps_seen: list[int] = []

    def run(self, on_batch=None) -> None:
        """The loop as a recipe writes it; on_batch(i) is called before the i-th micro-batch's loss (1-based)."""
        params = list(self.model.parameters())
        for i, _batch in enumerate(self.train, 1):
            if on_batch is not None:
                on_batch(i)
            with self.accelerator.accumulate(self.model):
                noise = torch.randn(1, 2, generator=self.rng.generator)
                loss = self.model(torch.ones(1, 2) + noise).pow(2).sum()
                updated = loop.apply_gradients(self.accelerator, loss, params, self.optimizer, self.schedule, 1.0)
            if not self.train.step_done(loss, updated):
                continue
            self.steps_seen.append(self.train.global_step)
            if self.train.checkpoint_due:
                self.train.save_checkpoint()


def names(out: str) -> list[str]:
    return [os.path.basename(p) for p in checkpoint.list_checkpoints(out)]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------- checkpoints as diffusers writes them


@pytest.mark.parametrize("extra, expected", [
    ([], ["checkpoint-2", "checkpoint-4"]),  # multiples of --checkpointing_steps only: the output is the final state
    (["--checkpoint_at_end"], ["checkpoint-4", "checkpoint-5"]),  # plus the last step; at most 2 kept
])
def test_checkpoints_at_multiples_of_checkpointing_steps_and_at_most_the_limit(tmp_path, extra, expected):
    out = str(tmp_path / "out")
    run = ToyRun(training_args(out, "--max_train_steps", "5", "--checkpointing_steps", "2",
                               "--checkpoints_total_limit", "2", *extra))
    run.run()
    assert run.steps_seen == [1, 2, 3, 4, 5] and names(out) == expected


# ----------------------------------------------------------------------------- stop signals


@pytest.mark.parametrize("signum, accumulation, at_batch, step", [
    (signal.SIGTERM, 1, 4, 4),  # during step 4: stops after it, checkpoint-4 written (checkpoint-3 was due anyway)
    (signal.SIGINT, 2, 3, 2),  # on the first micro-batch of step 2: that step is finished first
], ids=["SIGTERM", "SIGINT-mid-accumulation"])
def test_stop_signal_ends_the_run_after_the_step_with_a_checkpoint_of_it(tmp_path, capsys, signum, accumulation,
                                                                         at_batch, step):
    before = {s: signal.getsignal(s) for s in outputs.STOP_SIGNALS}
    out = str(tmp_path / "out")
    run = ToyRun(training_args(out, "--gradient_accumulation_steps", str(accumulation)))
    with pytest.raises(SystemExit) as info:
        run.run(lambda i: os.kill(os.getpid(), signum) if i == at_batch else None)
    assert info.value.code == 128 + signum and run.train.global_step == step and run.steps_seen[-1] == step
    assert names(out)[-1] == f"checkpoint-{step}"
    state = json.load(open(os.path.join(out, f"checkpoint-{step}", checkpoint.STATE_FILE)))
    assert state["batches_in_epoch"] == step * accumulation  # a whole number of optimizer steps: an exact resume
    line = error_lines(capsys.readouterr().err)[-1]
    assert line.startswith(f"error: stopped by {signal.Signals(signum).name} after step {step}: ")
    assert f"checkpoint-{step} is kept" in line and "--resume_from_checkpoint latest" in line
    assert {s: signal.getsignal(s) for s in outputs.STOP_SIGNALS} == before  # the loop's handlers are gone


def test_a_second_stop_signal_stops_at_once(tmp_path, capsys):
    out = str(tmp_path / "out")
    run = ToyRun(training_args(out))

    def twice(i):
        if i == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as info:
        run.run(twice)
    assert info.value.code == 128 + signal.SIGTERM and run.train.global_step == 1 and names(out) == []
    assert error_lines(capsys.readouterr().err)[-1].startswith("error: stopped by SIGTERM")


# ----------------------------------------------------------------------------- a full disk


# a full disk as the OS reports it, and as torch.save's zip writer does (a RuntimeError from inline_container.cc)
FULL_DISK = [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
             RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64: "
                          "PytorchStreamWriter failed writing file data/0: file write failed")]


@pytest.mark.parametrize("error", FULL_DISK, ids=["oserror", "torch-writer"])
def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys,
                                                                                            monkeypatch, error):
    out = str(tmp_path / "out")
    run = ToyRun(training_args(out, "--checkpointing_steps", "1"))
    save_state = run.accelerator.save_state

    def fills_the_disk(folder, *a, **kw):
        if folder.endswith("checkpoint-2.partial"):
            open(os.path.join(folder, "model.safetensors"), "wb").write(b"half a file")
            raise error
        return save_state(folder, *a, **kw)

    monkeypatch.setattr(run.accelerator, "save_state", fills_the_disk)
    with pytest.raises(SystemExit) as info:
        run.run()
    lines = error_lines(capsys.readouterr().err)
    assert info.value.code == 2 and len(lines) == 1, lines
    said = "No space left on device" if isinstance(error, OSError) else "PytorchStreamWriter failed writing file"
    assert f"cannot write checkpoint-2 in {out}: " in lines[0] and said in lines[0], lines[0]
    assert f"{os.path.join(out, 'checkpoint-1')} stays the latest checkpoint (--output_dir)" in lines[0]
    assert sorted(os.listdir(out)) == ["checkpoint-1"]  # the half-written checkpoint-2.partial is gone
    assert checkpoint.resolve_resume(out, "latest") == os.path.join(out, "checkpoint-1")


def test_resuming_with_changed_flags_refuses_a_new_skip_grid_and_warns_of_what_changes_the_course(tmp_path, caplog):
    """The checkpoint records the flags; another --num_ddim_timesteps (the skip grid the weights learnt) is refused
    naming the flag, another --train_batch_size is one warning and the position in the epoch is kept in samples."""
    out = str(tmp_path / "out")

    def args(*extra, grid=50):
        parsed = training_args(out, "--checkpointing_steps", "4", "--max_train_steps", "4", *extra)
        parsed.num_ddim_timesteps = grid  # an LCM recipe's flag
        return parsed

    ToyRun(args()).run()
    with pytest.raises(UserError, match=r"trained with --num_ddim_timesteps 50, this run has 25: it changes the skip "
                                        r"grid.*\(--resume_from_checkpoint, --num_ddim_timesteps\)"):
        ToyRun(args("--resume_from_checkpoint", "latest", grid=25))
    with caplog.at_level("WARNING"):
        resumed = ToyRun(args("--resume_from_checkpoint", "latest", "--train_batch_size", "2", "--seed", "7"))
    warned = [r.getMessage() for r in caplog.records if "not as an exact continuation" in r.getMessage()]
    assert len(warned) == 2 and "--train_batch_size 2 (it was trained with 1)" in warned[0] and "--seed 7" in warned[1]
    assert resumed.train.global_step == 4 and resumed.train.batches_done == 2  # 4 samples: 2 batches of 2
    caplog.clear()
    with caplog.at_level("WARNING"):
        ToyRun(args("--resume_from_checkpoint", "latest"))  # the same flags: not a word
    assert not [r for r in caplog.records if "exact continuation" in r.getMessage()]


# ----------------------------------------------------------------------------- resuming from a bad checkpoint


def _damage(path: str, how: str) -> None:
    if how == "truncated":
        data = open(os.path.join(path, "model.safetensors"), "rb").read()
        open(os.path.join(path, "model.safetensors"), "wb").write(data[: len(data) // 2])
    elif how == "incomplete":
        os.remove(os.path.join(path, "optimizer.bin"))


@pytest.mark.parametrize("how, resumed_as, needle", [
    ("truncated", {}, "cannot be read (truncated or corrupt?)"),
    ("incomplete", {}, "is an incomplete checkpoint: optimizer.bin is missing"),
    ("another shape", {"width": 3}, "its weights have other shapes than this run's model (another --lora_rank"),
    ("another model", {"model": torch.nn.Sequential(torch.nn.Linear(2, 1))}, "it holds another model"),
    ("another run", {"name": "tlcm_stage2"}, "is a checkpoint of another run (toy), not of this one (tlcm_stage2)"),
])
def test_resuming_from_a_bad_checkpoint_is_one_line_naming_the_flag(tmp_path, how, resumed_as, needle):
    out = str(tmp_path / "out")
    ToyRun(training_args(out, "--max_train_steps", "2", "--checkpointing_steps", "2")).run()
    _damage(os.path.join(out, "checkpoint-2"), how)
    with pytest.raises(UserError) as info:
        ToyRun(training_args(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"), **resumed_as)
    message = str(info.value)
    assert needle in message and message.endswith("(--resume_from_checkpoint)") and "\n" not in message, message


def test_resuming_without_random_states_warns_that_the_resume_is_not_exact(tmp_path, caplog):
    out = str(tmp_path / "out")
    ToyRun(training_args(out, "--max_train_steps", "2", "--checkpointing_steps", "2")).run()
    os.remove(os.path.join(out, "checkpoint-2", "random_states_0.pkl"))
    with caplog.at_level("WARNING"):
        run = ToyRun(training_args(out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"))
    assert run.train.global_step == 2
    assert "random_states_0.pkl is missing" in caplog.text and "not an exact continuation" in caplog.text
    run.run()
    assert run.steps_seen == [3]


# ----------------------------------------------------------------------------- the output folder


def claim(out: str, *extra: str):
    """outputs.claim on a main process of its own (what loop.make_accelerator does)."""
    process = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    outputs.claim(training_args(out, *extra), process)


def write_lock(out: str, pid: int, host: str | None = None) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, outputs.LOCK_FILE), "w") as f:
        json.dump({"pid": pid, "host": host or socket.gethostname()}, f)


def test_a_folder_in_use_is_refused_and_a_crashed_runs_lock_is_taken_over(tmp_path, capsys):
    out = str(tmp_path / "out")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(out, other.pid)
        with pytest.raises(SystemExit) as info:
            claim(out)
        line = error_lines(capsys.readouterr().err)[-1]
        assert info.value.code == 2 and f"is in use by another run (pid {other.pid} on {socket.gethostname()})" in line
    finally:
        other.kill()
        other.wait()
    claim(out)  # that run is gone: its lock is stale
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    assert outputs.lock_owner(os.path.join(out, outputs.LOCK_FILE)) == me
    outputs.release()
    assert os.listdir(out) == []

    write_lock(out, os.getpid(), host="another-machine")  # a process elsewhere cannot be looked at: in use
    with pytest.raises(SystemExit):
        claim(out)
    assert "pid" in error_lines(capsys.readouterr().err)[-1]


def _finished(folder: str, final: str = "model_index.json", checkpoints=(7,)) -> None:
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, final), "w").write("{}")
    for step in checkpoints:
        os.makedirs(os.path.join(folder, f"checkpoint-{step}"))
        open(os.path.join(folder, f"checkpoint-{step}", checkpoint.STATE_FILE), "w").write('{"global_step": 7}')


def test_a_folder_created_for_a_run_goes_again_with_its_write_probe_when_a_stop_lands_on_the_probe(tmp_path):
    """make_output_dir writes and removes a probe file to check the new folder is writable; a stop signal between the
    two leaves the probe: the exit still removes the folder it created (and nobody else's probe or files)."""
    out = tmp_path / "new" / "run"
    outputs.make_output_dir(str(out))
    (out / f".write_test.{os.getpid()}").write_text("")  # the state a stop inside the probe leaves
    outputs.release()
    assert not (tmp_path / "new").exists()
    outputs.make_output_dir(str(out))
    (out / ".write_test.1").write_text("")  # another process's probe (a multi-process run): not ours to remove
    outputs.release()
    assert os.listdir(out) == [".write_test.1"]


def test_a_folder_of_a_users_files_is_refused_unless_asked_and_then_only_its_own_names_replaced(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes on this project\n")
    (out / "data.csv").write_text("1,2\n")
    with pytest.raises(SystemExit) as info:
        claim(str(out))
    line = error_lines(capsys.readouterr().err)[-1]
    assert info.value.code == 2 and "holds files it did not write (README.md, data.csv)" in line, line
    outputs.release()  # what the exit does: the lock goes, nothing of the refused run is left
    assert "--overwrite_output_dir" in line and sorted(os.listdir(out)) == ["README.md", "data.csv"]
    claim(str(out), "--overwrite_output_dir")  # asked: the run writes among them
    args = training_args(str(out), "--overwrite_output_dir")
    outputs.publish(args, "a run")  # the model card replaces README.md, a name the run writes; data.csv stays
    assert (out / "data.csv").read_text() == "1,2\n" and (out / "README.md").read_text().startswith("# a run")
    assert outputs.owner(str(out)) == outputs.TRAINING
    outputs.release()
    claim(str(out))  # a run's folder now: a rerun meets the earlier-run rules only
    outputs.release()
    (tmp_path / "theirs").mkdir()
    outputs.mark(str(tmp_path / "theirs"), "inference.py")
    (tmp_path / "theirs" / "image.png").write_bytes(b"png")
    with pytest.raises(SystemExit):
        claim(str(tmp_path / "theirs"))
    assert "holds the output of inference.py" in error_lines(capsys.readouterr().err)[-1]


def test_an_earlier_run_is_continued_or_replaced_only_when_asked(tmp_path, capsys):
    finished, unfinished = str(tmp_path / "finished"), str(tmp_path / "unfinished")
    _finished(finished)
    os.makedirs(os.path.join(unfinished, "checkpoint-3"))
    open(os.path.join(unfinished, "checkpoint-3", checkpoint.STATE_FILE), "w").write("{}")
    for out, what in [(finished, "a finished run (model_index.json)"),
                      (unfinished, "checkpoints of an unfinished run (checkpoint-3)")]:
        with pytest.raises(SystemExit):
            claim(out)
        line = error_lines(capsys.readouterr().err)[-1]
        assert f"already holds {what}" in line and "--overwrite_output_dir" in line, line
        claim(out, "--resume_from_checkpoint", "latest")  # continuing it is fine
    claim(unfinished, "--overwrite_output_dir")
    assert listing(unfinished) == [outputs.LOCK_FILE]  # its checkpoints are gone: no resume can pick them up
    _finished(str(tmp_path / "no_checkpoint"), checkpoints=())
    with pytest.raises(SystemExit):  # "latest" would find nothing and start over on the finished run
        claim(str(tmp_path / "no_checkpoint"), "--resume_from_checkpoint", "latest")
    assert "no checkpoint to resume from" in error_lines(capsys.readouterr().err)[-1]


def test_tlcm_stages_count_one_by_one(tmp_path):
    """A TLCM run's parts are its stages: `--stage 2` after `--stage 1` in the same folder is the documented next
    step; a finished stage is skipped; a stage with checkpoints of its own must be resumed or overwritten."""
    out = str(tmp_path / "out")
    _finished(os.path.join(out, "stage1", "lora"), "pytorch_lora_weights.safetensors", checkpoints=())
    args = SimpleNamespace(output_dir=out, stages=["2"], resume_from_checkpoint=None)
    assert outputs.earlier_run(args) is None
    args.stages = ["1"]
    final = os.path.join("stage1", "lora", "pytorch_lora_weights.safetensors")
    assert outputs.earlier_run(args) == f"a finished run ({final})"
    os.makedirs(os.path.join(out, "stage2", "checkpoint-2"))
    open(os.path.join(out, "stage2", "checkpoint-2", checkpoint.STATE_FILE), "w").write("{}")
    args.stages = ["1", "2"]
    assert outputs.earlier_run(args) == f"checkpoints of an unfinished run ({os.path.join('stage2', 'checkpoint-2')})"
    args.stages = ["2"]
    outputs.clear_earlier_run(args)
    assert listing(out) == ["stage1"]  # the stage to train again is gone, the one it starts from kept
    # an init LoRA in the folder of a stage the run does not train is allowed; in one it trains, refused
    args = SimpleNamespace(output_dir=out, stages=["2"], init_lora=os.path.join(out, "stage1", "lora"))
    outputs.check_not_an_input(args)
    args.stages = ["1", "2"]
    with pytest.raises(SystemExit):
        outputs.check_not_an_input(args)


def test_overwrite_replaces_a_finished_run_and_push_to_hub_uploads_it_without_checkpoints_or_token(
        toy_world, tmp_path, monkeypatch):
    """The SD recipe on a folder holding a finished run (a pipeline and checkpoint-7): refused as is; with
    --overwrite_output_dir the old checkpoint goes, the run trains, and --push_to_hub uploads (a local stand-in
    for the hub) the folder without checkpoints, lock or token; the run leaves no lock behind."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    out = str(tmp_path / "run")
    _finished(out)
    argv = ["--pretrained_teacher_model", os.path.join(toy_world, "models/sd"), "--train_data_dir",
            os.path.join(toy_world, "data/train"), "--output_dir", out, "--resolution", "32", "--train_batch_size", "2",
            "--max_train_samples", "4", "--max_train_steps", "1", "--checkpointing_steps", "1", "--w_min", "2",
            "--w_max", "6", "--validation_steps", "1000", "--report_to", "none"]
    refused = run_recipe("train_lcm_distill_sd.py", argv, check=False)
    assert refused.returncode == 2 and "already holds a finished run" in error_lines(refused.stderr)[0]
    assert listing(out) == ["checkpoint-7", "model_index.json"]
    assert open(f"{out}/model_index.json").read() == "{}"  # untouched

    calls = []

    def create_repo(repo_id, exist_ok=False, token=None, **kw):
        calls.append(("create_repo", repo_id, exist_ok, token))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(repo_id, folder_path, token=None, ignore_patterns=None, **kw):
        found = [os.path.relpath(os.path.join(root, n), folder_path) for root, _, files in os.walk(folder_path)
                 for n in files]
        uploaded = sorted(filter_repo_objects(found, ignore_patterns=ignore_patterns))  # what the hub would receive
        calls.append(("upload_folder", repo_id, token, uploaded))

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    run_recipe("train_lcm_distill_sd.py", argv + ["--overwrite_output_dir", "--push_to_hub", "--hub_model_id",
                                                  "someone/toy-lcm", "--hub_token", "hf_secret"])
    assert names(out) == ["checkpoint-1"] and json.load(open(f"{out}/model_index.json"))["unet"]
    assert "hf_secret" not in open(os.path.join(out, "README.md")).read()
    assert not os.path.exists(os.path.join(out, outputs.LOCK_FILE))
    (create, name, exist_ok, token), (upload, repo, upload_token, uploaded) = calls
    assert (create, name, exist_ok, token, upload, repo, upload_token) == (
        "create_repo", "someone/toy-lcm", True, "hf_secret", "upload_folder", "someone/toy-lcm", "hf_secret")
    assert "model_index.json" in uploaded and "README.md" in uploaded and any(f.startswith("unet/") for f in uploaded)
    assert not any("checkpoint-" in f or outputs.LOCK_FILE in f for f in uploaded), uploaded


def test_a_failed_upload_is_one_line_and_keeps_the_outputs(tmp_path, monkeypatch):
    import huggingface_hub

    def refuses(*a, **kw):
        raise OSError("401 Client Error: Unauthorized\nmore detail")

    monkeypatch.setattr(huggingface_hub, "create_repo", refuses)
    args = SimpleNamespace(push_to_hub=True, hub_model_id=None, hub_token=None, output_dir=str(tmp_path / "my-run"))
    with pytest.raises(UserError) as info:
        outputs.push_to_hub(args)
    assert str(info.value) == (f"uploading {args.output_dir} to the hub repo my-run failed: 401 Client Error: "
                               "Unauthorized (--push_to_hub); the outputs are kept")


@pytest.mark.parametrize("script", ["train_lcm_distill_sd.py", "train_lcm_distill_lora_sdxl.py", "train_tlcm_flux.py",
                                    "train_tlcm_sdxl.py"])
def test_every_recipe_takes_the_hub_flags_and_a_launchers_local_rank(toy_world, tmp_path, script):
    teacher = {"train_tlcm_flux.py": "flux", "train_lcm_distill_lora_sdxl.py": "sdxl"}.get(script, "sd")
    data = ["--prompts_file", "prompts.txt"] if "tlcm" in script else ["--train_data_dir", "data"]
    recipe = import_script(script)
    for rank in (["--local_rank", "1"], ["--local-rank=1"]):  # torch.distributed.launch, before and after torch 2
        args = recipe.parse_args(["--pretrained_teacher_model", os.path.join(toy_world, "models", teacher), *data,
                                  "--output_dir", str(tmp_path / "out"), "--push_to_hub", "--hub_model_id", "me/x",
                                  "--hub_token", "hf_x", *rank])
        assert args.local_rank == 1 and args.push_to_hub and args.hub_model_id == "me/x"
        assert "hub_token" not in outputs.public_vars(args)


# ----------------------------------------------------------------------------- signals sent to a real process


def test_an_in_process_stop_leaves_the_callers_excepthook_after_release(capsys):
    """stop_now puts in the excepthook that ends a stopped run quietly; release() gives the caller back its own."""
    found = sys.excepthook
    with pytest.raises(SystemExit) as info:
        outputs.stop_now(signal.SIGTERM)
    assert info.value.code == 128 + signal.SIGTERM and sys.excepthook is not found
    assert error_lines(capsys.readouterr().err) == ["error: stopped by SIGTERM; finished checkpoints and outputs are kept"]
    outputs.release()
    assert sys.excepthook is found


@pytest.mark.slow
def test_a_stop_signal_swallowed_by_a_bare_except_still_ends_the_run_with_its_line(tmp_path):
    """A SIGTERM that lands inside a library's bare `except:` (datasets' `multiprocess` import has one, which then
    fails on its fallback import) still ends the process with the stop's status and line, its folder tidied up."""
    out = tmp_path / "out"
    script = ("import os, signal\n"
              "from utils import outputs\n"
              f"outputs.make_output_dir({str(out)!r})\n"
              "signal.signal(signal.SIGTERM, outputs.stop_now)  # as claim() installs it\n"
              "try:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "except:  # noqa: E722, as in multiprocess/__init__.py\n"
              "    raise ModuleNotFoundError(\"No module named 'version'\")\n"
              "print('still running')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stderr.splitlines() == ["error: stopped by SIGTERM; finished checkpoints and outputs are kept"]
    assert "still running" not in proc.stdout and not out.exists()


@pytest.mark.slow
def test_sigterm_to_a_real_run_keeps_a_checkpoint_or_leaves_nothing(toy_world, tmp_path):
    """As a user (or a cluster's scheduler) stops a run: SIGTERM while the models load ends it at once and removes
    the output folder it created; SIGTERM while it trains stops after the step, keeps that step's checkpoint and
    the resume continues from it."""
    def start(out: str, steps: str):
        argv = ["--pretrained_teacher_model", os.path.join(toy_world, "models/sd"), "--train_data_dir",
                os.path.join(toy_world, "data/train"), "--output_dir", out, "--resolution", "32", "--train_batch_size",
                "2", "--max_train_samples", "8", "--max_train_steps", steps, "--checkpointing_steps", "2",
                "--checkpoints_total_limit", "1", "--w_min", "2", "--w_max", "6", "--validation_steps", "100000",
                "--report_to", "none"]
        return start_script("train_lcm_distill_sd.py", argv, env={"OMP_NUM_THREADS": "1"},
                            stderr_path=out + ".stderr")

    def wait_for(path: str, proc) -> None:
        deadline = time.time() + 300
        while not os.path.exists(path):
            assert proc.poll() is None and time.time() < deadline, open(proc.stderr_path).read()[-3000:]
            time.sleep(0.02)

    early = str(tmp_path / "early")
    proc = start(early, "1000")
    wait_for(early, proc)  # created while the flags are checked, long before the first step
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM and error_lines(err) == [
        "error: stopped by SIGTERM; finished checkpoints and outputs are kept"], err[-3000:]
    assert not os.path.exists(early), os.listdir(early)

    out = str(tmp_path / "out")
    proc = start(out, "1000")
    wait_for(os.path.join(out, "checkpoint-2"), proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    lines = error_lines(err)
    assert proc.returncode == 128 + signal.SIGTERM and len(lines) == 1, err[-3000:]
    step = int(lines[0].split("after step ")[1].split(":")[0])
    assert names(out) == [f"checkpoint-{step}"] and f"checkpoint-{step} is kept" in lines[0]
    assert not os.path.exists(os.path.join(out, outputs.LOCK_FILE))
    resumed = run_recipe("train_lcm_distill_sd.py", [
        "--pretrained_teacher_model", os.path.join(toy_world, "models/sd"), "--train_data_dir",
        os.path.join(toy_world, "data/train"), "--output_dir", out, "--resolution", "32", "--train_batch_size", "2",
        "--max_train_samples", "8", "--max_train_steps", str(step + 1), "--w_min", "2", "--w_max", "6",
        "--validation_steps", "100000", "--report_to", "none", "--resume_from_checkpoint", "latest"])
    assert f"at step {step}" in resumed.stdout + resumed.stderr
