"""The output rule every program follows (utils/outputs.py) and the stops that come from outside it: a signal while
the models load, a full or read-only disk while it writes. Each ends as one line on stderr, leaves nothing
half-written and touches no file the program did not write."""
from __future__ import annotations

import errno
import os
import signal

import numpy as np
import pytest
from helpers import listing, random_lora, run_command
from PIL import Image

from utils import errors, lora, lora_files, outputs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _released():
    yield
    outputs.release()


@pytest.fixture(scope="module")
def sd_lora(toy_world, tmp_path_factory) -> str:
    """A rank-4 LoRA of the toy SD UNet, as a diffusers file."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(toy_world, "models/sd"), subfolder="unet")
    random_lora(unet, lora.LCM_LORA_TARGETS)
    path = str(tmp_path_factory.mktemp("lora") / "pytorch_lora_weights.safetensors")
    lora_files.write_lora(lora.lora_state_dict(unet), lora.lora_alphas(unet), "diffusers", path)
    return path


def one_error_line(run) -> str:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in run.stderr, run.stderr[-3000:]
    return lines[0]


def merge(toy_world: str, lora_path: str, out: str, *extra: str) -> list[str]:
    return ["convert_lora.py", "merge", lora_path, "--base_model", os.path.join(toy_world, "models/sd"),
            "--output_dir", out, "--denoiser_only", *extra]


def test_merge_with_overwrite_replaces_its_own_files_and_keeps_the_others(toy_world, sd_lora, tmp_path):
    """Before, --overwrite replaced the whole folder: a user's file in it was deleted."""
    from diffusers import UNet2DConditionModel

    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("how I made this\n")
    (out / "config.json").write_text("{}")  # a name the merge writes: replaced
    refused = run_command(merge(toy_world, sd_lora, str(out)))
    assert refused.returncode == 2 and "--overwrite" in one_error_line(refused)
    run = run_command(merge(toy_world, sd_lora, str(out), "--overwrite"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "notes.txt").read_text() == "how I made this\n"
    assert listing(out) == ["config.json", "diffusion_pytorch_model.safetensors", "notes.txt"]  # no temporaries
    assert outputs.owner(str(out)) == "convert_lora.py"
    UNet2DConditionModel.from_pretrained(str(out))  # the merged UNet loads


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC], ids=["read-only", "full-disk"])
def test_a_read_only_or_full_disk_while_merging_is_one_line_and_leaves_nothing(toy_world, sd_lora, tmp_path,
                                                                              monkeypatch, code):
    """The write fails half-way through the weights file: one line naming the flag, exit 2, no folder, no
    temporary (before: a traceback)."""
    from diffusers import ModelMixin

    def fails(self, folder, *args, **kwargs):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
        open(path, "wb").write(b"half a file")
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(ModelMixin, "save_pretrained", fails)
    out = tmp_path / "parent" / "merged"
    run = run_command(merge(toy_world, sd_lora, str(out)))
    line = one_error_line(run)
    assert run.returncode == 2 and os.strerror(code) in line and line.endswith("(--output_dir)"), line
    assert not (tmp_path / "parent").exists()  # the folders it created are gone with the half-written file


STOPS = [("inference.py", signal.SIGINT), ("inference.py", signal.SIGTERM), ("convert_lora.py", signal.SIGTERM),
         ("utils.evaluate", signal.SIGTERM)]


@pytest.mark.parametrize("program, signum", STOPS, ids=[f"{p}-{s.name}" for p, s in STOPS])
def test_a_stop_signal_while_the_models_load_is_one_line_and_leaves_nothing(toy_world, sd_lora, tmp_path, monkeypatch,
                                                                           program, signum):
    """Ctrl-C (SIGINT) or SIGTERM arriving inside the model loading: exit 128 + signal, one line, the output folder
    it created removed (before: a KeyboardInterrupt traceback, or killed by SIGTERM without a word)."""
    from diffusers import DiffusionPipeline

    from utils import models

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal must stop the program before this line")

    monkeypatch.setattr(models, "load_pretrained", interrupted)  # inference.py's and convert_lora.py's loading
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", interrupted)  # utils.evaluate's
    out = str(tmp_path / "out")
    sd = os.path.join(toy_world, "models/sd")
    argv = {"inference.py": ["inference.py", "--base_model_path", sd, "--output_dir", out, "--quiet"],
            "convert_lora.py": merge(toy_world, sd_lora, out),
            "utils.evaluate": ["-m", "utils.evaluate", "--pipeline", sd, "--steps", "1", "--judge",
                               os.path.join(toy_world, "judge"), "--real_images",
                               os.path.join(toy_world, "data/test"), "--output_dir", out]}[program]
    run = run_command(argv)
    line = one_error_line(run)
    assert run.returncode == 128 + signum and f"stopped by {signum.name}" in line, (run.returncode, line)
    assert not os.path.exists(out)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers found are back


def test_a_full_disk_during_the_final_lora_save_leaves_the_folder_as_it_was(toy_world, tmp_path, monkeypatch):
    """The last file of the LoRA outputs fails to write: none of them lands in the run's folder (before: the
    diffusers file and the PEFT folder did, beside no kohya file); the checkpoints stay."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(toy_world, "models/sd"), subfolder="unet")
    random_lora(unet, lora.LCM_LORA_TARGETS)
    out = tmp_path / "run"
    (out / "checkpoint-4").mkdir(parents=True)
    save_file = lora_files.save_file

    def fills_the_disk(tensors, path, *args, **kwargs):
        if path.endswith(lora_files.KOHYA_WEIGHTS_NAME):
            open(path, "wb").write(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(lora_files, "save_file", fills_the_disk)
    one_process = SimpleNamespace(wait_for_everyone=lambda: None, is_main_process=True)
    with pytest.raises(OSError):
        lora_files.save_trained_lora(one_process, unet, str(out), "unet")
    assert sorted(os.listdir(out)) == ["checkpoint-4"]
    monkeypatch.setattr(lora_files, "save_file", save_file)
    lora_files.save_trained_lora(one_process, unet, str(out), "unet")
    assert listing(out) == ["checkpoint-4", "lora_kohya.safetensors", "pytorch_lora_weights.safetensors", "unet"]


def test_errors_turn_a_failed_write_and_ctrl_c_into_one_line_and_leave_bugs_alone(tmp_path, capsys):
    errors.note_output(str(tmp_path / "out"), "--output_dir")
    try:
        with pytest.raises(SystemExit) as info, errors.user_errors():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "unet" / "w.bin"))
        assert info.value.code == 2
        assert capsys.readouterr().err == (f"error: cannot write {tmp_path}/out/unet/w.bin: No space left on device "
                                           "(--output_dir)\n")
        with pytest.raises(SystemExit) as info, errors.user_errors():
            raise KeyboardInterrupt
        assert info.value.code == 130 and capsys.readouterr().err.startswith("error: stopped by SIGINT (Ctrl-C)")
        with pytest.raises(FileNotFoundError), errors.user_errors():  # not a failed write: a bug keeps its traceback
            open(tmp_path / "no_such_file")
        with pytest.raises(RuntimeError), errors.user_errors():
            raise RuntimeError("shapes do not match")
    finally:
        errors._outputs.clear()


def test_a_16_bit_grayscale_image_is_scaled_not_clipped_to_white(tmp_path):
    """PIL's own conversion of a 16-bit PNG clips every value above 255: a gradient came out nearly all white."""
    from utils.data import open_image

    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "gray16.png")
    rgb = np.asarray(open_image(str(tmp_path / "gray16.png")))
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.abs(rgb[..., 0].astype(int) - np.rint(values / 257.0)).max() == 0
    assert rgb.min() == 0 and rgb.max() == 255 and abs(rgb.mean() - 127.5) < 1


@pytest.fixture
def small_disk(tmp_path):
    """A 28 MiB tmpfs (root only; skipped elsewhere): room for one toy checkpoint (17 MiB), not for two."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=28m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_real_full_disk_while_training_is_one_line_and_keeps_the_last_checkpoint(toy_world, small_disk):
    """The disk fills up while checkpoint-2 is written (torch's writer, or safetensors, reports it in its own
    class): one line naming --output_dir, exit 2; the half-written checkpoint is gone, checkpoint-1 stays."""
    out = str(small_disk / "out")
    run = run_command(["train_lcm_distill_sd.py", "--pretrained_teacher_model", os.path.join(toy_world, "models/sd"),
                       "--train_data_dir", os.path.join(toy_world, "data/train"), "--output_dir", out,
                       "--resolution", "32", "--train_batch_size", "2", "--max_train_samples", "8",
                       "--max_train_steps", "2", "--checkpointing_steps", "1", "--validation_steps", "1000",
                       "--report_to", "none"])
    errors_said = [line for line in run.stderr.splitlines() if line.startswith("error")]  # beside the INFO lines
    assert len(errors_said) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    line = errors_said[0]
    assert run.returncode == 2 and line.startswith(f"error: cannot write checkpoint-2 in {out}: "), line
    assert line.endswith(f"{out}/checkpoint-1 stays the latest checkpoint (--output_dir)"), line
    assert listing(out) == ["checkpoint-1"]
