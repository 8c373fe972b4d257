"""Write a full-size diffusers pipeline with random weights, to measure training memory at real sizes offline.

    python benchmarks/full_size.py --model sdxl --output_dir models/sdxl-random
    python benchmarks/full_size.py --model sd15 --output_dir models/sd15-small --dtype bf16 --width_scale 0.25 --overwrite
    python benchmarks/full_size.py --model flux --output_dir models/flux-random --dtype bf16

Writes a complete pipeline folder (model_index.json, unet/ or transformer/, vae/, text_encoder/, [text_encoder_2/],
tokenizer/, [tokenizer_2/], scheduler/) that DiffusionPipeline.from_pretrained loads (StableDiffusionPipeline for
sd15, StableDiffusionXLPipeline for sdxl and ssd1b, FluxPipeline for flux). Every model is built on the meta device
and materialised directly in --dtype, one at a time, and saved and freed before the next is built, so a 2.6B-parameter
UNet never exists in fp32 and FLUX's transformer and T5 encoder are never in memory together. Weights are random:
Linear/Conv layers get their own `reset_parameters()`, norms ones and zeros, embeddings and anything else
N(0, 0.02). The CLIP tokenizers are the toy world's CLIP BPE (small vocabulary) saved with the real CLIP context of
77 tokens; FLUX's T5 tokenizer is the toy world's T5 unigram saved with FLUX.1-dev's 512-token limit.

Where the numbers come from (each model's published diffusers / transformers config files):
  sd15   Stable Diffusion 1.5: a 4-level UNet of 320/640/1280/1280 channels with cross-attention on the first three
         levels (859.5M parameters), the 4-channel KL autoencoder (83.7M, latents scaled by 0.18215), the text
         tower of OpenAI CLIP ViT-L/14 (123.1M), and the PNDM scheduler of its release.
  sdxl   SDXL base 1.0: a 3-level UNet of 320/640/1280 channels with 1, 2 and 10 transformer layers per attention
         block at levels 2 and 3, 64-channel heads, linear projections and "text_time" micro-conditioning
         (2567.5M), the same autoencoder re-trained with scaling 0.13025 (and upcast to fp32 to decode), CLIP ViT-L
         text (123.1M) and OpenCLIP ViT-bigG/14 text with projection (694.7M), Euler discrete scheduler.
  ssd1b  Segmind SSD-1B, a distillation of SDXL that keeps its text encoders, autoencoder and scheduler and prunes
         the UNet: no transformer in the mid block (a single ResNet), 2 and 4 transformer layers per attention in
         the down blocks, and up blocks of [4, 4, 10] and [2, 1, 1] layers (1.3B). The layer counts are those the
         ComfyUI model detector records for SSD-1B's weights (its SSD_1B entry: depths [0, 0, 2, 2, 4, 4] down,
         [0, 0, 0, 1, 1, 2, 10, 4, 4] up, mid depth -1), expressed with diffusers' asymmetric-UNet options
         (`reverse_transformer_layers_per_block`, mid block "UNetMidBlock2D"). Segmind's own unet/config.json was
         not found to compare against; the parameter count this layout gives (about 1.33B) matches the published
         "1.3B".
  flux   FLUX.1-dev: a rectified-flow transformer of 19 double-stream and 38 single-stream blocks, 24 heads of 128
         channels (RoPE axes 16/56/56), 64 input channels (2x2 patches of 16 latent channels), a guidance embedding
         (11,901.4M parameters, 23.8 GB in fp16/bf16), the 16-channel KL autoencoder without quant convs (83.8M,
         latents shifted by 0.1159 and scaled by 0.3611), CLIP ViT-L text for the pooled vector (123.1M), the
         encoder of T5 v1.1 XXL (24 layers, 4096 wide, gated-GELU MLP of 10240; 4,762.3M, 9.5 GB in fp16/bf16) and
         the flow-matching Euler scheduler with resolution-dependent shift (0.5 at 256 tokens to 1.15 at 4096).
         Writing it at full size needs about 28 GB of free RAM: the largest component (the transformer, 23.8 GB in
         either half dtype), the 2 GB shard safetensors serialises in memory, and about 2 GB for the Python
         process and allocator slack; the T5 encoder (9.5 GB) is written and freed first. 32 GB of RAM is enough.

--width_scale s multiplies every channel width (UNet levels and head counts, VAE channels, text hidden and MLP
sizes, FLUX's head count and T5's width, heads and MLP) and keeps the layout (depths, transformer layer counts,
concatenated cross-attention widths), so tests can write small pipelines of the same shape. Widths are rounded to
multiples of 32 (GroupNorm groups) for the UNet and VAE and of 64 (one head) for the text encoders, with head counts
that divide them. FLUX keeps 128 channels a head, so its RoPE axes (16 + 56 + 56) still fill a head, and scales the
number of heads (at least one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402 -- also puts the repository root on sys.path
import torch  # noqa: E402
from torch import nn  # noqa: E402

from utils import files, outputs  # noqa: E402
from utils.errors import UserError, user_errors  # noqa: E402
from utils.flags import Parser  # noqa: E402

MODELS = ("sd15", "sdxl", "ssd1b", "flux")
# half precisions only: the point is never to hold a full-size model in fp32
DTYPES = {name: getattr(torch, common.DTYPES[name]) for name in ("fp16", "bf16")}
CLIP_CONTEXT = 77  # tokens of the real CLIP text encoders (max_position_embeddings)
TEXT_HEAD = 64  # channels per attention head in both CLIP text towers
TIME_ID_DIM = 256  # SDXL's addition_time_embed_dim: a sinusoidal size per time id, not a channel width
SHARD = "2GB"  # safetensors serialises a shard in memory: small shards keep the peak near the model's own size
NORMS = (nn.GroupNorm, nn.LayerNorm)
T5_CONTEXT = 512  # FLUX.1-dev's max_sequence_length (schnell's is 256)
FLUX_HEAD = 128  # channels per FLUX attention head: the RoPE axes (16, 56, 56) must sum to it


def _channels(width: int, scale: float, multiple: int = 32) -> int:
    """`width` x `scale`, rounded to a positive multiple of `multiple` (GroupNorm needs 32 groups)."""
    return max(multiple, round(width * scale / multiple) * multiple)


def _heads(heads: int, scale: float, channels: int) -> int:
    """`heads` x `scale` rounded (at least 1), lowered until it divides `channels`."""
    n = max(1, round(heads * scale))
    while channels % n:
        n -= 1
    return n


def _clip_config(hidden: int, layers: int, act: str, scale: float) -> dict:
    """A CLIP text tower of `hidden` channels (64 a head, MLP 4x wide) and `layers` layers, widths scaled."""
    width = max(1, round(hidden / TEXT_HEAD * scale)) * TEXT_HEAD
    return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                num_attention_heads=width // TEXT_HEAD, max_position_embeddings=CLIP_CONTEXT, vocab_size=49408,
                hidden_act=act, projection_dim=width, layer_norm_eps=1e-5)


def _vae_config(scaling_factor: float, sample_size: int, scale: float, force_upcast: bool, latent_channels: int = 4,
                **extra) -> dict:
    """The 4-level KL autoencoder shared by SD 1.5, SDXL and FLUX (FLUX's other differences come in `extra`)."""
    return dict(in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=2, norm_num_groups=32,
                act_fn="silu", block_out_channels=[_channels(c, scale) for c in (128, 256, 512, 512)],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                scaling_factor=scaling_factor, sample_size=sample_size, force_upcast=force_upcast, **extra)


def _t5_config(scale: float) -> dict:
    """The encoder of T5 v1.1 XXL (FLUX's text_encoder_2), widths scaled with 64 channels a head kept."""
    d_model = max(1, round(4096 / TEXT_HEAD * scale)) * TEXT_HEAD
    return dict(d_model=d_model, d_ff=_channels(10240, scale, TEXT_HEAD), d_kv=TEXT_HEAD,
                num_heads=d_model // TEXT_HEAD, num_layers=24, num_decoder_layers=24, vocab_size=32128,
                feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                dropout_rate=0.1, is_encoder_decoder=False, use_cache=False,
                # one token table, `shared`, as in the released encoder; recent transformers ties the encoder's
                # `embed_tokens` to it only with this set, and would otherwise add a second 32128 x 4096 table
                tie_word_embeddings=True)


def _flux_transformer(scale: float, joint_attention_dim: int, pooled_dim: int) -> dict:
    """FLUX.1-dev's transformer, with the head count scaled and 128 channels a head kept."""
    return dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                attention_head_dim=FLUX_HEAD, num_attention_heads=max(1, round(24 * scale)),
                joint_attention_dim=joint_attention_dim, pooled_projection_dim=pooled_dim, guidance_embeds=True,
                axes_dims_rope=[16, 56, 56])


def _sd15_unet(scale: float, cross_attention_dim: int) -> dict:
    channels = [_channels(c, scale) for c in (320, 640, 1280, 1280)]
    heads = min(_heads(8, scale, c) for c in channels)  # one count for all levels, as the published int 8
    while any(c % heads for c in channels):
        heads -= 1
    return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                cross_attention_dim=cross_attention_dim, attention_head_dim=heads, norm_num_groups=32)


def _sdxl_unet(scale: float, cross_attention_dim: int, pooled_dim: int, ssd1b: bool) -> dict:
    channels = [_channels(c, scale) for c in (320, 640, 1280)]
    # diffusers' `attention_head_dim` of SDXL holds head counts (5, 10, 20 heads of 64 channels)
    heads = [_heads(h, scale, c) for h, c in zip((5, 10, 20), channels)]
    config = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  transformer_layers_per_block=[1, 2, 10], attention_head_dim=heads,
                  cross_attention_dim=cross_attention_dim, use_linear_projection=True, norm_num_groups=32,
                  addition_embed_type="text_time", addition_time_embed_dim=TIME_ID_DIM,
                  projection_class_embeddings_input_dim=6 * TIME_ID_DIM + pooled_dim)
    if ssd1b:  # pruned per attention (see the module docstring); the first level has no attention at all
        config.update(transformer_layers_per_block=[[0, 0], [2, 2], [4, 4]],
                      reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], [0, 0, 0]],
                      mid_block_type="UNetMidBlock2D")
    return config


def configs(model_name: str, width_scale: float = 1.0) -> dict[str, dict]:
    """The config of each model component of `model_name` (unet or transformer, vae, text_encoder[, _2])."""
    if model_name not in MODELS:
        raise UserError(f"unknown model {model_name!r}: one of {', '.join(MODELS)} (--model)")
    if not width_scale > 0:
        raise UserError(f"--width_scale must be above 0, got {width_scale}")
    s = width_scale
    if model_name == "flux":
        text, t5 = _clip_config(768, 12, "quick_gelu", s), _t5_config(s)
        # 16 latent channels, packed in 2x2 patches, make the transformer's 64 input channels
        vae = _vae_config(0.3611, 1024, s, True, latent_channels=16, shift_factor=0.1159, use_quant_conv=False,
                          use_post_quant_conv=False)
        # T5 first: the transformer, the largest, is then written last, with nothing else left over
        return {"text_encoder": text, "text_encoder_2": t5, "vae": vae,
                "transformer": _flux_transformer(s, t5["d_model"], text["hidden_size"])}
    if model_name == "sd15":
        text = _clip_config(768, 12, "quick_gelu", s)
        return {"unet": _sd15_unet(s, text["hidden_size"]), "vae": _vae_config(0.18215, 512, s, False),
                "text_encoder": text}
    text, text_2 = _clip_config(768, 12, "quick_gelu", s), _clip_config(1280, 32, "gelu", s)
    unet = _sdxl_unet(s, text["hidden_size"] + text_2["hidden_size"], text_2["projection_dim"], model_name == "ssd1b")
    return {"unet": unet, "vae": _vae_config(0.13025, 1024, s, True), "text_encoder": text, "text_encoder_2": text_2}


def _classes(component: str, config: dict) -> Callable[[dict], nn.Module]:
    """The constructor of `component` from its config dict."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if component == "unet":
        return UNet2DConditionModel.from_config
    if component == "transformer":
        return FluxTransformer2DModel.from_config
    if component == "vae":
        return AutoencoderKL.from_config
    if "d_model" in config:  # text_encoder_2 is T5 in FLUX, a CLIP tower in SDXL: the config tells them apart
        return lambda c: T5EncoderModel(T5Config(**c))
    cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
    return lambda c: cls(CLIPTextConfig(**c))


def _empty(component: str, config: dict, token_ids: dict | None = None) -> nn.Module:
    """The component with its parameters on the meta device (no memory); buffers are real and small."""
    from accelerate import init_empty_weights

    if token_ids:
        config = dict(config, **token_ids)
    with init_empty_weights(include_buffers=False):
        model = _classes(component, config)(config)
    if hasattr(model, "tie_weights"):  # accelerate re-wraps every parameter set inside the context, untying them
        model.tie_weights()
    return model


_counted: dict[str, int] = {}  # component + config -> parameters: the models share encoders and VAEs


def param_counts(model_name: str, width_scale: float = 1.0) -> dict[str, int]:
    """Parameters of each component of `model_name`, counted on the meta device."""
    counts = {}
    for name, config in configs(model_name, width_scale).items():
        key = json.dumps([name, config], sort_keys=True)
        if key not in _counted:
            _counted[key] = sum(p.numel() for p in _empty(name, config).parameters())
        counts[name] = _counted[key]
    return counts


@torch.no_grad()
def materialise(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Give every meta parameter real storage in `dtype` and a random init computed in that dtype."""
    real: dict[int, nn.Parameter] = {}  # by the meta parameter's id: a tied parameter stays one tensor
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in real:
                    real[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=dtype),
                                                   requires_grad=param.requires_grad)
                module._parameters[name] = real[id(param)]
    done: set[int] = set()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, NORMS) or type(module).__name__.endswith(("RMSNorm", "LayerNorm")):
            for name, p in module.named_parameters(recurse=False):
                p.fill_(0.0 if name == "bias" else 1.0)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, 0.02)  # CLIP's own init: N(0, 1) token vectors would dwarf the layers
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            module.reset_parameters()  # kaiming-uniform weights, fan-in uniform bias; runs in `dtype`
        else:
            for p in own:
                p.normal_(0.0, 0.02)
        done.update(id(p) for p in own)
    left = [n for n, p in model.named_parameters() if id(p) not in done]
    assert not left, f"parameters without an init: {left[:3]}"
    for name, buffer in model.named_buffers():  # float buffers (none in these models, by design) follow the dtype
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)
    return model.eval()


def _tokenizer(kind: str = "clip"):
    """The toy world's CLIP BPE with the real CLIP context length, or its T5 unigram with FLUX-dev's."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    from utils.toy.tokenizers import build_clip_tokenizer, build_t5_tokenizer
    from utils.toy.train import WEIGHTS

    cls, build, length = ((CLIPTokenizer, build_clip_tokenizer, CLIP_CONTEXT) if kind == "clip"
                          else (T5TokenizerFast, build_t5_tokenizer, T5_CONTEXT))
    path = os.path.join(WEIGHTS, f"{kind}_tokenizer")
    # the committed tokenizer may be missing: rebuilding it is deterministic and takes a second
    tok = cls.from_pretrained(path) if os.path.isdir(path) else build()
    tok.model_max_length = length
    return tok


def _tokenizers(model_name: str) -> dict:
    """Each tokenizer subfolder of the pipeline and the tokenizer saved there."""
    clip = _tokenizer("clip")
    if model_name == "sd15":
        return {"tokenizer": clip}
    return {"tokenizer": clip, "tokenizer_2": _tokenizer("t5") if model_name == "flux" else clip}


def _token_ids(tok) -> dict:
    """The special-token ids a text encoder's config records, from the tokenizer it is saved with."""
    ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if tok.bos_token_id is not None:
        ids["bos_token_id"] = tok.bos_token_id
    else:  # T5 has no BOS token: its decoder starts from the pad token, as the released config says
        ids["decoder_start_token_id"] = tok.pad_token_id
    return ids


def _scheduler(model_name: str):
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler

    if model_name == "flux":  # the shift grows with the image's token count, from 0.5 at 256 to 1.15 at 4096
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                               base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                               max_image_seq_len=4096)

    common_config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         steps_offset=1, prediction_type="epsilon")
    if model_name == "sd15":
        return PNDMScheduler(**common_config, set_alpha_to_one=False, skip_prk_steps=True)
    return EulerDiscreteScheduler(**common_config, timestep_spacing="leading", interpolation_type="linear",
                                  use_karras_sigmas=False)


def _model_index(model_name: str, tokenizers: dict) -> dict:
    """model_index.json of the pipeline, as its class writes it."""
    import diffusers

    text = ["transformers", "CLIPTextModel"]
    tok = ["transformers", "CLIPTokenizer"]
    if model_name == "flux":
        return {"_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__,
                "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": text, "tokenizer": tok, "text_encoder_2": ["transformers", "T5EncoderModel"],
                # the class name as this transformers version saves it (T5Tokenizer or T5TokenizerFast)
                "tokenizer_2": ["transformers", type(tokenizers["tokenizer_2"]).__name__],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "image_encoder": [None, None], "feature_extractor": [None, None]}
    index = {"_diffusers_version": diffusers.__version__, "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": text, "tokenizer": tok}
    if model_name == "sd15":
        return dict(index, _class_name="StableDiffusionPipeline", scheduler=["diffusers", "PNDMScheduler"],
                    safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False,
                    image_encoder=[None, None])
    return dict(index, _class_name="StableDiffusionXLPipeline", scheduler=["diffusers", "EulerDiscreteScheduler"],
                text_encoder_2=["transformers", "CLIPTextModelWithProjection"], tokenizer_2=tok,
                force_zeros_for_empty_prompt=True, image_encoder=[None, None], feature_extractor=[None, None])


def write_pipeline(model_name: str, out: str, dtype: torch.dtype = torch.float16, width_scale: float = 1.0,
                   log: Callable[[str], None] = print) -> dict[str, int]:
    """Write the pipeline folder of `model_name` at `out` (a new folder); returns each component's parameters."""
    os.makedirs(out)
    counts: dict[str, int] = {}
    tokenizers = _tokenizers(model_name)
    for name, config in configs(model_name, width_scale).items():
        start = time.perf_counter()
        # the text encoders find the pooled (EOS) token by id: give them the ids of the tokenizer they are saved with
        token_ids = _token_ids(tokenizers[name.replace("text_encoder", "tokenizer")]) if name.startswith("text") \
            else None
        model = materialise(_empty(name, config, token_ids), dtype)
        counts[name] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(os.path.join(out, name), max_shard_size=SHARD)
        del model  # one component in memory at a time
        log(f"{name}: {counts[name] / 1e6:,.1f}M params, {time.perf_counter() - start:.1f} s")
    for name, tok in tokenizers.items():
        tok.save_pretrained(os.path.join(out, name))
        kind = "T5 unigram" if "T5" in type(tok).__name__ else "CLIP BPE"
        log(f"{name}: toy {kind} of {len(tok)} tokens, context {tok.model_max_length}")
    scheduler = _scheduler(model_name)
    scheduler.save_pretrained(os.path.join(out, "scheduler"))
    if model_name == "sd15":  # SD 1.5's file also carries clip_sample, which PNDMScheduler takes but ignores
        path = os.path.join(out, "scheduler", "scheduler_config.json")
        with open(path) as f:
            saved = json.load(f)
        with open(path, "w") as f:
            json.dump(dict(saved, clip_sample=False), f, indent=2, sort_keys=True)
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(_model_index(model_name, tokenizers), f, indent=2, sort_keys=True)
    log(f"scheduler, model_index.json: {type(scheduler).__name__}")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=MODELS,
                        help="sd15 (Stable Diffusion 1.5), sdxl (SDXL base 1.0), ssd1b (Segmind SSD-1B) or flux "
                             "(FLUX.1-dev; needs about 28 GB of free RAM at full size, 32 GB of RAM is enough)")
    parser.add_argument("--output_dir", required=True,
                        help="the pipeline folder to write; a folder holding other files needs --overwrite")
    parser.add_argument("--dtype", default="fp16", choices=list(DTYPES),
                        help="dtype of the weights on disk, and the only one they are ever built in (default: fp16)")
    parser.add_argument("--width_scale", type=float, default=1.0,
                        help="multiply every channel width by this, keeping depths and layout; 1.0 is the published "
                             "size, e.g. 0.05 a tiny pipeline of the same shape (default: 1.0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --output_dir even if it holds files: the pipeline's own names are "
                             "replaced once the new pipeline is complete, other files are kept")
    args = parser.parse_args(argv)
    if not args.width_scale > 0:
        raise UserError(f"--width_scale must be above 0, got {args.width_scale}")
    return args


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Parse the flags and write the pipeline; returns each component's parameters."""
    with user_errors():
        args = parse_args(argv)
        out = os.path.abspath(args.output_dir)
        if not os.path.isdir(os.path.dirname(out)):
            raise UserError(f"the folder {os.path.dirname(out)} does not exist (--output_dir)")
        # the project's output rule: a folder holding what this program did not write is refused unless --overwrite,
        # and even then only the names written here are replaced
        outputs.prepare_output(out, "--output_dir", {}, "benchmarks/full_size.py", args.overwrite)
        start = time.perf_counter()
        # written under a hidden name and moved in at the end: an interrupted run leaves no half pipeline
        with files.atomic_write(out, into=True) as tmp:
            counts = write_pipeline(args.model, tmp, DTYPES[args.dtype], args.width_scale)
        print(f"wrote {args.output_dir}: {args.model}, {sum(counts.values()) / 1e6:,.1f}M params in {args.dtype}, "
              f"{time.perf_counter() - start:.1f} s")
        return counts


if __name__ == "__main__":
    main()
