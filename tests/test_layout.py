"""The shape of the code a user reads: no import circles in utils/, no private names borrowed across
modules, and a training run on a user's model folder never imports the toy world."""

from __future__ import annotations

import ast
import importlib.util
import os

import pytest
from helpers import start_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_metrics():
    spec = importlib.util.spec_from_file_location("code_metrics", os.path.join(ROOT, "benchmarks", "code_metrics.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cycle_finder_finds_a_planted_circle_and_utils_has_none():
    metrics = code_metrics()
    assert metrics.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    known = metrics.utils_modules()
    graph = {m: metrics.imported_modules(p, m, set(known)) for m, p in known.items()}
    assert graph["utils.loop"], "the import graph was not read"  # loop imports checkpoint, at least
    assert metrics.cycles(graph) == []


def project_sources() -> dict[str, ast.Module]:
    found = {}
    for folder in ("", "utils", "utils/toy", "benchmarks"):
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                path = os.path.join(ROOT, folder, name)
                found[os.path.relpath(path, ROOT)] = ast.parse(open(path).read())
    return found


def test_no_private_name_is_imported_from_another_module():
    borrowed = []
    for path, tree in project_sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                borrowed += [f"{path}: {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert borrowed == []


@pytest.mark.slow
def test_training_runs_on_a_model_folder_never_import_the_toy_world(toy_world, tmp_path):
    """The five recipes, one step each, in one process of its own that starts with none of this project's modules
    (helpers.start_script): utils.toy is not among the loaded modules at its end."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle on a blue background\na large green square on a white background\n")
    common = ["--report_to", "none", "--resolution", "32", "--train_batch_size", "2", "--validation_steps", "100",
              "--checkpointing_steps", "100"]
    data = ["--train_data_dir", os.path.join(toy_world, "data/train"), "--max_train_samples", "4",
            "--max_train_steps", "1"]
    runs = [("train_lcm_distill_sd", [*common, *data, "--pretrained_teacher_model",
                                      os.path.join(toy_world, "models/sd"), "--output_dir", str(tmp_path / "a")]),
            ("train_lcm_distill_lora_sdxl", [*common, *data, "--pretrained_teacher_model",
                                             os.path.join(toy_world, "models/sdxl"), "--output_dir", str(tmp_path / "b")]),
            ("train_tcd_lora", [*common, *data, "--pretrained_teacher_model", os.path.join(toy_world, "models/sd"),
                                "--output_dir", str(tmp_path / "e")]),
            ("train_tlcm_flux", [*common, "--prompts_file", str(prompts), "--stage1_steps", "1", "--stage2_steps", "1",
                                 "--pretrained_teacher_model", os.path.join(toy_world, "models/flux"),
                                 "--output_dir", str(tmp_path / "c")]),
            ("train_tlcm_sdxl", [*common, "--prompts_file", str(prompts), "--stage1_steps", "1", "--stage2_steps", "1",
                                 "--pretrained_teacher_model", os.path.join(toy_world, "models/sdxl"),
                                 "--output_dir", str(tmp_path / "d")])]
    script = tmp_path / "five_recipes.py"
    script.write_text("import sys, importlib\n"
                      f"sys.path.insert(0, {ROOT!r})\n"
                      f"for name, argv in {runs!r}:\n"
                      "    module = importlib.import_module(name)\n"
                      "    module.main(module.parse_args(argv))\n"
                      "print('TOY', sorted(m for m in sys.modules if m.startswith('utils.toy')), file=sys.stderr)\n")
    proc = start_script(str(script), [], stderr_path=str(tmp_path / "stderr"))
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 0, err[-3000:]
    assert os.path.isfile(tmp_path / "c" / "pytorch_lora_weights.safetensors")
    assert os.path.isfile(tmp_path / "d" / "pytorch_lora_weights.safetensors")
    assert os.path.isfile(tmp_path / "e" / "scheduler" / "scheduler_config.json")
    assert "TOY []" in err
