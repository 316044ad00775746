"""The evaluation of Diffusion-4K (Tables 1-2): GLCM score (Eq. 11), compression ratio (Eq. 12), FID, CLIPScore,
Aesthetics; and PSNR / SSIM / NMSE / LPIPS for reconstructions (the SC-VAE's comparisons).

GLCM score (Eq. 11), as the authors' evaluation script computes it (which produced the paper's 0.58–0.80):
  1. grayscale as OpenCV's cvtColor(COLOR_RGB2GRAY) computes it for uint8 (15-bit fixed point);
  2. 64 gray levels: gray // 4;
  3. non-overlapping 64×64 patches from the top-left;
  4. per patch, the 16 non-symmetric co-occurrence matrices for distances 1–4 and angles 0°, 45°, 90°,
     135°, each normalised to sum 1: a 64×64×4×4 array, scikit-image's `graycomatrix(patch, [1, 2, 3, 4],
     [0, π/4, π/2, 3π/4], levels=64, normed=True)`;
  5. the patch's value is the base-2 entropy of the histogram of the DISTINCT values in that array (what
     `skimage.measure.shannon_entropy` returns when handed it: it counts equal floats);
  6. the image's score is the mean over its patches.
Step 5 is not Haralick's GLCM entropy (−Σ p·log2 p over the cells of each matrix); that one is offered as
`entropy="haralick"` (mean over the 16 matrices). `glcm_patch_scores_plain` is this definition, patch by
patch; `glcm_score` runs the batched `glcm_patch_scores`, tested equal to it. The authors score only the
top-left size×size square; we score the whole image by default, and `crop=N` restores their behaviour.

Compression ratio (Eq. 12): H·W·3 bytes over the size of the image as a Pillow JPEG at quality 95. For a
folder, the paper's number is the ratio of totals (Σ H·W·3 / Σ JPEG bytes).

PSNR, SSIM (Gaussian window 11, σ = 1.5), NMSE and LPIPS (VGG16, v0.1, in plain PyTorch from the official
weight files) compare an image with a reference of the same size. `load_image` reads files as OpenCV's
imread (the authors' reader) does, as RGB.

FID (torch-fidelity's InceptionV3, as torchmetrics 1.5.1 ran it for the paper), CLIPScore (openai/clip-vit-base-
patch16) and the LAION aesthetic predictor (on openai/clip-vit-large-patch14) are in plain PyTorch from the
official weight files, each computed as the authors' evaluation computed it.

CLI: `python metrics.py DIR [--ref DIR [--lpips]] [--json OUT] [--crop N] [--glcm-entropy distinct|haralick]`, and
the paper's protocol `python metrics.py gen/ --ref eval/ --prompts eval/metadata.jsonl --fid --clip-score
--aesthetics --size 2048`. Imports from vae.py `UserError`, `atomic_write`, `check_writable`, `pick_device` and
`write_json`: the scripts' shared error type, atomic writers and checks of an output path and a device; and
from text_encoders.py CLIP's text tower, its encoder layer (shared by the image tower) and tokenizer.
"""
import argparse
import functools
import json
import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import safe_open
from torch import nn

from text_encoders import CLIPEncoderLayer, CLIPText, CLIPTokenizer, load_clip
from vae import UserError, atomic_write, check_writable, pick_device, write_json

# ====================================================================================================
# GLCM score (Eq. 11): the definition

GLCM_PATCH = 64  # patch side
GLCM_LEVELS = 64  # gray levels: 256 // 4
GLCM_DISTANCES = (1, 2, 3, 4)
GLCM_ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)
GLCM_ENTROPIES = ("distinct", "haralick")


def rgb_to_gray(rgb) -> torch.Tensor:
    """(H, W, 3) uint8 RGB (array or tensor) -> (H, W) uint8 gray, bit-exact with OpenCV's cvtColor.

    OpenCV (imgproc color_rgb.simd.hpp, RGB2Gray<uchar>) uses 15-bit fixed point for uint8 on every
    platform: the weights 0.299, 0.587, 0.114 become 9798, 19235, 3735 (·32768, rounded; they sum to
    32768) and the result is (x + 2^14) >> 15. This differs from round(0.299 R + 0.587 G + 0.114 B) by
    one level on 0.13 % of the colours, which moves GLCM scores.
    """
    x = torch.as_tensor(rgb)
    gray = torch.empty(x.shape[:-1], dtype=torch.uint8, device=x.device)
    for i in range(0, x.shape[0], 256):  # bands of rows keep the int32 temporaries in cache
        b = x[i : i + 256].to(torch.int32)
        gray[i : i + 256] = (9798 * b[..., 0] + 19235 * b[..., 1] + 3735 * b[..., 2] + (1 << 14)) >> 15
    return gray


def glcm_offsets() -> list[tuple[int, int]]:
    """(row, col) step of each of the 16 (distance, angle) matrices, distance-major.

    graycomatrix pairs pixel (r, c) with (r + round(sin(a)·d), c + round(cos(a)·d)), its round() going
    half away from zero. So 45° at d = 2 gives the same step (1, 1) as d = 1 (and 135° (1, −1)): the 16
    matrices hold only 14 different ones, two of them twice, and both copies count in step 5.
    """
    def round_half_away(x: float) -> int:
        return int(x + 0.5) if x > 0 else int(x - 0.5)

    return [(round_half_away(math.sin(a) * d), round_half_away(math.cos(a) * d))
            for d in GLCM_DISTANCES for a in GLCM_ANGLES]


def glcm_matrices(patch: torch.Tensor) -> torch.Tensor:
    """(64, 64) gray levels in [0, 64) -> (64, 64, 4, 4) float64, `graycomatrix(..., normed=True)`:
    [i, j, d, a] = share of the pairs (pixel, pixel + step(d, a)), both inside the patch, with levels i, j."""
    P, L = patch.shape[0], GLCM_LEVELS
    q = patch.long()
    out = torch.empty(L * L, len(GLCM_DISTANCES) * len(GLCM_ANGLES), dtype=torch.float64, device=patch.device)
    for s, (dr, dc) in enumerate(glcm_offsets()):
        r0, r1, c0, c1 = max(0, -dr), P - max(0, dr), max(0, -dc), P - max(0, dc)  # pixels whose partner is inside
        first, second = q[r0:r1, c0:c1], q[r0 + dr : r1 + dr, c0 + dc : c1 + dc]
        counts = torch.bincount((first * L + second).flatten(), minlength=L * L)
        out[:, s] = counts.double() / counts.sum()
    return out.view(L, L, len(GLCM_DISTANCES), len(GLCM_ANGLES))


def entropy_bits(p: torch.Tensor, dim) -> torch.Tensor:
    """−Σ p·log2 p along dim (0·log 0 = 0), as scipy.stats.entropy(·, base=2) computes it."""
    return -torch.special.xlogy(p, p).sum(dim) / math.log(2)


def glcm_patch_scores_plain(levels: torch.Tensor, entropy: str = "distinct") -> torch.Tensor:
    """Per-patch value (steps 4-5) of a (H, W) map of gray levels in [0, 64), one patch at a time.
    Returns (⌊H/64⌋, ⌊W/64⌋) float64; patch (i, j) covers rows 64i..64i+63 and columns 64j..64j+63."""
    P = GLCM_PATCH
    out = torch.empty(levels.shape[0] // P, levels.shape[1] // P, dtype=torch.float64, device=levels.device)
    for i, j in np.ndindex(*out.shape):
        glcm = glcm_matrices(levels[P * i : P * i + P, P * j : P * j + P])
        if entropy == "haralick":  # Haralick's entropy of each matrix, mean over the 16
            out[i, j] = entropy_bits(glcm.flatten(0, 1), dim=0).mean()
        else:  # the authors': histogram of the distinct values among all 65536 entries
            _, counts = torch.unique(glcm, return_counts=True)
            out[i, j] = entropy_bits(counts.double() / glcm.numel(), dim=0)
    return out


def glcm_score(image, *, crop: int | None = None, entropy: str = "distinct", device=None) -> float:
    """GLCM score (Eq. 11) of an image (path, PIL image or (H, W, 3) uint8 array), in bits.

    entropy="distinct" (default) is the authors' (see the module docstring); "haralick" is Haralick's
    GLCM entropy averaged over the 16 matrices. crop=N scores only the top-left N×N square, as the
    authors do; by default the whole image. Computed by the batched `glcm_patch_scores` on `device`.
    """
    rgb = to_rgb_array(image)
    if crop is not None:
        if crop < GLCM_PATCH:
            raise ValueError(f"crop must be at least {GLCM_PATCH}, got {crop}")
        if rgb.shape[0] < crop or rgb.shape[1] < crop:
            raise ValueError(f"image {rgb.shape[1]}×{rgb.shape[0]} is smaller than the {crop}×{crop} crop")
        rgb = rgb[:crop, :crop]
    rgb = torch.from_numpy(rgb) if rgb.flags.writeable else torch.tensor(rgb)
    levels = rgb_to_gray(rgb.to(device or "cpu")) >> 2  # 64 levels: gray // 4
    return glcm_patch_scores(levels, entropy=entropy).mean().item()


# ====================================================================================================
# Compression ratio (Eq. 12)


def jpeg_size(image, quality: int = 95) -> int:
    """Bytes of the image encoded as JPEG with Pillow's defaults at the given quality."""
    buf = BytesIO()
    Image.fromarray(to_rgb_array(image)).save(buf, "JPEG", quality=quality)
    return buf.tell()


def compression_ratio(image, quality: int = 95) -> float:
    """Eq. 12: raw RGB bytes H·W·3 over the JPEG size. Higher means less detail to encode."""
    rgb = to_rgb_array(image)
    return rgb.size / jpeg_size(rgb, quality)


# ====================================================================================================
# Reconstruction metrics on (H, W, 3) uint8 pairs (data range 255)


def _same_size(image, reference, dtype=np.uint8) -> tuple[np.ndarray, np.ndarray]:
    """Both as (H, W, 3) arrays of `dtype`; ValueError if their sizes differ."""
    a, b = to_rgb_array(image), to_rgb_array(reference)
    if a.shape != b.shape:
        raise ValueError(f"image sizes differ: {a.shape[1]}×{a.shape[0]} vs {b.shape[1]}×{b.shape[0]}")
    return a.astype(dtype, copy=False), b.astype(dtype, copy=False)


def psnr(image, reference) -> float:
    """10·log10(255² / MSE) over all pixels and channels; inf for identical images."""
    a, b = _same_size(image, reference, np.float64)
    mse = np.mean((a - b) ** 2)
    return math.inf if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def nmse(image, reference) -> float:
    """Normalized MSE ‖image − reference‖² / ‖reference‖² (0 if identical; inf for an all-black reference)."""
    a, b = _same_size(image, reference, np.float64)
    den = np.sum(b**2)
    num = np.sum((a - b) ** 2)
    return float(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def ssim(image, reference) -> float:
    """Mean SSIM (Wang et al. 2004): Gaussian window 11, σ = 1.5, K1 = 0.01, K2 = 0.03, data range 255.

    Per channel, local means / variances / covariance under the Gaussian window (population
    covariance), SSIM map averaged over the pixels at least 5 from the border (where the window fits
    in the image), then over the channels — as skimage's structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1).
    """
    from scipy.ndimage import correlate1d

    a, b = _same_size(image, reference, np.float64)
    r = 5  # window radius: 11 taps
    if min(a.shape[:2]) < 2 * r + 1:
        raise ValueError(f"SSIM needs images of at least {2 * r + 1}×{2 * r + 1}")
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / 1.5) ** 2)  # the Gaussian window, σ = 1.5
    w /= w.sum()

    def blur(x):  # (H, W, 3) -> same; borders are cropped below, so the boundary mode does not matter
        return correlate1d(correlate1d(x, w, axis=0, mode="reflect"), w, axis=1, mode="reflect")

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ux, uy = blur(a), blur(b)
    vx, vy, vxy = blur(a * a) - ux * ux, blur(b * b) - uy * uy, blur(a * b) - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return float(s[r:-r, r:-r].mean(axis=(0, 1)).mean())


# Metrics on (image, reference) pairs reported by the CLI with --ref (--lpips adds "lpips")
PAIR_METRICS = {"psnr": psnr, "ssim": ssim, "nmse": nmse}


# ====================================================================================================
# Weight files of the evaluation networks (LPIPS, FID, Aesthetics): torch state dicts, by default in the torch
# hub cache ($TORCH_HOME/hub/checkpoints/), where torchvision, torch-fidelity and pytorch-fid download theirs


def weight_file(given, names: tuple[str, ...], user: str, source: str, also: list[Path] = ()) -> Path:
    """`given`, else the first of `names` (then `also`) found in the torch hub cache; FileNotFoundError naming the
    file, every place looked and where to get it."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    places = [Path(given)] if given is not None else [hub / name for name in names] + list(also)
    found = next((p for p in places if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{user} needs {' or '.join(names)}; looked for {', '.join(map(str, places))}; get "
                                f"it from {source}")
    return found


def read_state_dict(path: Path) -> dict:
    """torch.load(path) of a weight file (tensors only, onto the CPU); ValueError in one line otherwise."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a torch state dict ({type(e).__name__})") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a torch state dict")
    return sd


def fit_state(state: dict, model: nn.Module, where: str, prefix: str = "") -> dict:
    """state's tensors for each key of model (stored under prefix + key), floating ones as float32; ValueError in
    one line if they do not fit it exactly."""
    expected = {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {list(state[k].shape)} (expected {list(s)})" for k, s in expected.items()
             if k in state and tuple(state[k].shape) != s]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:3])}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ValueError(f"{where}: weights do not fit {type(model).__name__}: " + "; ".join(parts))
    return {k.removeprefix(prefix): state[k].float() if state[k].is_floating_point() else state[k] for k in expected}


# ====================================================================================================
# LPIPS (Zhang et al. 2018), v0.1 with VGG16 — the perceptual term of the SC-VAE objective (Eq. 4)

LPIPS_VGG_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 state dict
LPIPS_HEADS_FILE = "vgg.pth"  # the LPIPS v0.1 linear heads, lpips/weights/v0.1/vgg.pth in the lpips wheel
# torchvision's vgg16().features: conv widths, "M" = 2×2 max-pool. Every conv is followed by a ReLU, so
# the Sequential indices (and the state-dict keys features.N.weight) are the ones torchvision uses.
_VGG16_FEATURES = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class _LpipsHead(nn.Module):
    """LPIPS's NetLinLayer: (dropout,) 1×1 conv to one channel, no bias — keys lin{i}.model.1.weight."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))  # [0] was Dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """d(x, y) = Σ_l mean_hw( w_l · (φ̂_l(x) − φ̂_l(y))² ), φ̂_l = VGG16 feature at relu{1_2,2_2,3_3,4_3,5_3}
    divided by its per-pixel channel norm (+1e-10), w_l a learned non-negative 1×1 conv (the "lin" head).

    Inputs (B, 3, H, W) in [−1, 1], as the lpips package expects; they are first mapped to ImageNet's
    normalization by LPIPS's fixed scaling layer ((x − shift) / scale). Returns (B,) distances.
    Differentiable in its inputs; load the official weights with `load_lpips`.
    """

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for c in _VGG16_FEATURES:
            if c == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
                c_in = c
        self.features = nn.Sequential(*layers)
        for i, tap in enumerate(_LPIPS_TAPS):
            setattr(self, f"lin{i}", _LpipsHead(self.features[tap - 1].out_channels))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two (B, 3, H, W) tensors of one shape, got {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
        h = (torch.cat([x, y]) - self.shift) / self.scale  # one VGG pass for both
        distance = 0
        for i, layer in enumerate(self.features[: _LPIPS_TAPS[-1] + 1]):
            h = layer(h)
            if i in _LPIPS_TAPS:
                f = h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit norm per pixel
                fx, fy = f.chunk(2)
                head = getattr(self, f"lin{_LPIPS_TAPS.index(i)}")
                distance = distance + head((fx - fy).square()).mean(dim=(1, 2, 3))  # spatial mean
        return distance


def load_lpips(vgg: str | os.PathLike | None = None, heads: str | os.PathLike | None = None, *,
               device="cpu") -> LPIPS:
    """LPIPS-VGG v0.1 from the official files: `vgg` = torchvision's vgg16-397923af.pth (its `features.*`
    are used), `heads` = LPIPS's v0.1 vgg.pth (`lin0..4.model.1.weight`). Defaults: the torch hub cache
    ($TORCH_HOME/hub/checkpoints/), and for the heads also an installed lpips package.
    FileNotFoundError / ValueError with a one-line message if a file is missing or does not fit."""
    model = LPIPS()
    import importlib.util

    spec = importlib.util.find_spec("lpips")  # an installed lpips package holds the heads (not imported)
    in_lpips = [Path(p) / "weights" / "v0.1" / LPIPS_HEADS_FILE for p in spec.submodule_search_locations or []
                ] if spec else []
    vgg = weight_file(vgg, (LPIPS_VGG_FILE,), "LPIPS", "https://download.pytorch.org/models/vgg16-397923af.pth")
    heads = weight_file(heads, (LPIPS_HEADS_FILE,), "LPIPS", "lpips/weights/v0.1/vgg.pth inside the lpips wheel "
                        "(pip download lpips --no-deps)", also=in_lpips)
    state = {k: v for k, v in read_state_dict(vgg).items() if k.startswith("features.")}
    state |= {k: v for k, v in read_state_dict(heads).items() if k.startswith("lin")}
    model.load_state_dict(fit_state(state, model, f"LPIPS ({vgg}, {heads})"))
    return model.requires_grad_(False).eval().to(device)


@torch.no_grad()
def lpips(image, reference, *, model: LPIPS) -> float:
    """LPIPS distance between two images of one size (uint8 arrays, PIL images or paths)."""
    a, b = _same_size(image, reference)
    device = next(model.parameters()).device
    return float(model(image_to_tensor(a).to(device), image_to_tensor(b).to(device)))


# ====================================================================================================
# FID (Heusel et al.), as the paper computed it
#
# FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½), μ and Σ the mean and unbiased covariance of the 2048-d
# pool3 features of InceptionV3 over each set of images. The paper used torchmetrics 1.5.1's
# FrechetInceptionDistance(normalize=False) on uint8 images, i.e. torch-fidelity's InceptionV3: the graph
# of TensorFlow's FID code (inception-2015-12-05) in PyTorch, fed the images resized to 299×299 by TF1's
# bilinear resize (no antialiasing) and mapped to [−1, 1] by (x − 128) / 128. FIDInceptionV3 is that
# graph; its module names are the checkpoint's keys. The resize moves FID: torchmetrics ≥ 1.8 antialiases
# by default (resize="antialias" here) and so no longer gives the paper's numbers.

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
# torch-fidelity's and pytorch-fid's names for the converted TF weights. Same sha256 prefix in the name
# (torch.hub's convention), and both packages load the file strictly into modules named alike (pytorch-fid
# into torchvision's Inception3 without AuxLogits): one key layout.
INCEPTION_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_SIZE = 299
FID_RESIZES = ("tf1", "antialias")


class _ConvBN(nn.Module):
    """conv (no bias) → batch norm with TF's ε = 1e-3 → ReLU; keys conv.weight, bn.*. padding: the graph's
    "SAME" (stride-1 convs in the blocks) or 0, its "VALID"."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _chain(x: torch.Tensor, *layers) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """3×3 mean, stride 1, over the pixels inside the image: TF's average pool does not count the padding
    (torchvision's InceptionV3 does, one of its differences from the FID graph)."""
    return nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(nn.Module):
    """35×35 block (Mixed_5b–5d): 1×1 | 1×1 → 5×5 | 1×1 → 3×3 → 3×3 | avg-pool → 1×1."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 64, 1)
        self.branch5x5_1 = _ConvBN(c_in, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding="same")
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding="same")
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding="same")
        self.branch_pool = _ConvBN(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x),
                          _chain(x, self.branch5x5_1, self.branch5x5_2),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(_avg_pool_3x3(x))], 1)


class _InceptionB(nn.Module):
    """35 → 17 reduction (Mixed_6a): 3×3/2 | 1×1 → 3×3 → 3×3/2 | max-pool 3×3/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = _ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding="same")
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          nn.functional.max_pool2d(x, 3, stride=2)], 1)


class _InceptionC(nn.Module):
    """17×17 block (Mixed_6b–6e), 7×7 convs factorised into 1×7 and 7×1 of width c7:
    1×1 | 1×1 → 1×7 → 7×1 | 1×1 → 7×1 → 1×7 → 7×1 → 1×7 | avg-pool → 1×1."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 192, 1)
        self.branch7x7_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding="same")
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding="same")
        self.branch7x7dbl_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding="same")
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding="same")
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding="same")
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding="same")
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x),
                          _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                                 self.branch7x7dbl_4, self.branch7x7dbl_5),
                          self.branch_pool(_avg_pool_3x3(x))], 1)


class _InceptionD(nn.Module):
    """17 → 8 reduction (Mixed_7a): 1×1 → 3×3/2 | 1×1 → 1×7 → 7×1 → 3×3/2 | max-pool 3×3/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(c_in, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding="same")
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding="same")
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([_chain(x, self.branch3x3_1, self.branch3x3_2),
                          _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
                          nn.functional.max_pool2d(x, 3, stride=2)], 1)


class _InceptionE(nn.Module):
    """8×8 block (Mixed_7b, 7c): 1×1 | 1×1 → (1×3 ‖ 3×1) | 1×1 → 3×3 → (1×3 ‖ 3×1) | pool → 1×1.

    The pool is a 3×3 average in Mixed_7b but a 3×3 max in Mixed_7c: so the FID graph has it (pytorch-fid's
    FIDInceptionE_2 notes it as a likely slip of that graph); torchvision's InceptionV3 averages in both."""

    def __init__(self, c_in: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _ConvBN(c_in, 320, 1)
        self.branch3x3_1 = _ConvBN(c_in, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding="same")
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding="same")
        self.branch3x3dbl_1 = _ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding="same")
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding="same")
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding="same")
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = nn.functional.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else _avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


def _resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size, size) as TF1's resize_bilinear(align_corners=False): output pixel i
    samples the input at i·(H / size) (no half-pixel offset, unlike torch's align_corners=False), linearly
    between its two neighbours, the last row / column repeated past the edge. No antialiasing: a 1024² image
    is read at 299² points, 2×2 pixels each. The lerps are a + (b − a)·w, in torch-fidelity's order."""
    def taps(n: int):
        src = torch.arange(size, dtype=x.dtype, device=x.device) * (n / size)
        lo = src.long()  # floor: src ≥ 0
        return lo, (lo + 1).clamp_max(n - 1), src - lo

    (r0, r1, wr), (c0, c1, wc) = taps(x.shape[2]), taps(x.shape[3])
    top, bottom = x[:, :, r0], x[:, :, r1]
    top = top[..., c0] + (top[..., c1] - top[..., c0]) * wc
    bottom = bottom[..., c0] + (bottom[..., c1] - bottom[..., c0]) * wc
    return top + (bottom - top) * wr[:, None]


class FIDInceptionV3(nn.Module):
    """InceptionV3 of TensorFlow's FID code: uint8 images (N, 3, H, W) of any size -> (N, 2048) pool3
    features, computed in float32 as torchmetrics did for the paper.

    resize="tf1" (the paper's, torchmetrics < 1.8) resizes to 299×299 without antialiasing, as TF1 did;
    "antialias" uses torch's antialiased bilinear resize, torchmetrics ≥ 1.8's default. forward =
    pool3(preprocess(images)); the two halves serve images of different sizes (`inception_features`).
    Load the official weights with `load_inception`.
    """

    def __init__(self, resize: str = "tf1"):
        super().__init__()
        if resize not in FID_RESIZES:
            raise ValueError(f"resize must be one of {FID_RESIZES}, got {resize!r}")
        self.resize = resize
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding="same")
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _InceptionA(192, pool_features=32)
        self.Mixed_5c = _InceptionA(256, pool_features=64)
        self.Mixed_5d = _InceptionA(288, pool_features=64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, c7=128)
        self.Mixed_6c = _InceptionC(768, c7=160)
        self.Mixed_6d = _InceptionC(768, c7=160)
        self.Mixed_6e = _InceptionC(768, c7=192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, pool="avg")
        self.Mixed_7c = _InceptionE(2048, pool="max")
        # The 1008 ImageNet logits: unused by FID; kept so that the file loads whole and that torchvision's
        # 1000-class InceptionV3 (other weights, other FIDs) is refused by its shape.
        self.fc = nn.Linear(2048, 1008)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float32 (N, 3, 299, 299) in [−1, 1] on the model's device."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FID's InceptionV3 takes uint8 images (N, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        x = images.to(self.fc.weight.device).float()
        if self.resize == "tf1":
            x = _resize_bilinear_tf1(x, INCEPTION_SIZE)
        else:
            x = nn.functional.interpolate(x, (INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                                          align_corners=False, antialias=True)
        return (x - 128) / 128

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 299, 299) from `preprocess` -> (N, 2048): the global average of Mixed_7c."""
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)  # 147²
        x = _chain(nn.functional.max_pool2d(x, 3, stride=2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)  # 71²
        x = _chain(nn.functional.max_pool2d(x, 3, stride=2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d)  # 35²
        x = _chain(x, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e)  # 17²
        x = _chain(x, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)  # 8²
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool3(self.preprocess(images))


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features (numpy or torch) -> μ (D,) and Σ (D, D), float64 numpy; Σ is the unbiased covariance
    (÷ (N − 1)), as torchmetrics and pytorch-fid compute it."""
    if torch.is_tensor(features):
        features = features.detach().cpu().double().numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"FID statistics need (N, D) features with N ≥ 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½): the Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂), in
    float64, with (Σ₁Σ₂)^½ from scipy.linalg.sqrtm as pytorch-fid computes it. (torchmetrics 1.5.1 sums the
    square roots of the eigenvalues of Σ₁Σ₂ instead: the same trace, up to rounding.)"""
    from scipy import linalg

    mu1, sigma1, mu2, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or not sigma1.shape == sigma2.shape == (len(mu1), len(mu1)):
        raise ValueError(f"FID statistics do not match: μ {mu1.shape} and {mu2.shape}, Σ {sigma1.shape} and "
                         f"{sigma2.shape}")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    # With fewer images than feature dimensions Σ is singular, and sqrtm of a singular product can fail
    # (inf / nan); then, as pytorch-fid, ε·I is added to both covariances.
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # Σ₁Σ₂ has the eigenvalues of Σ₁^½ Σ₂ Σ₁^½, all ≥ 0, so the trace of its square root is real; rounding
    # leaves some slightly below 0, and sqrtm then returns a complex matrix with a tiny imaginary part,
    # dropped here. A large one on the diagonal means Σ₁, Σ₂ are not covariances: an error, as in pytorch-fid.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(Σ₁Σ₂) has an imaginary part up to {np.abs(covmean.imag).max():.3g}: "
                             "Σ₁, Σ₂ are not both positive semi-definite")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def load_inception(path: str | os.PathLike | None = None, *, device="cpu", resize: str = "tf1") -> FIDInceptionV3:
    """FID's InceptionV3 from torch-fidelity's weights-inception-2015-12-05-6726825d.pth or pytorch-fid's
    pt_inception-2015-12-05-6726825d.pth (the same keys; the batch norms' num_batches_tracked may be there
    or not). Without `path`, either name in the torch hub cache ($TORCH_HOME/hub/checkpoints/), where those
    packages download it. resize: "tf1" (the paper's) or "antialias" (see FIDInceptionV3).
    FileNotFoundError / ValueError with a one-line message if the file is missing or does not fit."""
    with torch.device("meta"):  # no random init of the 24 M weights that the file replaces
        model = FIDInceptionV3(resize)
    found = weight_file(path, INCEPTION_FILES, "FID's InceptionV3", INCEPTION_URL)
    # The batch norms' num_batches_tracked (training-only counters) are in pytorch-fid's file, not torch-fidelity's
    counters = {k: torch.tensor(0) for k in model.state_dict() if k.endswith("num_batches_tracked")}
    model.load_state_dict(fit_state(counters | read_state_dict(found), model, str(found)), assign=True)
    return model.requires_grad_(False).eval().to(device)


@torch.no_grad()
def inception_features(images, model: FIDInceptionV3, *, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """(N, 2048) float32 pool3 features of a sequence of images (paths, PIL images or (H, W, 3) uint8 arrays,
    sizes may differ). Each image is read and resized to 299×299 alone, then the network runs on
    `batch_size` of them at a time: a batch holds 299² copies only, whatever the image size."""
    from tqdm import tqdm

    def prepared(image) -> torch.Tensor:  # (1, 3, 299, 299) on the model's device
        rgb = torch.from_numpy(np.array(to_rgb_array(image)))  # a writable copy
        return model.preprocess(rgb.permute(2, 0, 1)[None])

    out = []
    with tqdm(total=len(images), desc="FID features", unit="image", file=sys.stderr, disable=not progress) as bar:
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            out.append(model.pool3(torch.cat([prepared(image) for image in chunk])).cpu())
            bar.update(len(chunk))
    return torch.cat(out).numpy() if out else np.empty((0, 2048), np.float32)


# ====================================================================================================
# Fast GLCM (engineering): all patches at once
#
# The same numbers as glcm_patch_scores_plain (tested equal) without building a 65536-entry array per
# patch. Each patch's gray levels are renumbered 0..n−1 (n = levels present), so its non-zero cells fit
# in an n×n block, and one scatter-add per distinct step counts a whole chunk of patches. For "distinct",
# a cell with count c in a matrix of T pairs holds the float64 c / T, so the histogram of distinct values
# is a histogram over (step, count) with the (step, count) holding the same float merged, plus the
# zeros: every entry not in a non-zero cell.


@functools.lru_cache(maxsize=None)
def _glcm_steps(device: str):
    """The 14 distinct steps of glcm_offsets(), the matrices using each (1 or 2) and its pairs T."""
    P, offsets = GLCM_PATCH, glcm_offsets()
    steps = list(dict.fromkeys(offsets))
    copies = torch.tensor([offsets.count(s) for s in steps], dtype=torch.int32, device=device)
    pairs = torch.tensor([(P - abs(r)) * (P - abs(c)) for r, c in steps], dtype=torch.float64, device=device)
    return steps, copies, pairs


def _glcm_counts(levels: torch.Tensor, present: torch.Tensor, steps) -> torch.Tensor:
    """levels (K, P, P) in [0, 64), present (K, 64) bool -> co-occurrence counts (K, U, n·n) int32, with
    n the most levels in one patch: the n×n block holds every non-zero cell of each 64×64 matrix."""
    K, P, _ = levels.shape
    n = int(present.sum(1).max())
    rank = present.cumsum(1) - 1  # compact number of each level that occurs
    q = rank.gather(1, levels.view(K, -1).long()).view(K, P, P)
    q_row = q * n
    counts = torch.zeros(K, len(steps), n * n, dtype=torch.int32, device=levels.device)
    for u, (dr, dc) in enumerate(steps):
        r0, r1, c0, c1 = max(0, -dr), P - max(0, dr), max(0, -dc), P - max(0, dc)
        cell = (q_row[:, r0:r1, c0:c1] + q[:, r0 + dr : r1 + dr, c0 + dc : c1 + dc]).view(K, -1)
        _count_rows(counts[:, u], cell)
    return counts


def _count_rows(out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out (K, W) int32 += how often each value occurs in each row of index (K, N): a batched bincount."""
    return out.scatter_add_(1, index, torch.ones(1, 1, dtype=torch.int32, device=index.device).expand_as(index))


def _glcm_entropies(levels: torch.Tensor, present: torch.Tensor, entropy: str) -> torch.Tensor:
    """levels (K, P, P), present (K, 64) -> (K,) float64 per-patch value."""
    steps, copies, pairs = _glcm_steps(str(levels.device))
    counts = _glcm_counts(levels, present, steps)  # (K, U, n²)
    K, U, _ = counts.shape
    n_matrices = len(GLCM_DISTANCES) * len(GLCM_ANGLES)
    n_entries = n_matrices * GLCM_LEVELS**2  # of the 64×64×4×4 array
    if entropy == "haralick":  # the cells outside the n×n block are 0 and add nothing
        per_step = entropy_bits(counts.double() / pairs.view(1, U, 1), dim=2)  # (K, U)
        return (per_step * copies).sum(1) / n_matrices
    c1 = int(counts.max()) + 1
    per_count = torch.zeros(K, U, c1, dtype=torch.int32, device=counts.device)  # entries per (step, count)
    per_count.scatter_add_(2, counts.long(), copies.view(1, U, 1).expand_as(counts))
    per_count[..., 0] = 0  # the zeros are counted last, inside the n×n blocks or not
    per_count = per_count.view(K, -1)
    used = per_count.amax(0).nonzero()[:, 0]  # the (step, count) some patch of the chunk holds
    value = (used % c1) / pairs[used // c1]  # c / T, the very float graycomatrix(normed=True) stores
    _, value_bin = torch.unique(value, return_inverse=True)  # equal floats merge, as in np.unique
    hist = torch.zeros(K, int(value_bin.max()) + 1, dtype=torch.int32, device=counts.device)
    hist.index_add_(1, value_bin, per_count[:, used])  # entries per distinct non-zero value
    hist = torch.cat([n_entries - hist.sum(1, keepdim=True), hist], 1)
    return entropy_bits(hist.double() / n_entries, dim=1)


def glcm_patch_scores(levels: torch.Tensor, *, entropy: str = "distinct", chunk: int | None = None
                      ) -> torch.Tensor:
    """glcm_patch_scores_plain computed for all patches together, `chunk` at a time to bound memory.
    levels: (H, W) uint8 in [0, 64) on any device -> (⌊H/64⌋, ⌊W/64⌋) float64 on that device."""
    if entropy not in GLCM_ENTROPIES:
        raise ValueError(f"entropy must be one of {GLCM_ENTROPIES}, got {entropy!r}")
    P, (H, W), device = GLCM_PATCH, levels.shape, levels.device
    ph, pw = H // P, W // P
    if ph == 0 or pw == 0:
        raise ValueError(f"image {W}×{H} is smaller than one {P}×{P} GLCM patch")
    patches = levels[: ph * P, : pw * P].reshape(ph, P, pw, P).transpose(1, 2).reshape(-1, P, P)
    present = torch.cat([_count_rows(torch.zeros(len(p), GLCM_LEVELS, dtype=torch.int32, device=device),
                                     p.reshape(len(p), -1).long()) > 0 for p in patches.split(1024)])
    # A chunk's blocks are as wide as its patch with the most levels: sort the patches by it.
    order = torch.argsort(present.sum(1), stable=True)
    # On a CPU, a few patches per thread keep the per-pair index (8 bytes a pair) in cache; a GPU takes many.
    chunk = chunk or (512 if device.type == "cuda" else max(16, 4 * torch.get_num_threads()))
    out = torch.empty(len(patches), dtype=torch.float64, device=device)
    for idx in order.split(chunk):
        out[idx] = _glcm_entropies(patches[idx], present[idx], entropy)
    return out.view(ph, pw)


# ====================================================================================================
# CLIPScore and the LAION aesthetic predictor
#
#   CLIPScore(I, C) = 100 · max(cos(E_I, E_C), 0)     (Hessel et al. 2021, w = 100, as torchmetrics has it)
#   Aesthetics(I)   = MLP(E_I / ‖E_I‖),  MLP: 768 → 1024 → 128 → 64 → 16 → 1, all linear
#
# E_I, E_C are CLIP's projected image and caption embeddings: openai/clip-vit-base-patch16 for CLIPScore,
# openai/clip-vit-large-patch14 for the LAION improved aesthetic predictor (trained on those embeddings).
# The paper reports each as the mean over its images. What the authors' evaluation ran, reproduced here:
# - CLIPScore: torchmetrics 1.5.1 over transformers 4.45's CLIPProcessor, one image per call. Pixels: the
#   shorter side to 224 by Pillow's bicubic (the longer one int(224 · long / short)), the centre 224² from
#   offset ⌊(side − 224) / 2⌋, x / 255 standardised with CLIP's mean and std. A caption over 77 tokens (BOS
#   and EOS included) keeps its first 77, which drops EOS. The text is then pooled at the highest token id
#   (openai's configs, eos_token_id 2) or at the first EOS (position 0 when there is none): either way at BOS,
#   so all such captions share one text embedding, the BOS token's. That is the paper's number and the
#   default; keep_eos=True ends a cut caption with EOS, as OpenAI's clip.tokenize(truncate=True) does.
# - Aesthetics: the OpenAI clip package's preprocessing: torchvision's Resize(224, bicubic) on the PIL image
#   (the same sizes and filter) and CenterCrop(224), whose offset round((side − 224) / 2) rounds half to even:
#   one pixel past ⌊·⌋ when side − 224 ≡ 3 (mod 4). Their CLIP ran in fp16 on a GPU, ours in fp32.

CLIPSCORE_MODEL = "openai/clip-vit-base-patch16"  # Hugging Face repo ids
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_HEAD_SOURCE = "https://github.com/christophschuhmann/improved-aesthetic-predictor"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# transformers' CLIPVisionConfig defaults, which its config.json files may leave out. An image tower's config is
# these fields and projection_dim.
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def clip_pixels(image, size: int = 224, *, round_crop: bool = False) -> torch.Tensor:
    """A path, PIL image or (H, W, 3) uint8 array -> (1, 3, size, size) float32, CLIP's preprocessing (above).
    round_crop: torchvision's centre offset (the aesthetic predictor's), else transformers' (CLIPScore's)."""
    im = Image.fromarray(to_rgb_array(image))
    w, h = im.size
    long = int(size * max(w, h) / min(w, h))  # truncated, in floating point, as both libraries compute it
    im = im.resize((size, long) if w <= h else (long, size), Image.Resampling.BICUBIC)
    left, top = (round((s - size) / 2) if round_crop else (s - size) // 2 for s in im.size)
    x = torch.from_numpy(np.array(im.crop((left, top, left + size, top + size)))).permute(2, 0, 1).float() / 255
    return ((x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1))[None]


class CLIPVision(nn.Module):
    """CLIP's image tower and `visual_projection` (no bias), keys as in CLIPModel files: a ViT on patch_size²
    patches plus a class token, a LayerNorm before the encoder ("pre_layrnorm", sic) and one on the class token
    after it. The encoder layers are the text tower's (text_encoders.CLIPEncoderLayer) without the causal mask.
    config: the fields of CLIP_VISION_DEFAULTS and projection_dim."""

    def __init__(self, config: SimpleNamespace):
        super().__init__()
        self.config = c = config
        embeddings = nn.Module()
        embeddings.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        embeddings.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        embeddings.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2 + 1, c.hidden_size)
        layers = nn.ModuleList(CLIPEncoderLayer(c, causal=False) for _ in range(c.num_hidden_layers))
        self.vision_model = nn.ModuleDict(dict(
            embeddings=embeddings, pre_layrnorm=nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps),
            encoder=nn.ModuleDict(dict(layers=layers)),
            post_layernorm=nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)))
        self.visual_projection = nn.Linear(c.hidden_size, c.projection_dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, image_size, image_size) from clip_pixels -> (B, projection_dim) image embeddings E_I."""
        vm, e = self.vision_model, self.vision_model.embeddings
        x = e.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, patches, D), patches row by row
        x = torch.cat([e.class_embedding.expand(len(x), 1, -1), x], 1) + e.position_embedding.weight
        x = vm.pre_layrnorm(x)
        for layer in vm.encoder.layers:
            x = layer(x)
        return self.visual_projection(vm.post_layernorm(x[:, 0]))


class CLIP(nn.Module):
    """A CLIPModel: `vision` (CLIPVision), `text` (text_encoders.CLIPText with its text_projection) and
    `tokenizer` (text_encoders.CLIPTokenizer, one token longer than the text tower reads: see `tokenize`)."""

    def __init__(self, vision: CLIPVision, text: CLIPText, tokenizer: CLIPTokenizer):
        super().__init__()
        self.vision, self.text, self.tokenizer = vision, text, tokenizer

    def tokenize(self, texts: list[str], keep_eos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, context) token ids, cut as in the section header, and (N,) bool: which captions were cut."""
        context = self.text.config.max_position_embeddings
        with warnings.catch_warnings():  # its own note would count to context + 1; clip_score reports the cuts
            warnings.simplefilter("ignore")
            ids = self.tokenizer(texts)  # BOS, text, EOS, EOS padding, in context + 1 columns
        eos = self.tokenizer.eos_id
        cut = ids[:, context - 1] != eos  # a text token in the last column: BOS + text + EOS is longer
        ids = ids[:, :context].clone()
        if keep_eos:
            ids[cut, -1] = eos
        return ids, cut


class AestheticPredictor(nn.Module):
    """The LAION improved aesthetic predictor: `layers` (keys layers.{0,2,4,6,7}.* as in its .pth file) on the
    unit-normalised image embedding of `vision` (CLIP ViT-L/14)."""

    def __init__(self, vision: CLIPVision):
        super().__init__()
        self.vision = vision
        widths = (vision.config.projection_dim, 1024, 128, 64, 16, 1)
        layers = []
        for i in range(5):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < 3:
                layers.append(nn.Identity())  # a Dropout in training
        self.layers = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) from clip_pixels(round_crop=True) -> (B,) scores."""
        e = self.vision(pixels)
        norm = e.norm(dim=-1, keepdim=True)
        return self.layers(e / torch.where(norm == 0, 1, norm))[:, 0]  # a zero vector stays zero, as theirs does


def _hub_snapshots(repo_id: str) -> list[Path]:
    """The folders of repo_id in the local Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub), the revision refs/main names first; the snapshots folder if there are none."""
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    hub = os.environ.get("HF_HUB_CACHE") or Path(home) / "hub"
    repo = Path(hub) / ("models--" + repo_id.replace("/", "--"))
    main = (repo / "refs" / "main").read_text().strip() if (repo / "refs" / "main").is_file() else None
    return sorted((repo / "snapshots").glob("*"), key=lambda p: p.name != main) or [repo / "snapshots"]


def _clip_folder(path, repo_id: str, user: str) -> Path:
    """The CLIPModel folder: `path`, else repo_id's in the Hugging Face cache; FileNotFoundError naming the file
    missing, where it looked and where to get it."""
    places = [Path(path)] if path is not None else _hub_snapshots(repo_id)
    for folder in places:
        missing = [name for name in ("config.json", "model.safetensors") if not (folder / name).is_file()]
        if not missing:
            return folder
    raise FileNotFoundError(f"{user} needs {' and '.join(missing)} of a CLIPModel folder ({repo_id}); looked in "
                            f"{', '.join(map(str, places))}; get config.json, model.safetensors and the tokenizer "
                            f"files from https://huggingface.co/{repo_id}")


def _load_clip_vision(folder: Path, device) -> CLIPVision:
    """The image tower and visual_projection of a CLIPModel folder's model.safetensors, in float32."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder / 'config.json'}: unreadable ({e})") from None
    # old files also hold vision_config_dict, which transformers lets override vision_config
    given = {**(cfg.get("vision_config") or {}), **(cfg.get("vision_config_dict") or {})}
    file = folder / "model.safetensors"
    with safe_open(file, "pt") as f:
        keys = [k for k in f.keys() if k.startswith(("vision_model.", "visual_projection."))
                and not k.endswith("position_ids")]  # a buffer of arange, in older files
        if "visual_projection.weight" not in keys:
            raise ValueError(f"{file}: no CLIP image tower with its projection (visual_projection.weight)")
        state = {k: f.get_tensor(k) for k in keys}
    config = SimpleNamespace(**{k: given.get(k, v) for k, v in CLIP_VISION_DEFAULTS.items()},
                             projection_dim=state["visual_projection.weight"].shape[0])
    with torch.device("meta"):
        model = CLIPVision(config)
    model.load_state_dict(fit_state(state, model, str(file)), assign=True)
    return model.to(device).eval().requires_grad_(False)


def load_clip_model(path=None, *, device="cpu") -> CLIP:
    """CLIP from a transformers CLIPModel folder: config.json, model.safetensors and the tokenizer files
    (tokenizer.json, or vocab.json + merges.txt). None: openai/clip-vit-base-patch16 (the paper's CLIPScore
    model) in the Hugging Face cache. Float32. FileNotFoundError / ValueError with a one-line message."""
    folder = _clip_folder(path, CLIPSCORE_MODEL, "CLIPScore")
    vision = _load_clip_vision(folder, device)
    text = load_clip(folder, device=device, dtype=torch.float32)
    if text.config.projection_dim != vision.config.projection_dim:
        raise ValueError(f"{folder}: text projection to {text.config.projection_dim} features, image projection "
                         f"to {vision.config.projection_dim}: not one CLIPModel")
    tokenizer = CLIPTokenizer(folder, pad_token="<|endoftext|>", max_length=text.config.max_position_embeddings + 1)
    return CLIP(vision, text, tokenizer).eval()


def load_aesthetic(clip_path=None, head_path=None, *, device="cpu") -> AestheticPredictor:
    """The LAION improved aesthetic predictor: the image tower of a CLIPModel folder (None: openai/clip-vit-large-
    patch14 in the Hugging Face cache) and the MLP's state dict sac+logos+ava1-l14-linearMSE.pth (None: looked for
    in $TORCH_HOME/hub/checkpoints/). FileNotFoundError / ValueError with a one-line message."""
    folder = _clip_folder(clip_path, AESTHETIC_CLIP, "the aesthetic predictor")
    head = weight_file(head_path, (AESTHETIC_HEAD_FILE,), "the aesthetic predictor", AESTHETIC_HEAD_SOURCE)
    state = read_state_dict(head)
    model = AestheticPredictor(_load_clip_vision(folder, "cpu"))
    model.layers.load_state_dict(fit_state(state, model.layers, str(head), "layers."))
    return model.to(device).eval().requires_grad_(False)


def _clip_batches(images: list, size: int, round_crop: bool, batch_size: int, progress: bool, desc: str):
    """(start, pixels) for each run of batch_size images, preprocessed by clip_pixels in a few threads: Pillow
    decodes and resizes without the GIL, and for large files that is most of the time."""
    from tqdm import tqdm

    prepare = functools.partial(clip_pixels, size=size, round_crop=round_crop)
    with (ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool,
          tqdm(total=len(images), desc=desc, unit="image", file=sys.stderr, disable=not progress) as bar):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            yield start, torch.cat(list(pool.map(prepare, batch)))
            bar.update(len(batch))


@torch.no_grad()
def clip_score(images, texts, model: CLIP, *, keep_eos: bool = False, batch_size: int = 32,
               progress: bool = False) -> torch.Tensor:
    """Per-image CLIPScore (N,) float32 on the CPU (the paper reports the mean). images: paths, PIL images or
    (H, W, 3) uint8 arrays (a bad file raises one of UNREADABLE); texts: one caption each. Captions longer than
    the text tower's context are cut (see the section header), with one warning saying how many."""
    images, texts = list(images), [texts] if isinstance(texts, str) else list(texts)
    if len(images) != len(texts):
        raise ValueError(f"clip_score needs one caption per image, got {len(images)} images and {len(texts)} captions")
    ids, cut = model.tokenize(texts, keep_eos)
    if cut.any():
        n, context = int(cut.sum()), ids.shape[1]
        how = ("ending in EOS" if keep_eos else "EOS lost, so each is read at BOS (the highest id left): one text "
               "embedding for all of them, as in the paper's torchmetrics evaluation; keep_eos=True keeps EOS")
        warnings.warn(f"clip_score: {n} of {len(texts)} captions are longer than {context} tokens and were cut to "
                      f"{context}, {how}", stacklevel=3)  # 3: past torch.no_grad's wrapper, to the caller
    device = next(model.parameters()).device
    out = torch.empty(len(images))
    size = model.vision.config.image_size
    for start, pixels in _clip_batches(images, size, False, batch_size, progress, "clipscore"):
        e_i = model.vision(pixels.to(device))
        e_t = model.text(ids[start : start + len(e_i)].to(device))["text_embeds"]
        cos = (e_i / e_i.norm(dim=-1, keepdim=True) * e_t / e_t.norm(dim=-1, keepdim=True)).sum(-1)
        out[start : start + len(e_i)] = (100 * cos).clamp(min=0).cpu()
    return out


@torch.no_grad()
def aesthetic_score(images, model: AestheticPredictor, *, batch_size: int = 32, progress: bool = False
                    ) -> torch.Tensor:
    """Per-image LAION aesthetic score (N,) float32 on the CPU. images: paths, PIL images or (H, W, 3) uint8
    arrays (a bad file raises one of UNREADABLE)."""
    images = list(images)
    device = next(model.parameters()).device
    out = torch.empty(len(images))
    size = model.vision.config.image_size
    for start, pixels in _clip_batches(images, size, True, batch_size, progress, "aesthetics"):
        out[start : start + len(pixels)] = model(pixels.to(device)).cpu()
    return out


# ====================================================================================================
# Loading images


UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)  # what load_image raises for a bad file
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def load_image(path) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array: what OpenCV's `cv2.imread(path)` (the authors'
    reader) gives, as RGB. The EXIF orientation is applied; alpha is dropped (RGBA, LA, palette with
    transparency), not composited; grayscale is replicated to three channels (and its gray is itself
    again); 16-bit grayscale keeps its high byte, v >> 8 (libpng's strip-16 truncates); palette, bilevel,
    CMYK, YCbCr, ... go through Pillow's conversion to RGB. Raises one of UNREADABLE (one line) for files
    that are unreadable or unsupported."""
    with Image.open(path) as im:
        im.load()
        return to_rgb_array(ImageOps.exif_transpose(im))


def to_rgb_array(image) -> np.ndarray:
    """A path, PIL image or (H, W[, C]) uint8 array -> contiguous (H, W, 3) uint8 RGB array."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        if image.mode.startswith("I"):  # 16-bit ("I;16", "I;16B", ...) or 32-bit ("I") grayscale
            image = (np.asarray(image).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        elif image.mode == "F":
            raise ValueError("floating-point images (mode F) are not supported; save as 8- or 16-bit")
        elif image.mode in ("P", "PA"):  # through RGBA: Pillow warns when a palette's transparency is dropped
            image = np.asarray(image.convert("RGBA"))
        elif image.mode not in ("RGB", "RGBA", "L"):  # "1", "CMYK", "YCbCr", "LA", "RGBX", ...
            image = image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {arr.dtype}; convert to 8 bits first")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])  # alpha dropped


def image_to_tensor(image) -> torch.Tensor:
    """A path, PIL image or (H, W, 3) uint8 array -> (1, 3, H, W) float32 in [−1, 1] (x / 127.5 − 1),
    the input range of LPIPS and of the autoencoder."""
    rgb = torch.from_numpy(np.array(to_rgb_array(image)))  # a writable copy
    return (rgb.permute(2, 0, 1)[None].float() / 127.5 - 1).contiguous()


def resize_shorter_side(image: Image.Image, size: int, resample=Image.Resampling.LANCZOS) -> Image.Image:
    """The image scaled so that its shorter side is `size` (the longer one at least `size` after rounding)."""
    scale = size / min(image.size)
    return image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), resample)


# ====================================================================================================
# The paper's evaluation protocol (Tables 1–2)
#
# The evaluation set's metadata.jsonl gives one caption per real image; sample.py --prompts draws one image
# per caption (seed 0 for every prompt, JPEG q95, named after the real image). Before scoring, real and
# generated images are resized and centre-cropped to size×size (the authors' --size 2048); then FID (generated
# against real), CLIPScore (each generated image against its caption), Aesthetics, GLCM and compression ratio.


def read_metadata(path: Path) -> tuple[list[dict], list[tuple[int, str]]]:
    """The rows {"file_name", "text", "line"} of an Aesthetic-4K metadata.jsonl (one {"file_name": ..., "text": ...}
    object per line), and (line, reason) of each line that is not one. Split at newlines only: a caption may hold
    U+2028. The one reader of this format: training skips bad lines, the evaluation refuses them."""
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    rows, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))  # UnicodeDecodeError is a ValueError too
            rows.append({"file_name": str(row["file_name"]), "text": str(row["text"]), "line": number})
        except (ValueError, KeyError, TypeError) as e:
            bad.append((number, f"{type(e).__name__}: {e}".splitlines()[0]))
    return rows, bad


def read_prompts(path) -> list[tuple[str, Path]]:
    """(caption, image name) for each line of an evaluation set's metadata.jsonl; the name is file_name without its
    extension (a generated JPEG stands for a real PNG). A bad line is an error naming the file and line, not a skip:
    a generated set short of a prompt would be scored as if it were the whole set."""
    rows, bad = read_metadata(path)
    if bad:
        raise UserError(f'{path}:{bad[0][0]}: not a {{"file_name": ..., "text": ...}} object ({bad[0][1]})')
    prompts, seen = [], {}
    for row in rows:
        file_name, number = Path(row["file_name"]), row["line"]
        if file_name.is_absolute() or ".." in file_name.parts or not file_name.name:
            raise UserError(f"{path}:{number}: file_name {str(file_name)!r} is not a path inside the folder")
        if (name := file_name.with_suffix("")) in seen:
            raise UserError(f"{path}:{number}: file_name {str(file_name)!r} names the same image as line "
                            f"{seen[name]}")
        seen[name] = number
        prompts.append((row["text"], name))
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in it")
    return prompts


def resize_center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """The authors' preprocessing before scoring: the shorter side to `size` by torchvision 0.19's tensor resize
    (float32 bilinear with antialiasing, rounded back to uint8; the longer side int(size · long / short)), then the
    centre size×size square at torchvision's offsets (round half to even)."""
    h, w = rgb.shape[:2]
    if min(h, w) != size:  # at scale 1 the resize is the identity
        long = int(size * max(h, w) / min(h, w))
        h, w = (size, long) if h <= w else (long, size)
        x = torch.tensor(rgb).permute(2, 0, 1)[None].float()
        x = nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        rgb = x.round()[0].permute(1, 2, 0).to(torch.uint8).numpy()
    top, left = round((h - size) / 2), round((w - size) / 2)
    return rgb[top : top + size, left : left + size]


@functools.lru_cache(maxsize=None)
def _q95_tables() -> dict:
    buffer = BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG", quality=95)
    return Image.open(buffer).quantization


def saved_at_q95(path: Path) -> bool:
    """A JPEG file with Pillow's quality-95 quantization tables. The authors' compression ratio divides by the sizes
    of such files as saved; re-encoding the decoded pixels gives a slightly different size."""
    try:
        with Image.open(path) as im:
            return im.format == "JPEG" and im.quantization == _q95_tables()
    except UNREADABLE:
        return False


def fid_reference(args, model) -> tuple[np.ndarray, np.ndarray, int, str, list]:
    """(μ, Σ, images, where from, skipped) of the real set: read from --ref-stats if that file exists (μ and Σ as
    pytorch-fid saves them, plus the settings they were made with), else computed from --ref (and saved there)."""
    stats = Path(args.ref_stats) if args.ref_stats else None
    settings = {"size": args.size or 0, "resize": args.fid_resize}
    if stats is not None and stats.is_file():
        try:
            with np.load(stats) as z:
                mu, sigma, n = z["mu"], z["sigma"], int(z["n"]) if "n" in z else 0
                saved = {k: z[k].item() for k in settings if k in z}
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--ref-stats {stats}: not FID statistics (.npz with mu and sigma: {e})") from None
        if saved and saved != settings:
            raise UserError(f"--ref-stats {stats} holds statistics made with {saved}, this run uses {settings}; "
                            "give another file name to compute them again")
        return mu, sigma, n, str(stats), []
    rgbs, skipped, features = [], [], []
    for path in _progress(_list_files(Path(args.ref)), "real images", args.quiet):
        rgb, why = _read(path)
        if rgb is None:
            skipped.append({"file": path.relative_to(args.ref).as_posix(), "reason": why})
            continue
        rgbs.append(resize_center_crop(rgb, args.size) if args.size else rgb)
        if len(rgbs) == args.batch_size:
            features.append(inception_features(rgbs, model, batch_size=len(rgbs), progress=False))
            rgbs = []
    if rgbs:
        features.append(inception_features(rgbs, model, batch_size=len(rgbs), progress=False))
    n = sum(len(f) for f in features)
    if n < 2:
        raise UserError(f"--ref {args.ref}: FID needs at least 2 readable real images, found {n}")
    mu, sigma = feature_stats(np.concatenate(features))
    if stats is not None:
        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, mu=mu, sigma=sigma, n=n, **settings)
        atomic_write(stats, write)
    return mu, sigma, n, str(args.ref), skipped


# ====================================================================================================
# CLI


def _list_files(root: Path) -> list[Path]:
    """Every non-hidden file under root (or root itself if it is a file), sorted by relative path."""
    if root.is_file():
        return [root]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read(path: Path) -> tuple[np.ndarray | None, str | None]:
    """(rgb, None), or (None, reason) for a file that is not a readable image — never raises."""
    try:
        return load_image(path), None
    except UnidentifiedImageError:
        return None, "not an image"
    except Exception as e:  # truncated, corrupt, unsupported mode, too large for Pillow, ...
        message = str(e).strip().splitlines()
        return None, f"unreadable ({type(e).__name__}: {message[0] if message else 'no details'})"


def _image_row(name: str, rgb: np.ndarray, ref_root: Path | None, args, file_bytes: int | None = None):
    """Metrics of one image -> (row or None, why it was skipped, why it has no reference metrics). file_bytes: the
    size of the file when it is a JPEG q95 scored as saved, which then is its JPEG size (the authors' rule)."""
    h, w = rgb.shape[:2]
    side = args.crop or GLCM_PATCH
    if h < side or w < side:
        what = f"the {side}×{side} crop" if args.crop else f"a {GLCM_PATCH}×{GLCM_PATCH} GLCM patch"
        return None, f"{w}×{h} is smaller than {what}", None
    row = {"file": name, "width": w, "height": h}
    row["glcm"] = glcm_score(rgb, crop=args.crop, entropy=args.glcm_entropy, device=args.device)
    row["jpeg_bytes"] = file_bytes or jpeg_size(rgb, quality=95)
    row["jpeg_from"] = "file" if file_bytes else "encoded"
    row["compression_ratio"] = rgb.size / row["jpeg_bytes"]
    if ref_root is None:
        return row, None, None
    ref_path = ref_root / name
    if not ref_path.is_file():
        return row, None, "no file of that name under --ref"
    ref, why = _read(ref_path)
    if ref is None:
        return row, None, f"reference {why}"
    if ref.shape != rgb.shape:
        return row, None, f"size {w}×{h} differs from the reference's {ref.shape[1]}×{ref.shape[0]}"
    row.update({key: fn(rgb, ref) for key, fn in args.pair_metrics.items()})
    return row, None, None


def _progress(items: list, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="image", file=sys.stderr, disable=quiet)


def _load_scorers(args, device) -> dict:
    """The networks of the flags given: {"fid": InceptionV3, "clip_score": CLIP, "aesthetic": predictor}."""
    loaders = {"fid": (args.fid, lambda: load_inception(args.inception, device=device, resize=args.fid_resize)),
               "clip_score": (args.clip_score, lambda: load_clip_model(args.clip_model, device=device)),
               "aesthetic": (args.aesthetics, lambda: load_aesthetic(args.aesthetic_clip, args.aesthetic_head,
                                                                     device=device))}
    try:
        return {key: load() for key, (wanted, load) in loaders.items() if wanted}
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None


def _score_batch(batch: list, scorers: dict, keep_eos: bool) -> list:
    """CLIPScore and Aesthetics into each (row, rgb, caption) of the batch; returns their FID features."""
    rgbs = [rgb for _, rgb, _ in batch]
    if "clip_score" in scorers:
        with warnings.catch_warnings():  # a caption cut to 77 tokens: counted once, in the summary
            warnings.simplefilter("ignore")
            captions = [c for _, _, c in batch]
            scores = clip_score(rgbs, captions, scorers["clip_score"], keep_eos=keep_eos, batch_size=len(rgbs))
        cut = scorers["clip_score"].tokenize(captions)[1]  # one tokenization per batch, not per caption
        for (row, _, _), score, was_cut in zip(batch, scores.tolist(), cut.tolist()):
            row["clip_score"], row["caption_cut"] = score, was_cut
    if "aesthetic" in scorers:
        for (row, _, _), score in zip(batch, aesthetic_score(rgbs, scorers["aesthetic"], batch_size=len(rgbs))):
            row["aesthetic"] = float(score)
    if "fid" not in scorers:
        return []
    return list(inception_features(rgbs, scorers["fid"], batch_size=len(rgbs), progress=False))


def _evaluate(args) -> dict:
    root = Path(args.dir)
    if not root.exists():
        raise UserError(f"{root}: no such file or directory")
    if args.json:
        check_writable(Path(args.json), f"--json {args.json}")
    ref_root = Path(args.ref) if args.ref else None
    if ref_root is not None and not ref_root.is_dir():
        raise UserError(f"--ref {ref_root}: no such directory")
    if args.crop is not None and args.crop < GLCM_PATCH:
        raise UserError(f"--crop must be at least {GLCM_PATCH}, got {args.crop}")
    device = pick_device(args.device)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.size is not None and args.size < GLCM_PATCH:
        raise UserError(f"--size must be at least {GLCM_PATCH}, got {args.size}")
    if args.fid and ref_root is None and not (args.ref_stats and Path(args.ref_stats).is_file()):
        raise UserError("--fid compares with the real images: give --ref DIR (or --ref-stats FILE saved by a run "
                        "with --ref)")
    if args.ref_stats and not Path(args.ref_stats).is_file():
        if not args.fid or ref_root is None:
            raise UserError(f"--ref-stats {args.ref_stats}: no such file; with --fid and --ref it is written")
        check_writable(Path(args.ref_stats), f"--ref-stats {args.ref_stats}")
    if args.clip_score and not args.prompts:
        raise UserError("--clip-score scores each image against its caption: give --prompts metadata.jsonl")
    captions = {}
    for text, name in read_prompts(args.prompts) if args.prompts else []:
        captions[name.as_posix()] = text
        captions.setdefault(name.name, text)  # also by base name, as the authors' script names its images
    # With --fid, --ref is the real set of the FID; image pairs (PSNR, ...) are for reconstructions, not samples.
    args.pair_metrics = {} if args.fid else dict(PAIR_METRICS)
    if args.lpips:
        if ref_root is None or args.fid:
            raise UserError("--lpips compares image pairs: give --ref DIR (and not --fid)")
        try:
            model = load_lpips(args.lpips_vgg, args.lpips_heads, device=device)
        except (OSError, ValueError) as e:
            raise UserError(str(e)) from None
        args.pair_metrics["lpips"] = functools.partial(lpips, model=model)
    files = _list_files(root)
    if not files:
        raise UserError(f"{root}: no files in this folder")
    base = root.parent if root.is_file() else root
    names = [path.relative_to(base).as_posix() for path in files]
    caption = {n: captions.get(n.rsplit(".", 1)[0], captions.get(Path(n).stem)) for n in names}
    if captions and (lost := [n for n in names if caption[n] is None and Path(n).suffix.lower() in IMAGE_SUFFIXES]):
        raise UserError(f"--prompts {args.prompts}: no caption for {len(lost)} image(s) under {root} ({lost[0]}"
                        f"{', ...' if len(lost) > 1 else ''}); the images must be named after the file_name lines")
    scorers = _load_scorers(args, device)  # before the long work: a missing weight file fails here

    rows, skipped, unmatched, features, batch = [], [], [], [], []
    for path, name in zip(_progress(files, "metrics", args.quiet), names):
        rgb, why = _read(path)
        if rgb is None:
            skipped.append({"file": name, "reason": why})
            continue
        as_saved = not args.size or rgb.shape[:2] == (args.size, args.size)
        rgb = resize_center_crop(rgb, args.size) if args.size else rgb
        file_bytes = path.stat().st_size if as_saved and saved_at_q95(path) else None
        row, why, why_no_ref = _image_row(name, rgb, None if args.fid else ref_root, args, file_bytes)
        if row is None:
            skipped.append({"file": name, "reason": why})
            continue
        rows.append(row)
        if why_no_ref:
            unmatched.append({"file": name, "reason": why_no_ref})
        if scorers:  # the networks run on batches of images
            batch.append((row, rgb, caption[name]))
            if len(batch) == args.batch_size:
                features += _score_batch(batch, scorers, args.clip_keep_eos)
                batch = []
    if batch:
        features += _score_batch(batch, scorers, args.clip_keep_eos)
    if not rows:
        raise UserError(f"{root}: no readable image of at least {GLCM_PATCH}×{GLCM_PATCH} "
                        f"({len(skipped)} file(s) skipped: {skipped[0]['file']}: {skipped[0]['reason']}"
                        f"{', ...' if len(skipped) > 1 else ''})")
    summary = {
        "images": len(rows),
        "glcm_mean": float(np.mean([r["glcm"] for r in rows])),
        "compression_ratio_of_totals": sum(r["width"] * r["height"] * 3 for r in rows)
        / sum(r["jpeg_bytes"] for r in rows),  # the paper's
        "compression_ratio_mean": float(np.mean([r["compression_ratio"] for r in rows])),
    }
    froms = {r["jpeg_from"] for r in rows}
    summary["jpeg_sizes"] = "files" if froms == {"file"} else "re-encoded" if froms == {"encoded"} else "mixed"
    for key in ("clip_score", "aesthetic"):
        if key in scorers:
            summary[f"{key}_mean"] = float(np.mean([r[key] for r in rows]))
    if "clip_score" in scorers:
        summary["captions_cut"] = sum(r["caption_cut"] for r in rows)
    if "fid" in scorers:
        if len(features) < 2:
            raise UserError(f"{root}: FID needs at least 2 readable generated images, found {len(features)}")
        mu, sigma, n, source, ref_skipped = fid_reference(args, scorers["fid"])
        summary["fid"] = frechet_distance(*feature_stats(np.stack(features)), mu, sigma)
        summary["fid_images"] = {"generated": len(features), "real": n, "real_from": source}
        skipped += [{"file": f"--ref {s['file']}", "reason": s["reason"]} for s in ref_skipped]
    pairs = [r for r in rows if all(k in r for k in args.pair_metrics)]
    if pairs and args.pair_metrics:
        summary["pairs"] = len(pairs)
        summary.update({f"{k}_mean": float(np.mean([r[k] for r in pairs])) for k in args.pair_metrics})
        # An identical pair's PSNR is ∞, which would make the mean ∞ whatever the other pairs: PSNR is averaged
        # over the pairs that differ, and the identical ones are counted (SSIM 1 and NMSE 0 average as they are).
        differ = [r["psnr"] for r in pairs if math.isfinite(r["psnr"])]
        summary["psnr_mean"] = float(np.mean(differ)) if differ else None
        summary["identical_pairs"] = len(pairs) - len(differ)
    settings = {"dir": str(root), "ref": args.ref, "crop": args.crop, "glcm_entropy": args.glcm_entropy,
                "jpeg_quality": 95, "pair_metrics": list(args.pair_metrics) if ref_root else [], "size": args.size,
                "prompts": args.prompts, "fid_resize": args.fid_resize if args.fid else None}
    return {"settings": settings, "summary": summary, "images": rows, "skipped": skipped, "unmatched": unmatched}


def _print_report(result: dict) -> None:
    rows, s, settings = result["images"], result["summary"], result["settings"]
    pair_keys = settings["pair_metrics"] if "pairs" in s else []
    width = max([4] + [len(r["file"]) for r in rows])
    header = f"{'file':<{width}}  {'size':>11}  {'GLCM':>7}  {'CR':>7}"
    header += "".join(f"  {k.upper():>9}" for k in pair_keys)
    print(header)
    print("-" * len(header))
    for r in rows:
        size = f"{r['width']}×{r['height']}"
        line = f"{r['file']:<{width}}  {size:>11}  {r['glcm']:7.4f}  {r['compression_ratio']:7.3f}"
        print(line + "".join(f"  {r[k]:9.4f}" if k in r else f"  {'-':>9}" for k in pair_keys))
    area = f"top-left {settings['crop']}² crop" if settings["crop"] else "whole image"
    resized = f", each resized and centre-cropped to {settings['size']}²" if settings["size"] else ""
    print(f"\n{s['images']} image(s) scored{resized}")
    if any(k in s for k in ("fid", "clip_score_mean", "aesthetic_mean")):  # a row of the paper's Tables 1-2
        cells = [("FID", s.get("fid"), 9, 3), ("CLIPScore", s.get("clip_score_mean"), 10, 3),
                 ("Aesthetics", s.get("aesthetic_mean"), 11, 3), ("GLCM", s["glcm_mean"], 8, 4),
                 ("CR", s["compression_ratio_of_totals"], 8, 3)]
        print("".join(f"{name:>{w}}" for name, value, w, _ in cells if value is not None))
        print("".join(f"{value:>{w}.{d}f}" for _, value, w, d in cells if value is not None) + "\n")
    if "fid" in s:
        f = s["fid_images"]
        print(f"FID                {s['fid']:.4f}  ({f['generated']} generated against {f['real'] or 'the'} real "
              f"images from {f['real_from']}; InceptionV3 input resized by {settings['fid_resize']})")
    if "clip_score_mean" in s:
        cut = f"; {s['captions_cut']} caption(s) over 77 tokens were cut" if s["captions_cut"] else ""
        print(f"CLIPScore          {s['clip_score_mean']:.4f}  (mean; ViT-B/16{cut})")
    if "aesthetic_mean" in s:
        print(f"Aesthetics         {s['aesthetic_mean']:.4f}  (mean; LAION predictor on ViT-L/14)")
    print(f"GLCM score         {s['glcm_mean']:.4f}  (mean; {settings['glcm_entropy']} entropy, {area})")
    rule = {"files": "the JPEG q95 files' own sizes, as the authors measure",
            "re-encoded": "each image re-encoded as JPEG q95", "mixed": "file sizes of the JPEG q95 files, the "
            "others re-encoded as JPEG q95"}[s["jpeg_sizes"]]
    print(f"compression ratio  {s['compression_ratio_of_totals']:.3f}  (ratio of totals, the paper's; JPEG sizes: "
          f"{rule}); mean of per-image ratios {s['compression_ratio_mean']:.3f}")
    for k in pair_keys:
        if k != "psnr" or not s["identical_pairs"]:
            print(f"{k.upper():<18} {s[k + '_mean']:.4f}  (mean over {s['pairs']} pair(s))")
        elif s["psnr_mean"] is None:
            print(f"{'PSNR':<18} inf     (all {s['pairs']} pair(s) identical)")
        else:
            print(f"{'PSNR':<18} {s['psnr_mean']:.4f}  (mean over the {s['pairs'] - s['identical_pairs']} pair(s) "
                  f"that differ; {s['identical_pairs']} identical pair(s), PSNR inf, left out)")
    for title, items in (("skipped", result["skipped"]), ("without reference metrics", result["unmatched"])):
        if items:
            print(f"{title}: {len(items)} file(s)")
            for it in items:
                print(f"  {it['file']}: {it['reason']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Diffusion-4K image metrics: GLCM score (Eq. 11) and compression ratio (Eq. 12) of every "
        "image under DIR; with --ref, also PSNR / SSIM / NMSE (and LPIPS with --lpips) against the reference image of the same "
        "relative file name.")
    parser.add_argument("dir", help="folder of images, searched recursively (or a single image file)")
    parser.add_argument("--ref", help="folder of reference images, matched by relative file name")
    parser.add_argument("--json", help="also write per-image results and the summary to this JSON file")
    parser.add_argument("--crop", type=int, help="GLCM on the top-left N×N square only, as the authors do "
                        "(default: the whole image)")
    parser.add_argument("--glcm-entropy", choices=GLCM_ENTROPIES, default="distinct",
                        help="distinct: entropy of the histogram of distinct GLCM values, the authors' "
                        "(default); haralick: Haralick's GLCM entropy, mean over the 16 matrices")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device for the GLCM (default: cuda if available, else cpu)")
    parser.add_argument("--lpips", action="store_true", help="with --ref, also LPIPS (VGG, v0.1); needs "
                        f"{LPIPS_VGG_FILE} and the LPIPS {LPIPS_HEADS_FILE} (default: the torch hub cache)")
    parser.add_argument("--lpips-vgg", help=f"torchvision's {LPIPS_VGG_FILE} (ImageNet VGG16 state dict)")
    parser.add_argument("--lpips-heads", help=f"LPIPS v0.1 {LPIPS_HEADS_FILE} (lpips/weights/v0.1/ in the lpips wheel)")
    protocol = parser.add_argument_group("the paper's Tables 1-2", "FID, CLIPScore and Aesthetics as the authors "
                                         "computed them; with --fid, --ref is the set of real images")
    protocol.add_argument("--fid", action="store_true", help="FID of the images against --ref (or --ref-stats)")
    protocol.add_argument("--clip-score", action="store_true", help="CLIPScore of each image with its caption "
                          "(--prompts)")
    protocol.add_argument("--clip-keep-eos", action="store_true", help="end a caption cut to 77 tokens with EOS "
                          "(OpenAI's clip.tokenize); the paper's torchmetrics 1.5.1 drops it, which reads every cut "
                          "caption as the same BOS embedding")
    protocol.add_argument("--aesthetics", action="store_true", help="the LAION aesthetic predictor's score")
    protocol.add_argument("--prompts", help="the evaluation set's metadata.jsonl: each image's caption, matched by "
                          "file name without the extension")
    protocol.add_argument("--size", type=int, help="resize the shorter side to N and centre-crop N×N, every image, "
                          "before scoring (the authors: 2048)")
    protocol.add_argument("--ref-stats", help=".npz of the real set's FID statistics (mu, sigma): read if it "
                          "exists, else computed from --ref and written")
    protocol.add_argument("--fid-resize", choices=("tf1", "antialias"), default="tf1", help="InceptionV3's resize "
                          "to 299²: tf1, TensorFlow 1's bilinear without antialiasing (the paper's, torchmetrics "
                          "< 1.8), or antialias (clean-fid's, torchmetrics >= 1.8's default)")
    protocol.add_argument("--inception", help=f"FID's InceptionV3 weights ({INCEPTION_FILES[0]}; default: the "
                          "torch hub cache)")
    protocol.add_argument("--clip-model", help=f"CLIPModel folder for CLIPScore (default: {CLIPSCORE_MODEL} in the "
                          "Hugging Face cache)")
    protocol.add_argument("--aesthetic-clip", help=f"CLIPModel folder for Aesthetics (default: {AESTHETIC_CLIP} "
                          "in the Hugging Face cache)")
    protocol.add_argument("--aesthetic-head", help=f"{AESTHETIC_HEAD_FILE} (default: the torch hub cache)")
    protocol.add_argument("--batch-size", type=int, default=16, help="images per network call (default 16)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        result = _evaluate(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_report(result)
    if args.json:
        try:
            write_json(Path(args.json), result)
        except OSError as e:  # checked before scoring; the disk can still fill up or the folder go away
            print(f"error: --json {args.json}: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
