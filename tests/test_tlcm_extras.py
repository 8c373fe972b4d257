"""TLCM's DMD and GAN extras: their math (utils/tlcm_extras.py) and train_tlcm_flux.py's extras stage on the toy FLUX."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import kill_while_saving, run_recipe, toy_flux_flow, write_flux_start_lora

from utils import lora, lora_files, losses, tlcm_extras
from utils.solvers import flow_renoise

pytestmark = pytest.mark.usefixtures("one_thread")
FAKE = tlcm_extras.FAKE_SCORE
FEATURES = ("norm_out", "input")  # what the FLUX recipe's GAN head reads


# ----------------------------------------------------------------------------- math


def test_dmd_surrogate_gradient_is_the_normalised_fake_minus_real_direction():
    g = torch.Generator().manual_seed(0)
    x, real, fake = (torch.randn(3, 16, 8, generator=g) for _ in range(3))
    x.requires_grad_(True)
    grad = losses.dmd_grad(x.detach(), real, fake)
    losses.dmd_surrogate(x, grad).backward()
    scale = (x.detach() - real).abs().mean(dim=(1, 2), keepdim=True)
    assert torch.allclose(x.grad * x.numel(), (fake - real) / scale, atol=1e-6)
    assert torch.equal(losses.dmd_grad(x.detach(), real, real), torch.zeros_like(x))  # fake = real: no push


def gaussian_x0(z: torch.Tensor, sigma: float, mean: torch.Tensor) -> torch.Tensor:
    """E[x0 | z] for x0 ~ N(mean, I) and z = (1 - s) x0 + s eps: the exact denoiser of a unit Gaussian."""
    a = 1 - sigma
    return mean + a / (a * a + sigma * sigma) * (z - a * mean)


def test_dmd_moves_samples_towards_the_real_distribution_on_a_gaussian_toy():
    """Real data N(m_r, I), generator samples N(m_f, I): g is along m_f - m_r, and descent closes the gap."""
    g = torch.Generator().manual_seed(1)
    m_real, m_fake = torch.zeros(8), torch.full((8,), 3.0)
    x = (m_fake + torch.randn(256, 8, generator=g)).requires_grad_(True)
    opt = torch.optim.SGD([x], lr=x.numel())  # the surrogate's gradient is g / numel
    for _ in range(8):
        sigma = float(torch.rand(1, generator=g)) * 0.9 + 0.05
        z = flow_renoise(x.detach(), torch.randn(x.shape, generator=g), sigma)
        real, fake = gaussian_x0(z, sigma, m_real), gaussian_x0(z, sigma, x.detach().mean(0))
        direction = losses.dmd_grad(x.detach(), real, fake)
        cos = torch.nn.functional.cosine_similarity(direction.mean(0), (x.detach().mean(0) - m_real), dim=0)
        assert cos > 0.999  # the mean push is along m_fake - m_real
        opt.zero_grad()
        losses.dmd_surrogate(x, direction).backward()
        opt.step()
    assert (x.detach().mean(0) - m_real).norm() < 0.1 * (m_fake - m_real).norm()


def test_flow_matching_loss_vanishes_at_the_true_velocity():
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    assert float(losses.flow_matching_loss(eps - x0, x0, eps)) == 0.0
    assert float(losses.flow_matching_loss(torch.zeros_like(x0), x0, eps)) > 0.5


def test_discriminator_head_reads_the_input_or_the_output_of_its_module_inside_the_block_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    x = torch.randn(5, 3)
    for which, expected in (("input", model[0](x)), ("output", model(x))):
        head = tlcm_extras.DiscriminatorHead(4 if which == "input" else 2, ("1", which), hidden=8)
        with head.reading(model) as seen:
            model(x)
        model(x)  # outside the block: not recorded
        assert len(seen) == 1 and torch.equal(seen[0], expected)


def test_discriminator_head_learns_a_separable_toy():
    g = torch.Generator().manual_seed(3)
    direction = torch.randn(32, generator=g)
    real = torch.randn(16, 10, 32, generator=g) + 0.5 * direction
    fake = torch.randn(16, 10, 32, generator=g) - 0.5 * direction
    head = tlcm_extras.DiscriminatorHead(32, FEATURES, hidden=16, seed=0)
    same = tlcm_extras.DiscriminatorHead(32, FEATURES, 16, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(head.parameters(), same.parameters()))
    opt = tlcm_extras.AuxOptimizer(head.parameters(), 1e-2)
    history = []
    for _ in range(30):
        loss = losses.gan_discriminator_loss(head(real), head(fake))
        history.append(loss.item())
        assert opt.step(loss)
    assert history[-1] < 0.3 * history[0] and bool((head(real) > head(fake).max()).all())
    # the generator's loss pushes fake features towards the real side
    moved = fake.clone().requires_grad_(True)
    losses.gan_generator_loss(head(moved)).backward()
    assert float((-moved.grad.mean((0, 1)) * direction).sum()) > 0


def test_aux_optimizer_state_round_trip_and_skips_non_finite():
    def make():
        torch.manual_seed(0)
        return torch.nn.Linear(4, 1)
    a, b = make(), make()
    opt_a, opt_b = tlcm_extras.AuxOptimizer(a.parameters(), 0.1), tlcm_extras.AuxOptimizer(b.parameters(), 0.1)
    x = torch.randn(8, 4)
    opt_a.step(a(x).pow(2).mean())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # weights and Adam moments, as if saved and loaded
    opt_a.step(a(x).pow(2).mean())
    opt_b.step(b(x).pow(2).mean())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    before = [p.detach().clone() for p in a.parameters()]
    assert not opt_a.step(a(x).sum() * float("nan"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))


def transformer_call(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return model(hidden_states=torch.randn(2, 16, 64, generator=g), timestep=torch.tensor([0.9, 0.4]),
                 pooled_projections=torch.randn(2, 64, generator=g),
                 encoder_hidden_states=torch.randn(2, 16, 32, generator=g), txt_ids=torch.zeros(16, 3),
                 img_ids=torch.zeros(16, 3), return_dict=False)[0]


def test_fake_score_adapter_starts_at_the_base_learns_alone_and_stays_out_of_the_saved_lora(toy_world, tmp_path):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(os.path.join(toy_world, "models/flux"), subfolder="transformer")
    model.requires_grad_(False)
    lora.add_trainable_lora(model, 4, 8, lora.FLUX_LORA_TARGETS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.normal_(0, 0.05)  # a trained student
    student_params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad(), lora.adapters_disabled(model):
        base = transformer_call(model)
    student = transformer_call(model).detach()
    fake_params = list(tlcm_extras.add_fake_score(model, 4, 8, lora.FLUX_LORA_TARGETS).values())
    assert fake_params and all(p.dtype == torch.float32 for p in fake_params)
    assert [p for p in model.parameters() if p.requires_grad] == student_params  # "default" is still the trained one
    assert torch.equal(transformer_call(model).detach(), student)
    with torch.no_grad(), tlcm_extras.adapter_active(model):
        assert torch.allclose(transformer_call(model), base, atol=1e-6)  # zero-init: fake = base

    opt, before = tlcm_extras.AuxOptimizer(fake_params, 1e-2), [p.detach().clone() for p in student_params]
    for _ in range(2):
        with tlcm_extras.adapter_active(model):
            assert all(p.requires_grad for p in fake_params) and not any(p.requires_grad for p in student_params)
            opt.step(transformer_call(model, seed=1).pow(2).mean())
    with torch.no_grad(), tlcm_extras.adapter_active(model):
        assert not torch.allclose(transformer_call(model), base, atol=1e-4)  # the fake score moved
    assert all(torch.equal(p, q) for p, q in zip(student_params, before))  # ... and only it
    assert torch.equal(transformer_call(model).detach(), student)
    assert all(p.requires_grad for p in student_params) and not any(p.requires_grad for p in fake_params)

    lora_files.save_lora_outputs(model, str(tmp_path), "transformer", peft_dir=str(tmp_path))
    from safetensors.torch import load_file

    for name in (lora_files.PEFT_WEIGHTS_NAME, lora_files.DIFFUSERS_WEIGHTS_NAME, lora_files.KOHYA_WEIGHTS_NAME):
        keys = load_file(os.path.join(tmp_path, name)).keys()
        assert keys and not any(FAKE in k for k in keys), name
    assert len(load_file(os.path.join(tmp_path, lora_files.PEFT_WEIGHTS_NAME))) == 2 * len(lora.lora_scalings(model))


# ----------------------------------------------------------------------------- the recipe


def adapter(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, lora_files.PEFT_WEIGHTS_NAME))


@pytest.fixture(scope="module")
def start_lora(toy_world, tmp_path_factory):
    """A rank-4 LoRA standing in for stage 2's output (written as the recipe writes its LoRAs)."""
    return write_flux_start_lora(toy_world, str(tmp_path_factory.mktemp("tlcm_extras") / "start"))


def extras_args(world: str, out: str, init: str) -> list[str]:
    return ["--pretrained_teacher_model", os.path.join(world, "models/flux"),
            "--prompts_file", os.path.join(world, "data/train/metadata.jsonl"), "--max_train_samples", "16",
            "--output_dir", out, "--resolution", "32", "--lora_rank", "4", "--train_batch_size", "2",
            "--stage", "extras", "--init_lora", init, "--dmd", "--gan", "--extras_steps", "5",
            "--extras_learning_rate", "1e-3", "--dmd_learning_rate", "1e-3", "--gan_learning_rate", "1e-3",
            "--checkpointing_steps", "2", "--checkpoint_at_end", "--lr_warmup_steps", "0", "--validation_steps", "1000",
            "--report_to", "none"]


def student_vector(flow) -> torch.Tensor:
    """The student's LoRA ("default" adapter) as one flat vector, a copy."""
    return torch.cat([p.detach().flatten() for n, p in flow.base.named_parameters() if ".default." in n]).clone()


class CallOrder:
    """Spies on the recipe's extras_loss, fake_score_loss and disc_loss: the order of the calls, the sample each
    got or returned, and the student's LoRA at the time of the call."""

    def __init__(self, recipe) -> None:
        self.recipe, self.calls = recipe, []
        self.extras_loss, self.fake_score_loss = recipe.extras_loss, recipe.fake_score_loss
        self.disc_loss = recipe.disc_loss

    def patch(self, mp) -> None:
        def extras(flow, *args, **kwargs):
            before = student_vector(flow)
            loss, x = self.extras_loss(flow, *args, **kwargs)
            self.calls.append(("student", x, before))
            return loss, x

        def fake(flow, cond, x, gen):
            self.calls.append(("fake_score", x, student_vector(flow)))
            return self.fake_score_loss(flow, cond, x, gen)

        def disc(flow, head, cond, x, gen):
            self.calls.append(("head", x, student_vector(flow)))
            return self.disc_loss(flow, head, cond, x, gen)
        mp.setattr(self.recipe, "extras_loss", extras)
        mp.setattr(self.recipe, "fake_score_loss", fake)
        mp.setattr(self.recipe, "disc_loss", disc)


@pytest.fixture(scope="module")
def extras_run(toy_world, start_lora, tmp_path_factory):
    """The extras stage with DMD and GAN, in this process, its loss calls watched: (output folder, CallOrder)."""
    import train_tlcm_flux

    out = str(tmp_path_factory.mktemp("tlcm_extras") / "straight")
    order = CallOrder(train_tlcm_flux)
    with pytest.MonkeyPatch.context() as mp:
        order.patch(mp)
        run_recipe("train_tlcm_flux.py", extras_args(toy_world, out, start_lora))
    return out, order


def test_dmd_gan_extras_train_the_student_lora_only(toy_world, start_lora, extras_run):
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from utils import checkpoint

    extras_run, _ = extras_run
    start, final = adapter(start_lora), adapter(extras_run)
    assert final.keys() == start.keys()  # the student's LoRA, nothing of the fake score
    assert any(not torch.equal(start[k], final[k]) for k in start)  # the extras moved it
    assert all(torch.equal(v, adapter(os.path.join(extras_run, "stageextras/lora"))[k]) for k, v in final.items())
    for name in (lora_files.DIFFUSERS_WEIGHTS_NAME, lora_files.KOHYA_WEIGHTS_NAME):
        assert not any(FAKE in k for k in load_file(os.path.join(extras_run, name)))
    pipe = FluxPipeline.from_pretrained(os.path.join(toy_world, "models/flux"))
    pipe.load_lora_weights(extras_run)  # the diffusers file loads as before

    # the checkpoint holds the fake score (moved away from its zero init) and the head with its optimizer
    ckpt = os.path.join(extras_run, "stageextras", "checkpoint-5")
    model_state = checkpoint.read_model_state(ckpt)
    fake_b = [v for k, v in model_state.items() if f"lora_B.{FAKE}" in k]
    assert fake_b and any(v.abs().sum() > 0 for v in fake_b)
    custom = [torch.load(os.path.join(ckpt, f"custom_checkpoint_{i}.pkl"), weights_only=False) for i in (1, 2)]
    assert all(state["optimizer"]["state"] for state in custom)  # Adam moments of the fake score and the head
    assert len(custom[0]["params"]) == len(fake_b) * 2 and len(custom[1]["params"]) == 4  # fake A+B; head W, b x2


def test_fake_score_and_head_step_after_the_student_on_its_detached_one_step_sample(extras_run):
    """Per micro-batch: the student's loss and update, then the fake score's, then the head's, both on the very
    (detached) one-step sample the student's loss returned."""
    _, order = extras_run
    calls = order.calls
    assert [name for name, _, _ in calls] == ["student", "fake_score", "head"] * 5  # --extras_steps 5, no accumulation
    for (_, x, before), (_, x_fake, after_fake), (_, x_head, after_head) in zip(calls[::3], calls[1::3], calls[2::3]):
        assert x is not None and not x.requires_grad and x_fake is x and x_head is x
        assert not torch.equal(before, after_fake)  # the student had taken its step
        assert torch.equal(after_fake, after_head)  # the fake score's step left the student alone


@pytest.mark.slow
def test_killed_extras_stage_resumes_bit_identical(toy_world, start_lora, extras_run, tmp_path, monkeypatch):
    """SIGKILL (a real process) while the extras stage writes checkpoint-4; resuming from checkpoint-2 restores the
    fake score, the head and their optimizers, so the student LoRA and the extras' states end bit-identical."""
    extras_run, _ = extras_run
    crashed = str(tmp_path / "crashed")
    args = extras_args(toy_world, crashed, start_lora)
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # the same float sums as this process
    kill_while_saving("train_tlcm_flux.py", args, os.path.join(crashed, "stageextras", "checkpoint-4.partial"))
    assert not os.path.exists(os.path.join(crashed, lora_files.PEFT_WEIGHTS_NAME))
    run_recipe("train_tlcm_flux.py", args + ["--resume_from_checkpoint", "latest"])
    a, b = adapter(extras_run), adapter(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for i in (1, 2):
        sa, sb = (torch.load(os.path.join(run, "stageextras/checkpoint-5", f"custom_checkpoint_{i}.pkl"),
                             weights_only=False) for run in (extras_run, crashed))
        assert all(torch.equal(p, q) for p, q in zip(sa["params"], sb["params"]))


def test_extras_losses_each_reach_only_their_own_parameters(toy_world, tmp_path):
    """extras_loss: the student's LoRA (through the one-step sample x, returned detached); fake_score_loss: the
    fake score only; disc_loss: the head only. The frozen base gets no gradient from any of them."""
    import train_tlcm_flux as recipe

    from utils.solvers import flow_x0

    flow, cond, uncond = toy_flux_flow(toy_world, str(tmp_path / "out"), ["--dmd", "--gan"])
    fake = list(tlcm_extras.add_fake_score(flow.base, 4, 8, lora.FLUX_LORA_TARGETS).values())
    head = tlcm_extras.DiscriminatorHead(flow.base.config.num_attention_heads * flow.base.config.attention_head_dim,
                                           ("norm_out", "input"), 16)
    named = dict(flow.base.named_parameters())
    student = [p for n, p in named.items() if ".default." in n]
    frozen = [p for n, p in named.items() if "lora_" not in n]
    groups = {"student": student, "fake score": fake, "head": list(head.parameters()), "base": frozen}

    def reached(loss) -> set[str]:
        for ps in groups.values():
            for p in ps:
                p.grad = None
        loss.backward()
        return {name for name, ps in groups.items() if any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps)}

    loss, x = recipe.extras_loss(flow, flow.base, cond, uncond, ["a", "b"], torch.Generator().manual_seed(0),
                                 head=head)
    assert x.shape == (2, 16, 64) and not x.requires_grad
    # x is the one-step sample: the student's x0 prediction from the first noise draw at t = T
    noise, top = flow.noise(2, torch.Generator().manual_seed(0)), flow.sigma(torch.full((2,), 1000.0))
    with torch.no_grad():
        assert torch.allclose(x, flow_x0(noise, flow.student(cond)(noise, top), top), atol=1e-5)
    assert {"student"} <= reached(loss) <= {"student", "head"}  # AuxOptimizer.step clears the head's before its own
    with tlcm_extras.adapter_active(flow.base):  # as the recipe calls it: the fake score's weights require grad only there
        assert reached(recipe.fake_score_loss(flow, cond, x, torch.Generator().manual_seed(1))) == {"fake score"}
    assert reached(recipe.disc_loss(flow, head, cond, x, torch.Generator().manual_seed(2))) == {"head"}


def test_stage_all_with_an_extra_flag_runs_the_extras_stage(toy_world, tmp_path):
    import train_tlcm_flux

    base = ["--pretrained_teacher_model", "unused", "--prompts_file", "p.txt", "--output_dir", str(tmp_path),
            "--resolution", "32"]  # given: the default is read from the teacher's configs
    assert train_tlcm_flux.parse_args(base).stages == ["1", "2"]
    for flag in ("--dmd", "--gan"):
        args = train_tlcm_flux.parse_args(base + [flag])
        assert args.stages == ["1", "2", "extras"] and getattr(args, flag[2:])
    defaults = train_tlcm_flux.parse_args(base)
    assert not defaults.dmd and not defaults.gan


@pytest.mark.parametrize("extra, needle", [
    (["--dmd", "--dmd_weight", "-1"], "--dmd_weight"),
    (["--gan", "--gan_weight", "-0.5"], "--gan_weight"),
    (["--dmd", "--dmd_learning_rate=-1e-4"], "--dmd_learning_rate"),  # argparse: -1e-4 needs the = form
    (["--gan", "--gan_learning_rate", "-1"], "--gan_learning_rate"),
])
def test_negative_weights_and_learning_rates_are_one_line_errors(tmp_path, capsys, extra, needle):
    import train_tlcm_flux

    base = ["--pretrained_teacher_model", "unused", "--prompts_file", "p.txt", "--output_dir", str(tmp_path),
            "--resolution", "32"]  # given: the default is read from the teacher's configs
    with pytest.raises(SystemExit) as exc:
        train_tlcm_flux.parse_args(base + extra)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and needle in lines[0] and "negative" in lines[0]


def test_stage_extras_without_an_extra_names_all_three_flags(toy_world, tmp_path):
    out = str(tmp_path / "out")
    proc = run_recipe("train_tlcm_flux.py", ["--pretrained_teacher_model", os.path.join(toy_world, "models/flux"),
                                             "--prompts_file", os.path.join(toy_world, "data/train/metadata.jsonl"),
                                             "--output_dir", out, "--stage", "extras"], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert all(flag in lines[0] for flag in ("--reward_model", "--dmd", "--gan"))
    assert not os.path.exists(out)
