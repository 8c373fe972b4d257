"""The field's image metrics: FID and KID, CLIP score and CLIP FD, PickScore, LPIPS to the teacher.

Every metric model comes from a local file or folder, or a hub id, and is built by the library that
owns it: Inception-v3 (clean-fid's TorchScript port of the TensorFlow FID network, or a torchvision
`inception_v3` state dict), CLIP (open_clip or transformers), PickScore (a transformers CLIP), LPIPS
(the `lpips` package on a torchvision trunk). FID resizes to 299 px with clean-fid's resizers, and KID
is clean-fid's. Images enter every function as float tensors (N, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from .errors import UserError
from .grids import to_uint8

METRICS = ("fid", "kid", "clip_score", "clip_fd", "pick_score", "lpips_to_teacher")
# Metrics whose reference packages cannot be installed beside this project's pins (docs/evaluation.md).
NOT_INSTALLABLE = {
    "hps": "hpsv2 1.2.0 requires protobuf<4 and pytest==7.2.0, and this project pins protobuf 7.36.2 and pytest 9.0.3: "
           "score the cached images with hpsv2 in its own environment (docs/evaluation.md#hpsv2-and-imagereward)",
    "image_reward": "image-reward 1.5 pins timm==0.6.13 and open-clip-torch 3.3.0 requires timm>=1.0.17: score the "
                    "cached images with ImageReward in its own environment (docs/evaluation.md#hpsv2-and-imagereward)",
}
FID_RESIZE_MODES = ("clean", "legacy_pytorch", "legacy_tensorflow")
CLEAN_FID_INCEPTION = "inception-2015-12-05.pt"  # clean-fid's file name for the TensorFlow FID Inception
PAPER_SAMPLE_COUNTS = (5000, 10000, 30000)


# ----------------------------------------------------------------------------- Frechet distance and KID


def frechet_distance(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2) of two feature sets (rows are samples).

    With at least as many samples as feature dimensions this is clean-fid's computation (scipy's sqrtm of
    S1 S2). With fewer (small evaluations: 2048-d Inception features of a few hundred images) the
    covariances have rank below n, and the same number comes exactly and in milliseconds from the
    centred features: tr sqrt(S1 S2) is the nuclear norm of X1 X2^T / sqrt((n1 - 1)(n2 - 1)).
    """
    from cleanfid.fid import fid_from_feats

    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if len(f1) < 2 or len(f2) < 2:
        raise ValueError("a Frechet distance needs at least 2 samples per set")
    if len(f1) + len(f2) > f1.shape[1]:
        with warnings.catch_warnings():  # clean-fid passes sqrtm's deprecated `disp`
            warnings.simplefilter("ignore", DeprecationWarning)
            return float(fid_from_feats(f1, f2))
    x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
    a, b = len(f1) - 1, len(f2) - 1
    diff = f1.mean(0) - f2.mean(0)
    trace_sqrt = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / np.sqrt(a * b)
    return float(diff @ diff + (x1 * x1).sum() / a + (x2 * x2).sum() / b - 2 * trace_sqrt)


@contextmanager
def numpy_seed(seed: int) -> Iterator[None]:
    """Run a block on numpy's global RNG seeded with `seed`, then put the caller's RNG state back."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def kernel_inception_distance(feats1: np.ndarray, feats2: np.ndarray, seed: int = 0) -> float:
    """clean-fid's KID: the unbiased MMD^2 of the cubic kernel (x.y / d + 1)^3, averaged over 100 subsets."""
    from cleanfid.fid import kernel_distance

    if min(len(feats1), len(feats2)) < 2:
        raise ValueError("KID needs at least 2 samples per set")
    with numpy_seed(seed):  # clean-fid draws its subsets from numpy's global RNG
        return kernel_distance(np.asarray(feats1, np.float64), np.asarray(feats2, np.float64))


def small_count_warning(num_samples: int) -> str | None:
    """A warning for FID/KID at sample counts below the papers' (FID is biased upward at small counts)."""
    if num_samples >= PAPER_SAMPLE_COUNTS[0]:
        return None
    return (f"FID from {num_samples} images is biased upward (the bias shrinks roughly as 1/N): compare it only "
            f"with FIDs from the same count; papers use {', '.join(f'{n // 1000}k' for n in PAPER_SAMPLE_COUNTS)}")


# ----------------------------------------------------------------------------- Inception features


class InceptionFeatures:
    """2048-d Inception-v3 pool features of images, after resizing to 299 px as clean-fid does.

    source: a folder holding clean-fid's `inception-2015-12-05.pt` or that TorchScript file (the
    TensorFlow FID network, the one papers' numbers come from), "clean-fid" to let clean-fid download it
    once into ~/.cache/clean-fid, or any other file: a torchvision `inception_v3` state dict
    (.pth/.pt/.safetensors; torchvision's ImageNet weights give FIDs not comparable with papers').
    resize: clean-fid's mode: "clean" (PIL bicubic on float channels), "legacy_pytorch" (bilinear
    without antialias), "legacy_tensorflow" (inside the TorchScript network; TorchScript only).
    """

    def __init__(self, source: str, resize: str = "clean", device: str = "cpu") -> None:
        from cleanfid.resize import build_resizer

        if resize not in FID_RESIZE_MODES:
            raise UserError(f"unknown FID resize mode {resize!r}: one of {', '.join(FID_RESIZE_MODES)} (--fid_resize)")
        torchscript = source == "clean-fid" or os.path.basename(os.path.normpath(source)) != CLEAN_FID_INCEPTION \
            and os.path.isdir(os.path.expanduser(source)) or os.path.basename(source) == CLEAN_FID_INCEPTION
        if resize == "legacy_tensorflow" and not torchscript:
            raise UserError("--fid_resize legacy_tensorflow resizes inside clean-fid's TorchScript Inception: "
                            "give that network as --fid_inception")
        self.device, self.resize_mode = device, resize
        self.torchscript, self.model = self._load(source)
        self.resizer = build_resizer(resize)
        self.model = self.model.to(device).eval()

    def _load(self, source: str) -> tuple[bool, torch.nn.Module]:
        """(is_torchscript, network) from the source (see the class docstring)."""
        from cleanfid.inception_torchscript import InceptionV3W

        if source == "clean-fid":
            folder = os.path.join(os.path.expanduser("~"), ".cache", "clean-fid")
            os.makedirs(folder, exist_ok=True)
            try:
                return True, InceptionV3W(folder, download=True, resize_inside=self.resize_mode == "legacy_tensorflow")
            except OSError as exc:  # no network: say which file to fetch by hand
                raise UserError(f"clean-fid could not download {CLEAN_FID_INCEPTION} ({exc}): put it in a folder and "
                                "give that folder (--fid_inception)") from None
        path = os.path.expanduser(source)
        if os.path.isdir(path):
            path = os.path.join(path, CLEAN_FID_INCEPTION)
        if not os.path.isfile(path):
            raise UserError(f"Inception weights {source!r} not found: a folder with {CLEAN_FID_INCEPTION}, that file, "
                            "a torchvision inception_v3 state dict, or clean-fid (--fid_inception)")
        if os.path.basename(path) == CLEAN_FID_INCEPTION:
            return True, InceptionV3W(os.path.dirname(path), download=False,
                                      resize_inside=self.resize_mode == "legacy_tensorflow")
        return False, torchvision_inception(path)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """(N, 2048) float64 features of images in [-1, 1], quantised to 8 bits first like saved PNGs."""
        resized = np.stack([self.resizer(a) for a in to_uint8(images)])  # (N, 299, 299, 3), 0..255
        x = torch.from_numpy(resized.astype(np.float32)).permute(0, 3, 1, 2).to(self.device)
        if not self.torchscript:  # torchvision's ImageNet normalisation
            mean = torch.tensor([0.485, 0.456, 0.406], device=self.device).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225], device=self.device).view(1, 3, 1, 1)
            x = (x / 255 - mean) / std
        return self.model(x).double().cpu().numpy()


def torchvision_inception(path: str) -> torch.nn.Module:
    """torchvision's inception_v3 with the state dict at `path`, its classifier replaced by the identity."""
    from torchvision.models import inception_v3

    state = _load_state_dict(path, "--fid_inception")
    with torch.device("meta"):  # no random initialisation of 27M weights that the file replaces
        network = inception_v3(weights=None, aux_logits="AuxLogits.fc.weight" in state, init_weights=False,
                               transform_input=True)  # as torchvision's own ImageNet weights expect
    try:
        network.load_state_dict(state, assign=True)
    except RuntimeError as exc:
        raise UserError(f"{path} is not an inception_v3 state dict: {str(exc).splitlines()[0]} (--fid_inception)")
    network.fc = torch.nn.Identity()
    return network


def _load_state_dict(path: str, flag: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file; UserError naming the flag if it is neither."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors each raise their own kinds
        raise UserError(f"{path} could not be read as weights: {str(exc).splitlines()[0]} ({flag})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no state dict ({flag})")
    return state


# ----------------------------------------------------------------------------- CLIP and PickScore


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per image: 100 * max(cos(image, prompt), 0)."""
    cos = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return 100.0 * cos.clamp(min=0)


def pick_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Per image: exp(logit_scale) * cos(image, prompt), PickScore's reward (logit_scale as the model stores it)."""
    cos = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return float(np.exp(logit_scale)) * cos


def is_open_clip(source: str) -> bool:
    """Whether a --clip_model names an open_clip model: hf-hub:/local-dir: or a folder with open_clip_config.json."""
    return source.startswith(("hf-hub:", "local-dir:")) or os.path.isfile(
        os.path.join(os.path.expanduser(source), "open_clip_config.json"))


class ClipEmbedder:
    """Unit-norm CLIP image and text embeddings from open_clip or transformers, and the model's logit scale.

    source: "hf-hub:<repo>" or "local-dir:<folder>" or a folder with open_clip_config.json (open_clip,
    e.g. hf-hub:laion/CLIP-ViT-g-14-laion2B-s12B-b42K); any other folder or hub id is a transformers
    CLIPModel (e.g. openai/clip-vit-large-patch14). processor: a transformers processor folder or hub
    id when it is not stored with the model (PickScore's is laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
    """

    def __init__(self, source: str, processor: str | None = None, device: str = "cpu", flag: str = "--clip_model"):
        self.device = device
        try:
            if is_open_clip(source):
                self._load_open_clip(source)
            else:
                self._load_transformers(source, processor or source)
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"{source} could not be loaded as a CLIP model: {str(exc).strip().splitlines()[0]} "
                            f"({flag})") from None

    def _load_open_clip(self, source: str) -> None:
        import open_clip

        name = source if source.startswith(("hf-hub:", "local-dir:")) else "local-dir:" + os.path.expanduser(source)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, device=self.device)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.model.eval()
        self.kind = "open_clip"

    def _load_transformers(self, source: str, processor: str) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(source).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(processor)
        self.kind = "transformers"

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().item())

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (N, D) of images in [-1, 1], preprocessed as the model's own pipeline does."""
        from PIL import Image

        pil = [Image.fromarray(a) for a in to_uint8(images)]
        if self.kind == "open_clip":
            emb = self.model.encode_image(torch.stack([self.preprocess(p) for p in pil]).to(self.device))
        else:
            inputs = self.processor(images=pil, return_tensors="pt")
            emb = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
            emb = getattr(emb, "pooler_output", emb)  # transformers 5 returns a model output here
        return torch.nn.functional.normalize(emb.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings (N, D) of the prompts (truncated to the model's context)."""
        if self.kind == "open_clip":
            emb = self.model.encode_text(self.tokenizer(prompts).to(self.device))
        else:
            inputs = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True)
            emb = self.model.get_text_features(input_ids=inputs["input_ids"].to(self.device),
                                               attention_mask=inputs["attention_mask"].to(self.device))
            emb = getattr(emb, "pooler_output", emb)
        return torch.nn.functional.normalize(emb.float(), dim=-1).cpu()


# ----------------------------------------------------------------------------- LPIPS


class Lpips:
    """LPIPS (Zhang et al. 2018) of image pairs: the `lpips` package's linear heads on a torchvision trunk.

    net: "alex" (the usual choice) or "vgg". backbone: "torchvision" (torchvision's ImageNet weights,
    downloaded once into torch's cache), a torchvision alexnet / vgg16 state dict file, or "random"
    (tests only). The calibrated linear heads ship inside the lpips package (no download).
    """

    def __init__(self, net: str = "alex", backbone: str = "torchvision", device: str = "cpu") -> None:
        import lpips

        if net not in ("alex", "vgg"):
            raise UserError(f"unknown LPIPS network {net!r}: alex or vgg (--lpips_net)")
        with warnings.catch_warnings():  # lpips builds its trunk with torchvision's deprecated `pretrained=False`
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)  # trunk filled in below, not by lpips
        if backbone != "random":
            self._load_trunk(net, backbone)
        self.model = self.model.to(device).eval()
        self.device = device

    def _load_trunk(self, net: str, backbone: str) -> None:
        """Copy a torchvision alexnet / vgg16 `features` into lpips' trunk, whose slices hold those layers by index."""
        import torchvision

        build = torchvision.models.alexnet if net == "alex" else torchvision.models.vgg16
        if backbone == "torchvision":
            weights = (torchvision.models.AlexNet_Weights if net == "alex" else torchvision.models.VGG16_Weights)
            try:
                classifier = build(weights=weights.IMAGENET1K_V1)
            except OSError as exc:  # no network and nothing in torch's cache
                raise UserError(f"torchvision could not fetch its {net} weights ({exc}): give a state dict file "
                                "(--lpips_backbone)") from None
        else:
            if not os.path.isfile(os.path.expanduser(backbone)):
                raise UserError(f"LPIPS trunk weights {backbone!r} not found: a torchvision {net} state dict, "
                                f"torchvision or random (--lpips_backbone)")
            classifier = build(weights=None)
            state = _load_state_dict(os.path.expanduser(backbone), "--lpips_backbone")
            try:  # the classifier head is not needed: a file of `features.*` alone will do
                missing = classifier.load_state_dict(state, strict=False).missing_keys
            except RuntimeError as exc:
                missing = [str(exc).splitlines()[0]]
            if any(k.startswith("features.") or " " in k for k in missing) or not state:
                raise UserError(f"{backbone} is not a torchvision {net} state dict (--lpips_backbone)")
        for block in self.model.net.children():
            for index, layer in block.named_children():
                layer.load_state_dict(classifier.features[int(index)].state_dict())

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Per pair: the LPIPS distance of images and references, both in [-1, 1] (N,)."""
        d = self.model(images.float().to(self.device), references.float().to(self.device))
        return d.flatten().cpu()
