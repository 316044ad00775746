"""The test suite: every component on CPU with tiny random configurations, against peer implementations.

Run: python -m pytest -q test_all.py
"""
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
import json
import math
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import time
import warnings

from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy import ndimage
import numpy as np
import pytest
import pywt
import torch
import torch.nn.functional as F

import metrics
import mmdit
import offload
import runs
import sample
import text_encoders
import text_encoders as te
import train_vae
import train_wlf
import vae
import wavelet
from demo import shapes as demo_shapes


def rel(a, b) -> float:
    """max |a − b| / max |b|, in float64: an error judged against the scale of the values it is in."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()

# ====================================================================================================
# wavelet
# ====================================================================================================

with warnings.catch_warnings():  # pytorch-wavelets imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    from pytorch_wavelets import DWTForward, DWTInverse

# Shapes: even, odd, non-square, and sizes whose halves are odd (so deeper levels pad too).
_WAVELET_SHAPES = [(2, 3, 16, 16), (1, 2, 7, 9), (2, 1, 10, 14), (1, 4, 33, 20)]


@pytest.mark.parametrize("shape", _WAVELET_SHAPES)
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_wavelet_matches_pywavelets(shape, levels):
    x = torch.randn(shape, dtype=torch.float64)
    ll, highs = wavelet.dwt(x, levels)
    for b in range(shape[0]):
        for c in range(shape[1]):
            ref = pywt.wavedec2(x[b, c].numpy(), "haar", mode="zero", level=levels)
            # Exact same arithmetic up to rounding of ±1/√2 products: fp64 round-off only.
            np.testing.assert_allclose(ll[b, c].numpy(), ref[0], rtol=0, atol=1e-12)
            for level, (ch, cv, cd) in enumerate(ref[1:]):  # pywt lists coarsest first
                high = highs[levels - 1 - level][b, c].numpy()
                for band, expected in zip(high, (ch, cv, cd)):
                    np.testing.assert_allclose(band, expected, rtol=0, atol=1e-12)
    if levels == 1:  # dwt2 is the documented one-level convention: (cA, (cH, cV, cD))
        ca, (ch, cv, cd) = pywt.dwt2(x[0, 0].numpy(), "haar", mode="zero")
        np.testing.assert_allclose(ll[0, 0].numpy(), ca, atol=1e-12)
        np.testing.assert_allclose(highs[0][0, 0].numpy(), np.stack((ch, cv, cd)), atol=1e-12)


@pytest.mark.parametrize("shape", _WAVELET_SHAPES)
@pytest.mark.parametrize("levels", [1, 3])
def test_wavelet_matches_pytorch_wavelets(shape, levels):
    x = torch.randn(shape, dtype=torch.float32)
    ll, highs = wavelet.dwt(x, levels)
    ref_ll, ref_highs = DWTForward(J=levels, wave="haar", mode="zero")(x)
    # Same filters in fp32, different summation order (conv vs slices): a few ulps of values of order 1 (the
    # transform is orthonormal, so N(0, 1) inputs give N(0, 1) coefficients), well below 1e-6.
    assert ll.shape == ref_ll.shape
    torch.testing.assert_close(ll, ref_ll, rtol=0, atol=1e-6)
    assert len(highs) == len(ref_highs)
    for ours, ref in zip(highs, ref_highs):
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # And the peer's inverse reads our coefficients (cropped to even sizes, as the peer returns): the fp32
    # round-off of a forward and an inverse pass through up to 3 levels, on values of order 1, stays below 1e-5.
    rec = DWTInverse(wave="haar", mode="zero")((ll, highs))
    torch.testing.assert_close(rec[..., : shape[2], : shape[3]], x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", _WAVELET_SHAPES)
@pytest.mark.parametrize("levels", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_wavelet_perfect_reconstruction(shape, levels, dtype):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    ll, highs = wavelet.dwt(x, levels)
    assert ll.dtype == dtype and all(h.dtype == dtype for h in highs)
    rec = wavelet.idwt(ll, highs, size=shape[-2:])
    assert rec.shape == x.shape
    # Exact in fp64 up to round-off; bf16 keeps 8 mantissa bits, so each level costs ~2^-8 relative.
    atol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 0.1}[dtype]
    torch.testing.assert_close(rec.double(), x.double(), rtol=0, atol=atol)
    # Without `size`, only the zero padding of the finest level is left over.
    rec_padded = wavelet.idwt(ll, highs)
    assert rec_padded.shape[-2:] == (shape[2] + shape[2] % 2, shape[3] + shape[3] % 2)


def test_wavelet_gradcheck():
    x = torch.randn(1, 2, 7, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: wavelet.dwt(t, 2)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: wavelet.dwt(t, 2)[1][1], (x,))
    ll, highs = wavelet.dwt(x.detach(), 2)
    ll.requires_grad_(True)
    h0 = highs[0].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: wavelet.idwt(a, [b, highs[1]], size=(7, 10)), (ll, h0))
    y = torch.randn(1, 2, 7, 10, dtype=torch.float64)
    w = (1.0, 2.0, 0.5, 3.0)
    assert torch.autograd.gradcheck(lambda p: wavelet.wlf_loss(p, y, w, levels=2), (x,))


def test_wavelet_equal_weights_one_level_equals_mse():
    """Parseval: the orthonormal Haar transform keeps the sum of squares, so WLF with one level
    and equal band weights is plain MSE -- the authors' released objective adds nothing over it."""
    pred = torch.randn(2, 16, 32, 48, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 16, 32, 48, dtype=torch.float64)
    wlf = wavelet.wlf_loss(pred, target)
    mse = F.mse_loss(pred, target)
    torch.testing.assert_close(wlf, mse, rtol=1e-12, atol=0)  # identical up to fp64 round-off
    (g_wlf,) = torch.autograd.grad(wlf, pred)
    (g_mse,) = torch.autograd.grad(mse, pred)
    torch.testing.assert_close(g_wlf, g_mse, rtol=1e-12, atol=1e-15)  # fp64 round-off; atol for gradients near 0
    # The same identity holds at any depth for even sizes (every level is orthonormal).
    torch.testing.assert_close(wavelet.wlf_loss(pred, target, levels=3), mse, rtol=1e-12, atol=0)
    # ... and equals the authors' form: the four bands concatenated, then one mean.
    def bands(x):  # (B, 4·C, h, w): LL then (LH, HL, HH) per channel
        ll, (high,) = wavelet.dwt(x, 1)
        return torch.cat([ll, high.flatten(1, 2)], dim=1)

    authors = F.mse_loss(bands(pred.detach()), bands(target))
    torch.testing.assert_close(authors, mse.detach(), rtol=1e-12, atol=0)


def test_wavelet_unequal_weights_change_loss_and_gradient():
    torch.manual_seed(0)
    pred = torch.randn(2, 4, 16, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    weights = (1.0, 2.0, 2.0, 4.0)  # emphasise high frequencies
    loss = wavelet.wlf_loss(pred, target, weights)
    mse = F.mse_loss(pred, target)
    assert rel(loss.detach(), mse.detach()) > 1e-3  # far beyond round-off: the weights do change the loss
    # Independent computation of the weighted loss from the per-band definition.
    ll, (high,) = wavelet.dwt(pred.detach() - target, 1)
    expected = (ll.square().sum() + sum(w * high[:, :, i].square().sum() for i, w in enumerate(weights[1:])))
    torch.testing.assert_close(loss.detach(), expected / pred.numel(), rtol=1e-12, atol=0)
    (g,) = torch.autograd.grad(loss, pred)
    (g_mse,) = torch.autograd.grad(mse, pred)
    assert not torch.allclose(g, g_mse)
    # The weighted loss is a quadratic form in the difference: its gradient is the inverse
    # transform of the weighted bands, 2/N · IDWT(w ⊙ DWT(pred − target)).
    weighted = high * torch.tensor(weights[1:], dtype=high.dtype).view(1, 1, 3, 1, 1)
    expected_g = wavelet.idwt(ll * weights[0], [weighted]) * 2 / pred.numel()
    # Autograd through the transform vs the inverse transform in closed form, fp64: round-off of a few
    # operations per value (1e-10 relative); atol for gradient entries near 0.
    torch.testing.assert_close(g, expected_g, rtol=1e-10, atol=1e-14)


def test_wavelet_bad_input():
    with pytest.raises(ValueError, match="B, C, H, W"):
        wavelet.dwt(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="levels"):
        wavelet.dwt(torch.zeros(1, 1, 8, 8), levels=0)
    with pytest.raises(ValueError, match="shapes differ"):
        wavelet.wlf_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 6))
    with pytest.raises(ValueError, match="band_weights"):
        wavelet.wlf_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), (1, 1))


# ====================================================================================================
# metrics
# ====================================================================================================

_METRICS_ROOT = Path(__file__).resolve().parent
_METRICS_ANGLES = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]


def _metrics_photo(name: str) -> np.ndarray:
    from skimage import data

    return getattr(data, name)()


def _metrics_opencv_gray(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


def _metrics_reference_patches(rgb: np.ndarray, entropy: str = "distinct") -> np.ndarray:
    """The authors' recipe with scikit-image, one 64×64 patch at a time -> (⌊H/64⌋, ⌊W/64⌋)."""
    from skimage.feature import graycomatrix, graycoprops
    from skimage.measure import shannon_entropy

    levels = _metrics_opencv_gray(rgb) // 4
    ph, pw = levels.shape[0] // 64, levels.shape[1] // 64
    out = np.empty((ph, pw))
    for i in range(ph):
        for j in range(pw):
            glcm = graycomatrix(levels[64 * i : 64 * i + 64, 64 * j : 64 * j + 64], [1, 2, 3, 4], _METRICS_ANGLES,
                                levels=64, symmetric=False, normed=True)
            if entropy == "distinct":
                out[i, j] = shannon_entropy(glcm)
            else:  # Haralick's entropy in nats per slice -> bits, mean over the 16 slices
                out[i, j] = graycoprops(glcm, "entropy").mean() / math.log(2)
    return out


def _metrics_ours_patches(rgb: np.ndarray, entropy: str = "distinct", chunk=None, plain=False) -> np.ndarray:
    """The fast path (or, with plain=True, the definition) on our grayscale -> (⌊H/64⌋, ⌊W/64⌋)."""
    levels = metrics.rgb_to_gray(torch.from_numpy(np.ascontiguousarray(rgb))) >> 2
    if plain:
        return metrics.glcm_patch_scores_plain(levels, entropy).numpy()
    return metrics.glcm_patch_scores(levels, entropy=entropy, chunk=chunk).numpy()


# --------------------------------------------------------------------------------------------------
# Grayscale


def test_metrics_gray_is_opencv_on_every_colour():
    differ = 0
    for red in range(0, 256, 16):  # all 2^24 RGB colours, 16 reds at a time
        v = np.arange(1 << 20, dtype=np.uint32)
        rgb = np.stack([red + (v >> 16), (v >> 8) & 255, v & 255], -1).astype(np.uint8).reshape(1024, 1024, 3)
        ours = metrics.rgb_to_gray(rgb).numpy()
        # Exact: OpenCV runs the same integer computation for uint8 (15-bit fixed point), nothing to tolerate.
        np.testing.assert_array_equal(ours, _metrics_opencv_gray(rgb))
        # Against the float definition round(0.299 R + 0.587 G + 0.114 B): at most one level apart.
        x = rgb.astype(np.float64)
        diff = np.abs(ours - np.floor(0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2] + 0.5))
        assert diff.max() <= 1
        differ += np.count_nonzero(diff)
    assert differ == 22411  # 0.13 % of the colours: the fixed point matters for parity
    # e.g. pure blue 250: 0.114·250 = 28.5 rounds to 29, OpenCV gives 28
    assert metrics.rgb_to_gray(np.array([[[0, 0, 250]]], dtype=np.uint8)).item() == 28
    # Gray stays gray (load_image relies on it for grayscale files), on an odd-sized random image too.
    g = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)
    np.testing.assert_array_equal(metrics.rgb_to_gray(g).numpy()[:, 0], np.arange(256))
    rgb = np.random.default_rng(4).integers(0, 256, (301, 517, 3), dtype=np.uint8)
    np.testing.assert_array_equal(metrics.rgb_to_gray(rgb).numpy(), _metrics_opencv_gray(rgb))


# --------------------------------------------------------------------------------------------------
# GLCM score


def test_metrics_glcm_offsets_follow_scikit_image():
    from skimage.feature import graycomatrix

    # A patch whose only non-zero pixel is at (20, 20): in slice s, the cell (0, 1) counts the pairs
    # (p, p + step) that end on it, so the step is the one that reaches (20, 20) from a zero pixel.
    img = np.zeros((41, 41), dtype=np.uint8)
    img[20, 20] = 1
    glcm = graycomatrix(img, [1, 2, 3, 4], _METRICS_ANGLES, levels=2)
    for s, (dr, dc) in enumerate(metrics.glcm_offsets()):
        d, a = divmod(s, 4)
        probe = np.zeros_like(img)
        probe[20, 20], probe[20 - dr, 20 - dc] = 1, 1  # the partner one step before (20, 20)
        glcm_probe = graycomatrix(probe, [1, 2, 3, 4], _METRICS_ANGLES, levels=2)
        assert glcm[1, 1, d, a] == 0 and glcm_probe[1, 1, d, a] == 1, (s, dr, dc)
    assert len(set(metrics.glcm_offsets())) == 14  # 45° and 135° round to the same step at d = 1 and 2


def test_metrics_glcm_matrices_are_scikit_image_graycomatrix():
    from skimage.feature import graycomatrix

    rng = np.random.default_rng(5)
    photo = _metrics_opencv_gray(_metrics_photo("astronaut")) // 4
    patches = [photo[:64, :64], photo[200:264, 300:364], rng.integers(0, 64, (64, 64), dtype=np.uint8),
               np.full((64, 64), 63, np.uint8)]
    for patch in patches:
        ref = graycomatrix(patch, [1, 2, 3, 4], _METRICS_ANGLES, levels=64, symmetric=False, normed=True)
        ours = metrics.glcm_matrices(torch.from_numpy(patch))
        # Exact: the same integer counts, each divided once (IEEE, correctly rounded) by the same pair total.
        np.testing.assert_array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket", "retina"])
def test_metrics_glcm_matches_scikit_image_on_photos(name):
    photo = _metrics_photo(name)
    H, W = photo.shape[:2]
    # Crops: one patch, non-multiples of 64, non-square both ways, and one away from the corner.
    crops = [(0, 0, 64, 64), (0, 0, 100, 130), (0, 0, 192, 320), (0, 0, 330, 200), (H - 256, W - 200, 256, 200)]
    if name == "retina":  # mostly black border: also look at the textured centre
        crops.append((600, 600, 256, 256))
    for entropy in metrics.GLCM_ENTROPIES:
        for top, left, h, w in crops:
            rgb = photo[top : top + h, left : left + w]
            h, w = rgb.shape[:2]  # chelsea is only 300 high
            ref = _metrics_reference_patches(rgb, entropy)
            plain = _metrics_ours_patches(rgb, entropy, plain=True)
            fast = _metrics_ours_patches(rgb, entropy)
            assert fast.shape == plain.shape == ref.shape == (h // 64, w // 64)
            # The definition and the fast path against scikit-image and against each other: the same
            # histograms, entropies summed in different orders (~1e-15); 1e-12 leaves room for other
            # summation orders and is far below the paper's 4 decimals.
            np.testing.assert_allclose(plain, ref, rtol=0, atol=1e-12)
            np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-12)
            np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-12)
            score = metrics.glcm_score(rgb, entropy=entropy)
            assert abs(score - ref.mean()) <= 1e-12


def test_metrics_glcm_flat_noise_and_blocky_images():
    rng = np.random.default_rng(0)
    flat = np.full((128, 192, 3), (90, 140, 200), dtype=np.uint8)
    noise = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    # Stripes and blocks of a few gray values: the same normalized value then shows up in slices
    # with different pair totals (a 1-pixel column gives 64/4032 at step (0, 1) and 63/3969 at
    # (1, 1)), which the distinct-value histogram must count as one value.
    patches = []
    for width in (1, 2, 3, 5):
        p = np.zeros((64, 64), np.uint8)
        p[:, :width] = 1
        patches += [p, p.T.copy()]
    patches += list(rng.integers(0, 4, (8, 4, 4)).repeat(16, 1).repeat(16, 2).astype(np.uint8))
    blocky = np.repeat((np.concatenate(patches, axis=1) * 60)[..., None], 3, axis=2)  # (64, 1024, 3)
    for rgb in (flat, noise, blocky):
        for entropy in metrics.GLCM_ENTROPIES:
            fast, ref = _metrics_ours_patches(rgb, entropy), _metrics_reference_patches(rgb, entropy)
            plain = _metrics_ours_patches(rgb, entropy, plain=True)
            # summation order only, as on the photos
            np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-12)
            np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-12)
    # Flat patch in closed form: 16 entries equal 1 (one full cell per slice), 65520 zeros.
    p = np.array([16, 65520]) / 65536
    assert abs(metrics.glcm_score(flat) - float(-(p * np.log2(p)).sum())) < 1e-12
    assert metrics.glcm_score(flat, entropy="haralick") == 0.0
    # The stripes really exercised that merging: some patch's reference array holds one value in
    # two slices whose pair totals differ.
    from skimage.feature import graycomatrix

    level = metrics.rgb_to_gray(blocky).numpy() // 4
    totals = np.array([(64 - abs(r)) * (64 - abs(c)) for r, c in metrics.glcm_offsets()]).reshape(4, 4)
    shared = 0
    for j in range(level.shape[1] // 64):
        g = graycomatrix(level[:, 64 * j : 64 * j + 64], [1, 2, 3, 4], _METRICS_ANGLES, levels=64, normed=True)
        for v in np.unique(g[g > 0]):
            shared += len(set(totals[np.nonzero((g == v).any(axis=(0, 1)))])) > 1
    assert shared > 0


def test_metrics_glcm_chunking_and_patch_layout():
    rgb = _metrics_photo("astronaut")[:256, :320]
    whole = _metrics_ours_patches(rgb)
    for chunk in (1, 3, 7, 100):  # chunks of patches give the same per-patch values
        # up to summation order: a chunk's histogram has a column for every value of any of its patches
        np.testing.assert_allclose(_metrics_ours_patches(rgb, chunk=chunk), whole, rtol=0, atol=1e-14)
    # patch (i, j) is rows 64i.., columns 64j..
    np.testing.assert_allclose(_metrics_ours_patches(rgb[64:128, 192:256]), whole[1:2, 3:4], rtol=0, atol=1e-14)


def test_metrics_glcm_crop_and_inputs(tmp_path):
    rgb = _metrics_photo("coffee")  # 400×600
    assert metrics.glcm_score(rgb, crop=256) == metrics.glcm_score(rgb[:256, :256])
    assert metrics.glcm_score(rgb, crop=300) == metrics.glcm_score(rgb[:256, :256])  # ⌊300/64⌋ = 4 patches
    with pytest.raises(ValueError, match="smaller than the 512×512 crop"):
        metrics.glcm_score(rgb, crop=512)
    with pytest.raises(ValueError, match="smaller than one 64×64"):
        metrics.glcm_score(rgb[:63])
    with pytest.raises(ValueError, match="entropy must be one of"):
        metrics.glcm_score(rgb, entropy="shannon")
    # Path, PIL image and array give the same score.
    path = tmp_path / "coffee.png"
    Image.fromarray(rgb).save(path)
    s = metrics.glcm_score(rgb)
    assert metrics.glcm_score(path) == s and metrics.glcm_score(str(path)) == s
    assert metrics.glcm_score(Image.open(path)) == s


# --------------------------------------------------------------------------------------------------
# Loading, compression ratio, reconstruction metrics


def test_metrics_load_image_conversions(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (70, 90, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], -1)).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(metrics.load_image(tmp_path / "rgba.png"), rgb)  # alpha dropped
    gray = rgb[..., 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(metrics.load_image(tmp_path / "gray.png"), np.repeat(gray[..., None], 3, -1))
    g16 = rng.integers(0, 65536, (70, 90)).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # really stored as 16 bits
    np.testing.assert_array_equal(metrics.load_image(tmp_path / "g16.png")[..., 1], (g16 >> 8).astype(np.uint8))
    pal = Image.fromarray(rgb).convert("P")
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(metrics.load_image(tmp_path / "pal.png"), np.asarray(pal.convert("RGB")))
    # EXIF orientation 6 (rotate 90° clockwise to view) is applied.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", exif=exif, quality=100)
    assert metrics.load_image(tmp_path / "rot.jpg").shape == (90, 70, 3)


def test_metrics_compression_ratio_matches_pillow(tmp_path):
    from io import BytesIO

    for name in ("astronaut", "rocket"):
        rgb = _metrics_photo(name)
        buf = BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=95)
        expected = rgb.shape[0] * rgb.shape[1] * 3 / len(buf.getvalue())
        assert metrics.compression_ratio(rgb) == expected  # same encoder, same bytes: exact
        assert metrics.jpeg_size(rgb) == len(buf.getvalue())
        path = tmp_path / f"{name}.png"
        Image.fromarray(rgb).save(path)
        assert metrics.compression_ratio(path) == expected == metrics.compression_ratio(Image.open(path))
    flat = np.full((256, 256, 3), 128, dtype=np.uint8)
    assert metrics.compression_ratio(flat) > 5 * metrics.compression_ratio(_metrics_photo("astronaut")[:256, :256])


def test_metrics_psnr_ssim_nmse_match_scikit_image():
    from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(2)
    for name, shape in (("chelsea", None), ("astronaut", (123, 77))):
        ref = _metrics_photo(name)
        if shape:
            ref = ref[: shape[0], : shape[1]]
        img = np.clip(ref + rng.normal(0, 12, ref.shape), 0, 255).astype(np.uint8)
        # float64 on both sides; differences are summation order only.
        expected_psnr = peak_signal_noise_ratio(ref, img, data_range=255)
        expected_nmse = normalized_root_mse(ref, img, normalization="euclidean") ** 2  # reference first
        assert metrics.psnr(img, ref) == pytest.approx(expected_psnr, rel=1e-12)
        assert metrics.nmse(img, ref) == pytest.approx(expected_nmse, rel=1e-12)
        expected = structural_similarity(img, ref, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=255, channel_axis=-1)
        assert metrics.ssim(img, ref) == pytest.approx(expected, rel=1e-10)
        assert metrics.ssim(ref, img) == pytest.approx(expected, rel=1e-10)  # symmetric
    assert metrics.psnr(ref, ref) == math.inf and metrics.nmse(ref, ref) == 0
    assert metrics.ssim(ref, ref) == pytest.approx(1, abs=1e-12)
    with pytest.raises(ValueError, match="sizes differ"):
        metrics.psnr(ref, ref[:-1])


# --------------------------------------------------------------------------------------------------
# CLI


def _metrics_cli(*args, check_rc=None):
    proc = subprocess.run([sys.executable, str(_METRICS_ROOT / "metrics.py"), *map(str, args), "--quiet"],
                          capture_output=True, text=True, cwd=_METRICS_ROOT)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def test_metrics_cli_folder_report_and_json(tmp_path):
    d, ref_dir = tmp_path / "images", tmp_path / "ref"
    (d / "sub").mkdir(parents=True)
    ref_dir.mkdir()
    astro, coffee = _metrics_photo("astronaut")[:192, :256], _metrics_photo("coffee")[:128, :200]
    Image.fromarray(astro).save(d / "astro.png")
    Image.fromarray(coffee).save(d / "sub" / "coffee.jpg", quality=90)
    Image.fromarray(np.concatenate([astro, np.full(astro.shape[:2] + (1,), 7, np.uint8)], -1)).save(d / "rgba.png")
    Image.fromarray(astro[..., 1]).save(d / "gray.png")
    Image.fromarray(astro[..., 0].astype(np.uint16) * 257).save(d / "g16.png")
    Image.fromarray(astro).convert("P").save(d / "palette.png")
    Image.fromarray(astro[:32, :32]).save(d / "tiny.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (d / "notes.txt").write_text("hello")
    # references: astro matches (with noise), rgba has the wrong size, the rest are missing
    rng = np.random.default_rng(3)
    noisy = np.clip(astro + rng.normal(0, 5, astro.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(ref_dir / "astro.png")
    Image.fromarray(astro[:100]).save(ref_dir / "rgba.png")

    out = tmp_path / "out" / "metrics.json"
    proc = _metrics_cli(d, "--ref", ref_dir, "--json", out, check_rc=0)
    result = json.loads(out.read_text())  # valid JSON
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temporary file left beside it
    names = [r["file"] for r in result["images"]]
    assert names == ["astro.png", "g16.png", "gray.png", "palette.png", "rgba.png", "sub/coffee.jpg"]
    skipped = {s["file"]: s["reason"] for s in result["skipped"]}
    assert set(skipped) == {"corrupt.png", "notes.txt", "tiny.png"}
    assert "not an image" in skipped["notes.txt"] and "unreadable" in skipped["corrupt.png"]
    assert "32×32" in skipped["tiny.png"] and "64×64" in skipped["tiny.png"]
    unmatched = {u["file"]: u["reason"] for u in result["unmatched"]}
    assert "differs" in unmatched["rgba.png"] and "no file" in unmatched["gray.png"]
    for name in ("corrupt.png", "notes.txt", "tiny.png", "rgba.png"):
        assert name in proc.stdout  # reported in the printed summary too
    rows = {r["file"]: r for r in result["images"]}
    # Per-image values against the peers, on the documented conversions (tolerances as in the tests above).
    from io import BytesIO
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    for name, row in rows.items():
        rgb = metrics.load_image(d / name)
        assert row["glcm"] == pytest.approx(_metrics_reference_patches(rgb).mean(), abs=1e-12)
        buf = BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=95)
        assert row["jpeg_bytes"] == len(buf.getvalue())  # same encoder, same settings: same bytes
        assert row["compression_ratio"] == pytest.approx(rgb.size / len(buf.getvalue()), rel=1e-12)
    assert rows["astro.png"]["psnr"] == pytest.approx(peak_signal_noise_ratio(noisy, astro, data_range=255), rel=1e-12)
    ssim = structural_similarity(astro, noisy, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=255, channel_axis=-1)
    assert rows["astro.png"]["ssim"] == pytest.approx(ssim, rel=1e-10)
    assert "psnr" not in rows["rgba.png"]
    s = result["summary"]
    assert s["images"] == 6 and s["pairs"] == 1
    raw = sum(r["width"] * r["height"] * 3 for r in rows.values())
    assert s["compression_ratio_of_totals"] == pytest.approx(raw / sum(r["jpeg_bytes"] for r in rows.values()))
    assert s["glcm_mean"] == pytest.approx(np.mean([r["glcm"] for r in rows.values()]))

    # --crop and --glcm-entropy reach the score
    out2 = tmp_path / "crop.json"
    _metrics_cli(d / "sub", "--crop", 128, "--glcm-entropy", "haralick", "--json", out2, check_rc=0)
    row = json.loads(out2.read_text())["images"][0]
    ref = _metrics_reference_patches(metrics.load_image(d / "sub" / "coffee.jpg")[:128, :128], "haralick")
    assert row["glcm"] == pytest.approx(ref.mean(), abs=1e-12)


def test_metrics_cli_bad_input_is_one_line(tmp_path, capsys):
    # In a fresh interpreter: a missing folder ends with status 2 and one line, no traceback.
    proc = _metrics_cli(tmp_path / "missing")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such file or directory"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    cases = [
        ((tmp_path / "empty",), "no files"),
        ((tmp_path / "text",), "no readable image of at least 64×64 (1 file(s) skipped: a.txt: not an image)"),
        ((tmp_path / "text", "--ref", tmp_path / "nope"), "--ref"),
        ((tmp_path / "text", "--crop", "32"), "--crop must be at least 64"),
    ]
    for args, message in cases:
        assert metrics.main([*map(str, args), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_metrics_cli_json_target_is_checked_before_scoring(tmp_path, capsys, monkeypatch):
    d = tmp_path / "images"
    d.mkdir()
    Image.fromarray(_metrics_photo("astronaut")[:64, :64]).save(d / "a.png")
    (tmp_path / "file.txt").write_text("x")
    scored = []  # spy: the CLI scores every image through glcm_score
    monkeypatch.setattr(metrics, "glcm_score", lambda *a, **k: scored.append(a) or 1.0)
    for target, why in ((tmp_path, "is a folder, not a file"),
                        (tmp_path / "file.txt" / "m.json", f"{tmp_path / 'file.txt'} is a file, not a folder")):
        assert metrics.main([str(d), "--json", str(target), "--quiet"]) == 2
        assert capsys.readouterr().err.splitlines() == [f"error: --json {target}: {why}"]
    assert scored == []
    # a target in folders that do not exist yet is fine: write_json creates them (and scoring did run)
    assert metrics.main([str(d), "--json", str(tmp_path / "new" / "m.json"), "--quiet"]) == 0
    assert len(scored) == 1 and json.loads((tmp_path / "new" / "m.json").read_text())["summary"]["glcm_mean"] == 1.0


def test_metrics_cli_json_in_a_read_only_folder_fails_before_scoring(tmp_path, capsys, monkeypatch):
    d, locked = tmp_path / "images", tmp_path / "locked"
    d.mkdir()
    locked.mkdir()
    Image.fromarray(_metrics_photo("astronaut")[:64, :64]).save(d / "a.png")
    scored = []
    monkeypatch.setattr(metrics, "glcm_score", lambda *a, **k: scored.append(a) or 1.0)
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user may write into read-only folders (root with CAP_DAC_OVERRIDE)")
        for target in (locked / "m.json", locked / "sub" / "m.json"):
            assert metrics.main([str(d), "--json", str(target), "--quiet"]) == 2
            assert capsys.readouterr().err.splitlines() == [f"error: --json {target}: cannot write in {locked} (read-only)"]
    finally:
        locked.chmod(0o755)
    assert scored == []


def test_metrics_cli_identical_pairs_leave_the_psnr_mean_finite(tmp_path, capsys):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    d, ref = tmp_path / "images", tmp_path / "ref"
    d.mkdir()
    ref.mkdir()
    astro, coffee = _metrics_photo("astronaut")[:128, :128], _metrics_photo("coffee")[:128, :128]
    noisy = np.clip(astro + np.random.default_rng(0).normal(0, 5, astro.shape), 0, 255).astype(np.uint8)
    for name, image, reference in (("same.png", coffee, coffee), ("noisy.png", noisy, astro)):
        Image.fromarray(image).save(d / name)
        Image.fromarray(reference).save(ref / name)
    out = tmp_path / "m.json"
    assert metrics.main([str(d), "--ref", str(ref), "--json", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    s, rows = result["summary"], {r["file"]: r for r in result["images"]}
    assert rows["same.png"]["psnr"] is None  # inf per pair, null in strict JSON
    assert s["pairs"] == 2 and s["identical_pairs"] == 1
    # the mean over the pair that differs; SSIM and NMSE are finite for identical pairs and average over both
    assert s["psnr_mean"] == pytest.approx(peak_signal_noise_ratio(astro, noisy, data_range=255), rel=1e-12)
    ssim = structural_similarity(astro, noisy, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=255, channel_axis=-1)
    assert s["ssim_mean"] == pytest.approx((1 + ssim) / 2, rel=1e-10)
    psnr_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("PSNR"))
    assert f"{s['psnr_mean']:.4f}" in psnr_line and "1 pair(s) that differ; 1 identical pair(s)" in psnr_line

    (d / "noisy.png").unlink()  # only identical pairs: no mean to give, and the report says why
    assert metrics.main([str(d), "--ref", str(ref), "--json", str(out), "--quiet"]) == 0
    s = json.loads(out.read_text())["summary"]
    assert s["psnr_mean"] is None and s["identical_pairs"] == s["pairs"] == 1
    assert "(all 1 pair(s) identical)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# LPIPS

_METRICS_VGG_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision's vgg16().features convs


@pytest.fixture(scope="module")
def _metrics_lpips_files(tmp_path_factory):
    """Random weights in the official layouts: torchvision's vgg16 state dict (features.* and classifier.*) and
    the LPIPS v0.1 heads (lin0..4.model.1.weight, non-negative, 1×1 convs without bias)."""
    root = tmp_path_factory.mktemp("lpips")
    g = torch.Generator().manual_seed(0)
    widths = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    vgg = {}
    for i, (c_in, c_out) in zip(_METRICS_VGG_CONVS, zip(widths, widths[1:])):
        vgg[f"features.{i}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * (2 / (9 * c_in)) ** 0.5
        vgg[f"features.{i}.bias"] = torch.randn(c_out, generator=g) * 0.01
    vgg["classifier.0.weight"] = torch.randn(8, 8, generator=g)  # present in the real file, unused by LPIPS
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) * 0.1
             for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, root / "vgg16-397923af.pth")
    torch.save(heads, root / "vgg.pth")
    return root, vgg, heads


def _metrics_lpips_reference(x, y, vgg, heads):
    """LPIPS from its definition (Zhang et al. 2018, v0.1), in float64 with functional ops on the raw state dicts:
    ImageNet scaling layer, VGG16 conv/ReLU/max-pool stack, taps at relu1_2 .. relu5_3, per-pixel unit channel norm
    (+1e-10), squared difference, learned non-negative channel weights, spatial mean, sum over the five taps."""
    import torch.nn.functional as F

    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    feats = []
    for h in ((x.double() - shift) / scale, (y.double() - shift) / scale):
        taps = []
        for n, i in enumerate(_METRICS_VGG_CONVS):
            if n in (2, 4, 7, 10):  # a max-pool before conv 3, 5, 8, 11 (1-based: after blocks 1-4)
                h = F.max_pool2d(h, 2)
            h = F.relu(F.conv2d(h, vgg[f"features.{i}.weight"].double(), vgg[f"features.{i}.bias"].double(), padding=1))
            if n in (1, 3, 6, 9, 12):
                taps.append(h)
        feats.append(taps)
    total = 0
    for k, (a, b) in enumerate(zip(*feats)):
        a = a / (torch.linalg.vector_norm(a, dim=1, keepdim=True) + 1e-10)
        b = b / (torch.linalg.vector_norm(b, dim=1, keepdim=True) + 1e-10)
        w = heads[f"lin{k}.model.1.weight"].double().flatten()
        total = total + torch.einsum("bchw,c->bhw", (a - b) ** 2, w).mean(dim=(1, 2))
    return total


def test_metrics_lpips_matches_its_definition(_metrics_lpips_files):
    root, vgg, heads = _metrics_lpips_files
    model = metrics.load_lpips(root / "vgg16-397923af.pth", root / "vgg.pth")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 48, 80, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    ours = model(x, y)
    ref = _metrics_lpips_reference(x, y, vgg, heads)
    assert ours.shape == (3,) and (ref > 0).all()
    # fp32 through 13 convs against an fp64 reference: ~1e-6 relative; 1e-5 leaves room for BLAS differences.
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=0)
    # Identical images: 0. The two halves of one batched VGG pass need not round alike at every batch
    # position, which could leave fp32 noise of order 1e-14; a real distance here is ~0.1.
    assert model(x, x).abs().max() <= 1e-10
    # symmetric: the same features in swapped batch halves, so fp32 rounding of the sums only
    torch.testing.assert_close(model(y, x), ours, rtol=1e-6, atol=0)
    # differentiable in the image, the network itself frozen
    xr = x.clone().requires_grad_(True)
    model(xr, y).sum().backward()
    assert xr.grad.abs().sum() > 0 and all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_metrics_lpips_on_images_and_cli(_metrics_lpips_files, tmp_path):
    root, vgg, heads = _metrics_lpips_files
    model = metrics.load_lpips(root / "vgg16-397923af.pth", root / "vgg.pth")
    astro = _metrics_photo("astronaut")[:96, :128]
    noisy = np.clip(astro + np.random.default_rng(0).normal(0, 12, astro.shape), 0, 255).astype(np.uint8)
    value = metrics.lpips(astro, noisy, model=model)
    ref = _metrics_lpips_reference(*(torch.from_numpy(a).permute(2, 0, 1)[None].double() / 127.5 - 1
                                     for a in (astro, noisy)), vgg, heads)
    assert value == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="sizes differ"):
        metrics.lpips(astro, noisy[:64], model=model)

    d, ref_dir = tmp_path / "images", tmp_path / "ref"
    d.mkdir(), ref_dir.mkdir()
    Image.fromarray(astro).save(d / "astro.png")
    Image.fromarray(noisy).save(ref_dir / "astro.png")
    out = tmp_path / "m.json"
    _metrics_cli(d, "--ref", ref_dir, "--lpips", "--lpips-vgg", root / "vgg16-397923af.pth", "--lpips-heads",
                 root / "vgg.pth", "--device", "cpu", "--json", out, check_rc=0)
    result = json.loads(out.read_text())
    # fp32 against the fp64 definition, as above
    assert result["images"][0]["lpips"] == pytest.approx(ref.item(), rel=1e-5)
    assert result["summary"]["lpips_mean"] == pytest.approx(ref.item(), rel=1e-5)
    assert result["settings"]["pair_metrics"] == ["psnr", "ssim", "nmse", "lpips"]


def test_metrics_lpips_missing_or_wrong_files(_metrics_lpips_files, tmp_path, monkeypatch):
    root, vgg, heads = _metrics_lpips_files
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    with pytest.raises(FileNotFoundError) as e:
        metrics.load_lpips(None, root / "vgg.pth")
    message = str(e.value)
    assert "vgg16-397923af.pth" in message and str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "\n" not in message and "download.pytorch.org" in message
    with pytest.raises(FileNotFoundError, match=r"vgg\.pth; looked for .*nope\.pth.*lpips"):
        metrics.load_lpips(root / "vgg16-397923af.pth", tmp_path / "nope.pth")
    # the default places are used when the files are there
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    for name in ("vgg16-397923af.pth", "vgg.pth"):
        (hub / name).write_bytes((root / name).read_bytes())
    assert metrics.load_lpips().lin0.model[1].weight.equal(heads["lin0.model.1.weight"])
    # a heads file without lin4, and a file that is no state dict
    torch.save({k: v for k, v in heads.items() if not k.startswith("lin4")}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"short.pth\): weights do not fit LPIPS: missing \(1\): lin4.model.1.weight"):
        metrics.load_lpips(root / "vgg16-397923af.pth", tmp_path / "short.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a torch state dict"):
        metrics.load_lpips(tmp_path / "junk.pth", root / "vgg.pth")
    # the CLI: one line and status 2
    (tmp_path / "a").mkdir()
    Image.fromarray(_metrics_photo("astronaut")[:64, :64]).save(tmp_path / "a" / "x.png")
    proc = _metrics_cli(tmp_path / "a", "--ref", tmp_path / "a", "--lpips", "--lpips-heads", tmp_path / "nope.pth",
                        "--lpips-vgg", root / "vgg16-397923af.pth")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "vgg.pth" in proc.stderr
    proc = _metrics_cli(tmp_path / "a", "--lpips")
    assert proc.returncode == 2 and "give --ref" in proc.stderr


# --------------------------------------------------------------------------------------------------
# FID

_METRICS_FID_SIZES = [(64, 96), (299, 299), (333, 200)]  # (H, W): up, none, and a non-square down/up mix


def _metrics_bare_import(stand_ins: dict, load):
    """load() with `stand_ins` in sys.modules, then the stand-ins and the modules of their packages dropped again,
    so that no other test sees them (what else load() imported, scipy say, stays: others hold it). It imports peer
    modules past code they do not need: torch-fidelity's and pytorch-fid's package __init__ and fid_score.py
    import torchvision, which cannot be installed here."""
    packages = {name.split(".")[0] for name in stand_ins}
    assert not packages & {name.split(".")[0] for name in sys.modules}
    sys.modules.update(stand_ins)
    try:
        return load()
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] in packages]:
            del sys.modules[name]


def _metrics_package_stand_in(name: str):
    """An empty package whose submodules are the installed ones: its own __init__ does not run."""
    import importlib.util
    import types

    module = types.ModuleType(name)
    module.__path__ = importlib.util.find_spec(name).submodule_search_locations
    return module


@pytest.fixture(scope="module")
def _metrics_fid(tmp_path_factory):
    """Random InceptionV3 weights in torch-fidelity's layout (as its conversion script writes them: a plain dict,
    no batch-norm num_batches_tracked), with the keys and shapes of torch-fidelity's own FeatureExtractorInceptionV3;
    that extractor loaded from the file (strictly, by its own code) as the reference; one random uint8 image of each
    size in _METRICS_FID_SIZES and its reference features (1, 2048)."""
    import importlib
    from unittest import mock

    fe, tf1 = _metrics_bare_import({"torch_fidelity": _metrics_package_stand_in("torch_fidelity")}, lambda: [
        importlib.import_module(f"torch_fidelity.{m}")
        for m in ("feature_extractor_inceptionv3", "interpolate_compat_tensorflow")])
    extractor = fe.FeatureExtractorInceptionV3
    with mock.patch.object(torch, "load", return_value={}), mock.patch.object(extractor, "load_state_dict"):
        skeleton = extractor("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in skeleton.state_dict().items():  # He-scaled convs and mild batch norms: features of order 1
        if k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.endswith("bn.weight"):
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif not k.endswith("num_batches_tracked"):  # biases, running means, fc
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
    path = tmp_path_factory.mktemp("fid") / metrics.INCEPTION_FILES[0]
    torch.save(sd, path)
    reference = extractor("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in _METRICS_FID_SIZES]
    expected = [reference(_metrics_chw(a))[0] for a in images]
    return path, sd, reference, tf1.interpolate_bilinear_2d_like_tensorflow1x, images, expected


def _metrics_chw(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1)[None]


def _metrics_pytorch_fid_distance():
    """pytorch-fid's calculate_frechet_distance; fid_score.py imports torchvision and pytorch-fid's InceptionV3
    (built on torchvision) at its top, which that function does not use: empty stand-ins serve that import."""
    import importlib
    import types

    stand_ins = {name: types.ModuleType(name) for name in ("torchvision", "torchvision.transforms",
                                                           "pytorch_fid.inception")}
    stand_ins["pytorch_fid.inception"].InceptionV3 = types.SimpleNamespace(BLOCK_INDEX_BY_DIM={2048: 3})  # for argparse
    stand_ins["pytorch_fid"] = _metrics_package_stand_in("pytorch_fid")
    return _metrics_bare_import(stand_ins, lambda: importlib.import_module("pytorch_fid.fid_score")
                                ).calculate_frechet_distance


def _metrics_pil_bilinear(rgb: np.ndarray, size: int) -> np.ndarray:
    """Pillow's antialiased bilinear resize of each channel in float32 (mode F) -> (3, size, size)."""
    return np.stack([np.asarray(Image.fromarray(rgb[..., c].astype(np.float32), mode="F")
                                .resize((size, size), Image.Resampling.BILINEAR)) for c in range(3)])


# Features against torch-fidelity: the same fp32 convolutions on the same inputs, only the order of some sums may
# differ (global mean vs adaptive_avg_pool2d, the conv algorithm picked per shape): ~1e-7 at worst, 0 when
# measured. 1e-5 relative leaves room for that; a wrong pool, padding or resize offset moves features by ≥ 1e-2.
_METRICS_FID_RTOL = 1e-5


def test_metrics_fid_inception_matches_torch_fidelity(_metrics_fid):
    path, sd, reference, tf1_resize, images, expected = _metrics_fid
    model = metrics.load_inception(path)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    for rgb, ref in zip(images, expected):
        x = _metrics_chw(rgb)
        # The resize alone: the same float32 ops in the same order as torch-fidelity's (bit-equal when measured).
        peer_input = (tf1_resize(x.float(), size=(299, 299), align_corners=False) - 128) / 128
        assert rel(model.preprocess(x), peer_input) <= 1e-6
        ours = model(x)
        assert ours.shape == (1, 2048) and ours.dtype == torch.float32 and ref.abs().max() > 1
        assert rel(ours, ref) <= _METRICS_FID_RTOL, rgb.shape
    with pytest.raises(ValueError, match="uint8 images"):
        model(torch.rand(1, 3, 64, 64))


def test_metrics_fid_features_of_image_lists_and_antialias(_metrics_fid, tmp_path):
    path, sd, reference, _, images, expected = _metrics_fid
    Image.fromarray(images[2]).save(tmp_path / "c.png")
    mixed = [images[0], Image.fromarray(images[1]), tmp_path / "c.png"]  # an array, a PIL image, a path
    model = metrics.load_inception(path)
    # Batches of 2 then 1, each image of its own size resized alone: torch-fidelity on each image by itself.
    feats = metrics.inception_features(mixed, model, batch_size=2, progress=False)
    assert feats.shape == (3, 2048) and feats.dtype == np.float32
    assert rel(feats, torch.cat(expected)) <= _METRICS_FID_RTOL
    assert metrics.inception_features([], model, progress=False).shape == (0, 2048)
    # resize="antialias" is Pillow's antialiased bilinear resize (torch's antialias=True follows its filter):
    # measured ≤ 5e-5 apart in [−1, 1] (float32 weights summed in another order); TF1's resize, which reads
    # 2×2 pixels per output pixel, is ~0.3 away on these noise images when shrinking 333 rows to 299.
    aa = metrics.load_inception(path, resize="antialias")
    for rgb in images:
        pil = (torch.from_numpy(_metrics_pil_bilinear(rgb, 299)) - 128) / 128
        assert (aa.preprocess(_metrics_chw(rgb))[0] - pil).abs().max() <= 1e-4
    assert (model.preprocess(_metrics_chw(images[2]))[0] - pil).abs().max() > 0.1
    with pytest.raises(ValueError, match="resize must be one of"):
        metrics.load_inception(path, resize="bicubic")


def test_metrics_fid_weight_files(_metrics_fid, tmp_path, monkeypatch):
    path, sd, reference = _metrics_fid[:3]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    with pytest.raises(FileNotFoundError) as e:
        metrics.load_inception()
    message = str(e.value)
    assert "\n" not in message and metrics.INCEPTION_URL in message
    assert all(str(hub / name) in message for name in metrics.INCEPTION_FILES)
    with pytest.raises(FileNotFoundError, match=r"looked for [^,]*nope\.pth; get it from https://github.com/toshas"):
        metrics.load_inception(tmp_path / "nope.pth")
    # pytorch-fid's layout, found in the hub cache under its name: the same keys as saved from a module's
    # state_dict() (pytorch-fid loads its file strictly into torchvision's Inception3, whose module names are
    # these), with each batch norm's num_batches_tracked and the state dict's version metadata
    hub.mkdir(parents=True)
    saved = reference.state_dict()
    assert any(k.endswith("num_batches_tracked") for k in saved) and hasattr(saved, "_metadata")
    torch.save(saved, hub / metrics.INCEPTION_FILES[1])
    model = metrics.load_inception()
    loaded = model.state_dict()
    # every weight in place: 94 conv + batch-norm layers (conv.weight, bn.weight / bias / running_mean /
    # running_var) and fc
    assert all(loaded[k].equal(v) for k, v in sd.items()) and len(sd) == 94 * 5 + 2
    # wrong keys or shapes: one line naming the file and the first keys
    for bad, match in (({k: v for k, v in sd.items() if not k.startswith("Mixed_7c.")}, r"missing \(45\): Mixed_7c."),
                       ({**sd, "AuxLogits.fc.weight": torch.zeros(1008, 768)}, "unexpected .1.: AuxLogits.fc.weight"),
                       ({**sd, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)},
                        r"wrong shape \(2\): fc.weight \[1000, 2048\]")):  # torchvision's 1000-class InceptionV3
        torch.save(bad, tmp_path / "bad.pth")
        with pytest.raises(ValueError, match=f"bad.pth: weights do not fit FIDInceptionV3: {match}") as e:
            metrics.load_inception(tmp_path / "bad.pth")
        assert "\n" not in str(e.value)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth: not a torch state dict"):
        metrics.load_inception(tmp_path / "junk.pth")


def test_metrics_fid_feature_stats():
    f = np.random.default_rng(3).normal(size=(50, 8)).astype(np.float32)
    for features in (f, torch.from_numpy(f)):
        mu, sigma = metrics.feature_stats(features)
        assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (8, 8)
        # numpy's own float64 mean and unbiased covariance of the same float32 values: the same sums
        np.testing.assert_allclose(mu, np.mean(f.astype(np.float64), axis=0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="N ≥ 2"):
        metrics.feature_stats(f[:1])


def test_metrics_fid_frechet_distance_matches_pytorch_fid(monkeypatch):
    pytorch_fid_distance = _metrics_pytorch_fid_distance()
    rng = np.random.default_rng(4)

    def stats(n, d, shift=0.0):
        return metrics.feature_stats(rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + shift)

    full, other = stats(200, 16), stats(300, 16, shift=0.5)  # full-rank covariances
    singular, other_singular = stats(10, 64), stats(12, 64, shift=0.5)  # N < D: rank N − 1, as FID on few images
    for a, b in ((full, other), (singular, other_singular), (full, full)):
        ours, ref = metrics.frechet_distance(*a, *b), pytorch_fid_distance(*a, *b)
        # the same scipy sqrtm of the same product and the same traces: equal up to the last bits
        assert ours == pytest.approx(ref, rel=1e-12, abs=1e-9)
    # torchmetrics 1.5.1's formula, Σ √λ(Σ₁Σ₂) for the trace: the same number up to eigensolver rounding
    (mu1, s1), (mu2, s2) = full, other
    tm = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.linalg.eigvals(s1 @ s2)).real.sum()
    assert metrics.frechet_distance(*full, *other) == pytest.approx(tm, rel=1e-10)
    assert abs(metrics.frechet_distance(*full, *full)) < 1e-9  # a set against itself
    # diagonal covariances: FID = ‖μ₁ − μ₂‖² + Σ (√a − √b)²
    a, b, m1, m2 = rng.uniform(0.1, 3, 32), rng.uniform(0.1, 3, 32), rng.normal(size=32), rng.normal(size=32)
    closed = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(closed, rel=1e-12)
    # a product whose square root fails (inf / nan): ε·I on both covariances, as pytorch-fid; forced here through
    # scipy's sqrtm, which both call as scipy.linalg.sqrtm
    import scipy.linalg

    sqrtm = scipy.linalg.sqrtm
    unshifted = [singular[1] @ other_singular[1]]

    def failing_sqrtm(m, *args, **kwargs):
        if np.array_equal(m, unshifted[0]):
            out = np.full_like(m, np.nan)
            return (out, np.inf) if kwargs.get("disp", True) is False else out
        return sqrtm(m, *args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_sqrtm)
    ours, ref = metrics.frechet_distance(*singular, *other_singular), pytorch_fid_distance(*singular, *other_singular)
    assert math.isfinite(ours) and ours == pytest.approx(ref, rel=1e-12)
    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm)
    assert ours != pytest.approx(metrics.frechet_distance(*singular, *other_singular), rel=1e-12)  # ε moved it
    # "covariances" with a negative eigenvalue: a large imaginary part; both refuse
    neg = np.diag([1.0, -1.0])
    with pytest.raises(ValueError, match="imaginary"):
        metrics.frechet_distance(np.zeros(2), neg, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="Imaginary"):
        pytorch_fid_distance(np.zeros(2), neg, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="do not match"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# ====================================================================================================
# vae
# ====================================================================================================

_VAE_GROUPS = 8  # tiny widths (32, 64) are divisible by it


def _vae_diffusers(block_out_channels=(32, 64), seed=0):
    """A tiny diffusers AutoencoderKL in the Flux layout (no quant convs) with random weights, norms included."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    levels = len(block_out_channels)
    d = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels, block_out_channels=list(block_out_channels), layers_per_block=1,
        latent_channels=4, norm_num_groups=_VAE_GROUPS, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    _vae_randomize(d)
    return d.eval()


def _vae_randomize(module):
    # Default init leaves GroupNorm at weight 1 / bias 0, which would hide a swapped norm mapping.
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))


def _vae_tiny_params(stride=1, ch_mult=(1, 2)):
    return replace(vae.VAE_CONFIGS["flux"], ch=32, ch_mult=ch_mult, num_res_blocks=1, z_channels=4,
                   groups=_VAE_GROUPS, stride=stride)


def _vae_reference(d, z, stride=2, return_feature=False):
    """The UNpartitioned decoder written from diffusers' blocks and plain torch ops (independent of vae.py):
    trunk, then norm_out, swish, [F16: nearest ×2 on the whole map], conv_out with padding 1."""
    dec = d.decoder
    h = dec.conv_in(z / 0.3611 + 0.1159)
    h = dec.mid_block(h)
    for up_block in dec.up_blocks:
        h = up_block(h)
    feat = F.silu(F.group_norm(h, _VAE_GROUPS, dec.conv_norm_out.weight, dec.conv_norm_out.bias, eps=1e-6))
    x = F.conv2d(F.interpolate(feat, scale_factor=stride, mode="nearest"), dec.conv_out.weight, dec.conv_out.bias,
                 padding=1)
    return (x, feat) if return_feature else x


def _vae_diffusers_folder(tmp_path, d, stride=None):
    folder = tmp_path / "vae"
    d.save_pretrained(folder)  # config.json + diffusion_pytorch_model.safetensors
    if stride is not None:  # the Diffusion-4K SC-VAE folders carry "stride": 2
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "stride": stride}))
    return folder


def test_vae_flux_config_matches_the_official_checkpoint():
    with torch.device("meta"):
        sd = vae.AutoEncoder(vae.VAE_CONFIGS["flux"]).state_dict()
    # The official Flux ae.safetensors: 244 tensors, 83,819,683 parameters, and these shapes.
    assert len(sd) == 244 and sum(v.numel() for v in sd.values()) == 83_819_683
    assert sd["encoder.conv_in.weight"].shape == (128, 3, 3, 3)
    assert sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3)
    assert sd["decoder.conv_in.weight"].shape == (512, 16, 3, 3)
    assert sd["decoder.conv_out.weight"].shape == (3, 128, 3, 3)
    assert sd["decoder.up.3.block.2.conv2.weight"].shape == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.3.downsample.conv.weight" not in sd
    assert (vae.VAE_CONFIGS["sd3"].scale_factor, vae.VAE_CONFIGS["sd3"].shift_factor) == (1.5305, 0.0609)


@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
def test_vae_diffusers_folder_loads_and_matches(tmp_path, size):
    d = _vae_diffusers()
    ae = vae.load_vae(_vae_diffusers_folder(tmp_path, d))
    assert ae.params.stride == 1 and ae.params.ch_mult == (1, 2) and ae.params.groups == _VAE_GROUPS
    torch.manual_seed(1)
    x = torch.rand(2, 3, *size) * 2 - 1
    with torch.no_grad():
        ref_mean = d.encode(x).latent_dist.mean
        z = ae.encode(x)
        ref_x = d.decode(z / 0.3611 + 0.1159).sample
        out = ae.decode(z)
        gen = torch.Generator().manual_seed(3)
        ref_sample = d.encode(x).latent_dist.sample(generator=gen)
        z_sample = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    # fp32, the same math as diffusers in another summation order: ≤ 1e-5 of the tensor's scale.
    assert rel(z, (ref_mean - 0.1159) * 0.3611) <= 1e-5
    assert rel(out, ref_x) <= 1e-5
    assert rel(z_sample, (ref_sample - 0.1159) * 0.3611) <= 1e-5
    assert (z_sample - z).abs().max() > 1e-3  # sampling really adds noise


def test_vae_state_dict_converts_to_diffusers(tmp_path):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    torch.manual_seed(0)
    ae = vae.AutoEncoder(_vae_tiny_params()).eval()
    _vae_randomize(ae)
    config = vae.diffusers_config(ae.params)
    kwargs = {k: v for k, v in config.items() if k not in ("_class_name", "stride")}
    d = AutoencoderKL(**kwargs)
    d.load_state_dict(convert_ldm_vae_checkpoint(dict(ae.state_dict()), config), strict=True)  # it pops: a copy
    # Our own diffusers export reads back into diffusers as well.
    vae.save_vae(ae, tmp_path / "export")
    d2 = AutoencoderKL.from_pretrained(tmp_path / "export")
    torch.manual_seed(1)
    x = torch.rand(1, 3, 48, 64) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        out = ae.decode(z)
        for peer in (d.eval(), d2.eval()):
            # fp32, the same math in another summation order: ≤ 1e-5 of the tensor's scale.
            assert rel(z, (peer.encode(x).latent_dist.mean - 0.1159) * 0.3611) <= 1e-5
            assert rel(out, peer.decode(z / 0.3611 + 0.1159).sample) <= 1e-5
    # And the export loads back through load_vae bit for bit: the same tensors, stored and read back.
    back = vae.load_vae(tmp_path / "export")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ae.state_dict().items())


def test_vae_diffusers_export_uses_the_peers_key_names(tmp_path):
    # The one key table, checked against diffusers' own names (not against itself): the export of a model with
    # two levels holds exactly the tensors of the equally configured AutoencoderKL, each with the peer's shape.
    ae = vae.AutoEncoder(_vae_tiny_params())
    vae.save_vae(ae, tmp_path / "export")
    exported = load_file(tmp_path / "export" / "diffusion_pytorch_model.safetensors")
    peer = _vae_diffusers().state_dict()
    assert exported.keys() == peer.keys()
    assert all(exported[k].shape == peer[k].shape for k in peer)
    # up.i is diffusers' up_blocks.(L − 1 − i): the first up level (up.1) carries the upsampler.
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in exported


def test_vae_official_single_files(tmp_path):
    torch.manual_seed(0)
    ae = vae.AutoEncoder(_vae_tiny_params())
    sd = {k: v.contiguous() for k, v in ae.state_dict().items()}
    save_file(sd, tmp_path / "ae.safetensors")  # Flux layout: no prefix, no metadata
    flux = vae.load_vae(tmp_path / "ae.safetensors")
    assert (flux.scale_factor, flux.shift_factor) == (0.3611, 0.1159)
    assert flux.params == replace(_vae_tiny_params(), groups=32)  # groups are not in the shapes: Flux's 32
    # Bit for bit: the same tensors, stored and read back (and in bf16 below, the same conversion).
    assert all(torch.equal(flux.state_dict()[k], v) for k, v in sd.items())
    # SD3: the VAE under first_stage_model., next to other models' keys that must be ignored.
    sd3_file = {"first_stage_model." + k: v for k, v in sd.items()}
    sd3_file["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(8, 16, 2, 2)
    save_file(sd3_file, tmp_path / "sd3.safetensors")
    sd3 = vae.load_vae(tmp_path / "sd3.safetensors", dtype=torch.bfloat16)
    assert (sd3.scale_factor, sd3.shift_factor) == (1.5305, 0.0609)
    assert all(torch.equal(sd3.state_dict()[k], v.to(torch.bfloat16)) for k, v in sd.items())
    assert sd3.params.ch == 32 and sd3.params.ch_mult == (1, 2) and sd3.params.num_res_blocks == 1
    assert sd3.params.z_channels == 4
    assert vae.load_vae(tmp_path / "sd3.safetensors", config="flux").scale_factor == 0.3611
    assert vae.load_vae(tmp_path / "ae.safetensors", stride=2).params.stride == 2
    # save_vae keeps stride and groups in the metadata.
    f16 = vae.AutoEncoder(_vae_tiny_params(stride=2))
    vae.save_vae(f16, tmp_path / "f16.safetensors")
    back = vae.load_vae(tmp_path / "f16.safetensors")
    assert back.params == f16.params
    assert back.encoder.conv_in.stride == (2, 2)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("channels, latent", [((32, 64), (3, 3)), ((32, 64), (5, 7)), ((32,), (7, 5))])
def test_vae_partitioned_f16_equals_unpartitioned(tmp_path, n, channels, latent):
    # Feature maps 6×6, 10×14 and odd 7×5 at H/2: square, non-square, not divisible by n, tiles of one pixel.
    d = _vae_diffusers(channels).double()
    ae = vae.load_vae(_vae_diffusers_folder(tmp_path, d, stride=2), dtype=torch.float64)
    assert ae.params.stride == 2
    torch.manual_seed(2)
    z = torch.randn(2, 4, *latent, dtype=torch.float64, requires_grad=True)
    out = ae.decode(z, partitions=n)  # with autograd: the plain definition of Sec. 4.1
    ref = _vae_reference(d, z)
    assert out.shape == ref.shape == (2, 3, 2 ** len(channels) * latent[0], 2 ** len(channels) * latent[1])
    # fp64, a different summation order only: ≤ 1e-12 (a one-pixel shift would be O(1)).
    assert rel(out, ref) <= 1e-12
    # The tiled stage is differentiable (SC-VAE trains through it): same gradient as the reference.
    g = torch.randn_like(ref)
    (grad,) = torch.autograd.grad((out * g).sum(), z)
    (ref_grad,) = torch.autograd.grad((ref * g).sum(), z)
    assert rel(grad, ref_grad) <= 1e-12
    with torch.no_grad():  # and without autograd, the memory-bounded decoding (same fp64 bound)
        assert rel(ae.decode(z, partitions=n), ref) <= 1e-12


def test_vae_partitioned_f16_fp32_and_bf16(tmp_path):
    d = _vae_diffusers()
    ae = vae.load_vae(_vae_diffusers_folder(tmp_path, d, stride=2))
    torch.manual_seed(2)
    z = torch.randn(1, 4, 5, 7)
    with torch.no_grad():
        ref = _vae_reference(d, z)
        # fp32: ≤ 1e-5 of the scale for every n (summation order only).
        for n in (1, 2, 3, 4):
            assert rel(ae.decode(z, partitions=n), ref) <= 1e-5
        # bf16 weights and activations (8-bit mantissa): within 5% of the scale, and n does not matter more than that.
        ae16 = vae.load_vae(tmp_path / "vae", dtype=torch.bfloat16)
        out16 = [ae16.decode(z.bfloat16(), partitions=n).float() for n in (1, 2)]
        assert rel(out16[0], ref) <= 5e-2 and rel(out16[1], ref) <= 5e-2


def test_vae_f16_encoder_is_the_strided_first_conv(tmp_path):
    d = _vae_diffusers()
    ae = vae.load_vae(_vae_diffusers_folder(tmp_path, d, stride=2))
    d.encoder.conv_in.stride = (2, 2)  # the authors' F16 encoder: same 3×3 kernel, stride 2, padding 1
    torch.manual_seed(1)
    x = torch.rand(1, 3, 48, 64) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        ref = (d.encode(x).latent_dist.mean - 0.1159) * 0.3611
    assert z.shape == (1, 4, 12, 16)  # 1/4 here = 1/16 with Flux's four levels
    assert rel(z, ref) <= 1e-5  # fp32, summation order only
    with pytest.raises(ValueError, match="multiples of 4"):
        ae.encode(torch.zeros(1, 3, 30, 32))


@pytest.mark.parametrize("stride", [1, 2])
def test_vae_bounded_decoding_equals_the_definition(tmp_path, stride, monkeypatch):
    d = _vae_diffusers().double()
    ae = vae.load_vae(_vae_diffusers_folder(tmp_path, d, stride=stride), dtype=torch.float64)
    torch.manual_seed(4)
    z = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    grids = []
    tiles = vae.conv_tiles
    monkeypatch.setattr(vae, "conv_tiles", lambda *a, **k: grids.append(k["grid"]) or tiles(*a, **k))
    with torch.no_grad():
        ref = _vae_reference(d, z, stride)
        for n in (1, 3):
            ae.decoder.strip_pixels = None  # the plain forward and the plain definition of the last stage
            plain = ae.decode(z, partitions=n)
            assert grids == []
            ae.decoder.strip_pixels = 7  # strips of one or two rows: exercises the in-place, one-strip-late writes
            bounded = ae.decode(z, partitions=n)
            # Each ResnetBlock conv and Upsample of the 5×6 and 10×12 maps in more than one strip; then the last stage.
            assert len(grids) == 10 and all(k > 1 and c == 1 for k, c in grids[:-1]) and grids[-1] == (n, n)
            grids.clear()
            # fp64, different summation orders only: ≤ 1e-12 of the scale, each against the other and the peer.
            assert rel(plain, ref) <= 1e-12 and rel(bounded, ref) <= 1e-12 and rel(bounded, plain) <= 1e-12


@pytest.mark.parametrize("stride", [1, 2])
def test_vae_return_feature(tmp_path, stride):
    d = _vae_diffusers().double()
    ae = vae.load_vae(_vae_diffusers_folder(tmp_path, d, stride=stride), dtype=torch.float64)
    torch.manual_seed(5)
    z = torch.randn(1, 4, 4, 6, dtype=torch.float64)
    with torch.no_grad():
        x, feat = ae.decode(z, return_feature=True)
        ref_x, ref_feat = _vae_reference(d, z, stride, return_feature=True)
    assert feat.shape == (1, 32, 8, 12)  # ch channels before conv_out: H/2 for F16, H for F8
    assert x.shape == (1, 3, 8 * stride, 12 * stride)
    # fp64 against the peer, summation order only: ≤ 1e-12 of the scale.
    assert rel(feat, ref_feat) <= 1e-12 and rel(x, ref_x) <= 1e-12


def test_vae_load_errors_name_the_keys(tmp_path):
    ae = vae.AutoEncoder(_vae_tiny_params())
    sd = {k: v.contiguous() for k, v in ae.state_dict().items()}
    path = tmp_path / "ae.safetensors"

    def write(mutate):
        bad = dict(sd)
        mutate(bad)
        save_file(bad, path)
        return path

    with pytest.raises(ValueError, match=r"missing \(1\): decoder\.mid\.attn_1\.q\.bias"):
        vae.load_vae(write(lambda s: s.pop("decoder.mid.attn_1.q.bias")))
    with pytest.raises(ValueError, match=r"wrong shape \(1\): decoder\.conv_out\.bias \[5\] \(expected \[3\]\)"):
        vae.load_vae(write(lambda s: s.__setitem__("decoder.conv_out.bias", torch.zeros(5))))
    with pytest.raises(ValueError, match=r"unexpected \(1\): decoder\.extra\.weight"):
        vae.load_vae(write(lambda s: s.__setitem__("decoder.extra.weight", torch.zeros(1))))
    with pytest.raises(ValueError, match="not a Flux/SD3 autoencoder"):
        vae.load_vae(write(lambda s: s.clear() or s.__setitem__("model.weight", torch.zeros(1))))
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        vae.load_vae(tmp_path / "nowhere.safetensors")
    # diffusers folder: the error names the diffusers key as stored in the file.
    folder = _vae_diffusers_folder(tmp_path, _vae_diffusers())
    weights = folder / "diffusion_pytorch_model.safetensors"
    dsd = load_file(weights)
    dsd.pop("decoder.up_blocks.0.resnets.1.conv2.weight")
    save_file(dsd, weights)
    with pytest.raises(ValueError, match=r"missing \(1\): decoder\.up_blocks\.0\.resnets\.1\.conv2\.weight"):
        vae.load_vae(folder)


def _broken_copies(good: Path, folder: Path) -> dict[str, Path]:
    """Copies of a good weight file that no loader may accept, each in its own folder under the same name: empty,
    cut short (its header promises more bytes than follow) and a text file. The mmdit and text_encoders loader
    tests use it too."""
    data = good.read_bytes()
    copies = {}
    for kind, content in (("empty", b""), ("truncated", data[:-64]), ("text", b"not weights, just text\n")):
        (folder / kind).mkdir(parents=True)
        copies[kind] = folder / kind / good.name
        copies[kind].write_bytes(content)
    return copies


def _loader_error(load, named: Path, *words: str, error=ValueError) -> str:
    """load() raises `error` with a one-line message that names the file `named` and holds every word."""
    with pytest.raises(error) as err:
        load()
    message = str(err.value)
    assert "\n" not in message and str(named) in message and all(w in message for w in words), message
    return message


def test_vae_load_rejects_broken_files_in_one_line(tmp_path):
    sd = {k: v.contiguous() for k, v in vae.AutoEncoder(_vae_tiny_params()).state_dict().items()}
    save_file(sd, tmp_path / "ae.safetensors")
    for path in _broken_copies(tmp_path / "ae.safetensors", tmp_path).values():
        _loader_error(lambda: vae.load_vae(path), path, "not a readable safetensors file")
    key = "decoder.conv_out.weight"  # 3·32·3·3 = 864 entries
    nan = sd[key].clone()
    nan[1, 2, 0, 0] = float("nan")
    bad = {"int": sd[key].to(torch.int32), "nan": nan, "big": torch.full_like(sd[key], 1e6),
           "wide": torch.full_like(sd[key], 100.0)}
    for name, value in bad.items():
        save_file(sd | {key: value}, tmp_path / f"{name}.safetensors")
    _loader_error(lambda: vae.load_vae(tmp_path / "int.safetensors"), tmp_path / "int.safetensors", key,
                  "torch.int32, not a floating-point weight")
    _loader_error(lambda: vae.load_vae(tmp_path / "nan.safetensors"), tmp_path / "nan.safetensors", key,
                  "NaN or inf (as torch.float32)")
    # 1e6 is finite in fp32 and inf in fp16: the check sees the tensor as it is loaded
    assert vae.load_vae(tmp_path / "big.safetensors").decoder.conv_out.weight.isfinite().all()
    _loader_error(lambda: vae.load_vae(tmp_path / "big.safetensors", dtype=torch.float16),
                  tmp_path / "big.safetensors", key, "NaN or inf (as torch.float16)")
    # 864 × 100 passes fp16's 65504: a finite tensor whose quick fp16 sum overflows still loads
    weight = vae.load_vae(tmp_path / "wide.safetensors", dtype=torch.float16).decoder.conv_out.weight
    assert weight.sum().isinf() and weight.isfinite().all()
    folder = tmp_path / "vae"
    vae.save_vae(vae.AutoEncoder(_vae_tiny_params()), folder)  # a diffusers folder: config.json beside the weights
    (folder / "config.json").write_text('{"stride": 2,\n  "scaling_factor": }')
    _loader_error(lambda: vae.load_vae(folder), folder / "config.json", "unreadable JSON", "line 2 column 21")
    (folder / "config.json").write_text("[1, 2]")
    _loader_error(lambda: vae.load_vae(folder), folder / "config.json", "not a JSON object")


def test_vae_attention_chunks_long_sequences():
    # 100² = 10,000 positions: without autograd the queries run in two chunks (2^26 scores each at most).
    torch.manual_seed(6)
    block = vae.AttnBlock(32, _VAE_GROUPS)
    _vae_randomize(block)
    x = torch.randn(1, 32, 100, 100)
    whole = block(x).detach()  # autograd on: one SDPA call (the path checked against diffusers above)
    with torch.no_grad():
        chunked = block(x)
    assert rel(chunked, whole) <= 1e-6  # fp32; softmax is per query row, so only rounding differs


# ====================================================================================================
# mmdit
# ====================================================================================================

# Tolerance of the fp32 comparisons with diffusers: both sides compute the same functions in fp32 and differ only in
# op order (fused vs split qkv, complex vs real RoPE), measured at max|Δ|/max|ref| ≤ 1.1e-6 (often exactly 0); 1e-5
# leaves 10× headroom over that rounding, while any wrong mapping (a swapped shift/scale, a misordered q/k/v, an
# off-by-one RoPE pair) moves the output by O(1e-1).
MMDIT_FP32 = 1e-5


def _mmdit_randomize(model: torch.nn.Module, seed: int = 0):
    """Every parameter random (none left at a zero / one init, so a wrong mapping cannot hide), norm scales
    near 1, weights ~ 1/sqrt(fan_in); a stored SD3 pos_embed random too, so it must really be loaded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith("scale")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
        for name, b in model.named_buffers():
            if name.endswith("pos_embed"):
                b.copy_(torch.randn(b.shape, generator=g))
    return model.eval()


def _mmdit_diffusers_flux(guidance=True, heads=2, head_dim=32, axes=(8, 12, 12)):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return _mmdit_randomize(FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=guidance,
        axes_dims_rope=axes))


def _mmdit_diffusers_sd3(qk_norm=None, dual=(), heads=2, head_dim=32, max_size=16, layers=3):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    return _mmdit_randomize(SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=24, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=12, pos_embed_max_size=max_size, dual_attention_layers=dual, qk_norm=qk_norm))


def _mmdit_flux_inputs(batch=1, h=8, w=8, n_txt=5, guidance=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, h, w, generator=g)
    return dict(img=mmdit.pack(latents), img_ids=mmdit.flux_img_ids(h, w, batch),
                txt=torch.randn(batch, n_txt, 24, generator=g), txt_ids=mmdit.flux_txt_ids(n_txt, batch),
                timesteps=torch.rand(batch, generator=g), y=torch.randn(batch, 12, generator=g),
                guidance=1 + 4 * torch.rand(batch, generator=g) if guidance else None)


def _mmdit_flux_diffusers_forward(model, inp):
    return model(hidden_states=inp["img"], encoder_hidden_states=inp["txt"], pooled_projections=inp["y"],
                 timestep=inp["timesteps"], img_ids=inp["img_ids"][0], txt_ids=inp["txt_ids"][0],
                 guidance=inp["guidance"], return_dict=False)[0]  # diffusers: 2-D ids, ×1000 inside like ours


def _mmdit_sd3_inputs(batch=1, h=8, w=8, n_ctx=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, 4, h, w, generator=g), t=1000 * torch.rand(batch, generator=g),
                y=torch.randn(batch, 12, generator=g), context=torch.randn(batch, n_ctx, 24, generator=g))


def _mmdit_sd3_diffusers_forward(model, inp):
    return model(hidden_states=inp["x"], encoder_hidden_states=inp["context"], pooled_projections=inp["y"],
                 timestep=inp["t"], return_dict=False)[0]  # diffusers SD3 takes σ·1000 like ours


# ---------------------------------------------------------------------------------- diffusers parity


@pytest.mark.parametrize("guidance,batch,h,w,heads,head_dim,axes", [
    (True, 1, 8, 8, 2, 32, (8, 12, 12)),
    (False, 2, 8, 12, 2, 32, (8, 12, 12)),  # schnell-like, non-square grid, batch 2
    (True, 2, 12, 6, 1, 64, (16, 24, 24)),  # one 64-wide head, taller than wide
])
def test_mmdit_flux_matches_diffusers(tmp_path, guidance, batch, h, w, heads, head_dim, axes):
    ref = _mmdit_diffusers_flux(guidance, heads, head_dim, axes)
    ref.save_pretrained(tmp_path)
    ours = mmdit.load_transformer(str(tmp_path))
    assert isinstance(ours, mmdit.Flux) and ours.params.axes_dim == axes and ours.params.guidance_embed == guidance
    inp = _mmdit_flux_inputs(batch, h, w, guidance=guidance)
    with torch.no_grad():
        out, expected = ours(**inp), _mmdit_flux_diffusers_forward(ref, inp)
    assert out.shape == expected.shape == (batch, (h // 2) * (w // 2), 16)
    assert rel(out, expected) <= MMDIT_FP32


@pytest.mark.parametrize("qk_norm,dual,batch,h,w", [
    (None, (), 1, 8, 8),  # SD3-medium-like
    (None, (), 2, 12, 20),  # non-square token grid 6×10, cropped off-centre of the 16×16 stored grid
    ("rms_norm", (), 1, 10, 6),  # SD3.5-large-like: QK RMSNorm
    ("rms_norm", (0, 1), 2, 8, 14),  # SD3.5-medium-like: QK norm + dual attention (not in the pre-only block)
])
def test_mmdit_sd3_matches_diffusers(tmp_path, qk_norm, dual, batch, h, w):
    ref = _mmdit_diffusers_sd3(qk_norm, dual)
    ref.save_pretrained(tmp_path)
    ours = mmdit.load_transformer(str(tmp_path))
    assert isinstance(ours, mmdit.MMDiT)
    assert ours.params.qk_norm == (qk_norm is not None) and ours.params.x_block_self_attn_layers == dual
    inp = _mmdit_sd3_inputs(batch, h, w)
    with torch.no_grad():
        out, expected = ours(**inp), _mmdit_sd3_diffusers_forward(ref, inp)
    assert out.shape == expected.shape == (batch, 4, h, w)
    assert rel(out, expected) <= MMDIT_FP32


def test_mmdit_save_diffusers_layout_loads_in_diffusers(tmp_path):
    """The table read backwards: our weights written in the diffusers layout load strictly into diffusers."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    flux = _mmdit_randomize(mmdit.Flux(mmdit.FluxParams(
        in_channels=16, out_channels=16, vec_in_dim=12, context_in_dim=24, hidden_size=64, num_heads=2, depth=2,
        depth_single_blocks=2, axes_dim=(8, 12, 12))))
    mmdit.save_transformer(flux, str(tmp_path / "flux"), layout="diffusers")
    ref = FluxTransformer2DModel.from_pretrained(str(tmp_path / "flux")).eval()
    inp = _mmdit_flux_inputs(2, 8, 12)
    with torch.no_grad():
        assert rel(flux(**inp), _mmdit_flux_diffusers_forward(ref, inp)) <= MMDIT_FP32

    sd3 = _mmdit_randomize(mmdit.MMDiT(mmdit.SD3Params(
        in_channels=4, out_channels=4, depth=3, hidden_size=128, num_heads=2, adm_in_channels=12, context_in_dim=24,
        pos_embed_max_size=16, qk_norm=True, x_block_self_attn_layers=(1,))))
    mmdit.save_transformer(sd3, str(tmp_path / "sd3"), layout="diffusers")
    ref = SD3Transformer2DModel.from_pretrained(str(tmp_path / "sd3")).eval()
    inp = _mmdit_sd3_inputs(2, 12, 8)
    with torch.no_grad():
        assert rel(sd3(**inp), _mmdit_sd3_diffusers_forward(ref, inp)) <= MMDIT_FP32


# ---------------------------------------------------- the official layout, checked against diffusers' converters


def test_mmdit_sd3_official_layout_through_diffusers_converter():
    """Our state_dict() with the official prefix, converted by diffusers' own SD3 converter, loads strictly into
    diffusers and gives our outputs: our key names, qkv order and (shift, scale) order are the official ones."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    ours = _mmdit_randomize(mmdit.MMDiT(mmdit.SD3Params(
        in_channels=4, out_channels=4, depth=3, hidden_size=128, num_heads=2, adm_in_channels=12, context_in_dim=24,
        pos_embed_max_size=16, qk_norm=True, x_block_self_attn_layers=(0,))))
    checkpoint = {mmdit.OFFICIAL_PREFIX + k: v.clone() for k, v in ours.state_dict().items()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(checkpoint))  # it pops: give it a copy
    ref = SD3Transformer2DModel(**{k: v for k, v in mmdit.diffusers_config(ours.params).items() if k[0] != "_"})
    ref.load_state_dict(converted, strict=True)
    inp = _mmdit_sd3_inputs(2, 10, 12)
    with torch.no_grad():
        assert rel(ours(**inp), _mmdit_sd3_diffusers_forward(ref.eval(), inp)) <= MMDIT_FP32


def test_mmdit_flux_official_layout_through_diffusers_converter():
    """Same for Flux. diffusers' converter splits single_blocks.N.linear1 at fixed rows (3072, 3072, 3072, 12288),
    so the tiny linear1 is spread to those offsets (zeros elsewhere) and the parts trimmed back afterwards;
    everything else (names, [q | k | v] order, the final (shift, scale) swap) goes through it untouched."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    p = mmdit.FluxParams(in_channels=16, out_channels=16, vec_in_dim=12, context_in_dim=24, hidden_size=64,
                         num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(8, 12, 12))
    ours = _mmdit_randomize(mmdit.Flux(p))
    H, mlp, offsets = 64, 256, (0, 3072, 6144, 9216)
    checkpoint = {}
    for k, v in ours.state_dict().items():
        if ".linear1." in k:  # rows [q | k | v | mlp] placed at the converter's offsets
            spread = torch.zeros(21504, *v.shape[1:])
            for i, start in enumerate(offsets):
                size = mlp if i == 3 else H
                spread[start:start + size] = v[i * H:i * H + size]
            v = spread
        checkpoint[mmdit.OFFICIAL_PREFIX + k] = v.clone()
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(checkpoint))
    for k in list(converted):
        if k.startswith("single_transformer_blocks.") and (".to_" in k or ".proj_mlp." in k):
            converted[k] = converted[k][:mlp if ".proj_mlp." in k else H]
    ref = FluxTransformer2DModel(**{k: v for k, v in mmdit.diffusers_config(p).items() if k[0] != "_"})
    ref.load_state_dict(converted, strict=True)
    inp = _mmdit_flux_inputs(2, 8, 12)
    with torch.no_grad():
        assert rel(ours(**inp), _mmdit_flux_diffusers_forward(ref.eval(), inp)) <= MMDIT_FP32


def test_mmdit_official_configs_match_the_checkpoints():
    """The full-size configs, built on the meta device: the tensor counts, parameter counts and key shapes of the
    official flux1-dev / sd3_medium / sd3.5 files, and the config inferred back from those shapes is the same
    config (so dev-style shapes infer guidance_embed=True and schnell-style ones False)."""
    with torch.device("meta"):
        models = {name: (mmdit.Flux(p) if isinstance(p, mmdit.FluxParams) else mmdit.MMDiT(p))
                  for name, p in mmdit.CONFIGS.items()}
    sd = {name: m.state_dict() for name, m in models.items()}
    n_params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert len(sd["flux-dev"]) == 780 and len(sd["flux-schnell"]) == 776
    assert n_params["flux-dev"] == 11_901_408_320
    assert n_params["sd3-medium"] == 2_028_328_000
    flux = {k: tuple(v.shape) for k, v in sd["flux-dev"].items()}
    assert flux["img_in.weight"] == (3072, 64) and flux["txt_in.weight"] == (3072, 4096)
    assert flux["double_blocks.18.img_attn.norm.query_norm.scale"] == (128,)
    assert flux["double_blocks.0.txt_mod.lin.weight"] == (18432, 3072)
    assert flux["double_blocks.0.img_mlp.2.weight"] == (3072, 12288)
    assert flux["single_blocks.37.linear1.weight"] == (21504, 3072)
    assert flux["single_blocks.0.linear2.weight"] == (3072, 15360)
    assert flux["single_blocks.0.modulation.lin.weight"] == (9216, 3072)
    assert flux["final_layer.adaLN_modulation.1.weight"] == (6144, 3072)
    assert flux["guidance_in.out_layer.bias"] == (3072,) and "guidance_in.in_layer.weight" not in sd["flux-schnell"]
    sd3 = {k: tuple(v.shape) for k, v in sd["sd3-medium"].items()}
    assert sd3["pos_embed"] == (1, 36864, 1536) and sd3["x_embedder.proj.weight"] == (1536, 16, 2, 2)
    assert sd3["joint_blocks.23.context_block.adaLN_modulation.1.weight"] == (3072, 1536)  # pre-only: 2-way
    assert "joint_blocks.23.context_block.attn.proj.weight" not in sd3
    assert sd3["final_layer.linear.weight"] == (64, 1536)
    medium = {k: tuple(v.shape) for k, v in sd["sd3.5-medium"].items()}
    assert medium["joint_blocks.12.x_block.adaLN_modulation.1.weight"] == (13824, 1536)  # 9-way with attn2
    assert "joint_blocks.13.x_block.attn2.qkv.weight" not in medium and medium["pos_embed"] == (1, 147456, 1536)
    assert sd["sd3.5-large"]["joint_blocks.0.context_block.attn.ln_k.weight"].shape == (64,)
    for name, state in sd.items():
        family = "flux" if name.startswith("flux") else "sd3"
        assert mmdit.infer_params({k: tuple(v.shape) for k, v in state.items()}, family) == mmdit.CONFIGS[name]


# --------------------------------------------------------------------------------------- loader layouts


def _mmdit_write_sharded(sd: dict, folder, name="model"):
    """An official sharded checkpoint: two shards and a safetensors index json."""
    keys = sorted(sd)
    shards = {f"{name}-00001-of-00002.safetensors": keys[::2], f"{name}-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for file, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, os.path.join(folder, file))
        weight_map.update({k: file for k in ks})
    index = os.path.join(folder, f"{name}.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return index


def test_mmdit_flux_loader_layouts(tmp_path):
    """One tiny Flux written in every layout; each loads through load_transformer to bitwise the same outputs."""
    p = mmdit.FluxParams(in_channels=16, out_channels=16, vec_in_dim=12, context_in_dim=24, hidden_size=64,
                         num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 14, 14))  # default split for 32
    ours = _mmdit_randomize(mmdit.Flux(p))
    sd = {k: v.contiguous() for k, v in ours.state_dict().items()}
    paths = []
    save_file(sd, tmp_path / "plain.safetensors")
    paths.append(tmp_path / "plain.safetensors")
    save_file({mmdit.OFFICIAL_PREFIX + k: v for k, v in sd.items()} | {"vae.extra": torch.zeros(1)},
              tmp_path / "prefixed.safetensors")
    paths.append(tmp_path / "prefixed.safetensors")
    (tmp_path / "sharded").mkdir()
    paths.append(_mmdit_write_sharded(sd, tmp_path / "sharded"))
    paths.append(tmp_path / "sharded")  # the folder: found through its index
    mmdit.save_transformer(ours, str(tmp_path / "pipe" / "transformer"), layout="diffusers")
    paths.append(tmp_path / "pipe")  # a pipeline folder with transformer/
    ref = _mmdit_diffusers_flux(axes=(4, 14, 14))
    ref.load_state_dict(mmdit.to_diffusers(sd, "flux"))
    ref.save_pretrained(tmp_path / "dshard", max_shard_size="40KB")  # diffusers shards + index json
    assert len(list((tmp_path / "dshard").glob("*.safetensors"))) > 1
    paths += [tmp_path / "dshard", next((tmp_path / "dshard").glob("*.index.json"))]

    inp = _mmdit_flux_inputs(2, 8, 12)
    with torch.no_grad():
        expected = ours(**inp)
        for path in paths:
            loaded = mmdit.load_transformer(str(path))
            assert loaded.params == p, path
            # every layout holds the very same numbers (the diffusers table only moves and splits tensors), so
            # loading is exact and the forward is a re-run of the same code on the same tensors: bitwise
            assert all(torch.equal(t, sd[k]) for k, t in loaded.state_dict().items()), path
            assert torch.equal(loaded(**inp), expected), path
    bf16 = mmdit.load_transformer(str(paths[0]), dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in bf16.state_dict().values())
    with torch.no_grad():
        out = bf16(**inp)
    # bf16 weights and activations (eps 2^-8 = 3.9e-3) through 4 blocks: measured 1.2e-2
    assert out.dtype == torch.bfloat16 and rel(out.float(), expected) < 3e-2


def test_mmdit_sd3_loader_layouts(tmp_path):
    """SD3 single files carry the VAE and text encoders next to the denoiser: they are ignored. A head_dim
    other than the official 64 is kept through save_transformer's metadata."""
    p = mmdit.SD3Params(in_channels=4, out_channels=4, depth=2, hidden_size=128, num_heads=2, adm_in_channels=12,
                        context_in_dim=24, pos_embed_max_size=16)
    ours = _mmdit_randomize(mmdit.MMDiT(p))
    sd = {k: v.contiguous() for k, v in ours.state_dict().items()}
    save_file({mmdit.OFFICIAL_PREFIX + k: v for k, v in sd.items()}
              | {"first_stage_model.decoder.conv_in.weight": torch.zeros(2, 2),
                 "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.zeros(3)},
              tmp_path / "sd3_medium_incl_clips.safetensors")
    (tmp_path / "sharded").mkdir()
    index = _mmdit_write_sharded(sd, tmp_path / "sharded")
    inp = _mmdit_sd3_inputs(2, 8, 12)
    with torch.no_grad():
        expected = ours(**inp)
        for path in (tmp_path / "sd3_medium_incl_clips.safetensors", index):
            loaded = mmdit.load_transformer(str(path))
            assert loaded.params == p
            assert all(torch.equal(t, sd[k]) for k, t in loaded.state_dict().items())  # loaded exactly, so the
            assert torch.equal(loaded(**inp), expected)  # forward is a re-run on the same tensors: bitwise

    odd = _mmdit_randomize(mmdit.MMDiT(mmdit.SD3Params(
        in_channels=4, out_channels=4, depth=2, hidden_size=64, num_heads=2, adm_in_channels=12, context_in_dim=24,
        pos_embed_max_size=16)))  # head_dim 32: not inferable from shapes without QK-norm
    mmdit.save_transformer(odd, str(tmp_path / "odd.safetensors"))
    loaded = mmdit.load_transformer(str(tmp_path / "odd.safetensors"))
    assert loaded.params == odd.params
    assert all(torch.equal(t, odd.state_dict()[k]) for k, t in loaded.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded(**inp), odd(**inp))  # same tensors, same code: a re-run


def test_mmdit_sd3_pos_embed_crop():
    """The crop takes the centre window of the stored grid (here a recognisable ramp)."""
    model = mmdit.MMDiT(mmdit.SD3Params(in_channels=4, out_channels=4, depth=1, hidden_size=64, num_heads=1,
                                        adm_in_channels=12, context_in_dim=24, pos_embed_max_size=8))
    with torch.no_grad():
        model.pos_embed.copy_(torch.arange(64.0)[None, :, None].expand(1, 64, 64))  # token index as the value
    crop = model.cropped_pos_embed(3, 4)[0, :, 0]  # top = (8-3)//2 = 2, left = (8-4)//2 = 2
    assert crop.tolist() == [8.0 * r + c for r in range(2, 5) for c in range(2, 6)]


def test_mmdit_sd3_too_large_grid_raises():
    model = mmdit.MMDiT(mmdit.SD3Params(in_channels=4, out_channels=4, depth=1, hidden_size=64, num_heads=1,
                                        adm_in_channels=12, context_in_dim=24, pos_embed_max_size=8))
    inp = _mmdit_sd3_inputs(1, 18, 4)  # 9 × 2 tokens > 8
    with pytest.raises(ValueError, match=r"pos_embed_max_size 8 .*16×16 \(128 px"):
        model(**inp)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(**_mmdit_sd3_inputs(1, 7, 4))


def test_mmdit_loader_errors(tmp_path):
    p = mmdit.FluxParams(in_channels=16, out_channels=16, vec_in_dim=12, context_in_dim=24, hidden_size=64,
                         num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(4, 14, 14))
    sd = {k: v.contiguous() for k, v in mmdit.Flux(p).state_dict().items()}
    missing = dict(sd)
    del missing["double_blocks.0.txt_attn.proj.bias"]
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 \(double_blocks\.0\.txt_attn\.proj\.bias\), unexpected 0"):
        mmdit.load_transformer(str(tmp_path / "missing.safetensors"))
    save_file(sd | {"double_blocks.0.img_attn.extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"unexpected 1 \(double_blocks\.0\.img_attn\.extra\.weight\)"):
        mmdit.load_transformer(str(tmp_path / "extra.safetensors"))
    wrong = dict(sd)
    wrong["single_blocks.0.linear2.weight"] = torch.zeros(64, 10)
    save_file(wrong, tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match=r"single_blocks\.0\.linear2\.weight has shape \(64, 10\)"):
        mmdit.load_transformer(str(tmp_path / "shape.safetensors"))
    save_file({"encoder.conv_in.weight": torch.zeros(2)}, tmp_path / "vae.safetensors")
    with pytest.raises(ValueError, match="not a Flux or SD3 transformer"):
        mmdit.load_transformer(str(tmp_path / "vae.safetensors"))
    with pytest.raises(FileNotFoundError, match="not found"):
        mmdit.load_transformer(str(tmp_path / "absent.safetensors"))
    dsd = mmdit.to_diffusers(sd, "flux")
    del dsd["transformer_blocks.0.attn.to_k.weight"]
    with pytest.raises(ValueError, match=r"missing \['transformer_blocks\.0\.attn\.to_k\.weight'\]"):
        mmdit.from_diffusers(dsd, "flux")
    dev = mmdit.Flux(mmdit.infer_params({k: v.shape for k, v in sd.items()}, "flux"))  # sd has guidance_in: dev
    with pytest.raises(ValueError, match="guidance-distilled"):
        dev(**_mmdit_flux_inputs(1, 4, 4, guidance=False))


def test_mmdit_loader_rejects_broken_files_in_one_line(tmp_path, monkeypatch):
    """Each broken file fails with one ValueError line naming it (or FileNotFoundError naming the index);
    the file-level checks run on every shard before any tensor is read."""
    p = mmdit.FluxParams(in_channels=16, out_channels=16, vec_in_dim=12, context_in_dim=24, hidden_size=64,
                         num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(4, 14, 14))
    model = mmdit.Flux(p)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "flux.safetensors")
    for path in _broken_copies(tmp_path / "flux.safetensors", tmp_path / "broken").values():
        _loader_error(lambda: mmdit.load_transformer(path), path, "not a readable safetensors file")
    key = "img_in.weight"
    inf = sd[key].clone()
    inf[3, 5] = -float("inf")
    for name, value, words in (("int", sd[key].to(torch.int64), "torch.int64, not a floating-point weight"),
                               ("inf", inf, "NaN or inf (as torch.float32)")):
        save_file(sd | {key: value}, tmp_path / f"{name}.safetensors")
        _loader_error(lambda: mmdit.load_transformer(tmp_path / f"{name}.safetensors"),
                      tmp_path / f"{name}.safetensors", key, words)
    mmdit.save_transformer(model, tmp_path / "diffusers", layout="diffusers")
    (tmp_path / "diffusers" / "config.json").write_text('{\n  "_class_name": "FluxTransformer2DModel",,\n}')
    _loader_error(lambda: mmdit.load_transformer(tmp_path / "diffusers"), tmp_path / "diffusers" / "config.json",
                  "unreadable JSON", "line 2 column 43")

    (tmp_path / "sharded").mkdir()
    index = Path(_mmdit_write_sharded(sd, tmp_path / "sharded"))
    good_index = index.read_text()
    for text, words in (("{", "unreadable JSON (Expecting property name"), ('{"weight_map": [1]}', '"weight_map"')):
        index.write_text(text)
        _loader_error(lambda: mmdit.load_transformer(index), index, words)
    index.write_text(good_index.replace("model-00002-of-00002", "gone"))
    _loader_error(lambda: mmdit.load_transformer(index), index, "missing", error=FileNotFoundError)
    index.write_text(good_index)
    shard = tmp_path / "sharded" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    read = []  # spy: every tensor read passes through checked_weight
    monkeypatch.setattr(mmdit, "checked_weight", lambda t, *args, **kw: read.append(args[1]) or t)
    _loader_error(lambda: mmdit.load_transformer(tmp_path / "sharded"), shard, "incomplete metadata")
    assert read == []  # the first shard is intact, yet none of its tensors was read before the second failed


# ------------------------------------------------------------------------------- helpers and training hooks


def test_mmdit_pack_unpack_and_ids():
    lat = torch.randn(2, 16, 6, 10)
    x = mmdit.pack(lat)
    assert x.shape == (2, 15, 64)
    # "b c (h 2) (w 2) -> b (h w) (c 2 2)": token (i, j), channel 4c + 2a + b is latent[c, 2i + a, 2j + b]
    for i, j, c, a, b in [(0, 0, 0, 0, 1), (2, 4, 15, 1, 0), (1, 3, 7, 1, 1)]:
        assert x[1, i * 5 + j, 4 * c + 2 * a + b] == lat[1, c, 2 * i + a, 2 * j + b]
    assert torch.equal(mmdit.unpack(x, 6, 10), lat)
    ids = mmdit.flux_img_ids(6, 10, batch=2)
    assert ids.shape == (2, 15, 3) and ids[0, 7].tolist() == [0.0, 1.0, 2.0]  # token 7 = row 1, col 2
    assert mmdit.flux_txt_ids(4, 2).shape == (2, 4, 3) and not mmdit.flux_txt_ids(4).any()
    with pytest.raises(ValueError, match="even"):
        mmdit.pack(torch.zeros(1, 16, 5, 4))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_mmdit_gradient_checkpointing(family):
    """Checkpointing changes nothing numerically, really recomputes each block in backward, and the block
    lists for FSDP are exposed."""
    if family == "flux":
        model = _mmdit_randomize(mmdit.Flux(mmdit.FluxParams(
            in_channels=16, out_channels=16, vec_in_dim=12, context_in_dim=24, hidden_size=64, num_heads=2, depth=1,
            depth_single_blocks=2, axes_dim=(4, 14, 14))))
        inp = _mmdit_flux_inputs(2, 4, 6)
        assert model.blocks() == [*model.double_blocks, *model.single_blocks]
    else:
        model = _mmdit_randomize(mmdit.MMDiT(mmdit.SD3Params(
            in_channels=4, out_channels=4, depth=2, hidden_size=64, num_heads=1, adm_in_channels=12,
            context_in_dim=24, pos_embed_max_size=8, qk_norm=True, x_block_self_attn_layers=(0,))))
        inp = _mmdit_sd3_inputs(2, 4, 6)
        assert model.blocks() == list(model.joint_blocks)
    calls = []
    for block in model.blocks():
        block.register_forward_pre_hook(lambda *_: calls.append(1))  # recompute stops early: no post-hook
    grads = []
    for on in (False, True):
        model.gradient_checkpointing = on
        model.zero_grad()
        calls.clear()
        model(**inp).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        assert len(calls) == len(model.blocks()) * (2 if on else 1)  # recomputed in backward
    for a, b in zip(*grads):  # the same ops rerun on the same inputs: bitwise equal on CPU; the tolerance only
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)  # admits a backend with nondeterministic reductions


# ====================================================================================================
# text_encoders
# ====================================================================================================

_TEXT_ENCODERS_PROMPTS = [
    "a photo of a cat",
    "café naïve — 東京 😀",
    "",
    "A  Photo\tOF\n a CAT's dog, it's 4096x4096!! <|endoftext|> after",
    " ".join(["astronaut riding a horse"] * 30),  # far over 77 tokens
    "  leading and trailing spaces  ",
    "ｆｕｌｌｗｉｄｔｈ ① and e\u0301 (decomposed)",
]


def _text_encoders_corpus(n=1500, seed=0) -> list[str]:
    rng = random.Random(seed)
    words = ("a photo of the cat dog astronaut riding horse on moon café naïve 東京 city night painting style highly "
             "detailed ultra resolution landscape mountain lake it's 4096 😀 —").split()
    syllables = ["ka", "to", "ri", "ne", "mo", "sa", "lu", "pe", "di", "vo", "gra", "sht", "ph", "qu", "x", "z"]
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    return [" ".join(rng.choice(words) for _ in range(12)) for _ in range(n)]


def _text_encoders_byte_chars() -> list[str]:
    """GPT-2 / CLIP's printable stand-ins for the 256 bytes, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # unprintable bytes are moved past 255, in order
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _text_encoders_write_clip_vocab(folder, merges: list[tuple[str, str]]) -> None:
    """vocab.json + merges.txt laid out as OpenAI's: 256 bytes, 256 bytes + </w>, one token per merge, BOS, EOS."""
    chars = _text_encoders_byte_chars()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def _text_encoders_clip_vocab(tmp_path):
    """A small CLIP-style BPE (merges learned by `tokenizers` with CLIP's normalization and word pattern)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix="</w>", show_progress=False, min_frequency=2)
    tok.train_from_iterator(_text_encoders_corpus(), trainer)
    merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    folder = tmp_path / "clip_vocab"
    _text_encoders_write_clip_vocab(folder, merges)
    return folder


def _text_encoders_hf_clip_tokenizer(folder, pad_token="<|endoftext|>"):
    import transformers

    return transformers.CLIPTokenizer.from_pretrained(str(folder), pad_token=pad_token, model_max_length=77)


def _text_encoders_proto_fields(buf: bytes):
    """(field number, value) of a serialized protobuf message; enough to read a SentencePiece model's charsmap."""
    i = 0
    while i < len(buf):
        key, i = _text_encoders_varint(buf, i)
        kind = key & 7
        if kind == 0:
            value, i = _text_encoders_varint(buf, i)
        elif kind in (1, 5):
            value, i = buf[i: i + (8 if kind == 1 else 4)], i + (8 if kind == 1 else 4)
        elif kind == 2:
            n, i = _text_encoders_varint(buf, i)
            value, i = buf[i: i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {kind}")
        yield key >> 3, value


def _text_encoders_varint(buf: bytes, i: int):
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _text_encoders_spm(tmp_path):
    """A small T5-style SentencePiece unigram model (pad 0, eos 1, unk 2, nmt_nfkc normalization), and the
    transformers T5Tokenizer that transformers' own converter would build from it (it needs protobuf, which is
    not installed: the precompiled charsmap is read here with a few lines of wire-format parsing)."""
    import sentencepiece as spm
    import transformers

    folder = tmp_path / "t5_vocab"
    folder.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_text_encoders_corpus()), model_prefix=str(folder / "spiece"),
                                   vocab_size=256, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    raw = (folder / "spiece.model").read_bytes()
    normalizer_spec = next(v for n, v in _text_encoders_proto_fields(raw) if n == 3)
    charsmap = next(v for n, v in _text_encoders_proto_fields(normalizer_spec) if n == 2)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]  # as transformers' T5Converter
    hf = transformers.T5Tokenizer(vocab=vocab, _spm_precompiled_charsmap=charsmap, extra_ids=100)
    return folder, hf


def _text_encoders_ids(vocab: int, length: int, eos: int, batch: int = 3, seed: int = 0, pad: int | None = None):
    """Token rows shaped like a tokenizer's: BOS-ish start, random tokens, EOS at different places, then padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    for row, end in enumerate(range(2, length, max(1, (length - 2) // batch))[:batch]):
        ids[row, end] = eos
        ids[row, end + 1:] = eos if pad is None else pad
    return ids


def _text_encoders_clip_config(vocab=1000, width=32, layers=3, heads=2, act="quick_gelu", eos=2, projection=None):
    import transformers

    return transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                       num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                                       hidden_act=act, eos_token_id=eos, bos_token_id=0, pad_token_id=1,
                                       projection_dim=projection or width)


def _text_encoders_t5_config(vocab=300, d_model=32, layers=2, heads=4, d_kv=8, d_ff=48):
    import transformers

    return transformers.T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
                                 num_heads=heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                 dropout_rate=0.0)


def _text_encoders_check_clip(ours, ref, ids, projected: bool):
    out = ours(ids, output_hidden_states=True)
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
    # Two implementations in fp32 (ours: SDPA with is_causal; transformers: an explicit causal mask), whose kernels
    # may sum in another order on other hardware or versions: 1e-5 of the tensor's scale, ~100 fp32 roundings.
    # On the CPU the two happen to agree bit for bit (measured 0), which the tolerance does not rely on.
    assert rel(out["last_hidden_state"], r.last_hidden_state) <= 1e-5
    assert len(out["hidden_states"]) == len(r.hidden_states)
    for a, b in zip(out["hidden_states"], r.hidden_states):  # [-2]: SD3's penultimate state
        assert rel(a, b) <= 1e-5
    if projected:
        assert rel(out["text_embeds"], r.text_embeds) <= 1e-5
        pooled = ref.text_model(ids).pooler_output
    else:
        pooled = r.pooler_output
    assert rel(out["pooled"], pooled) <= 1e-5


# ----------------------------------------------------------------------------------------------
# Models


@pytest.mark.parametrize("eos", [2, 500])
def test_text_encoders_clip_matches_transformers(tmp_path, eos):
    """CLIPTextModel (quick_gelu) saved by save_pretrained. eos 2 is the legacy config (pooled at argmax(ids));
    eos 500 < vocab max pools at the first EOS, which the ids make differ from argmax."""
    import transformers

    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(_text_encoders_clip_config(eos=eos)).eval()
    ref.save_pretrained(tmp_path / "clip")
    ours = te.load_clip(tmp_path / "clip")
    assert ours.config.hidden_act == "quick_gelu" and ours.config.eos_token_id == (None if eos == 2 else eos)
    ids = _text_encoders_ids(1000, 77, eos=999 if eos == 2 else eos)
    if eos != 2:
        assert not torch.equal(ids.argmax(-1), (ids == eos).int().argmax(-1))  # the two rules disagree here
    _text_encoders_check_clip(ours, ref, ids, projected=False)


def test_text_encoders_clip_projection_gelu_sharded(tmp_path):
    """CLIPTextModelWithProjection (exact gelu), sharded with an index json."""
    import transformers

    torch.manual_seed(1)
    ref = transformers.CLIPTextModelWithProjection(_text_encoders_clip_config(act="gelu", eos=999, projection=24)).eval()
    ref.save_pretrained(tmp_path / "clip", max_shard_size="50KB")
    assert (tmp_path / "clip" / "model.safetensors.index.json").is_file()
    ours = te.load_clip(tmp_path / "clip")
    assert ours.config.hidden_act == "gelu" and ours.config.projection_dim == 24
    _text_encoders_check_clip(ours, ref, _text_encoders_ids(1000, 77, eos=999, pad=0), projected=True)


def test_text_encoders_t5_matches_transformers(tmp_path):
    """T5EncoderModel, v1.1 style; 300 tokens so relative offsets pass max_distance 128 (the last bucket)."""
    import transformers

    torch.manual_seed(2)
    ref = transformers.T5EncoderModel(_text_encoders_t5_config()).eval()
    ref.save_pretrained(tmp_path / "t5")
    ours = te.load_t5(tmp_path / "t5")
    ids = _text_encoders_ids(300, 300, eos=1, pad=0)
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
    # fp32 both sides, computed in another order (our fp32 residual stream, the bias inside SDPA): 1e-5 of the scale
    # (measured 2e-7)
    assert rel(ours(ids), expected) <= 1e-5


def test_text_encoders_t5_half_precision_does_not_overflow(tmp_path):
    """Feed-forward weights scaled so that gelu(wi_0 x)·wi_1 x exceeds fp16's 65504: our fp16 model stays finite
    and close to transformers' fp32 result; bf16 too."""
    import transformers

    torch.manual_seed(3)
    ref = transformers.T5EncoderModel(_text_encoders_t5_config()).eval()
    with torch.no_grad():
        for block in ref.encoder.block:
            ff = block.layer[1].DenseReluDense
            # rows of norm 400 on RMS-normalized inputs: outputs of a few hundred, products past 65504
            ff.wi_0.weight.mul_(400 / ff.wi_0.weight.norm(dim=1, keepdim=True))
            ff.wi_1.weight.mul_(400 / ff.wi_1.weight.norm(dim=1, keepdim=True))
            ff.wo.weight.mul_(1e-4)
    ref.save_pretrained(tmp_path / "t5")
    ids = _text_encoders_ids(300, 64, eos=1, pad=0)
    with torch.no_grad():
        expected = ref(ids).last_hidden_state

    half = te.load_t5(tmp_path / "t5", dtype=torch.float16)
    assert half.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    captured = {}
    ff = half.encoder.block[0].layer[1].DenseReluDense
    hooks = [ff.wi_0.register_forward_hook(lambda m, i, o: captured.__setitem__("a", o)),
             ff.wi_1.register_forward_hook(lambda m, i, o: captured.__setitem__("b", o))]
    out = half(ids)
    for h in hooks:
        h.remove()
    naive = F.gelu(captured["a"], approximate="tanh") * captured["b"]  # the product formed in fp16
    assert captured["a"].dtype == torch.float16 and torch.isinf(naive).any()  # the test does reach the overflow
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    # fp16 keeps 11 significant bits (≈ 5e-4 per rounding) over 2 blocks of a few roundings each: 1e-2 of the scale
    assert rel(out, expected) <= 1e-2

    bf16 = te.load_t5(tmp_path / "t5", dtype=torch.bfloat16)(ids)
    # bf16 keeps 8 significant bits (≈ 4e-3 per rounding): 5e-2 of the scale
    assert torch.isfinite(bf16).all() and rel(bf16, expected) <= 5e-2


def test_text_encoders_single_files_and_sd3_bundle(tmp_path):
    """Configs inferred from shapes (no config.json): a single-file CLIP-L (legacy `text_model.` keys plus the
    position_ids buffer), and one SD3-style file bundling CLIP-L, CLIP-G (1280 wide → exact gelu, 20 heads) and T5
    (embedding under `encoder.embed_tokens.weight` only) next to unrelated model keys."""
    import transformers

    torch.manual_seed(4)
    clip_l = transformers.CLIPTextModel(_text_encoders_clip_config(width=128, heads=2, eos=2)).eval()
    clip_g = transformers.CLIPTextModelWithProjection(
        _text_encoders_clip_config(width=1280, layers=1, heads=20, act="gelu", eos=2, projection=1280)).eval()
    with torch.no_grad():
        clip_g.text_model.encoder.layers[0].mlp.fc1.weight.mul_(4)  # make gelu vs quick_gelu differ clearly
    t5 = transformers.T5EncoderModel(_text_encoders_t5_config(heads=2, d_kv=24)).eval()  # inner 48 ≠ d_model 32

    def legacy(model):  # transformers ≥ 5 writes a bare CLIPTextModel; real clip_l files have `text_model.`
        sd = {("text_model." + k if not k.startswith(("text_model.", "text_projection.")) else k): v
              for k, v in model.state_dict().items()}
        return {**sd, "text_model.embeddings.position_ids": torch.arange(77)[None]}

    single = {k: v.contiguous() for k, v in legacy(clip_l).items()}
    save_file(single, tmp_path / "clip_l.safetensors")
    bundle = {f"text_encoders.clip_l.transformer.{k}": v for k, v in single.items()}
    bundle |= {f"text_encoders.clip_g.transformer.{k}": v.contiguous() for k, v in legacy(clip_g).items()}
    t5_sd = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in t5.state_dict().items()}
    bundle |= {f"text_encoders.t5xxl.transformer.{k}": v.contiguous() for k, v in t5_sd.items()}
    bundle |= {"model.diffusion_model.x_embedder.proj.weight": torch.zeros(2, 2), "first_stage_model.x": torch.zeros(1)}
    save_file(bundle, tmp_path / "sd3.safetensors")

    ids = _text_encoders_ids(1000, 77, eos=999)
    ours = te.load_clip(tmp_path / "clip_l.safetensors")
    assert (ours.config.num_attention_heads, ours.config.hidden_act) == (2, "quick_gelu")
    _text_encoders_check_clip(ours, clip_l, ids, projected=False)
    _text_encoders_check_clip(te.load_clip(tmp_path / "sd3.safetensors", which="clip_l"), clip_l, ids, projected=False)
    g = te.load_clip(tmp_path / "sd3.safetensors", which="clip_g")
    assert (g.config.num_attention_heads, g.config.hidden_act, g.config.projection_dim) == (20, "gelu", 1280)
    _text_encoders_check_clip(g, clip_g, ids, projected=True)
    t5_ours = te.load_t5(tmp_path / "sd3.safetensors")
    assert (t5_ours.config.num_heads, t5_ours.config.d_kv) == (2, 24)
    t5_ids = _text_encoders_ids(300, 40, eos=1, pad=0)
    with torch.no_grad():  # fp32 both sides, as in test_text_encoders_t5_matches_transformers
        assert rel(t5_ours(t5_ids), t5(t5_ids).last_hidden_state) <= 1e-5
    with pytest.raises(ValueError, match="which="):
        te.load_clip(tmp_path / "sd3.safetensors")  # two CLIPs in the file: ambiguous


def test_text_encoders_loader_errors(tmp_path):
    import transformers

    with pytest.raises(FileNotFoundError, match="not found"):
        te.load_clip(tmp_path / "nope.safetensors")
    transformers.CLIPTextModel(_text_encoders_clip_config()).save_pretrained(tmp_path / "clip")
    sd = load_file(tmp_path / "clip" / "model.safetensors")
    broken = dict(sd)
    broken.pop("encoder.layers.1.mlp.fc2.bias")
    broken["encoder.layers.0.extra.weight"] = torch.zeros(1)
    broken["final_layer_norm.weight"] = torch.zeros(7)
    save_file(broken, tmp_path / "clip" / "model.safetensors")
    with pytest.raises(ValueError) as err:
        te.load_clip(tmp_path / "clip")
    message = str(err.value)
    assert "\n" not in message and "missing (1)" in message and "unexpected (1)" in message and "wrong shape (1)" in message
    with pytest.raises(ValueError, match="model_type"):
        te.load_t5(tmp_path / "clip")  # a CLIP folder given to the T5 loader
    save_file({"encoder.block.0.layer.1.DenseReluDense.wi.weight": torch.zeros(2, 2),
               "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}, tmp_path / "t5_relu.safetensors")
    with pytest.raises(ValueError, match="gated-gelu"):
        te.load_t5(tmp_path / "t5_relu.safetensors")


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_text_encoders_loader_rejects_broken_files_in_one_line(tmp_path, monkeypatch, kind):
    """Each broken file fails with one ValueError line naming it; a truncated shard fails while the files are
    opened, before any tensor is read."""
    import transformers

    if kind == "clip":
        load, model = te.load_clip, transformers.CLIPTextModel(_text_encoders_clip_config())
        key = "final_layer_norm.weight"
    else:
        load, model = te.load_t5, transformers.T5EncoderModel(_text_encoders_t5_config())
        key = "encoder.final_layer_norm.weight"
    model.save_pretrained(tmp_path / "single")
    good = tmp_path / "single" / "model.safetensors"
    for path in _broken_copies(good, tmp_path / "broken").values():
        _loader_error(lambda: load(path), path, "not a readable safetensors file")
    sd = load_file(good)
    nan = sd[key].clone()
    nan[7] = float("nan")
    for name, value, words in (("int", sd[key].to(torch.int16), "torch.int16, not a floating-point weight"),
                               ("nan", nan, "NaN or inf (as torch.float32)")):
        save_file(sd | {key: value}, tmp_path / f"{name}.safetensors")
        _loader_error(lambda: load(tmp_path / f"{name}.safetensors"), tmp_path / f"{name}.safetensors", key, words)
    config = tmp_path / "single" / "config.json"
    config.write_text(config.read_text()[:-20])
    _loader_error(lambda: load(tmp_path / "single"), config, "unreadable JSON", "line")

    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    good_index = index.read_text()
    for text, words in (("{", "unreadable JSON (Expecting property name"), ('{"weight_map": [1]}', '"weight_map"')):
        index.write_text(text)
        _loader_error(lambda: load(tmp_path / "sharded"), index, words)
    index.write_text(good_index)
    shard = sorted((tmp_path / "sharded").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    read = []  # spy: every tensor is read through _Weights.tensor
    monkeypatch.setattr(te._Weights, "tensor", lambda self, k, **to: read.append(k))
    _loader_error(lambda: load(tmp_path / "sharded"), shard, "incomplete metadata")
    assert read == []


# ----------------------------------------------------------------------------------------------
# Tokenizers


def test_text_encoders_clip_tokenizer_matches_transformers(tmp_path):
    """vocab.json + merges.txt and tokenizer.json, padded with EOS (CLIP-L) and with "!" = id 0 (CLIP-G)."""
    folder = _text_encoders_clip_vocab(tmp_path)
    vocab = json.loads((folder / "vocab.json").read_text())
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    hf = _text_encoders_hf_clip_tokenizer(folder)
    expected = torch.tensor(hf(_TEXT_ENCODERS_PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids)
    # transformers with pad_token="!" would also read the text's "!" as the pad token (see CLIPTokenizer), so the
    # CLIP-G reference is the EOS-padded one with its padding set to 0
    lengths = torch.tensor([len(r) for r in hf(_TEXT_ENCODERS_PROMPTS, max_length=77, truncation=True).input_ids])
    expected_g = expected.masked_fill(torch.arange(77) >= lengths[:, None], 0)
    assert (expected_g[:, -1] != eos).any()  # some rows are padded
    for pad, want in (("<|endoftext|>", expected), ("!", expected_g)):
        hf_pad = _text_encoders_hf_clip_tokenizer(folder, pad_token=pad)
        hf_pad.save_pretrained(tmp_path / f"hf_{vocab[pad]}")  # its tokenizer.json registers "!" as special
        for source in (folder, tmp_path / f"hf_{vocab[pad]}" / "tokenizer.json"):
            ours = te.CLIPTokenizer(source, pad_token=pad)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = ours(_TEXT_ENCODERS_PROMPTS)
                ours(_TEXT_ENCODERS_PROMPTS)
            assert got.shape == (len(_TEXT_ENCODERS_PROMPTS), 77) and got.dtype == torch.long
            assert torch.equal(got, want), source  # token ids: one wrong id is a wrong token, so exact
            assert len([w for w in caught if "truncated" in str(w.message)]) == 1  # once per tokenizer
    # the pad token written by transformers next to tokenizer.json is used when none is given
    assert te.CLIPTokenizer(tmp_path / f"hf_{vocab['!']}").pad_id == 0
    assert te.CLIPTokenizer(tmp_path / f"hf_{vocab['!']}")(["!!"])[0, :3].tolist() == [bos, vocab["!"], vocab["!</w>"]]
    row = te.CLIPTokenizer(folder)([""])[0]
    assert row[0] == bos and (row[1:] == eos).all()  # BOS, EOS, EOS padding
    with pytest.warns(UserWarning, match="truncated"):
        long = te.CLIPTokenizer(folder, pad_token=0)([_TEXT_ENCODERS_PROMPTS[4]])[0]
    assert long[0] == bos and long[-1] == eos and (long[1:-1] != eos).all()  # truncated, EOS kept


def test_text_encoders_t5_tokenizer_matches_transformers(tmp_path):
    """spiece.model through sentencepiece, and the tokenizer.json transformers writes, against transformers'
    T5Tokenizer: EOS 1 appended, padding 0, truncation keeping EOS."""
    folder, hf = _text_encoders_spm(tmp_path)
    expected = torch.tensor(hf(_TEXT_ENCODERS_PROMPTS, padding="max_length", max_length=32, truncation=True).input_ids)
    hf.save_pretrained(tmp_path / "hf_t5")
    for source in (folder, tmp_path / "hf_t5"):
        ours = te.T5Tokenizer(source, max_length=32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = ours(_TEXT_ENCODERS_PROMPTS)
        assert torch.equal(got, expected), source  # token ids: exact
        assert len([w for w in caught if "truncated" in str(w.message)]) == 1
    assert te.T5Tokenizer(folder, max_length=8)([""]).tolist() == [[1, 0, 0, 0, 0, 0, 0, 0]]
    with pytest.warns(UserWarning, match="truncated"):
        assert te.T5Tokenizer(folder, max_length=8)(["astronaut " * 20])[0, -1] == 1  # EOS survives truncation


# ----------------------------------------------------------------------------------------------
# Conditioners


def _text_encoders_pipeline_parts(tmp_path):
    """Tiny CLIP-L (identity projection, as diffusers gives SD3's CLIP-L), CLIP-G, T5 and their tokenizers, saved
    as a diffusers-style folder, with the transformers objects for the peer pipelines."""
    import transformers

    clip_folder = _text_encoders_clip_vocab(tmp_path)
    t5_folder, t5_hf = _text_encoders_spm(tmp_path)
    tok_l = _text_encoders_hf_clip_tokenizer(clip_folder)
    tok_g = _text_encoders_hf_clip_tokenizer(clip_folder, pad_token="!")
    vocab, eos = len(tok_l), tok_l.eos_token_id
    torch.manual_seed(5)
    clip_l = transformers.CLIPTextModelWithProjection(_text_encoders_clip_config(vocab, 32, eos=eos)).eval()
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(32))
    clip_g = transformers.CLIPTextModelWithProjection(
        _text_encoders_clip_config(vocab, 48, heads=3, act="gelu", eos=eos, projection=40)).eval()
    t5 = transformers.T5EncoderModel(_text_encoders_t5_config(vocab=len(t5_hf), d_model=96, d_kv=16)).eval()
    root = tmp_path / "pipe"
    for name, obj in (("text_encoder", clip_l), ("text_encoder_2", clip_g), ("text_encoder_3", t5),
                      ("tokenizer", tok_l), ("tokenizer_2", tok_g), ("tokenizer_3", t5_hf)):
        obj.save_pretrained(root / name)
    return root, dict(text_encoder=clip_l, text_encoder_2=clip_g, text_encoder_3=t5, tokenizer=tok_l,
                      tokenizer_2=tok_g, tokenizer_3=t5_hf)


@pytest.mark.filterwarnings("ignore:.*prompt truncated")
def test_text_encoders_conditioners_match_diffusers(tmp_path):
    """SD3 (context, pooled, and the "" negative) against StableDiffusion3Pipeline.encode_prompt; Flux (txt, vec)
    against FluxPipeline.encode_prompt; SD3 without T5 against the zero-padded manual computation."""
    import diffusers
    import transformers

    root, parts = _text_encoders_pipeline_parts(tmp_path)
    prompts = ["a photo of a cat", _TEXT_ENCODERS_PROMPTS[4]]
    cpu = torch.device("cpu")
    sd3 = te.SD3Conditioner(te.load_clip(root / "text_encoder"), te.load_clip(root / "text_encoder_2"),
                            te.CLIPTokenizer(root / "tokenizer", pad_token="<|endoftext|>"),
                            te.CLIPTokenizer(root / "tokenizer_2", pad_token=0), te.load_t5(root / "text_encoder_3"),
                            te.T5Tokenizer(root / "tokenizer_3", max_length=40))
    assert sd3.encoders == [sd3.clip_l, sd3.clip_g, sd3.t5]
    pipe = diffusers.StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, **parts)
    with torch.no_grad():
        ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, device=cpu, negative_prompt="",
                                                              do_classifier_free_guidance=True, max_sequence_length=40)
    out, neg = sd3(prompts), sd3.negative(2)
    assert out["context"].shape == (2, 77 + 40, 96) and out["pooled"].shape == (2, 32 + 40)
    # same fp32 models through two implementations: 1e-5 of the scale
    for a, b in ((out["context"], ctx), (out["pooled"], pooled), (neg["context"], neg_ctx), (neg["pooled"], neg_pooled)):
        assert rel(a, b) <= 1e-5
    assert (out["context"][:, :77, 32 + 48:] == 0).all()  # the zero padding of the CLIP features: exactly zero

    no_t5 = te.SD3Conditioner(sd3.clip_l, sd3.clip_g, sd3.clip_l_tokenizer, sd3.clip_g_tokenizer, t5_length=40,
                              context_dim=96)(prompts)
    l_ids = torch.tensor(parts["tokenizer"](prompts, padding="max_length", max_length=77, truncation=True).input_ids)
    g_ids = torch.tensor(parts["tokenizer_2"](prompts, padding="max_length", max_length=77, truncation=True).input_ids)
    with torch.no_grad():
        rl = parts["text_encoder"](l_ids, output_hidden_states=True)
        rg = parts["text_encoder_2"](g_ids, output_hidden_states=True)
    manual = F.pad(torch.cat([rl.hidden_states[-2], rg.hidden_states[-2]], -1), (0, 96 - 80))
    manual = torch.cat([manual, torch.zeros(2, 40, 96)], 1)
    assert rel(no_t5["context"], manual) <= 1e-5  # as above: the same fp32 CLIPs, two implementations
    assert (no_t5["context"][:, 77:] == 0).all()  # no T5: zeros, exactly
    assert rel(no_t5["pooled"], torch.cat([rl.text_embeds, rg.text_embeds], -1)) <= 1e-5

    flux = te.FluxConditioner(te.load_clip(root / "text_encoder"), te.load_t5(root / "text_encoder_3"),
                              te.CLIPTokenizer(root / "tokenizer"), te.T5Tokenizer(root / "tokenizer_3", max_length=40))
    clip_plain = transformers.CLIPTextModel(parts["text_encoder"].config).eval()
    clip_plain.load_state_dict(parts["text_encoder"].text_model.state_dict())
    fpipe = diffusers.FluxPipeline(transformer=None, scheduler=None, vae=None, text_encoder=clip_plain,
                                   tokenizer=parts["tokenizer"], text_encoder_2=parts["text_encoder_3"],
                                   tokenizer_2=parts["tokenizer_3"])
    with torch.no_grad():
        txt, vec, _ = fpipe.encode_prompt(prompts, None, device=cpu, max_sequence_length=40)
    got = flux(prompts, dtype=torch.float64)
    assert got["txt"].dtype == torch.float64 and got["txt"].shape == (2, 40, 96) and got["vec"].shape == (2, 32)
    assert rel(got["txt"], txt) <= 1e-5 and rel(got["vec"], vec) <= 1e-5  # fp32 models, two implementations


# ====================================================================================================
# CLIPScore and Aesthetics
# ====================================================================================================

# (H, W): resized longer side minus 224 ≡ 1, 0, 2, 0 (mod 4) for the first four, 3 for the last four (those
# are cut one pixel apart by transformers' ⌊·⌋ and torchvision's round-half-even); 97 × 500 and 61 × 64 are
# enlarged; 224 × 224 is not resized at all.
_CLIP_SIZES = [(300, 257), (224, 224), (97, 500), (1000, 333), (224, 227), (235, 224), (403, 260), (61, 64)]
_CLIP_CAPTIONS = ["a photo of a cat", "a dog", "city lights at night", "", "astronaut riding a horse",
                  "a red square on grass", "café naïve — 東京", "mountains under snow"]


def _clip_images(seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in _CLIP_SIZES]


@pytest.fixture(scope="module")
def _clip_folder(tmp_path_factory):
    """A tiny random CLIPModel saved by transformers (model.safetensors, tokenizer.json), laid out as openai's:
    quick_gelu, eos_token_id 2 (text pooled at the highest token id), 77 positions, 224² images in 32² patches;
    projection 768, so the aesthetic predictor's head fits it as it is."""
    import transformers

    tmp = tmp_path_factory.mktemp("clip")
    vocab = _text_encoders_clip_vocab(tmp)
    torch.manual_seed(0)
    text = dict(vocab_size=len(json.loads((vocab / "vocab.json").read_text())), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=2)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=32)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)
    transformers.CLIPModel(config).save_pretrained(tmp / "model")
    _text_encoders_hf_clip_tokenizer(vocab).save_pretrained(tmp / "model")
    return tmp / "model"


def _clip_peer(folder):
    import transformers

    return transformers.CLIPModel.from_pretrained(str(folder)).eval(), transformers.CLIPTokenizer.from_pretrained(str(folder))


def _clip_reference_pixels(image, round_crop=False) -> torch.Tensor:
    """transformers' CLIPImageProcessor, Pillow path (the one transformers 4.45 ran for the paper); round_crop: its
    resize, then torchvision CenterCrop's offset int(round((side − 224) / 2.0)) (the OpenAI clip package's)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    x = CLIPImageProcessorPil()(images=image, do_center_crop=not round_crop, return_tensors="pt").pixel_values
    top, left = (int(round((side - 224) / 2.0)) for side in x.shape[-2:])
    return x[..., top : top + 224, left : left + 224]


@torch.no_grad()
def _clip_reference_scores(hf, images, input_ids) -> torch.Tensor:
    """torchmetrics 1.5.1's _clip_score_update on transformers' CLIPModel, per pair, clamped at 0 as its
    clip_score does for one image."""
    e_i = hf.get_image_features(pixel_values=torch.cat([_clip_reference_pixels(im) for im in images])).pooler_output
    e_t = hf.get_text_features(input_ids=input_ids).pooler_output
    e_i, e_t = e_i / e_i.norm(p=2, dim=-1, keepdim=True), e_t / e_t.norm(p=2, dim=-1, keepdim=True)
    return (100 * (e_i * e_t).sum(-1)).clamp(min=0)


def test_clip_preprocessing_matches_transformers(tmp_path):
    images = _clip_images()
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    inputs = images + [Image.fromarray(images[3]), tmp_path / "a.png", Image.fromarray(images[2]).convert("RGBA")]
    peers = images + [images[3], images[0], images[2]]
    for image, peer in zip(inputs, peers):
        for round_crop in (False, True):
            got = metrics.clip_pixels(image, round_crop=round_crop)
            # the same Pillow resize and the same float32 arithmetic (x / 255 equals numpy's x · (1/255) in float64
            # rounded to float32 for all 256 values): bitwise
            assert got.shape == (1, 3, 224, 224) and torch.equal(got, _clip_reference_pixels(peer, round_crop))
    differs = [not metrics.clip_pixels(im, round_crop=True).equal(metrics.clip_pixels(im)) for im in images]
    assert differs == [False] * 4 + [True] * 4  # the two rules apart where the margin is 3 (mod 4)


def test_clip_towers_and_score_match_transformers(_clip_folder, tmp_path):
    """Image tower, both projections and clip_score against transformers' CLIPModel and torchmetrics' formula;
    images of every size, as arrays, a PIL image and a file; batches of 3 (not a divisor of 8)."""
    model, (hf, hf_tok) = metrics.load_clip_model(_clip_folder), _clip_peer(_clip_folder)
    images = _clip_images()
    pixels = torch.cat([metrics.clip_pixels(im) for im in images])
    encoded = hf_tok(_CLIP_CAPTIONS, padding=True, return_tensors="pt").input_ids
    ids, cut = model.tokenize(_CLIP_CAPTIONS)
    assert not cut.any() and torch.equal(ids[:, : encoded.shape[1]], encoded)  # token ids: exact
    assert (ids[:, encoded.shape[1] :] == model.tokenizer.eos_id).all()  # EOS padding, as openai's tokenizers pad
    with torch.no_grad():
        # float32 towers computed in a different order (SDPA vs. eager softmax attention): 1e-5 is ~100× the
        # float32 rounding of these few layers, and far below any error in a weight or a layer
        assert rel(model.vision(pixels), hf.get_image_features(pixel_values=pixels).pooler_output) <= 1e-5
        assert rel(model.text(ids)["text_embeds"], hf.get_text_features(input_ids=encoded).pooler_output) <= 1e-5
    Image.fromarray(images[5]).save(tmp_path / "f.png")
    inputs = images[:4] + [Image.fromarray(images[4]), tmp_path / "f.png"] + images[6:]
    got = metrics.clip_score(inputs, _CLIP_CAPTIONS, model, batch_size=3)
    want = _clip_reference_scores(hf, images, encoded)
    assert got.shape == (8,) and (want == 0).any() and (want > 0).any()  # both sides of the clamp at 0
    assert rel(got, want) <= 1e-5  # as above
    with pytest.raises(ValueError, match="one caption per image"):
        metrics.clip_score(images, _CLIP_CAPTIONS[:3], model)


def test_clip_score_truncates_captions_as_torchmetrics(_clip_folder):
    """Over 77 tokens with BOS and EOS: torchmetrics keeps the first 77 (EOS gone, so the text is read at BOS, the
    highest id left); keep_eos=True ends them with EOS as transformers' truncation=True does. One warning each."""
    model, (hf, hf_tok) = metrics.load_clip_model(_clip_folder), _clip_peer(_clip_folder)
    captions = [" ".join(["a"] * 75), " ".join(["a"] * 76), _TEXT_ENCODERS_PROMPTS[4], "a photo of a cat"]
    assert [len(ids) for ids in hf_tok(captions).input_ids][:3] == [77, 78, 122]  # fits, one over, far over
    images = _clip_images()[:4]
    full = hf_tok(captions, padding=True, return_tensors="pt").input_ids[:, :77]  # what torchmetrics 1.5.1 does
    kept = hf_tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    for keep_eos, peer_ids, how in ((False, full, "read at BOS"), (True, kept, "ending in EOS")):
        ids, cut = model.tokenize(captions, keep_eos=keep_eos)
        assert cut.tolist() == [False, True, True, False] and torch.equal(ids, peer_ids)  # token ids: exact
        with pytest.warns(UserWarning, match=f"2 of 4 captions are longer than 77 tokens .*{how}"):
            got = metrics.clip_score(images, captions, model, keep_eos=keep_eos)
        assert rel(got, _clip_reference_scores(hf, images, peer_ids)) <= 1e-5  # float32, as in the test above
    with torch.no_grad():
        pooled = model.text(full[1:3])["text_embeds"]
    assert torch.equal(pooled[0], pooled[1])  # cut without EOS, both captions are the BOS state alone


def test_clip_aesthetic_score_matches_its_definition(_clip_folder, tmp_path):
    """The MLP as the improved-aesthetic-predictor repository defines it (Linear, Dropout, ... keys layers.N),
    on transformers' unit-normalised image embeddings of the OpenAI clip package's crop."""
    from torch import nn

    torch.manual_seed(1)
    head = nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1)).eval()
    file = tmp_path / metrics.AESTHETIC_HEAD_FILE
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, file)
    model = metrics.load_aesthetic(_clip_folder, file)
    hf, _ = _clip_peer(_clip_folder)
    images = _clip_images(seed=2)
    with torch.no_grad():
        e = hf.get_image_features(pixel_values=torch.cat([_clip_reference_pixels(im, True) for im in images]))
        want = head(e.pooler_output / e.pooler_output.norm(dim=-1, keepdim=True))[:, 0]
    got = metrics.aesthetic_score(images, model, batch_size=5)
    assert got.shape == (8,) and rel(got, want) <= 1e-5  # float32, two implementations (as for CLIPScore)


def test_clip_missing_or_wrong_files(_clip_folder, tmp_path, monkeypatch):
    import re

    with pytest.raises(FileNotFoundError, match=r"config.json and model.safetensors .*nowhere.*huggingface.co/openai/"
                                                r"clip-vit-base-patch16"):
        metrics.load_clip_model(tmp_path / "nowhere")
    (tmp_path / "bin").mkdir()
    shutil.copy(_clip_folder / "config.json", tmp_path / "bin")
    with pytest.raises(FileNotFoundError, match="needs model.safetensors"):
        metrics.load_clip_model(tmp_path / "bin")  # e.g. a folder with pytorch_model.bin only
    # None: the Hugging Face cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--openai--clip-vit-large-patch14"
    with pytest.raises(FileNotFoundError, match=f"looked in {repo / 'snapshots'}; .*clip-vit-large-patch14"):
        metrics.load_aesthetic(None, tmp_path / "head.pth")
    (repo / "snapshots").mkdir(parents=True)
    (repo / "snapshots" / "old").mkdir()
    (repo / "snapshots" / "new").symlink_to(_clip_folder)  # the cache links its snapshot files the same way
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("new")
    with pytest.raises(FileNotFoundError, match=f"needs {re.escape(metrics.AESTHETIC_HEAD_FILE)}; looked for "
                                                f"{re.escape(str(tmp_path / 'head.pth'))}; .*improved-aesthetic"):
        metrics.load_aesthetic(None, tmp_path / "head.pth")  # the CLIP folder was found: the head is missing
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "torch" / "hub" / "checkpoints"))):
        metrics.load_aesthetic()
    torch.save({"layers.0.weight": torch.zeros(1024, 512)}, tmp_path / "head.pth")
    with pytest.raises(ValueError, match=r"head.pth: weights do not fit Sequential: missing \(9\).*wrong shape \(1\): "
                                         r"layers.0.weight \[1024, 512\] \(expected \[1024, 768\]\)"):
        metrics.load_aesthetic(None, tmp_path / "head.pth")
    # a text tower alone (CLIPTextModelWithProjection's keys) is no image tower
    save_file({k: v for k, v in load_file(_clip_folder / "model.safetensors").items() if k.startswith("text_")},
              tmp_path / "bin" / "model.safetensors")
    with pytest.raises(ValueError, match=r"no CLIP image tower with its projection \(visual_projection.weight\)"):
        metrics.load_clip_model(tmp_path / "bin")


# --------------------------------------------------------------------------------------------------
# The paper's protocol: sample.py --prompts, then metrics.py --fid --clip-score --aesthetics


def _protocol_resize_reference(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize re-derived in float64 (Pillow's and torch's algorithm, one axis at a time): output
    pixel i takes the triangle filter, stretched by the scale when shrinking, centred at (i + 0.5)·scale."""
    def axis(x: np.ndarray, n_out: int, dim: int) -> np.ndarray:
        n_in = x.shape[dim]
        scale = n_in / n_out
        support = max(scale, 1.0)
        weights = np.zeros((n_out, n_in))
        for i in range(n_out):
            center = (i + 0.5) * scale
            lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
            j = np.arange(lo, hi)
            w = np.maximum(0, 1 - np.abs((j - center + 0.5) / support))
            weights[i, lo:hi] = w / w.sum()
        return np.moveaxis(np.tensordot(weights, np.moveaxis(x, dim, 0), axes=1), 0, dim)

    return axis(axis(rgb.astype(np.float64), hw[1], 1), hw[0], 0)


def test_metrics_protocol_resize_center_crop():
    rng = np.random.default_rng(0)
    for (h, w), size, hw in (((90, 130), 64, (64, 92)), ((130, 90), 64, (92, 64)), ((50, 70), 64, (64, 89))):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got = metrics.resize_center_crop(rgb, size)
        want = _protocol_resize_reference(rgb, hw)
        top, left = round((hw[0] - size) / 2), round((hw[1] - size) / 2)  # 14 and 12.5 -> 12 (half to even)
        want = want[top : top + size, left : left + size]
        # float32 in torch against float64 here, then rounded to uint8: a value within 1e-4 of .5 may round the
        # other way, so 1 is the bound, and such ties are rare
        assert got.shape == (size, size, 3) and np.abs(got.astype(int) - np.round(want)).max() <= 1
        assert (got == np.round(want)).mean() > 0.99
    rgb = rng.integers(0, 256, (64, 67, 3), dtype=np.uint8)  # no resize; crop offsets round(1.5) = 2, round(0.5) = 0
    assert np.array_equal(metrics.resize_center_crop(rgb, 64), rgb[:, 2:66])
    assert np.array_equal(metrics.resize_center_crop(rgb[:, :65], 64), rgb[:, :64])


def test_metrics_protocol_jpeg_sizes_as_the_authors(tmp_path, capsys):
    """A folder of JPEG q95 files: the compression ratio is the authors' eval.py formula, H·W·3·N / Σ file sizes;
    a folder mixing in other files says so and re-encodes those."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "gen"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=95)
    assert metrics.saved_at_q95(folder / "0.jpg")
    assert metrics.main([str(folder), "--json", str(tmp_path / "r.json"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]
    sizes = [os.path.getsize(folder / f"{i}.jpg") for i in range(3)]
    assert summary["jpeg_sizes"] == "files" and summary["compression_ratio_of_totals"] == pytest.approx(
        64 * 96 * 3 * 3 / sum(sizes), rel=1e-12)  # the same division: only the float summation order may differ
    assert "the JPEG q95 files' own sizes" in capsys.readouterr().out
    Image.open(folder / "0.jpg").save(folder / "0.jpg", quality=90)
    Image.open(folder / "1.jpg").save(folder / "1.png")
    assert not metrics.saved_at_q95(folder / "0.jpg") and not metrics.saved_at_q95(folder / "1.png")
    assert metrics.main([str(folder), "--json", str(tmp_path / "r.json"), "--quiet"]) == 0
    rows = {r["file"]: r for r in json.loads((tmp_path / "r.json").read_text())["images"]}
    assert {k: r["jpeg_from"] for k, r in rows.items()} == {"0.jpg": "encoded", "1.jpg": "file", "1.png": "encoded",
                                                            "2.jpg": "file"}
    assert "mixed" in json.dumps(json.loads((tmp_path / "r.json").read_text())["summary"])


@pytest.fixture(scope="module")
def _protocol_set(tmp_path_factory, _metrics_fid, _clip_folder):
    """An evaluation set (real images of several sizes + metadata.jsonl), its images generated by the tiny model
    through sample.py --prompts, and the weight files of the three networks."""
    tmp = tmp_path_factory.mktemp("protocol")
    rng = np.random.default_rng(3)
    rows = [{"file_name": f"{i}.png", "text": text} for i, text in
            enumerate(["a red fox in snow", "a blue car", "a lighthouse at dawn", "two cats on a sofa"])]
    (tmp / "eval").mkdir()
    for row, (h, w) in zip(rows, [(80, 100), (100, 70), (64, 64), (90, 90)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp / "eval" / row["file_name"])
    meta = _sample_metadata(tmp / "eval" / "metadata.jsonl", rows)
    assert sample.main(["--prompts", str(meta), "--out", str(tmp / "gen"), *_SAMPLE_TINY]) == 0
    torch.manual_seed(2)
    head = {f"layers.{i}.{k}": 0.05 * torch.randn(o, n) if k == "weight" else torch.zeros(o)
            for i, (n, o) in zip((0, 2, 4, 6, 7), [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)])
            for k in ("weight", "bias")}
    torch.save(head, tmp / metrics.AESTHETIC_HEAD_FILE)
    flags = ["--inception", str(_metrics_fid[0]), "--clip-model", str(_clip_folder), "--aesthetic-clip",
             str(_clip_folder), "--aesthetic-head", str(tmp / metrics.AESTHETIC_HEAD_FILE), "--quiet"]
    return tmp, rows, head, flags


def test_metrics_protocol_end_to_end(_protocol_set, _metrics_fid, _clip_folder, capsys, monkeypatch):
    """The two commands of the README on the tiny model; the FID statistics, CLIPScore and Aesthetics of each image
    against the peers (torch-fidelity's InceptionV3, transformers' CLIPModel) on the same crops. The distance itself
    is pytorch-fid's (test_metrics_fid_frechet_distance_matches_pytorch_fid); a sqrtm of 2048² takes ~30 s on two
    cores, so a spy records what the CLI hands it and what it returns, instead of a second one."""
    import re

    from torch import nn

    tmp, rows, head, flags = _protocol_set
    stats, out = tmp / "ref.npz", tmp / "scores.json"
    distance, handed = metrics.frechet_distance, []
    monkeypatch.setattr(metrics, "frechet_distance", lambda *a: handed.append((a, distance(*a))) or handed[-1][1])
    args = [str(tmp / "gen"), "--ref", str(tmp / "eval"), "--prompts", str(tmp / "eval" / "metadata.jsonl"),
            "--fid", "--clip-score", "--aesthetics", "--size", "64", "--batch-size", "3", *flags]
    assert metrics.main([*args, "--ref-stats", str(stats), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"FID +CLIPScore +Aesthetics +GLCM +CR\n", printed)  # the row of Tables 1-2
    assert "4 generated against 4 real images" in printed
    result = json.loads(out.read_text())
    s, by_file = result["summary"], {r["file"]: r for r in result["images"]}
    assert sorted(by_file) == [f"{i}.jpg" for i in range(4)] and s["jpeg_sizes"] == "files"
    assert [x["file"] for x in result["skipped"]] == ["--ref metadata.jsonl"]  # listed, not scored

    gen = [metrics.load_image(tmp / "gen" / f"{i}.jpg") for i in range(4)]  # 64² already: the crop is the identity
    real = [metrics.resize_center_crop(metrics.load_image(tmp / "eval" / r["file_name"]), 64) for r in rows]
    extractor = _metrics_fid[2]
    ((mu_g, sigma_g, mu_r, sigma_r), fid), = handed
    for (mu, sigma), side in (((mu_g, sigma_g), gen), ((mu_r, sigma_r), real)):
        f = np.concatenate([extractor(_metrics_chw(np.array(a)))[0].numpy() for a in side]).astype(np.float64)
        # features equal to ~1e-7 (see _METRICS_FID_RTOL), their means and covariances as closely
        assert rel(mu, f.mean(0)) <= 1e-5 and rel(sigma, np.cov(f, rowvar=False)) <= 1e-5
    assert s["fid"] > 0 and s["fid"] == fid  # what the distance returned is what is reported

    hf, hf_tok = _clip_peer(_clip_folder)
    ids = hf_tok([r["text"] for r in rows], padding=True, return_tensors="pt").input_ids
    clip = _clip_reference_scores(hf, gen, ids)
    got = torch.tensor([by_file[f"{i}.jpg"]["clip_score"] for i in range(4)])
    assert rel(got, clip) <= 1e-5 and s["clip_score_mean"] == pytest.approx(clip.mean().item(), rel=1e-5)  # fp32
    mlp = nn.Sequential(nn.Linear(768, 1024), nn.Dropout(), nn.Linear(1024, 128), nn.Dropout(), nn.Linear(128, 64),
                        nn.Dropout(), nn.Linear(64, 16), nn.Linear(16, 1)).eval()
    mlp.load_state_dict({k.removeprefix("layers."): v for k, v in head.items()})
    with torch.no_grad():
        e = hf.get_image_features(pixel_values=torch.cat([_clip_reference_pixels(a, True) for a in gen])).pooler_output
        aesthetic = mlp(e / e.norm(dim=-1, keepdim=True))[:, 0]
    assert rel(torch.tensor([by_file[f"{i}.jpg"]["aesthetic"] for i in range(4)]), aesthetic) <= 1e-5  # fp32

    # The saved statistics stand in for --ref: the same numbers reach the distance (a file round trip: bitwise)
    monkeypatch.setattr(metrics, "frechet_distance", lambda *a: handed.append((a, 1.0)) or 1.0)
    assert metrics.main([str(tmp / "gen"), "--fid", "--ref-stats", str(stats), "--size", "64", *flags]) == 0
    assert all(np.array_equal(a, b) for a, b in zip(handed[1][0], handed[0][0]))
    with np.load(stats) as z:
        assert int(z["n"]) == 4 and int(z["size"]) == 64 and str(z["resize"]) == "tf1"
    capsys.readouterr()
    assert metrics.main([str(tmp / "gen"), "--fid", "--ref-stats", str(stats), "--size", "128", *flags]) == 2
    assert "made with {'size': 64, 'resize': 'tf1'}, this run uses {'size': 128" in capsys.readouterr().err


def test_metrics_protocol_errors(_protocol_set, tmp_path, capsys):
    """Each a one-line error with exit 2, before any network is loaded or any image scored."""
    tmp, rows, head, flags = _protocol_set
    gen = str(tmp / "gen")
    other = _sample_metadata(tmp_path / "other.jsonl", [{"file_name": "x.png", "text": "x"}])
    bad = _sample_metadata(tmp_path / "bad.jsonl", [{"file_name": "0.png"}])
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(tmp / "gen" / "0.jpg", one)
    cases = [
        ([gen, "--fid"], "--fid compares with the real images: give --ref DIR"),
        ([gen, "--clip-score"], "--clip-score scores each image against its caption: give --prompts"),
        ([gen, "--clip-score", "--prompts", str(other)], f"--prompts {other}: no caption for 4 image(s) under"),
        ([gen, "--clip-score", "--prompts", str(bad)], f"{bad}:1: not a {{\"file_name\": ..., \"text\": ...}} object"),
        ([gen, "--fid", "--ref", str(tmp / "eval"), "--inception", str(tmp_path / "none.pth")],
         f"looked for {tmp_path / 'none.pth'}"),
        ([gen, "--size", "10"], "--size must be at least 64, got 10"),
        ([gen, "--ref", str(tmp / "eval"), "--fid", "--lpips"], "--lpips compares image pairs"),
        ([gen, "--ref-stats", str(tmp_path / "s.npz")], "no such file; with --fid and --ref it is written"),
        ([str(one), "--fid", "--ref", str(tmp / "eval"), *flags], "FID needs at least 2 readable generated images"),
    ]
    for argv, message in cases:
        assert metrics.main([*argv, "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)



# ====================================================================================================
# sample
# ====================================================================================================

def _sample_diffusers_scheduler(**kwargs):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**kwargs)


@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096, 16384, 65536])
@pytest.mark.parametrize("steps", [4, 28, 50])
def test_sample_flux_schedule_matches_diffusers(image_seq_len, steps):
    # FLUX.1-dev's scheduler config in diffusers: dynamic exponential shift through (256, 0.5), (4096, 1.15).
    scheduler = _sample_diffusers_scheduler(
        use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15
    )
    mu = sample.flux_mu(image_seq_len)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # as FluxPipeline calls it
    ours = sample.flux_schedule(steps, image_seq_len)
    # diffusers computes in fp32 (ulp 6e-8 near 1); we compute in fp64.
    torch.testing.assert_close(ours, scheduler.sigmas.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[:-1] * 1000, scheduler.timesteps.double(), rtol=1e-6, atol=0)
    assert ours[0] == 1 and ours[-1] == 0


def test_sample_flux_mu_at_4096():
    # 4096² with the F16 autoencoder: 256² latents packed 2×2 -> 16384 tokens, and by hand
    # mu = 0.5 + (1.15 − 0.5)·(16384 − 256)/(4096 − 256) = 0.5 + 0.65·4.2 = 3.23; 1e-9 allows fp64 round-off only.
    assert sample.flux_mu(16384) == pytest.approx(3.23, abs=1e-9)


def test_sample_schnell_schedule_is_unshifted():
    # The same linspace in fp64: default fp64 tolerances (rtol 1e-7) allow round-off only.
    torch.testing.assert_close(sample.flux_schedule(4, 16384, shift=False), torch.linspace(1, 0, 5, dtype=torch.float64))


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_sample_sd3_schedule_matches_diffusers(steps):
    scheduler = _sample_diffusers_scheduler(shift=3.0)  # SD3's scheduler config
    scheduler.set_timesteps(steps)
    ours = sample.sd3_schedule(steps)
    torch.testing.assert_close(ours, scheduler.sigmas.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[:-1] * 1000, scheduler.timesteps.double(), rtol=1e-6, atol=0)


def test_sample_euler_matches_diffusers_step():
    # One Euler step of ours against the scheduler's step() with the same velocity.
    scheduler = _sample_diffusers_scheduler(shift=3.0)
    scheduler.set_timesteps(6)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    v = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = x.clone()
    for t in scheduler.timesteps:
        expected = scheduler.step(v, t, expected).prev_sample
    ours = sample.denoise(lambda x_, s: v, x.double(), sample.sd3_schedule(6))
    torch.testing.assert_close(ours.float(), expected, rtol=0, atol=1e-5)  # fp32 round-off over 6 steps


def test_sample_noise_is_seeded_on_cpu():
    from diffusers.utils.torch_utils import randn_tensor

    a = sample.get_noise(2, 64, 96, 16, seed=7)
    assert a.shape == (2, 16, 4, 6) and a.dtype == torch.float32
    # diffusers' pipelines draw their latents with a seeded CPU generator the same way: the same draw, so exact.
    assert torch.equal(a, randn_tensor((2, 16, 4, 6), generator=torch.Generator("cpu").manual_seed(7)))
    assert torch.equal(a, sample.get_noise(2, 64, 96, 16, seed=7))  # a re-run: exact
    assert not torch.equal(a, sample.get_noise(2, 64, 96, 16, seed=8))


# ---------------------------------------------------------------------------------------------------------
# End to end on tiny random weight directories


def _sample_text_encoders(root, *, clip_g: bool, t5_dim: int):
    """Tiny CLIP-L (and CLIP-G) and T5 made by transformers (test-only), their tokenizers, written to `root`
    in both layouts: transformers folders text_encoder*/ and single official-style files."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip_dir, t5_dir = sample.tiny_tokenizer_files(root / "_tokenizers")
    vocab = len(json.loads((clip_dir / "vocab.json").read_text()))
    clip_cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=1, max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1)
    models = {"clip_l": CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg, projection_dim=64))}
    if clip_g:
        # quick_gelu: a config-less file this narrow is read as OpenAI-style CLIP (the real CLIP-G is 1280 wide).
        models["clip_g"] = CLIPTextModelWithProjection(CLIPTextConfig(**{**clip_cfg, "hidden_size": 128,
                                                                         "num_attention_heads": 2}, projection_dim=128))
    models["t5"] = T5EncoderModel(T5Config(vocab_size=100, d_model=t5_dim, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                           feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    return models, clip_dir, t5_dir


def _sample_write_weights(root, family: str, layout: str, parts):
    """A weights directory for a tiny `family` model in the official or diffusers layout."""
    models, clip_dir, t5_dir, transformer, ae = parts
    root.mkdir(parents=True, exist_ok=True)
    folders = {"flux": {"clip_l": "text_encoder", "t5": "text_encoder_2"},
               "sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}}[family]
    tokenizers = {"flux": [("tokenizer", clip_dir), ("tokenizer_2", t5_dir)],
                  "sd3": [("tokenizer", clip_dir), ("tokenizer_2", clip_dir), ("tokenizer_3", t5_dir)]}[family]
    for name, src in tokenizers:
        shutil.copytree(src, root / name)
    if layout == "diffusers":
        (root / "model_index.json").write_text("{}")
        mmdit.save_transformer(transformer, str(root / "transformer"), layout="diffusers")
        vae.save_vae(ae, root / "vae")
        for key, folder in folders.items():
            models[key].save_pretrained(root / folder)
        return root
    files = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5": "t5xxl_fp16.safetensors"}
    if family == "flux":
        mmdit.save_transformer(transformer, str(root / "flux1-dev.safetensors"))
        vae.save_vae(ae, root / "ae.safetensors")
    else:  # one checkpoint with the transformer and the autoencoder, the text encoders in text_encoders/
        sd = {f"model.diffusion_model.{k}": v.contiguous() for k, v in transformer.state_dict().items()}
        sd.update({f"first_stage_model.{k}": v.contiguous() for k, v in ae.state_dict().items()})
        save_file(sd, str(root / "sd3_medium.safetensors"))
    for key in folders:
        target = root / ("text_encoders" if family == "sd3" else ".") / files[key]
        target.parent.mkdir(exist_ok=True)
        save_file({k: v.clone().contiguous() for k, v in models[key].state_dict().items()}, str(target))
    return root


def _sample_tiny_ae(stride, config):
    torch.manual_seed(1)
    # 32 channels, 32 groups: official single files carry no group count, and the loader assumes 32.
    params = replace(vae.VAE_CONFIGS[config], ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1,
                                 stride=stride)
    return vae.AutoEncoder(params)


@pytest.fixture(scope="module")
def _sample_flux_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    models, clip_dir, t5_dir = _sample_text_encoders(root, clip_g=False, t5_dim=64)
    torch.manual_seed(2)
    transformer = mmdit.Flux(mmdit.FluxParams(vec_in_dim=64, context_in_dim=64, hidden_size=64, mlp_ratio=4.0,
                                              num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(8, 12, 12)))
    parts = (models, clip_dir, t5_dir, transformer, _sample_tiny_ae(stride=2, config="flux"))
    return {layout: _sample_write_weights(root / layout, "flux", layout, parts) for layout in ("official", "diffusers")}


@pytest.fixture(scope="module")
def _sample_sd3_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    models, clip_dir, t5_dir = _sample_text_encoders(root, clip_g=True, t5_dim=256)
    torch.manual_seed(3)
    transformer = mmdit.MMDiT(mmdit.SD3Params(depth=2, hidden_size=128, num_heads=2, adm_in_channels=64 + 128,
                                              context_in_dim=256, pos_embed_max_size=16))
    parts = (models, clip_dir, t5_dir, transformer, _sample_tiny_ae(stride=1, config="sd3"))
    return {layout: _sample_write_weights(root / layout, "sd3", layout, parts) for layout in ("official", "diffusers")}


def _sample_run(args, tmp_path, name="img.png"):
    out = tmp_path / name
    code = sample.main([*args, "--out", str(out), "--device", "cpu"])
    return code, out


def _sample_assert_same_pixels_up_to_rounding(a, b):
    """The same weights in two layouts reach the GEMMs with different memory layouts, so fp32 sums may round
    differently (relative 1e-6 or so). Quantized to 8 bits, that moves a value only where it lies within that
    round-off of a rounding boundary: by one level, at a handful of values. So: at most one level, at most 1% of
    the values. A wrong key mapping or a transposed weight moves most values by many levels."""
    diff = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (diff.max(), (diff > 0).mean())


def test_sample_flux_both_layouts_same_png(_sample_flux_dirs, tmp_path):
    common = ["a red fox", "--model", "flux-dev", "--width", "96", "--height", "64", "--steps", "3", "--vae", "f16",
              "--seed", "5"]
    code, official = _sample_run([*common, "--weights", str(_sample_flux_dirs["official"])], tmp_path, "a.png")
    assert code == 0
    code, diffusers_png = _sample_run([*common, "--weights", str(_sample_flux_dirs["diffusers"])], tmp_path, "b.png")
    assert code == 0
    code, again = _sample_run([*common, "--weights", str(_sample_flux_dirs["official"])], tmp_path, "c.png")
    a, b, c = (Image.open(p) for p in (official, diffusers_png, again))
    assert a.size == (96, 64) and a.mode == "RGB"
    assert a.text["prompt"] == "a red fox" and a.text["seed"] == "5" and a.text["model"] == "flux-dev"
    assert a.text["steps"] == "3" and a.text["guidance"] == "3.5" and a.text["vae"] == "F16"
    assert np.array_equal(np.asarray(a), np.asarray(c))  # a re-run of the same computation: exact
    _sample_assert_same_pixels_up_to_rounding(a, b)  # same weights and seed, other layout
    assert np.asarray(a).std() > 0  # not a blank image
    code, other = _sample_run([*common[:-1], "6", "--weights", str(_sample_flux_dirs["official"])], tmp_path, "d.png")
    assert not np.array_equal(np.asarray(a), np.asarray(Image.open(other)))
    # The atomic writer's temp files (hidden, beside the target) are gone: the folder holds the four PNGs only.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png", "d.png"]


def test_sample_sd3_cfg_path(_sample_sd3_dirs, tmp_path):
    """SD3 end to end in both layouts, and the CFG arithmetic against a manual loop stepped by diffusers' scheduler."""
    common = ["a blue car", "--model", "sd3-medium", "--width", "64", "--height", "64", "--steps", "2", "--seed", "1"]
    pngs = []
    for layout in ("official", "diffusers"):
        code, out = _sample_run([*common, "--weights", str(_sample_sd3_dirs[layout])], tmp_path, f"{layout}.png")
        assert code == 0
        pngs.append(np.asarray(Image.open(out)))
    assert pngs[0].shape == (64, 64, 3) and pngs[0].std() > 0
    _sample_assert_same_pixels_up_to_rounding(*pngs)  # one bundled checkpoint vs diffusers folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusers.png", "official.png"]  # no temp files left

    pipe = sample.load_pipeline("sd3-medium", _sample_sd3_dirs["official"], device="cpu", dtype=torch.float32)
    images, _ = sample.generate(pipe, "a blue car", width=64, height=64, steps=2, guidance=7.0, seed=1, progress=False)
    scheduler = _sample_diffusers_scheduler(shift=3.0)
    scheduler.set_timesteps(2)
    pos, neg = pipe.conditioner(["a blue car"]), pipe.conditioner([""])
    x = sample.get_noise(1, 64, 64, 8, seed=1)
    with torch.no_grad():
        for t in scheduler.timesteps:
            cond = pipe.transformer(x, t[None], pos["pooled"], pos["context"])
            uncond = pipe.transformer(x, t[None], neg["pooled"], neg["context"])
            x = scheduler.step(uncond + 7.0 * (cond - uncond), t, x).prev_sample
        expected = pipe.ae.decode(x).clamp(-1, 1)
    # Batched CFG vs two separate passes, fp64 vs fp32 schedule: fp32 round-off only.
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-4)
    assert not torch.allclose(images, sample.generate(pipe, "a blue car", width=64, height=64, steps=2, guidance=1.0,
                                                      seed=1, progress=False)[0])


def test_sample_tiny_runs_without_weights(tmp_path, monkeypatch):
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))  # where tiny writes its tokenizer files for a moment
    code, out = _sample_run(["x", "--model", "tiny", "--width", "64", "--height", "96", "--steps", "1"], tmp_path)
    assert code == 0 and Image.open(out).size == (64, 96)
    assert list(temp.iterdir()) == []  # nothing left behind


@pytest.mark.parametrize("args, message", [
    (["p", "--model", "flux-dev"], "needs --weights"),
    (["p", "--model", "flux-dev", "--weights", "/nonexistent/dir"], "weights directory not found"),
    (["p", "--model", "dalle"], "unknown model"),
    (["p", "--model", "tiny", "--width", "100"], "multiples of 32"),
    (["p", "--model", "tiny", "--steps", "0"], "--steps"),
])
def test_sample_errors_are_one_line(args, message, tmp_path, capsys):
    code, out = _sample_run(args, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert err[-1].startswith("error: ") and message in err[-1], err


def test_sample_missing_piece_is_named(_sample_flux_dirs, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(_sample_flux_dirs["official"], broken)
    (broken / "ae.safetensors").unlink()
    code, out = _sample_run(["p", "--model", "flux-dev", "--weights", str(broken)], tmp_path)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "autoencoder not found" in err and "ae.safetensors" in err and str(broken) in err


def test_sample_sd3_grid_limit_is_a_clear_error(_sample_sd3_dirs, tmp_path, capsys):
    # pos_embed_max_size 16 tokens per side = 256 px with the F8 autoencoder and 2×2 patches.
    code, _ = _sample_run(["p", "--model", "sd3-medium", "--weights", str(_sample_sd3_dirs["official"]),
                           "--width", "320", "--height", "64", "--steps", "1"], tmp_path)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "pos_embed_max_size 16" in err


# ---------------------------------------------------------------------------------------------------------
# --prompts (the paper's evaluation set: one image per metadata.jsonl line), and what the CLI refuses up front

_SAMPLE_TINY = ["--model", "tiny", "--width", "64", "--height", "64", "--steps", "2", "--device", "cpu"]


def _sample_tree(root: Path) -> dict:
    """Every entry under `root`, hidden temp files included: path -> (inode, bytes), or None for a folder."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.read_bytes()) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def _sample_metadata(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_sample_prompts_generate_the_evaluation_set(tmp_path, capsys):
    """One JPEG (quality 95) per line, named after file_name in its folder; a second run skips them all; a deleted
    image comes back bit for bit (the same computation); each equals the single-prompt CLI's image at seed 0."""
    rows = {"a.jpg": {"file_name": "a.jpg", "text": "a red fox"},
            "sub/b.jpg": {"file_name": "sub/b.png", "text": "a blue car"},
            "c.jpg": {"file_name": "c", "text": "a lighthouse at dawn"}}
    meta = _sample_metadata(tmp_path / "metadata.jsonl", [*rows.values()][:2] + [""] + [rows["c.jpg"]])
    gen = tmp_path / "gen"
    assert sample.main(["--prompts", str(meta), "--out", str(gen), *_SAMPLE_TINY]) == 0
    first = _sample_tree(gen)
    assert sorted(k for k, v in first.items() if v) == sorted(rows)  # and no temp files
    Image.new("RGB", (64, 64)).save(tmp_path / "q95.jpg", quality=95)
    q95 = Image.open(tmp_path / "q95.jpg").quantization
    for name, row in rows.items():
        image = Image.open(gen / name)
        assert image.format == "JPEG" and image.size == (64, 64) and image.quantization == q95
        assert json.loads(image.info["comment"])["prompt"] == row["text"] and np.asarray(image).std() > 0
    assert not np.array_equal(np.asarray(Image.open(gen / "a.jpg")), np.asarray(Image.open(gen / "c.jpg")))

    single = tmp_path / "single.jpg"
    assert sample.main(["a red fox", "--seed", "0", "--out", str(single), *_SAMPLE_TINY]) == 0
    assert single.read_bytes() == first["a.jpg"][1]  # the same prompt, seed and computation: the same bytes

    capsys.readouterr()
    assert sample.main(["--prompts", str(meta), "--out", str(gen), *_SAMPLE_TINY]) == 0
    assert _sample_tree(gen) == first  # the same files, not rewritten (inodes kept: atomic_write would replace)
    assert "0 written, 3 already there" in capsys.readouterr().err

    (gen / "sub/b.jpg").unlink()  # (its inode number may be reused: only the bytes can tell)
    assert sample.main(["--prompts", str(meta), "--out", str(gen), *_SAMPLE_TINY]) == 0
    again = _sample_tree(gen)
    assert {k: v and v[1] for k, v in again.items()} == {k: v and v[1] for k, v in first.items()}
    assert again["a.jpg"] == first["a.jpg"] and again["c.jpg"] == first["c.jpg"]
    assert "1 written, 2 already there" in capsys.readouterr().err


def test_sample_prompts_torchrun_splits_the_same_images(tmp_path):
    """torchrun --nproc_per_node 2 (CPU): rank r takes lines r, r + 2, ...; the seed belongs to the prompt, so the
    files equal one process's bit for bit (both on one thread, as torchrun's ranks run here: the same computation)."""
    meta = _sample_metadata(tmp_path / "metadata.jsonl", [{"file_name": f"{i}.jpg", "text": f"prompt {i}"}
                                                          for i in range(3)])
    args = ["--prompts", str(meta), *_SAMPLE_TINY]
    run = _train_wlf_run([*args, "--out", str(tmp_path / "n2")], 2, tmp_path, script=sample.__file__)
    assert sorted(run.stdout.split()) == [str(tmp_path / "n2" / f"{i}.jpg") for i in range(3)]  # each once
    assert "rank 0 of 2: 2 written" in run.stderr and "rank 1 of 2: 1 written" in run.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in _train_wlf_run
    try:
        assert sample.main([*args, "--out", str(tmp_path / "n1")]) == 0
    finally:
        torch.set_num_threads(threads)
    one, two = _sample_tree(tmp_path / "n1"), _sample_tree(tmp_path / "n2")
    assert sorted(one) == ["0.jpg", "1.jpg", "2.jpg"] and {k: v[1] for k, v in one.items()} == \
        {k: v[1] for k, v in two.items()}


_SAMPLE_PROMPT_FILES = {
    "good.jsonl": ['{"file_name": "a.jpg", "text": "x"}'],
    "bad.jsonl": ['{"file_name": "a.jpg", "text": "x"}', "", '{"file_name": "b.jpg", "text": '],
    "notext.jsonl": ['{"file_name": "a.jpg", "caption": "x"}'],
    "escape.jsonl": ['{"file_name": "../a.jpg", "text": "x"}'],
    "twice.jsonl": ['{"file_name": "a.jpg", "text": "x"}', '{"file_name": "a.png", "text": "y"}'],
    "empty.jsonl": [""],
}


@pytest.mark.parametrize("args, message", [
    (["p", "--out", "{tmp}/folder.png"], "--out {tmp}/folder.png is a folder: give an image file name"),
    (["p", "--out", "{tmp}/file/x.png"], "--out {tmp}/file/x.png: {tmp}/file is a file, not a folder"),
    (["--prompts", "{tmp}/good.jsonl", "--out", "{tmp}/file"], "--out {tmp}/file: {tmp}/file is a file, not a folder"),
    (["p", "--out", "{tmp}/x.webp"], "--out {tmp}/x.webp: name a .png, .jpg or .jpeg file"),
    (["p", "--out", "{tmp}/x.png", "--format", "jpg"], "name a .png, .jpg or .jpeg file for --format jpg"),
    (["p", "--quality", "101"], "--quality must be in 1..100, got 101"),
    (["p", "--device", "foo"], "--device foo: use cpu, cuda or cuda:N"),
    pytest.param(["p", "--device", "cuda"], "--device cuda: no CUDA GPU is available here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["p", "--width", "0"], "--width must be at least 1, got 0"),
    (["p", "--height", "-64"], "--height must be at least 1, got -64"),
    (["p", "--seed", "-1"], "--seed must be in 0..4294967295"),
    (["p", "--seed", str(2**32)], "--seed must be in 0..4294967295"),
    (["--prompts", "{tmp}/bad.jsonl"], '{tmp}/bad.jsonl:3: not a {"file_name": ..., "text": ...} object'),
    (["--prompts", "{tmp}/notext.jsonl"], "{tmp}/notext.jsonl:1: not a {\"file_name\": ..., \"text\": ...} object "
                                          "(KeyError: 'text')"),
    (["--prompts", "{tmp}/escape.jsonl"], "{tmp}/escape.jsonl:1: file_name '../a.jpg' is not a path inside"),
    (["--prompts", "{tmp}/twice.jsonl"], "{tmp}/twice.jsonl:2: file_name 'a.png' names the same image as line 1"),
    (["--prompts", "{tmp}/empty.jsonl"], "--prompts {tmp}/empty.jsonl: no prompts in it"),
    (["--prompts", "{tmp}/missing.jsonl"], "cannot read {tmp}/missing.jsonl: No such file or directory"),
    (["p", "--prompts", "{tmp}/good.jsonl"], "give one prompt or --prompts FILE"),
    (["--prompts", "{tmp}/good.jsonl", "--num-images", "2"], "--num-images: --prompts makes one image per prompt"),
])
def test_sample_bad_arguments_fail_before_loading(args, message, tmp_path, capsys, monkeypatch):
    """One line, exit 2, before any weights load (load_pipeline would fail the test), nothing written."""
    for name, lines in _SAMPLE_PROMPT_FILES.items():
        _sample_metadata(tmp_path / name, lines)
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file").write_text("")
    monkeypatch.chdir(tmp_path)  # the default --out is relative
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: pytest.fail("loaded the weights"))
    before = _sample_tree(tmp_path)
    code = sample.main([arg.replace("{tmp}", str(tmp_path)) for arg in args] + ["--model", "tiny"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert message.replace("{tmp}", str(tmp_path)) in err[0]
    assert _sample_tree(tmp_path) == before


def test_sample_read_only_output_fails_before_loading(tmp_path, capsys, monkeypatch):
    meta = _sample_metadata(tmp_path / "metadata.jsonl", _SAMPLE_PROMPT_FILES["good.jsonl"])
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):
        pytest.skip("this user writes into read-only folders (root)")
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: pytest.fail("loaded the weights"))
    for args in (["p", "--out", str(read_only / "x.png")], ["--prompts", str(meta), "--out", str(read_only / "gen")]):
        assert sample.main([*args, *_SAMPLE_TINY]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err == [f"error: --out {args[-1]}: cannot write in {read_only} (read-only)"]
    assert list(read_only.iterdir()) == []


def test_sample_ambiguous_weight_files_are_refused(_sample_flux_dirs, tmp_path, capsys):
    """Two files matching flux1-dev*.safetensors: refused, naming both; --transformer chooses one, and the image is
    the one the unambiguous folder gives (the same file, the same computation: the same bytes)."""
    official = _sample_flux_dirs["official"]
    weights = tmp_path / "w"
    weights.mkdir()
    for p in official.iterdir():
        (weights / p.name).symlink_to(p)
    (weights / "flux1-dev-wlf.safetensors").symlink_to(official / "flux1-dev.safetensors")
    common = ["p", "--model", "flux-dev", "--width", "64", "--height", "64", "--steps", "2", "--vae", "f16",
              "--device", "cpu"]
    assert sample.main([*common, "--weights", str(weights), "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: flux-dev transformer: 2 files in {weights} match flux1-dev*.safetensors (flux1-dev-wlf.safetensors, "
        "flux1-dev.safetensors); choose one with --transformer FILE"]
    chosen = ["--weights", str(weights), "--transformer", str(weights / "flux1-dev-wlf.safetensors")]
    assert sample.main([*common, *chosen, "--out", str(tmp_path / "chosen.png")]) == 0
    assert sample.main([*common, "--weights", str(official), "--out", str(tmp_path / "plain.png")]) == 0
    assert (tmp_path / "chosen.png").read_bytes() == (tmp_path / "plain.png").read_bytes()
    (weights / "t5xxl_fp8.safetensors").symlink_to(official / "t5xxl_fp16.safetensors")
    capsys.readouterr()
    assert sample.main([*common, *chosen, "--out", str(tmp_path / "y.png")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: T5-XXL text encoder: 2 files in {weights} match t5xxl*.safetensors (t5xxl_fp16.safetensors, "
        "t5xxl_fp8.safetensors); leave only the one to use in the folder")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_sample_nan_weights_write_nothing(_sample_flux_dirs, tmp_path, capsys, monkeypatch):
    """A NaN weight would make NaN images, saved as flat black ones with exit 0: the loader refuses the file, and
    images that still come out non-finite (an fp16 overflow, say) are refused before anything is written."""
    official = _sample_flux_dirs["official"]
    state = load_file(str(official / "flux1-dev.safetensors"))
    state["img_in.weight"] = torch.full_like(state["img_in.weight"], float("nan"))
    save_file(state, str(tmp_path / "nan.safetensors"))
    meta = _sample_metadata(tmp_path / "metadata.jsonl", _SAMPLE_PROMPT_FILES["good.jsonl"])
    common = ["--model", "flux-dev", "--weights", str(official), "--width", "64", "--height", "64", "--steps", "2",
              "--vae", "f16", "--device", "cpu"]
    runs = (["p", "--out", str(tmp_path / "x.png")], ["--prompts", str(meta), "--out", str(tmp_path / "gen")])
    for args in runs:
        assert sample.main([*args, *common, "--transformer", str(tmp_path / "nan.safetensors")]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: {tmp_path / 'nan.safetensors'}: img_in.weight holds NaN or inf (as torch.float32)")
    monkeypatch.setattr(vae.AutoEncoder, "decode", lambda self, z, **kw: torch.full((len(z), 3, 64, 64), float("nan")))
    for args in runs:
        assert sample.main([*args, *common]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            "error: the images hold NaN or inf (non-finite weights, or an fp16 overflow: try --dtype bf16 or fp32); "
            "none written")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "gen").exists()


# ====================================================================================================
# offload (streamed blocks)
# ====================================================================================================
# Bitwise equality with the unstreamed model is the right check on the CPU: a streamed block computes with the
# same values, in the same dtype, through the same kernels; only the addresses differ (views into a slot, each
# 256-byte aligned, as the originals are ≥ 64-byte aligned by the CPU allocator, so the same SIMD paths run).


class _OffloadFp8Linear(torch.nn.Module):
    """A Linear whose weight is an fp8 buffer with an fp32 scale: what fp8 weight storage looks like to the
    streamer (tensors of several dtypes, buffers as well as parameters)."""

    def __init__(self, dim):
        super().__init__()
        w = torch.randn(dim, dim) / dim ** 0.5
        self.register_buffer("weight", (w / w.abs().max() * 448).to(torch.float8_e4m3fn))
        self.register_buffer("scale", w.abs().max() / 448)
        self.bias = torch.nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return F.linear(x, self.weight.float() * self.scale, self.bias)


def _offload_flux(depth=2, single=3):
    torch.manual_seed(0)
    model = _mmdit_randomize(mmdit.Flux(mmdit.FluxParams(  # no zero-initialized gates: every block matters
        vec_in_dim=32, context_in_dim=32, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=depth,
        depth_single_blocks=single, axes_dim=(8, 12, 12))))
    inputs = dict(img=torch.randn(1, 16, 64), img_ids=mmdit.flux_img_ids(8, 8), txt=torch.randn(1, 8, 32),
                  txt_ids=mmdit.flux_txt_ids(8), timesteps=torch.tensor([0.5]), y=torch.randn(1, 32),
                  guidance=torch.tensor([3.5]))
    return model.eval(), inputs


def _offload_models():
    """Tiny Flux (double and single blocks of different sizes), SD3.5-medium-like MMDiT (dual-attention first
    block, pre-only last block: three block shapes) and a stack of fp8 Linears, each with its inputs."""
    flux, flux_inputs = _offload_flux()
    torch.manual_seed(1)
    sd3 = _mmdit_randomize(mmdit.MMDiT(mmdit.SD3Params(depth=3, hidden_size=64, num_heads=2, adm_in_channels=32,
                                                       context_in_dim=32, pos_embed_max_size=8, qk_norm=True,
                                                       x_block_self_attn_layers=(0,)))).eval()
    sd3_inputs = (torch.randn(2, 16, 8, 8), torch.tensor([500.0, 20.0]), torch.randn(2, 32), torch.randn(2, 5, 32))
    fp8 = torch.nn.Sequential(*[_OffloadFp8Linear(16) for _ in range(4)]).eval()
    return [(flux, flux.blocks(), flux_inputs), (sd3, sd3.blocks(), sd3_inputs), (fp8, list(fp8), (torch.randn(3, 16),))]


def _offload_call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


@pytest.mark.parametrize("ahead", [0, 1, 2, 7])
def test_offload_streamed_model_is_the_same_and_holds_k_plus_1_blocks(ahead):
    """The streamed model computes what the plain one does: the same weights, at other addresses, so the CPU's
    GEMMs may split or peel their sums differently over several threads (fp32 round-off, ≤ 1e-5 relative; one
    thread gives bitwise the same). Per block call, counted from outside: the computing block is resident (its
    tensors are views into a slot, not its CPU tensors), at most ahead + 1 blocks are resident, exactly that many
    once the window is full, over two forwards (the window wraps from the last block to the first); afterwards
    every tensor is back where it was."""
    for model, blocks, inputs in _offload_models():
        with torch.inference_mode():
            expected = _offload_call(model, inputs)
        home = {id(b): [t.data_ptr() for t in [*b.parameters(), *b.buffers()]] for b in blocks}
        everything = [t.data_ptr() for t in [*model.parameters(), *model.buffers()]]
        counts = []
        with offload.stream_blocks(model, blocks, "cpu", ahead=ahead) as streamer:
            slots = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in streamer.slots]

            def resident(block):
                ptrs = [t.data_ptr() for t in [*block.parameters(), *block.buffers()]]
                if ptrs == home[id(block)]:
                    return False
                assert all(any(lo <= p < hi for lo, hi in slots) for p in ptrs)  # all of it inside a slot
                return True

            def check(block, args):
                assert resident(block)  # the block computes from its device copy
                counts.append(sum(resident(b) for b in blocks))

            hooks = [b.register_forward_pre_hook(check) for b in blocks]  # after the streamer's own hook
            with torch.inference_mode():
                outputs = [_offload_call(model, inputs) for _ in range(2)]
            for hook in hooks:
                hook.remove()
        assert len(streamer.slots) == min(ahead + 1, len(blocks))
        assert len(counts) == 2 * len(blocks) and max(counts) == min(ahead + 1, len(blocks)), counts
        assert all(rel(out, expected) <= 1e-5 for out in outputs)
        assert [t.data_ptr() for t in [*model.parameters(), *model.buffers()]] == everything


def test_offload_recovers_from_an_error_mid_forward():
    """A forward that raises inside a block leaves the window half-advanced: the next forward (block 0 first
    again) still computes the same output, and leaving the context puts every tensor back."""
    model, inputs = _offload_flux()
    with torch.inference_mode():
        expected = model(**inputs)
    home = [t.data_ptr() for t in model.parameters()]
    with offload.stream_blocks(model, model.blocks(), "cpu", ahead=1) as streamer:
        hook = model.blocks()[3].register_forward_pre_hook(lambda m, a: 1 / 0)
        with pytest.raises(ZeroDivisionError), torch.inference_mode():
            model(**inputs)
        hook.remove()
        assert sorted(streamer.resident) == [3, 4]
        with torch.inference_mode():
            assert rel(model(**inputs), expected) <= 1e-5  # other addresses: see the test above
    assert [t.data_ptr() for t in model.parameters()] == home
    with pytest.raises(ValueError, match="ahead must be at least 0"), offload.stream_blocks(model, [], "cpu", -1):
        pass
    with torch.device("meta"):
        on_meta = mmdit.Flux(mmdit.FluxParams(vec_in_dim=8, context_in_dim=8, hidden_size=32, num_heads=2, depth=1,
                                              depth_single_blocks=1, axes_dim=(4, 6, 6)))
    with pytest.raises(ValueError, match="the blocks must be on the CPU"):
        with offload.stream_blocks(on_meta, on_meta.blocks(), "cpu"):
            pass


def test_offload_blocks_cli_same_image_as_no_offload(tmp_path, _sample_sd3_dirs):
    """sample.py end to end: tiny Flux and a tiny SD3 (CFG: one doubled batch per step), with --offload blocks,
    plain --offload and none give the same PNG up to fp32 round-off (the same weights at other addresses: see
    above); the generated tensors are compared too (a PNG hides differences under half a level)."""
    flux = ["x", "--model", "tiny", "--width", "64", "--height", "64", "--steps", "2"]
    sd3 = ["a blue car", "--model", "sd3-medium", "--weights", str(_sample_sd3_dirs["official"]), "--width", "64",
           "--height", "64", "--steps", "2"]
    for name, args in (("flux", flux), ("sd3", sd3)):
        pngs = []
        for i, extra in enumerate(([], ["--offload", "blocks"], ["--offload"], ["--offload", "components"])):
            code, out = _sample_run([*args, *extra], tmp_path, f"{name}-{i}.png")
            assert code == 0
            pngs.append(np.asarray(Image.open(out)))
        assert pngs[0].std() > 0
        for png in pngs[1:]:
            _sample_assert_same_pixels_up_to_rounding(png, pngs[0])
    for pipe in (sample.tiny_pipeline(), sample.load_pipeline("sd3-medium", _sample_sd3_dirs["official"],
                                                              dtype=torch.float32)):
        common = dict(width=64, height=64, steps=2, guidance=3.5, seed=3, num_images=2, progress=False)
        plain, _ = sample.generate(pipe, "a fox", **common)
        streamed, _ = sample.generate(pipe, "a fox", offload="blocks", **common)
        assert rel(streamed, plain) <= 1e-5 and plain.std() > 0


class _OffloadFakeStream:
    """A CUDA stream as a log of ops; with _OffloadFakeEvent, enough to derive what happens before what."""

    def __init__(self, log):
        self.log, self.ops = log, []

    def op(self, *what):
        self.log.append((self, len(self.ops), what))
        self.ops.append(len(self.log) - 1)

    def wait_event(self, event):
        self.op("wait", event, event.version)  # CUDA: waits for the event's latest record at the time of the call

    def wait_stream(self, other):
        self.op("wait_stream", other, len(other.ops))

    def synchronize(self):
        pass


class _OffloadFakeEvent:
    def __init__(self):
        self.version = 0

    def record(self, stream):
        self.version += 1
        stream.op("record", self, self.version)


def test_offload_cuda_ordering_has_no_race(monkeypatch):
    """The CUDA path without a GPU: streams and events replaced by logs, the happens-before order they impose
    (each stream in order; a record before the wait that names it) is checked on a two-forward run: every block
    computes only after its copy has landed, and no copy overwrites a slot before the compute that last read it
    has finished. Without the events (or with a slot reused too early) some copy could race its reader."""
    log, copies = [], []
    compute, copy = _OffloadFakeStream(log), _OffloadFakeStream(log)
    current = [compute]

    class FakeCudaStreamer(offload.BlockStreamer):  # the CPU streamer with CUDA's synchronization switched on
        def __init__(self, *args):
            super().__init__(*args)
            self.cuda, self.copy_stream = True, copy
            self.ready = [_OffloadFakeEvent() for _ in self.slots]
            self.released = [_OffloadFakeEvent() for _ in self.slots]

        def issue(self, i):  # logs the copy as (its wait for the slot, its ready record, block, slot)
            super().issue(i)
            copies.append((copy.ops[-2], copy.ops[-1], i, self.resident[i]))

    @contextmanager
    def on_stream(stream):
        current.append(stream)
        yield
        current.pop()

    monkeypatch.setattr(offload, "BlockStreamer", FakeCudaStreamer)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    model, blocks, inputs = _offload_models()[1]  # SD3.5: three block shapes
    with offload.stream_blocks(model, blocks, "cpu", ahead=1) as streamer:
        for i, b in enumerate(blocks):
            b.register_forward_pre_hook(lambda m, a, i=i: compute.op("compute", i, streamer.resident[i]))
            b.register_forward_hook(lambda m, a, out, i=i: compute.op("done", i))
        with torch.inference_mode():
            for _ in range(2):
                _offload_call(model, inputs)

    def before(a: int, b: int) -> bool:  # does log entry a happen before log entry b?
        todo, seen = [b], set()
        while todo:
            n = todo.pop()
            if n == a:
                return True
            if n in seen or n < a:
                continue
            seen.add(n)
            stream, k, what = log[n]
            if k:
                todo.append(stream.ops[k - 1])
            if what[0] == "wait":
                todo += [m for m, (s, _, w) in enumerate(log) if w == ("record", what[1], what[2])]
            if what[0] == "wait_stream" and what[2]:
                todo.append(what[1].ops[what[2] - 1])
        return False

    computes = [(n, *w[1:]) for n, (_, _, w) in enumerate(log) if w[0] == "compute"]
    assert len(computes) == 2 * len(blocks)
    for n, block, slot in computes:
        landed = max(end for _, end, b, _ in copies if end < n and b == block)
        assert before(landed, n)  # its copy has landed
        done = next(m for m, (_, _, w) in enumerate(log) if m > n and w == ("done", block))
        for start, _, _, s in copies:  # a later copy into its slot waits for the end of this compute
            if start > n and s == slot:
                assert before(done, start), (block, slot)


@pytest.mark.parametrize("args", [["--offload", "a cat"], ["a cat", "--offload", "block"],
                                  ["a cat", "--offload", "Blocks"]])
def test_offload_bad_values_are_one_line(args, tmp_path, capsys, monkeypatch):
    """A prompt right after a bare --offload is read as its value: the message says where the prompt goes."""
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: pytest.fail("loaded the weights"))
    code, out = _sample_run([*args, "--model", "tiny"], tmp_path)
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and not out.exists() and len(err) == 1
    assert err[0] == (f"error: --offload takes components, blocks or no value, got {args[-1]!r} "
                      "(a prompt goes before --offload)")


# ====================================================================================================
# train_wlf
# ====================================================================================================

_TRAIN_WLF_RES = 32  # image side; the tiny VAE has 2 levels: latents 8×8 run as "F16", 16×16 as "F8"
_TRAIN_WLF_PROMPTS = ["a red square on grass", "blue sky over the sea", "a cat sleeping on a sofa",
                      "city lights at night", "mountains under snow"]


def _train_wlf_images(folder: Path) -> None:
    """Five small images of different sizes and formats, one corrupt file and one missing file, one bad line."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate([(40, 48), (48, 36), (64, 64), (33, 50), (50, 40)]):
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([(xx * 255 // w), (yy * 255 // h), rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
        name = f"img{i}.png" if i % 2 == 0 else f"img{i}.jpg"
        Image.fromarray(pixels).save(folder / name)
        rows.append({"file_name": name, "text": _TRAIN_WLF_PROMPTS[i]})
        if i == 1:
            (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
            rows.append({"file_name": "broken.png", "text": "a corrupt file"})
    rows.append({"file_name": "missing.png", "text": "a file that is not there"})
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{not json")
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def _train_wlf_clip_tokenizer(folder: Path) -> None:
    """A byte-level CLIP vocabulary without merges: every character is a token (enough for random encoders)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def _train_wlf_t5_tokenizer(folder: Path) -> int:
    import sentencepiece as spm

    corpus = [p + " " + w for p in _TRAIN_WLF_PROMPTS for w in ("photo", "painting", "ultra detailed", "4k")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus * 4), model_prefix=str(folder / "spiece"),
                                   vocab_size=40, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    return 40


def _train_wlf_text_encoders(root: Path) -> None:
    """Random tiny CLIP-L (width 32), CLIP-G (width 32, projection 32) and T5 (d_model 64), each in a folder
    with its tokenizer, as transformers lays them out (model.safetensors; config from the shapes)."""
    torch.manual_seed(1)
    for name, projection in (("clip_l", None), ("clip_g", 32)):
        folder = root / name
        folder.mkdir(parents=True)
        _train_wlf_clip_tokenizer(folder)
        config = text_encoders.CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=1, projection_dim=projection)
        model = text_encoders.CLIPText(config)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    folder = root / "t5"
    folder.mkdir()
    vocab = _train_wlf_t5_tokenizer(folder)
    t5 = text_encoders.T5Encoder(text_encoders.T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=64, num_layers=1,
                                                        num_heads=4))
    save_file({k: v.contiguous() for k, v in t5.state_dict().items()}, folder / "model.safetensors")


def _train_wlf_transformers(root: Path) -> None:
    torch.manual_seed(2)
    flux = mmdit.Flux(mmdit.FluxParams(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=64,
                                       hidden_size=64, mlp_ratio=2.0, num_heads=4, depth=1, depth_single_blocks=2,
                                       axes_dim=(4, 6, 6), guidance_embed=True))
    mmdit.save_transformer(flux, str(root / "flux.safetensors"))
    sd3 = mmdit.MMDiT(mmdit.SD3Params(patch_size=2, in_channels=16, out_channels=16, depth=2, hidden_size=64,
                                      num_heads=2, adm_in_channels=64, context_in_dim=64, pos_embed_max_size=8))
    mmdit.save_transformer(sd3, str(root / "sd3.safetensors"))


@pytest.fixture(scope="module")
def _train_wlf_assets(tmp_path_factory):
    """Images, tiny VAE / text encoders / transformers, and the Flux (F16) and SD3 (F8) shards, built once."""
    root = tmp_path_factory.mktemp("train_wlf")
    _train_wlf_images(root / "data")
    _train_wlf_text_encoders(root / "te")
    _train_wlf_transformers(root)
    torch.manual_seed(3)
    params = vae.AutoEncoderParams(3, 8, 3, (1, 2), 1, 16, scale_factor=0.5, shift_factor=0.1, groups=4)
    vae.save_vae(vae.AutoEncoder(params), root / "ae.safetensors")  # F4 as stored; --f16 runs it as "F8"
    te = root / "te"
    common = ["--data", str(root / "data"), "--vae", str(root / "ae.safetensors"), "--clip-l", str(te / "clip_l"),
              "--t5", str(te / "t5"), "--t5-tokens", "24", "--resolution", str(_TRAIN_WLF_RES), "--flip",
              "--workers", "0", "--batch-size", "2", "--shard-size", "3", "--store-dtype", "fp32", "--no-progress"]
    train_wlf.main(["precompute", "--model", "flux-dev", "--f16", "--out", str(root / "flux_shards"), *common])
    train_wlf.main(["precompute", "--model", "sd3-medium", "--clip-g", str(te / "clip_g"),
                    "--out", str(root / "sd3_shards"), *common])
    return root



def _train_wlf_run(args: list[str], nproc: int, cwd: Path, script: str | None = None) -> subprocess.CompletedProcess:
    """train_wlf.py (or another training script) in a fresh process: under torchrun (--standalone picks a free port)
    for nproc > 1, plainly otherwise (world size 1 without torchrun)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    script = script or train_wlf.__file__
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(script).parent)}
    result = subprocess.run([*launcher, script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _train_wlf_train_args(assets: Path, family: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--shards", str(assets / f"{family}_shards"), "--transformer", str(assets / f"{family}.safetensors"),
            "--out", str(out), "--precision", "fp32", "--export-dtype", "fp32", "--lr", "1e-3", "--log-every", "1",
            "--no-progress", *extra]


def _train_wlf_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _train_wlf_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_train_wlf_precompute_shards_hold_the_encodings(_train_wlf_assets):
    """The corrupt file, the missing file and the bad metadata line are skipped and reported; every stored latent is
    the VAE encoding of its augmented crop, and every prompt embedding the conditioner's output."""
    root = _train_wlf_assets
    for family, stride in (("flux", 2), ("sd3", None)):
        shards = train_wlf.LatentShards(root / f"{family}_shards")
        m = shards.manifest
        assert m["complete"] and m["num_samples"] == len(shards) == 5
        reasons = {s["file_name"]: s["reason"] for s in m["skipped"]}
        assert set(reasons) == {"broken.png", "missing.png", "metadata.jsonl:4"}
        assert "UnidentifiedImageError" in reasons["broken.png"] and "FileNotFoundError" in reasons["missing.png"]
        assert m["latent_shape"] == ([16, 8, 8] if family == "flux" else [16, 16, 16])

        ae = vae.load_vae(root / "ae.safetensors", stride=stride)
        rows, _ = train_wlf.read_metadata(root / "data")
        with safe_open(str(root / f"{family}_shards" / "shard-00000.safetensors"), "pt") as f:
            stored_rows = f.get_tensor("row").tolist()
        assert [rows[r]["file_name"] for r in stored_rows] == ["img0.png", "img1.jpg", "img2.png"]
        batch = shards.get([0, 1, 2])
        images = torch.stack([train_wlf.prepare_image(root / "data" / rows[r]["file_name"], _TRAIN_WLF_RES,
                                                      random.Random(f"0/{r}"), True) for r in stored_rows])
        assert images.shape == (3, 3, _TRAIN_WLF_RES, _TRAIN_WLF_RES) and images.min() >= -1 and images.max() <= 1
        with torch.no_grad():
            # Same fp32 computation in the same process order: equal up to summation-order round-off.
            torch.testing.assert_close(batch["latents"], ae.encode(images), rtol=1e-5, atol=1e-5)
        te = root / "te"
        t5 = text_encoders.load_t5(te / "t5")
        t5_tok = text_encoders.T5Tokenizer(te / "t5", max_length=24)
        clip_l, clip_l_tok = text_encoders.load_clip(te / "clip_l"), text_encoders.CLIPTokenizer(te / "clip_l")
        prompts = [rows[r]["text"] for r in stored_rows]
        if family == "flux":
            ref = text_encoders.FluxConditioner(clip_l, t5, clip_l_tok, t5_tok)(prompts)
            ref = {"context": ref["txt"], "pooled": ref["vec"]}
        else:
            ref = text_encoders.SD3Conditioner(clip_l, text_encoders.load_clip(te / "clip_g"), clip_l_tok,
                                               text_encoders.CLIPTokenizer(te / "clip_g", pad_token=0), t5, t5_tok)(prompts)
        for name in ("context", "pooled"):  # identical encoders, batch composition may differ: fp32 round-off
            torch.testing.assert_close(batch[name], ref[name], rtol=1e-5, atol=1e-5)


class _Killed(BaseException):
    """Ends a precompute as a kill would: no handler of the script catches it, no file is tidied."""


def test_train_wlf_precompute_resumes_and_refuses_other_settings(_train_wlf_assets, tmp_path, capsys, monkeypatch):
    """A precompute killed right after its first shard (row 0, the first of a batch of 2) continues in the middle
    of that batch, in batches of 2 again without --batch-size, and ends with the same samples; other settings in
    the same folder are refused with one line, as is an interrupted job of the previous shard format."""
    root, out = _train_wlf_assets, tmp_path / "shards"
    args = _train_wlf_precompute_args(root, root / "data", out, "--shard-size", "1")
    write = train_wlf.write_shard

    def write_then_die(*a, **k):
        write(*a, **k)
        raise _Killed

    monkeypatch.setattr(train_wlf, "write_shard", write_then_die)
    with pytest.raises(_Killed):
        train_wlf.main(args)
    assert json.loads((out / "part-000.json").read_text())["next_row"] == 1
    monkeypatch.undo()
    i = args.index("--batch-size")
    train_wlf.main(args[:i] + args[i + 2 :])  # no --batch-size: the one the job began with, not the CPU's 1
    out_text = capsys.readouterr().out
    assert "part 0: continuing an interrupted precompute at metadata row 1" in out_text
    assert "batches of 2" in out_text
    resumed, original = train_wlf.LatentShards(out), train_wlf.LatentShards(root / "flux_shards")
    assert resumed.manifest["skipped"] == original.manifest["skipped"] and not list(out.glob("part-*"))
    a, b = resumed.get(list(range(5))), original.get(list(range(5)))
    # The crops depend on (seed, row) only, and the batch of rows 0-1 is encoded again whole, as the fixture encoded
    # it, by the same code in the same process: literally the same computation, so the same bits.
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    for changed in (["--resolution", "64"], ["--t5-tokens", "16"]):
        with pytest.raises(SystemExit) as e:
            train_wlf.main(args + changed)
        assert e.value.code == 2 and "other settings" in capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "complete": False, "next_row": 4}))  # the old format
    assert "an older version of this script" in _train_wlf_error(train_wlf.main, args, capsys)


# ------------------------------------------------------------ precompute on several ranks; shards read ahead

_KILL_AFTER_FIRST_SHARD = """import os, signal, sys
sys.path.insert(0, sys.argv.pop(1))
import train_wlf
write = train_wlf.write_shard
def write_then_die(*args, **kwargs):
    write(*args, **kwargs)
    if os.environ["RANK"] == "1":  # SIGKILL: no handler runs; torchrun then stops rank 0 wherever it is
        os.kill(os.getpid(), signal.SIGKILL)
train_wlf.write_shard = write_then_die
train_wlf.main(sys.argv[1:])
"""


def test_train_wlf_precompute_two_ranks_resume_and_equal_one_process(_train_wlf_assets, tmp_path, capsys):
    """torchrun 2 ranks: rank 1 (rows 4-6) is SIGKILLed right after its first shard (row 4, the first of a batch of
    2) and the job is run again: it continues rank 1's part mid-batch, and the merged shards hold the very samples
    of a one-process precompute, in its order, bit for bit, with the same skipped entries."""
    root = _train_wlf_assets
    two, one = tmp_path / "two", tmp_path / "one"
    args = _train_wlf_precompute_args(root, root / "data", two, "--shard-size", "1")
    (tmp_path / "kill.py").write_text(_KILL_AFTER_FIRST_SHARD)
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(tmp_path / "kill.py"), str(Path(train_wlf.__file__).parent), *args], cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and not (two / "shard-00000.safetensors").exists()
    part = json.loads((two / "part-001.json").read_text())
    assert part["rows"] == [4, 7] and part["next_row"] == 5 and not part["done"]
    result = _train_wlf_run(args, 2, tmp_path)
    assert "part 1: continuing an interrupted precompute at metadata row 5" in result.stdout
    assert "on 2 rank(s), batches of 2" in result.stdout and not list(two.glob("part-*"))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran: a convolution split over 2 threads differs in the last bits
    try:
        train_wlf.main(_train_wlf_precompute_args(root, root / "data", one))
    finally:
        torch.set_num_threads(threads)
    a, b = train_wlf.LatentShards(two), train_wlf.LatentShards(one)
    assert len(a) == len(b) == 5 and len(a.manifest["shards"]) == 5 and len(b.manifest["shards"]) == 2
    assert a.manifest["skipped"] == b.manifest["skipped"]
    for i in range(5):
        # Every row is encoded in the same batch of 2 (rows 2k, 2k+1) by the same code on one thread each: the
        # same computation, so the same bits.
        x, y = a.get([i]), b.get([i])
        for name in x:
            torch.testing.assert_close(x[name], y[name], rtol=0, atol=0, msg=f"sample {i} {name}")


def test_train_wlf_reads_ahead_the_same_batches(_train_wlf_assets, tmp_path, monkeypatch):
    """rank_batches: in each step, the ranks' micro-batches tile the next global batch of the stream exactly once.
    runs.ReadAhead returns fn's results in key order and raises fn's error at next(). A run reading ahead in its
    thread exports the same bits as one reading each batch when asked, and logs data_wait, a fraction in [0, 1)."""
    stream = train_wlf.SampleStream(7, seed=3)
    ranks = [train_wlf.rank_batches(stream, 5, batch=2, accumulation=3, world=2, rank=rank) for rank in range(2)]
    for step in range(3):
        seen = []
        for batches in ranks:
            for first, indices in (next(batches) for _ in range(3)):
                assert indices == [stream[first], stream[first + 1]]
                seen += [first, first + 1]
        assert sorted(seen) == list(range(5 + 12 * step, 5 + 12 * (step + 1)))

    def slow(key):
        time.sleep(0.01)
        if key == 4:
            raise vae.UserError("shard x: unreadable")
        return key * key
    reader = runs.ReadAhead(slow, range(10), depth=3)
    assert [reader.next() for _ in range(4)] == [0, 1, 4, 9] and reader.waited > 0
    with pytest.raises(vae.UserError, match="shard x: unreadable"):
        reader.next()
    reader.close()

    root = _train_wlf_assets
    args = lambda out: _train_wlf_train_args(root, "flux", out, "--steps", "3", "--batch-size", "1",
                                             "--grad-accum", "2", "--checkpoint-every", "0")
    train_wlf.main(args(tmp_path / "ahead"))

    class ReadWhenAsked:
        def __init__(self, fn, keys, depth):
            self.fn, self.keys, self.waited = fn, iter(keys), 0.0

        def next(self):
            return self.fn(next(self.keys))

        def close(self):
            pass
    monkeypatch.setattr(runs, "ReadAhead", ReadWhenAsked)
    train_wlf.main(args(tmp_path / "asked"))
    a = _train_wlf_tensors(tmp_path / "ahead" / "transformer.safetensors")
    b = _train_wlf_tensors(tmp_path / "asked" / "transformer.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same batches in the same order: the same bits
    assert all(0 <= r["data_wait"] < 1 for r in _train_wlf_log(tmp_path / "ahead"))


def test_train_wlf_loss_wlf_equal_weights_is_x0_mse():
    """training_loss: equal-weight one-level WLF == x0-space MSE of x̂0 = x_t − t·v (Parseval); unequal weights
    match a PyWavelets computation of Eq. 10 and differ from it; "mse" is the velocity MSE."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 16, 8, 12, generator=g, dtype=torch.float64), torch.randn(3, 16, 8, 12, generator=g,
                                                                                        dtype=torch.float64)
    t = torch.rand(3, generator=g, dtype=torch.float64)
    w = torch.randn(16, 16, dtype=torch.float64, generator=g) * 0.3
    velocity = lambda x, t_: torch.einsum("bchw,cd->bdhw", x, w) + t_.view(-1, 1, 1, 1)  # a fixed linear "model"
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * noise
    x0_hat = x_t - tt * velocity(x_t, t)
    wlf = train_wlf.training_loss(velocity, x0, noise, t, train_wlf.Objective(loss="wlf"))
    torch.testing.assert_close(wlf, F.mse_loss(x0_hat, x0), rtol=1e-12, atol=0)  # fp64: orthonormal Haar
    mse = train_wlf.training_loss(velocity, x0, noise, t, train_wlf.Objective(loss="mse"))
    torch.testing.assert_close(mse, F.mse_loss(velocity(x_t, t), noise - x0), rtol=1e-12, atol=0)  # fp64 round-off
    assert not torch.isclose(wlf, mse)

    weights = (2.0, 0.5, 1.0, 3.0)
    weighted = train_wlf.training_loss(velocity, x0, noise, t, train_wlf.Objective(loss="wlf", band_weights=weights))
    diff = (x0_hat - x0).numpy()
    ca, (ch, cv, cd) = pywt.dwt2(diff, "haar", axes=(-2, -1))
    expected = sum(wb * (band**2).sum() for wb, band in zip(weights, (ca, ch, cv, cd))) / diff.size
    assert abs(weighted.item() - expected) < 1e-12 * expected  # fp64 round-off of an independent DWT
    assert abs(weighted.item() - wlf.item()) > 1e-3 * wlf.item()


def test_train_wlf_timesteps_and_noise_are_keyed_by_position():
    """Per-sample draws depend on (seed, position) only; logit-normal with shift is in (0, 1) and skewed up."""
    obj = train_wlf.Objective(timesteps="logit-normal", shift=3.0)
    t1, e1 = train_wlf.sample_noise(obj, (2, 4, 4), seed=5, position=17)
    t2, e2 = train_wlf.sample_noise(obj, (2, 4, 4), seed=5, position=17)
    t3, _ = train_wlf.sample_noise(obj, (2, 4, 4), seed=5, position=18)
    assert t1 == t2 and torch.equal(e1, e2) and t1 != t3
    ts = torch.stack([train_wlf.sample_noise(obj, (1,), 0, p)[0] for p in range(2000)])
    assert 0 < ts.min() and ts.max() < 1
    # sigmoid(N(0,1)) has median 0.5; shift 3 maps it to 0.75.
    assert abs(ts.median().item() - 0.75) < 0.03
    stream = train_wlf.SampleStream(7, seed=1)
    assert sorted(stream[p] for p in range(7)) == list(range(7)) == sorted(stream[p] for p in range(7, 14))


def test_train_wlf_fsdp_matches_single_process_and_resumes(_train_wlf_assets, tmp_path):
    """Flux-dev (guidance embedding), WLF loss, fp32:
    A: torchrun 2 ranks × batch 1, FSDP2 + activation checkpointing, 6 steps, checkpoints at 3 and 6, export;
    B: one process without torchrun, batch 1 × 2 accumulation steps, no checkpointing: the same global batch;
    C: torchrun 2 ranks resuming from A's step-3 checkpoint (beside a half-written save, and A's step 6 with a byte
    changed, which rank 0 skips for both ranks) up to step 6."""
    root = _train_wlf_assets
    run_a, run_b, run_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    clip = ["--max-grad-norm", "0.05"]  # below the gradient norms here (0.09-0.4): DTensor clipping is active
    _train_wlf_run(_train_wlf_train_args(root, "flux", run_a, "--steps", "6", "--batch-size", "1", *clip,
                                         "--checkpoint-every", "3", "--keep-checkpoints", "2"), 2, tmp_path)
    _train_wlf_run(_train_wlf_train_args(root, "flux", run_b, "--steps", "6", "--batch-size", "1", "--grad-accum", "2",
                                         *clip, "--checkpoint-every", "0", "--no-activation-checkpointing"), 1, tmp_path)
    for step in ("00000003", "00000006"):
        shutil.copytree(run_a / "checkpoints" / f"step-{step}", run_c / "checkpoints" / f"step-{step}")
    shard = run_c / "checkpoints" / "step-00000006" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    (run_c / "checkpoints" / ".step-00000005.tmp").mkdir()  # a save that crashed half-way: never picked
    (run_c / "checkpoints" / ".step-00000005.tmp" / "__0_0.distcp").write_bytes(b"partial")
    result = _train_wlf_run(_train_wlf_train_args(root, "flux", run_c, "--steps", "6", "--batch-size", "1", *clip,
                                                  "--checkpoint-every", "3", "--resume"), 2, tmp_path)
    assert "step-00000006: __1_0.distcp does not match its sha256" in result.stdout
    assert "resumed from" in result.stdout and "step 3" in result.stdout
    assert not (run_c / "checkpoints" / ".step-00000005.tmp").exists()

    log_a, log_b = _train_wlf_log(run_a), _train_wlf_log(run_b)
    assert [r["step"] for r in log_a] == list(range(1, 7)) and all(math.isfinite(r["loss"]) for r in log_a)
    assert all(r["grad_norm"] > 0.05 for r in log_a)  # clipping was active in every step
    for ra, rb in zip(log_a, log_b):  # same samples, noise and t: only the reduction order differs
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * abs(rb["loss"]), (ra, rb)

    a = _train_wlf_tensors(run_a / "transformer.safetensors")
    b = _train_wlf_tensors(run_b / "transformer.safetensors")
    c = _train_wlf_tensors(run_c / "transformer.safetensors")
    start = _train_wlf_tensors(root / "flux.safetensors")
    assert a.keys() == b.keys() == c.keys() == start.keys()
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # 6 Adam steps of lr 1e-3 moved the weights
    for k in a:
        # fp32 gradients summed in another order (2 ranks' reduce-scatter vs 2 accumulation steps) differ by a few
        # ulps; 6 Adam steps keep that at ~1e-6 of an update of 1e-3 per step.
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
        # Same world size, same order of every reduction: resuming reproduces the run bit for bit.
        torch.testing.assert_close(c[k], a[k], rtol=0, atol=0, msg=k)

    # load_transformer infers the config from the saved file: guidance_embed from the guidance_in shapes, and the
    # RoPE split from the metadata the export wrote (the shapes alone would give (2, 7, 7)).
    model = mmdit.load_transformer(str(run_a / "transformer.safetensors"))
    assert isinstance(model, mmdit.Flux) and model.params.guidance_embed and model.params.axes_dim == (4, 6, 6)
    assert [p.name for p in sorted((run_a / "checkpoints").iterdir())] == ["step-00000003", "step-00000006"]


def test_train_wlf_sd3_overfits_with_two_ranks(_train_wlf_assets, tmp_path):
    """SD3 on 2 ranks × batch 1 over the same 2 samples (one global batch), stopped after step 20 (--stop-after, as
    for a job time limit) and resumed to 40: the loss is finite and falls; the exported file loads with
    load_transformer; `export` turns the last checkpoint into the same file."""
    root, run = _train_wlf_assets, tmp_path / "run"
    args = _train_wlf_train_args(root, "sd3", run, "--steps", "40", "--batch-size", "1", "--max-samples", "2",
                                 "--lr", "1e-2", "--checkpoint-every", "100", "--max-grad-norm", "0")
    first_half = _train_wlf_run([*args, "--stop-after", "20"], 2, tmp_path)
    assert "stopped after step 20" in first_half.stdout and not (run / "transformer.safetensors").exists()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000020"]
    _train_wlf_run([*args, "--resume"], 2, tmp_path)
    losses = [r["loss"] for r in _train_wlf_log(run)]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    # t and ε are drawn anew each step, so single losses are noisy: compare 10-step means (about 0.3 -> 0.08 here).
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.5 * first, (first, last)
    model = mmdit.load_transformer(str(run / "transformer.safetensors"))
    assert isinstance(model, mmdit.MMDiT)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000020", "step-00000040"]
    train_wlf.main(["export", "--checkpoint", str(run / "checkpoints" / "step-00000040"), "--transformer",
                    str(root / "sd3.safetensors"), "--out", str(tmp_path / "exported.safetensors"), "--dtype", "fp32"])
    # The same fp32 weights copied out by two routes (gathered from the live shards; read back from DCP files):
    # no arithmetic on either, so the same bits.
    a, b = _train_wlf_tensors(run / "transformer.safetensors"), _train_wlf_tensors(tmp_path / "exported.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = _train_wlf_tensors(root / "sd3.safetensors")
    assert torch.equal(a["pos_embed"], start["pos_embed"])  # the buffer travelled through FSDP and DCP untouched


def test_train_wlf_dry_run_memory_plan(capsys):
    """flux-dev at 4096² (F16: 16384 image tokens), batch 4 per GPU: fits 8 × 80 GiB with FSDP2 + checkpointing,
    not without checkpointing. The sharded static part is exact (16 bytes per parameter / world size), so the
    smallest world size that fits follows by hand from the rest of the plan."""
    plan = lambda **kw: train_wlf.memory_plan(mmdit.CONFIGS["flux-dev"], **{
        "latent_hw": (256, 256), "text_tokens": 512, "batch": 4, "world_size": 8, "gpu_gib": 80, **kw})
    base = plan()
    n = 11_901_408_320  # flux-dev has 11,901,408,320 parameters
    assert base["parameters"] == n
    rows = dict(base["rows"])
    assert rows["parameters, fp32, sharded over 8"] == 4 * n / 8
    assert rows["AdamW moments m and v, fp32, sharded over 8"] == 8 * n / 8
    # Checkpointed inputs: 57 blocks each keep a (4, 16896, 3072) bf16 sequence (double blocks as txt + img),
    # plus the shared vec (4, 3072) bf16 and RoPE rotations (4, 16896, 1, 64) complex64.
    expected = 57 * 4 * 16896 * 3072 * 2 + 4 * 3072 * 2 + 4 * 16896 * 64 * 8
    assert rows["checkpointed block inputs (57 blocks)"] == expected
    assert base["fits"] and 60 * 2**30 < base["total"] < 80 * 2**30
    assert not plan(activation_checkpointing=False)["fits"]
    # The boundary, by hand: total(W) = 1.1 × (16·n / W + the unsharded rest) + 2.5 GiB (fragmentation, context), so
    # the fewest GPUs of 80 GiB are ⌈16·n / ((80 − 2.5) GiB / 1.1 − rest)⌉ = 7 (6.6 by the formula): 7 fit, 6 do not.
    rest = base["allocated"] - 16 * n / 8
    fewest = math.ceil(16 * n / ((80 - 2.5) * 2**30 / 1.1 - rest))
    assert fewest == 7 and plan(world_size=7)["fits"] and not plan(world_size=6)["fits"]
    train_wlf.main(["train", "--dry-run", "--model", "flux-dev", "--resolution", "4096", "--f16", "--batch-size", "4",
                    "--world-size", "8", "--gpu-memory", "80"])
    out = capsys.readouterr().out
    assert "16384 image + 512 text tokens" in out and "fits" in out and "NOT" not in out


def test_train_wlf_dry_run_probe_counts_saved_activations():
    """The meta-device probe of a tiny Flux: a block keeps several activations of its sequence (so more than its
    input), the fp32 QK-norm outputs are counted at 4 bytes, and the flash-style attention stand-in keeps no
    L×L matrix (the count grows linearly, not quadratically, with the sequence)."""
    params = mmdit.FluxParams(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=64, hidden_size=64,
                              mlp_ratio=2.0, num_heads=4, depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6))
    with torch.device("meta"):
        model = mmdit.Flux(params).to(torch.bfloat16)
    small = train_wlf.probe_activations(model, (2, 16, 16, 16), 8, torch.bfloat16)
    large = train_wlf.probe_activations(model, (2, 16, 32, 64), 8, torch.bfloat16)
    seq_small, seq_large = 64 + 8, 512 + 8
    for probe, seq in ((small, seq_small), (large, seq_large)):
        single_input = 2 * seq * 64 * 2  # (B, L, H) bf16
        assert probe["block_saved"][1] > 10 * single_input
    # 7.2× the tokens: per-token activations scale by 7.2, the (B, 1, 3H) modulations not at all; an L×L score
    # matrix per head would scale by 52.
    ratio = large["block_saved"][1] / small["block_saved"][1]
    assert 5 < ratio <= seq_large / seq_small, ratio


def test_train_wlf_cli_errors_are_one_line(tmp_path, capsys):
    for argv, needle in ((["train", "--out", str(tmp_path)], "train needs --shards, --transformer"),
                         (["train", "--shards", str(tmp_path), "--transformer", "x", "--out", str(tmp_path)],
                          "manifest.json not found"),
                         (["train", "--dry-run", "--model", "flux-pro"], "unknown --model"),
                         (["precompute", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--model", "flux-dev",
                           "--vae", "x"], "metadata.jsonl not found")):
        with pytest.raises(SystemExit) as e:
            train_wlf.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and needle in err and err.count("\n") == 0, err


# --------------------------------------------------------------------------------------------------
# A long run's safety (runs.py): refused arguments, NaN steps, data fingerprints, checkpoints, the lock


def _train_wlf_error(main, argv: list[str], capsys) -> str:
    """main(argv) must end with status 2 and exactly one `error: ` line on stderr (other lines are progress
    reports, e.g. unreadable images); returns that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _train_wlf_precompute_args(root: Path, data: Path, out: Path, *extra: str) -> list[str]:
    te = root / "te"
    return ["precompute", "--model", "flux-dev", "--f16", "--data", str(data), "--vae", str(root / "ae.safetensors"),
            "--clip-l", str(te / "clip_l"), "--t5", str(te / "t5"), "--t5-tokens", "24", "--resolution",
            str(_TRAIN_WLF_RES), "--flip", "--workers", "0", "--batch-size", "2", "--shard-size", "3",
            "--store-dtype", "fp32", "--no-progress", "--out", str(out), *extra]


def test_train_wlf_refuses_arguments_that_cannot_be_right(tmp_path, capsys):
    """Each value is refused by the parser, in one line naming the flag, before anything is created."""
    base = ["train", "--shards", str(tmp_path / "s"), "--transformer", str(tmp_path / "t"), "--out", str(tmp_path / "o")]
    for flag, value, needle in (("--warmup-steps", "-5", "whole number of at least 0, got '-5'"),
                                ("--guidance", "nan", "finite number, got 'nan'"),
                                ("--lr", "inf", "finite number > 0, got 'inf'"), ("--lr", "0", "> 0, got '0'"),
                                ("--lr", "-1e-5", "> 0, got '-1e-5'"),
                                ("--band-weights", "nan,1,1,1", "finite number ≥ 0, got 'nan'"),
                                ("--band-weights", "1,-1,1,1", "≥ 0, got '-1'"),
                                ("--band-weights", "0,0,0,0", "all four are 0"), ("--beta1", "1", "< 1, got '1'"),
                                ("--beta2", "-0.1", "≥ 0 and < 1, got '-0.1'"), ("--weight-decay", "nan", "got 'nan'"),
                                ("--max-grad-norm", "-1", "≥ 0, got '-1'"), ("--logit-std", "0", "> 0, got '0'"),
                                ("--shift", "inf", "got 'inf'"), ("--checkpoint-every", "-1", "at least 0, got '-1'"),
                                ("--max-bad-steps", "0", "at least 1, got '0'")):
        line = _train_wlf_error(train_wlf.main, [*base, f"{flag}={value}"], capsys)  # "=": argparse takes "-1e-5" for a flag
        assert line.startswith(f"error: argument {flag}: ") and needle in line, line
    assert not (tmp_path / "o").exists()
    # a NaN check that cannot be fooled: every tensor of a nested state, the name of the first bad one
    with pytest.raises(vae.UserError, match=r"the export x: the state holds NaN or inf \(b.1\)"):
        runs.check_finite({"a": torch.ones(3), "b": [torch.zeros(2), torch.tensor([1.0, float("inf")])]}, "the export x")


def test_train_wlf_out_must_be_writable_before_any_work(_train_wlf_assets, tmp_path, capsys):
    """--out that is a file, lies under a file, or is read-only, and an export path that is a folder: one line at
    the start. The transformer given does not exist, so an error about --out shows it came first."""
    root, file = _train_wlf_assets, tmp_path / "file"
    file.write_text("x")
    train = lambda out, *extra: _train_wlf_train_args(root, "flux", out, "--transformer", str(tmp_path / "nope"), *extra)
    cases = [(train(file), "is a file, not a folder"), (train(file / "run"), "cannot create the folder"),
             (_train_wlf_precompute_args(root, root / "data", file), "is a file, not a folder"),
             (["export", "--checkpoint", str(tmp_path), "--transformer", str(tmp_path / "nope"), "--out", str(tmp_path)],
              "is a folder, not a file")]
    (tmp_path / "run" / "transformer.safetensors").mkdir(parents=True)
    cases.append((train(tmp_path / "run"), "export " + str(tmp_path / "run" / "transformer.safetensors")))
    if os.geteuid() != 0:  # root writes anywhere: only a non-root run can test a read-only folder
        (tmp_path / "ro").mkdir(mode=0o555)
        cases.append((train(tmp_path / "ro" / "run"), "Permission denied"))
    for argv, needle in cases:
        assert needle in _train_wlf_error(train_wlf.main, argv, capsys)


def test_train_wlf_nan_steps_are_skipped_then_stop_the_run(_train_wlf_assets, tmp_path, capsys):
    """--lr 1e8: the first update is finite, after it the loss is NaN. Skipped steps change nothing (the export
    after 2 skipped steps is the step-1 checkpoint bit for bit) and save no checkpoint; 3 in a row stop the run
    with status 2, no export, and the step-1 checkpoint intact (kept with --keep-checkpoints 1)."""
    root = _train_wlf_assets
    args = lambda out, *extra: _train_wlf_train_args(root, "flux", out, "--lr", "1e8", "--batch-size", "1",
                                                       "--checkpoint-every", "1", "--keep-checkpoints", "1", *extra)
    train_wlf.main(args(tmp_path / "a", "--steps", "3", "--max-bad-steps", "5"))
    assert "step 2: loss nan, grad_norm nan (this rank): update skipped, 1 in a row" in capsys.readouterr().out
    log = _train_wlf_log(tmp_path / "a")
    assert [r["skipped_updates"] for r in log] == [0, 1, 2] and log[1]["loss"] is None  # strict JSON: null
    assert [p.name for p in (tmp_path / "a" / "checkpoints").iterdir()] == ["step-00000001"]
    train_wlf.main(["export", "--checkpoint", str(tmp_path / "a" / "checkpoints" / "step-00000001"), "--transformer",
                    str(root / "flux.safetensors"), "--out", str(tmp_path / "step1.safetensors"), "--dtype", "fp32"])
    a, step1 = _train_wlf_tensors(tmp_path / "a" / "transformer.safetensors"), _train_wlf_tensors(tmp_path / "step1.safetensors")
    assert all(torch.equal(a[k], step1[k]) for k in step1)  # no update after step 1: the same bits

    run = tmp_path / "b"
    line = _train_wlf_error(train_wlf.main, args(run, "--steps", "8"), capsys)
    assert "step 4: loss or gradient norm not finite in 3 steps in a row (--max-bad-steps 3)" in line
    assert "step-00000001, is untouched" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]
    assert runs.verify(run / "checkpoints" / "step-00000001")["step"] == 1 and not (run / "transformer.safetensors").exists()
    assert not (run / "run.lock").exists()  # released on the error too


def test_train_wlf_precompute_refuses_changed_data(_train_wlf_assets, tmp_path, capsys):
    """precompute continues only the same job: an edited caption or a replaced image, in complete shards or in an
    interrupted job, is refused in one line naming the metadata line and what changed; the shards stay as they
    were. Bad metadata lines are reported with file and line; a file with none usable is an error."""
    root, data, out = _train_wlf_assets, tmp_path / "data", tmp_path / "shards"
    shutil.copytree(root / "data", data)
    args = _train_wlf_precompute_args(root, data, out)
    train_wlf.main(args)
    assert f"skipped {data / 'metadata.jsonl'}:4: bad line (JSONDecodeError" in capsys.readouterr().out
    shards = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    metadata = (data / "metadata.jsonl").read_text()
    (data / "metadata.jsonl").write_text(metadata.replace("a cat sleeping on a sofa", "a dog"))
    line = _train_wlf_error(train_wlf.main, args, capsys)
    assert "holds shards of other data: 1 change(s)" in line and "line 5 (img2.png): caption" in line, line

    (data / "metadata.jsonl").write_text(metadata)
    Image.new("RGB", (40, 48), "red").save(data / "img0.png")  # another image under the same name
    assert "line 1 (img0.png): file size, file time" in _train_wlf_error(train_wlf.main, args, capsys)

    # interrupted after its first shard, then the metadata edited: not continued into a mixed set
    m = json.loads((out / "manifest.json").read_text())
    m.update(complete=False, shards=m["shards"][:1], num_samples=3, next_row=4)
    (out / "manifest.json").write_text(json.dumps(m))
    assert "line 1 (img0.png): file size, file time" in _train_wlf_error(train_wlf.main, args, capsys)
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == shards

    (data / "metadata.jsonl").write_bytes(b'{"file_name": "img0.png"}\n\xff\xfe not utf-8\n')
    line = _train_wlf_error(train_wlf.main, args, capsys)
    assert f"{data / 'metadata.jsonl'}: no usable line (metadata.jsonl:1: bad line (KeyError" in line


def test_train_wlf_resume_refuses_other_data_or_loss(_train_wlf_assets, tmp_path, capsys):
    """A checkpoint records the shards' fingerprint, the samples used, the seed and the objective: --resume with
    other shards (another precompute), --max-samples, --seed or --band-weights is refused naming them; a copy of
    the same shards is the same data; --allow-data-change continues on other shards and says so."""
    root, run = _train_wlf_assets, tmp_path / "run"
    args = lambda *extra: _train_wlf_train_args(root, "flux", run, "--batch-size", "1", "--checkpoint-every", "1", *extra)
    train_wlf.main(args("--steps", "1"))
    line = _train_wlf_error(train_wlf.main, args("--steps", "2"), capsys)  # --resume forgotten: not trained over
    assert f"{run} already holds checkpoints (newest step-00000001): continue it with --resume" in line
    other = tmp_path / "other"
    train_wlf.main(_train_wlf_precompute_args(root, root / "data", other, "--seed", "1"))
    capsys.readouterr()
    for extra, needle in ((["--shards", str(other)], "other data than it was trained with (shards: "),
                          (["--max-samples", "4"], "samples: 5 then, 4 now"), (["--seed", "1"], "seed: 0 then, 1 now"),
                          (["--band-weights", "2,1,1,1"], "band_weights: [1.0, 1.0, 1.0, 1.0] then, [2.0, 1.0, 1.0, 1.0] now")):
        line = _train_wlf_error(train_wlf.main, args("--steps", "2", "--resume", *extra), capsys)
        assert needle in line and ("--allow-loss-change" if "band" in needle else "--allow-data-change") in line, line
    copy = tmp_path / "copy"
    shutil.copytree(root / "flux_shards", copy)
    train_wlf.main(args("--steps", "2", "--resume", "--shards", str(copy)))  # a moved folder: the same data
    train_wlf.main(args("--steps", "3", "--resume", "--shards", str(other), "--allow-data-change"))
    assert "--allow-data-change: continuing" in capsys.readouterr().out
    assert [r["step"] for r in _train_wlf_log(run)] == [1, 2, 3]


def test_train_wlf_resume_skips_damaged_checkpoints(_train_wlf_assets, tmp_path, capsys):
    """A backup copy beside the checkpoints is never read nor rotated; a truncated newest checkpoint and one with a
    changed byte are skipped, naming the file and why, and the run continues from the newest one that verifies,
    bit for bit as before (the re-run export equals the first); an explicit --resume of a damaged one is one line;
    log.jsonl holds each step once."""
    root, run = _train_wlf_assets, tmp_path / "run"
    ckpt = run / "checkpoints"
    args = lambda *extra: _train_wlf_train_args(root, "flux", run, "--batch-size", "1", "--checkpoint-every", "1",
                                                "--keep-checkpoints", "3", *extra)
    train_wlf.main(args("--steps", "3"))
    first = _train_wlf_tensors(run / "transformer.safetensors")
    shutil.copytree(ckpt / "step-00000002", ckpt / "step-00000002-backup")
    shard = ckpt / "step-00000003" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])
    capsys.readouterr()
    train_wlf.main(args("--steps", "3", "--resume"))
    out = capsys.readouterr().out
    assert f"skipped {ckpt / 'step-00000003'}: __0_0.distcp" in out and "(truncated?)" in out
    assert f"resumed from {ckpt / 'step-00000002'}" in out
    again = _train_wlf_tensors(run / "transformer.safetensors")
    assert all(torch.equal(again[k], first[k]) for k in first)  # step 3 re-run from step 2: the same bits

    data = bytearray(shard.read_bytes())  # the re-written step 3: one byte flipped, the size kept
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    train_wlf.main(args("--steps", "4", "--resume"))
    out = capsys.readouterr().out
    assert "__0_0.distcp does not match its sha256 in meta.json" in out and "resumed from " + str(ckpt / "step-00000002") in out
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000002", "step-00000002-backup", "step-00000003",
                                                      "step-00000004"]
    assert [r["step"] for r in _train_wlf_log(run)] == [1, 2, 3, 4]
    shutil.copy(ckpt / "step-00000003" / "__0_0.distcp", ckpt / "step-00000004" / "__0_0.distcp")
    line = _train_wlf_error(train_wlf.main, args("--steps", "5", "--resume", str(ckpt / "step-00000004")), capsys)
    assert line.startswith(f"error: --resume {ckpt / 'step-00000004'}: __0_0.distcp ")
    for step in ("00000002", "00000003"):  # none left that verifies: not trained over, the user decides
        (ckpt / f"step-{step}" / "__0_0.distcp").write_bytes(b"")
    line = _train_wlf_error(train_wlf.main, args("--steps", "5", "--resume"), capsys)
    assert f"none of the 3 checkpoints under {ckpt} verifies" in line


def test_runs_lock_of_an_earlier_torchrun_attempt_is_taken_over(tmp_path, monkeypatch):
    """A torchrun restart may bring rank 0 back on another node: the lock of the same job's earlier attempt (its
    run id, fewer restarts) is taken over; another job's, or the same attempt's, held on another host is not."""
    def held_by(**holder):
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "run" / runs.LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", **holder}))

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    try:
        held_by(run_id="job-7", restarts=0)
        runs.lock(tmp_path / "run")
        assert json.loads((tmp_path / "run" / runs.LOCK).read_text())["restarts"] == 1
    finally:
        runs.unlock_all()
    for holder in ({"run_id": "job-8", "restarts": 0}, {"run_id": "job-7", "restarts": 1}, {}):
        held_by(**holder)
        with pytest.raises(vae.UserError, match="is in use by pid 1 on elsewhere"):
            runs.lock(tmp_path / "run")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default names no job: nothing is taken over
    held_by(run_id=None, restarts=0)
    with pytest.raises(vae.UserError, match="is in use"):
        runs.lock(tmp_path / "run")


def test_train_wlf_lock_keeps_a_second_run_off_and_leftovers_go(_train_wlf_assets, tmp_path, capsys):
    """A run holds --out/run.lock: a second run on the same --out is refused naming the holder's pid and host; the
    holder, stopped by SIGTERM, releases it; a lock of a process that is gone is taken over; one from another host
    is refused. At the start, what killed processes left (temp files of an export, a checkpoint's temp folder, a
    half-deleted checkpoint) is removed, and nothing else."""
    root, run = _train_wlf_assets, tmp_path / "run"
    args = _train_wlf_train_args(root, "flux", run, "--steps", "1", "--checkpoint-every", "0", "--batch-size", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(train_wlf.__file__).parent)}
    holder = subprocess.Popen([sys.executable, train_wlf.__file__, *args, "--steps", "100000"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # the holder has started training once its log has a line
            if (run / "log.jsonl").exists() and (run / "log.jsonl").read_text():
                break
            assert holder.poll() is None, holder.stderr.read()
            time.sleep(0.2)
        line = _train_wlf_error(train_wlf.main, args, capsys)
        assert f"is in use by pid {holder.pid} on {socket.gethostname()}" in line
    finally:
        holder.terminate()
        holder.wait(timeout=60)
    assert not (run / "run.lock").exists()  # SIGTERM exits through the release

    (run / "run.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))  # gone now
    (run / ".transformer.safetensors.99999-0123abcd.tmp").write_bytes(b"half an export")
    (run / "..transformer.safetensors.99999-0123abcd.tmp.0123456789abcdef0123456789abcdef.tmp").write_bytes(b"x")
    (run / "checkpoints" / ".step-00000007.tmp").mkdir(parents=True)
    (run / "checkpoints" / "step-00000009").mkdir()  # a deletion killed after meta.json went
    (run / "checkpoints" / "step-00000009" / "__0_0.distcp").write_bytes(b"x")
    keep = [run / "notes.tmp", run / "checkpoints" / "step-00000009-backup" / "meta.json"]
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's")
    train_wlf.main(args)
    assert f"taking over the lock of pid {holder.pid}" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == ["args.json", "checkpoints", "log.jsonl", "notes.tmp",
                                                     "transformer.safetensors"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000009-backup"]
    assert all(p.read_text() == "the user's" for p in keep)
    (run / "run.lock").write_text(json.dumps({"pid": 1, "host": "another-host"}))
    assert "is in use by pid 1 on another-host" in _train_wlf_error(train_wlf.main, args, capsys)


def test_train_wlf_damaged_shard_fails_at_the_start(_train_wlf_assets, tmp_path, capsys):
    """A truncated shard, or one whose header was overwritten, fails when the shards are opened, naming the file,
    before the transformer (which does not exist here) is loaded."""
    root, shards = _train_wlf_assets, tmp_path / "shards"
    shutil.copytree(root / "flux_shards", shards)
    shard = shards / "shard-00001.safetensors"
    original = shard.read_bytes()
    argv = ["train", "--shards", str(shards), "--transformer", str(tmp_path / "nope"), "--out", str(tmp_path / "run")]
    shard.write_bytes(original[:-1000])
    line = _train_wlf_error(train_wlf.main, argv, capsys)
    assert f"{shards}: {shard.name} {len(original) - 1000} bytes, manifest.json says {len(original)} (truncated?)" in line
    shard.write_bytes(b"\xff" * 8 + original[8:])
    assert f"shard {shard}: unreadable" in _train_wlf_error(train_wlf.main, argv, capsys)
    shard.unlink()
    assert f"{shards}: {shard.name} missing" in _train_wlf_error(train_wlf.main, argv, capsys)


def test_train_wlf_two_ranks_skip_the_same_nan_steps(_train_wlf_assets, tmp_path):
    """2 ranks × batch 1 over 3 samples, one of them NaN: each step that draws it has a NaN loss on one rank only;
    both ranks skip that update (an all-reduced decision; otherwise FSDP's ranks would diverge or hang), the
    others train, and the export is finite."""
    root, shards = _train_wlf_assets, tmp_path / "shards"
    shutil.copytree(root / "flux_shards", shards)
    tensors = load_file(shards / "shard-00000.safetensors")
    tensors["latents"][0] = float("nan")
    save_file(tensors, shards / "shard-00000.safetensors")
    m = json.loads((shards / "manifest.json").read_text())
    m["shards"][0]["bytes"] = (shards / "shard-00000.safetensors").stat().st_size
    (shards / "manifest.json").write_text(json.dumps(m))
    stream = train_wlf.SampleStream(3, seed=0)
    bad = [s for s in range(1, 5) if 0 in (stream[2 * s - 2], stream[2 * s - 1])]
    assert 1 <= len(bad) < 4  # sample 0 is drawn in some steps, not in all
    args = _train_wlf_train_args(root, "flux", tmp_path / "run", "--shards", str(shards), "--steps", "4",
                                 "--batch-size", "1", "--max-samples", "3", "--checkpoint-every", "0", "--max-bad-steps", "4")
    result = _train_wlf_run(args, 2, tmp_path)
    log = _train_wlf_log(tmp_path / "run")
    assert [r["step"] for r in log if r["loss"] is None] == bad and log[-1]["skipped_updates"] == len(bad)
    assert result.stdout.count("update skipped") == len(bad)
    exported = _train_wlf_tensors(tmp_path / "run" / "transformer.safetensors")
    assert all(torch.isfinite(v).all() for v in exported.values())


def test_train_wlf_flops_count_each_stream_and_attention():
    """The MFU numerator for a tiny Flux equals a hand count: 2 FLOPs per multiply-add of every Linear over the
    tokens it sees (double blocks: image weights on image tokens, text weights on text tokens), 4·L²·D per joint
    attention, × 3 for forward + backward."""
    H, r, Li, Lt, C = 64, 2, 16, 8, 48
    params = mmdit.FluxParams(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=C, hidden_size=H,
                              mlp_ratio=float(r), num_heads=4, depth=2, depth_single_blocks=3, axes_dim=(4, 6, 6))
    L = Li + Lt
    macs = Li * 64 * H + Lt * C * H  # img_in, txt_in
    macs += (256 * H + H * H) * 2 + (32 * H + H * H)  # time_in, guidance_in, vector_in (one vector per sample)
    stream = (3 + 1 + 2 * r) * H * H  # qkv, proj, mlp per token
    macs += 2 * (Li * stream + Lt * stream + 2 * 6 * H * H + 2 * L * L * H)  # 2 double blocks (QKᵀ and AV: L²·H each)
    macs += 3 * (L * (3 + r) * H * H + L * (1 + r) * H * H + 3 * H * H + 2 * L * L * H)  # 3 single blocks
    macs += 2 * H * H + Li * H * 64  # final adaLN, final linear
    assert train_wlf.train_flops_per_sample(params, (8, 8), Lt) == 3 * 2 * macs


# --------------------------------------------------------------------------------------------------
# Several nodes: hybrid sharding (--shard-group), its memory plan, and checkpoints across layouts


def test_train_wlf_hsdp_matches_single_process_and_reshards(_train_wlf_assets, tmp_path):
    """Flux, fp32, global batch 4 everywhere, 3 steps, one checkpoint per step:
    B: one process, batch 4;
    A: torchrun 4 ranks × batch 1 as 2 groups × 2 shards (--shard-group 2: HSDP, a 2-D mesh);
    C: torchrun 2 ranks × batch 2 (one group: FSDP) resuming from A's step-1 checkpoint (2 × 2 -> 1 × 2);
    D: torchrun 4 ranks as 2 × 2 again, resuming from C's step-2 checkpoint (1 × 2 -> 2 × 2).
    Each rank draws the same positions of the sample stream whatever the layout, so all four compute the same
    updates; only the order of the fp32 sums differs."""
    root = _train_wlf_assets
    common = ("--steps", "3", "--max-grad-norm", "0", "--checkpoint-every", "1", "--keep-checkpoints", "3")
    run = {name: tmp_path / name for name in "abcd"}
    _train_wlf_run(_train_wlf_train_args(root, "flux", run["b"], *common, "--batch-size", "4"), 1, tmp_path)
    result = _train_wlf_run(_train_wlf_train_args(root, "flux", run["a"], *common, "--batch-size", "1",
                                                  "--shard-group", "2"), 4, tmp_path)
    assert "state sharded over 2 ranks, 2 replicas" in result.stdout
    # Each tensor is stored in 2 pieces, not 4: split over the 2 ranks of a group, the replica written once.
    from torch.distributed.checkpoint import FileSystemReader
    stored = FileSystemReader(str(run["a"] / "checkpoints" / "step-00000001")).read_metadata().state_dict_metadata
    assert {len(m.chunks) for k, m in stored.items() if k.startswith("model.")} == {2}
    for source, target, step, nproc, extra in ((run["a"], run["c"], 1, 2, ("--batch-size", "2")),
                                               (run["c"], run["d"], 2, 4, ("--batch-size", "1", "--shard-group", "2"))):
        name = f"step-{step:08d}"
        shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)
        result = _train_wlf_run(_train_wlf_train_args(root, "flux", target, *common, *extra, "--resume"), nproc, tmp_path)
        assert f"resumed from {target / 'checkpoints' / name} (step {step}" in result.stdout
    assert json.loads((run["c"] / "checkpoints" / "step-00000002" / "meta.json").read_text())["world_size"] == 2

    start = _train_wlf_tensors(root / "flux.safetensors")
    b = _train_wlf_tensors(run["b"] / "transformer.safetensors")
    assert max((b[k] - start[k]).abs().max().item() for k in b) > 1e-3  # 3 Adam steps of lr 1e-3 moved them
    log_b = {r["step"]: r for r in _train_wlf_log(run["b"])}
    for name in "acd":
        # The losses and gradient norms of the steps each run took (the resumed ones: the later steps). Measured:
        # equal to ≤ 1e-7 (rel). The norm is of the gradient after the reductions over ranks: a wrong averaging
        # factor (HSDP's all-reduce over the groups) would show here, not in Adam's scale-free update.
        for r in _train_wlf_log(run[name]):
            for key in ("loss", "grad_norm"):
                assert abs(r[key] - log_b[r["step"]][key]) <= 1e-5 * log_b[r["step"]][key], (name, key, r)
        other = _train_wlf_tensors(run[name] / "transformer.safetensors")
        assert other.keys() == b.keys()
        # One process multiplies a batch of 4 at once; 2 or 4 ranks sum their gradients over ranks: fp32 sums in
        # another order. A gradient element that nearly cancels over the 4 samples keeps few exact bits, and Adam
        # (m / √v) makes its update ~lr whatever its size: measured, the weights differ by ≤ 1.3e-6 (the updates
        # are 3e-3), 1.9e-5 of a tensor's largest weight. Between the distributed runs: 1.5e-6.
        error = max(rel(other[k], b[k]) for k in b)
        assert error <= 5e-5, (name, error)


def test_train_wlf_dry_run_shard_group(capsys):
    """--shard-group N divides the fp32 state (16 bytes per parameter) by N, not by the world size; the rest of
    the plan, per GPU, does not depend on how many groups there are. A --shard-group that does not divide the
    world is one line, for the plan and for training alike."""
    plan = lambda **kw: train_wlf.memory_plan(mmdit.CONFIGS["flux-dev"], **{
        "latent_hw": (256, 256), "text_tokens": 512, "batch": 4, "gpu_gib": 80, **kw})
    n = 11_901_408_320
    hsdp, fsdp8, fsdp32 = plan(world_size=32, shard_group=8), plan(world_size=8), plan(world_size=32)
    rows, rows32 = dict(hsdp["rows"]), dict(fsdp32["rows"])
    assert rows["parameters, fp32, sharded over 8"] == 4 * n / 8
    assert rows["gradients, fp32, sharded over 8"] == 4 * n / 8
    assert rows["AdamW moments m and v, fp32, sharded over 8"] == 8 * n / 8
    assert rows32["AdamW moments m and v, fp32, sharded over 32"] == 8 * n / 32
    assert hsdp["allocated"] == fsdp8["allocated"]  # 4 replicas of 8 GPUs: each GPU holds what 8 alone hold
    assert hsdp["allocated"] - fsdp32["allocated"] == 16 * n / 8 - 16 * n / 32
    # Flux-dev's largest block is a double block: 339,831,296 parameters, whose fp32 gradients are in flight
    # twice (the previous block's reduce-scatter overlaps this one's).
    assert rows["reduce-scatter inputs of 2 blocks in flight (fp32)"] == 2 * 4 * 339_831_296
    assert "HSDP (4 replicas × 8 shards)" in hsdp["header"] and "FSDP2," in fsdp32["header"]
    train_wlf.main(["train", "--dry-run", "--model", "flux-dev", "--resolution", "4096", "--f16", "--batch-size", "4",
                    "--world-size", "32", "--shard-group", "8", "--gpu-memory", "80"])
    out = capsys.readouterr().out
    assert "HSDP (4 replicas × 8 shards)" in out and "sharded over 8" in out and "fits" in out and "NOT" not in out
    for argv in (["train", "--dry-run", "--model", "flux-dev", "--world-size", "32", "--shard-group", "12"],
                 ["train", "--shards", "s", "--transformer", "t", "--out", "o", "--shard-group", "2"]):  # world 1
        group = argv[-1]
        with pytest.raises(SystemExit) as e:
            train_wlf.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.count("\n") == 0, err
        assert err.startswith(f"error: --shard-group {group} does not divide the world size"), err


# ====================================================================================================
# train_vae
# ====================================================================================================

_TRAIN_VAE_RES = 32  # crops: the tiny autoencoder is F2 as F8 (one down level), F4 as F16


@pytest.fixture(scope="module")
def _train_vae_assets(tmp_path_factory):
    """A tiny autoencoder in the official single-file layout, random LPIPS weights in the official layouts, and an
    image folder: textures of several sizes (one smaller than the crop), a corrupt file and a non-image."""
    root = tmp_path_factory.mktemp("train_vae")
    torch.manual_seed(0)
    params = vae.AutoEncoderParams(3, 8, 3, (1, 2), 1, 16, scale_factor=0.5, shift_factor=0.1, groups=4)
    ae = vae.AutoEncoder(params)
    with torch.no_grad():  # non-trivial norms, so a decoder that does not train would show
        for name, p in ae.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    vae.save_vae(ae, root / "ae.safetensors")
    lpips = metrics.LPIPS()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lpips.named_parameters():
            if name.startswith("features") and p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=g) * (2 / p[0].numel()) ** 0.5)
            elif name.startswith("lin"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.1)
    sd = lpips.state_dict()
    torch.save({k: v for k, v in sd.items() if k.startswith("features.")}, root / "vgg16-397923af.pth")
    torch.save({k: v for k, v in sd.items() if k.startswith("lin")}, root / "vgg.pth")
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 48), (64, 36), (33, 70), (24, 28)]):  # the last is below the crop
        yy, xx = np.mgrid[:h, :w]
        base = 127 + 100 * np.sin(xx[..., None] * (0.3 + 0.1 * i) + yy[..., None] * 0.2 + np.arange(3))
        image = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(data / ("sub" if i == 2 else "") / f"img{i}.png")
    (data / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (data / "notes.txt").write_text("not an image")
    return root


def _train_vae_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--vae", str(root / "ae.safetensors"), "--data", str(root / "data"), "--out", str(out),
            "--resolution", str(_TRAIN_VAE_RES), "--disc-channels", "8,16", "--lpips-vgg", str(root / "vgg16-397923af.pth"),
            "--lpips-heads", str(root / "vgg.pth"), "--workers", "0", "--log-every", "1", "--no-progress",
            "--lr", "1e-3", "--ema", "0.5", *extra]


def _train_vae_run(args: list[str], nproc: int, cwd: Path) -> subprocess.CompletedProcess:
    return _train_wlf_run(args, nproc, cwd, script=train_vae.__file__)


def _train_vae_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _train_vae_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _train_vae_models(root: Path, *extra: str):
    args = train_vae.build_parser().parse_args(_train_vae_args(root, root / "unused", *extra))
    return args, train_vae.load_models(args, torch.device("cpu"))


def _train_vae_batch(root: Path, n: int = 2) -> torch.Tensor:
    files = train_vae.list_images(root / "data")
    stream = train_vae.CropStream(files, _TRAIN_VAE_RES, seed=0)
    return torch.stack([stream[p]["image"] for p in range(n)])


def _train_vae_lpips_reference(x, y, root: Path) -> torch.Tensor:
    """LPIPS v0.1 (Zhang et al. 2018) per sample, in float64 with functional ops on the raw weight files (not through
    metrics.LPIPS): ImageNet scaling; torchvision's VGG16 convs (indices 0 .. 28), each with a ReLU, a 2×2 max-pool
    before convs 5, 10, 17 and 24; at relu1_2 .. relu5_3 (after convs 2, 7, 14, 21, 28) channels scaled to unit norm
    per pixel (+1e-10), squared differences weighted by the heads, averaged over the pixels; summed over the taps."""
    vgg = {k: v.double() for k, v in torch.load(root / "vgg16-397923af.pth", weights_only=True).items()}
    heads = torch.load(root / "vgg.pth", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(3, 1, 1)
    h, distance, tap = (torch.cat([x, y]).double() - shift) / scale, 0, 0
    for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28):
        if i in (5, 10, 17, 24):
            h = F.max_pool2d(h, 2)
        h = F.relu(F.conv2d(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1))
        if i in (2, 7, 14, 21, 28):
            ux, uy = (h / (torch.sqrt((h * h).sum(1, keepdim=True)) + 1e-10)).chunk(2)
            w = heads[f"lin{tap}.model.1.weight"].double().flatten()
            distance = distance + torch.einsum("bchw,c->b", (ux - uy) ** 2, w) / (h.shape[2] * h.shape[3])
            tap += 1
    return distance


def test_train_vae_loss_terms_and_adaptive_weight(_train_vae_assets):
    """Every term of Eq. 4 is finite and is what its definition says; the adaptive weight equals the ratio of the two
    gradient norms on decoder.conv_out.weight computed by hand with backward(); only the decoder gets gradients."""
    root = _train_vae_assets
    args, m = _train_vae_models(root)
    x = _train_vae_batch(root)
    g = train_vae.generator_losses(m, x, args, adversarial=True)
    for k in ("l2", "sc", "lpips", "adv", "w", "total"):
        assert g[k].ndim == 0 and math.isfinite(g[k].item()) and (k == "adv" or g[k].item() > 0), (k, g[k])

    with torch.no_grad():  # the terms from their definitions, on the models' own outputs
        x_hat, f_s = m.student.decode(m.student.encode(x), return_feature=True)
        _, f_t = m.teacher.decode(m.teacher.encode(x), return_feature=True)
        assert f_s.shape[-1] * 2 == f_t.shape[-1] == x.shape[-1]  # F16 student at H/2, F8 teacher at H
        up = f_s.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)  # nearest ×2, written differently
        # float32 means of the same numbers, summed in another order: a few ulps
        torch.testing.assert_close(g["sc"], ((f_t - up) ** 2).mean(), rtol=1e-6, atol=0)
        torch.testing.assert_close(g["l2"], ((x_hat - x) ** 2).mean(), rtol=1e-6, atol=0)
        # LPIPS(x̂, x) from its definition in float64: float32 through 13 convs is ~1e-6 off, 1e-5 leaves BLAS room
        assert rel(g["lpips"], _train_vae_lpips_reference(g["x_hat"], x, root).mean()) < 1e-5
    # total = L2 + λ_sc·L_sc + λ_lpips·LPIPS + λ_adv·w·L_adv with the paper's defaults 1.0, 0.1, 0.05
    expected = g["l2"] + 1.0 * g["sc"] + 0.1 * g["lpips"] + 0.05 * g["w"] * g["adv"]
    torch.testing.assert_close(g["total"], expected, rtol=1e-6, atol=0)

    # w by hand: two backward passes, reading conv_out.weight.grad
    last = m.student.decoder.conv_out.weight
    g["lpips"].backward(retain_graph=True)
    grad_lpips = last.grad.clone()
    m.student.decoder.zero_grad(set_to_none=True)
    g["adv"].backward(retain_graph=True)
    grad_adv = last.grad.clone()
    m.student.decoder.zero_grad(set_to_none=True)
    hand = grad_lpips.norm() / grad_adv.norm()
    assert 0 < hand.item() < 1e4
    torch.testing.assert_close(g["w"], hand, rtol=1e-5, atol=0)
    assert not g["w"].requires_grad  # detached: w is a constant of the step

    g["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student.decoder.parameters())
    frozen = [*m.student.encoder.parameters(), *m.teacher.parameters(), *m.lpips.parameters(), *m.disc.parameters()]
    assert all(p.grad is None for p in frozen)  # nothing else trains in the decoder's step

    # the clamp (the decoder did not change, so the unclamped w is `hand` again)
    args.max_adaptive_weight = 0.5 * hand.item()
    clamped = train_vae.generator_losses(m, x, args, adversarial=True)["w"]
    assert clamped.item() == pytest.approx(0.5 * hand.item(), rel=1e-6)


def test_train_vae_discriminator_and_its_losses():
    torch.manual_seed(0)
    d = train_vae.Discriminator((8, 16, 32))
    x = torch.randn(2, 3, 64, 48)
    for _ in range(20):  # power iterations converge while training
        out = d(x)
    assert out.shape == (2, 1, 8, 6)  # one logit per 8×8 patch
    for conv in (d.net[0], d.net[2], d.net[5]):  # the spectral-normalized 3×3 stride-2 convs
        sigma = torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2)
        assert abs(sigma.item() - 1) < 0.05 and conv.stride == (2, 2)
    assert isinstance(d.net[3], torch.nn.InstanceNorm2d) and not isinstance(d.net[1], torch.nn.InstanceNorm2d)
    # hinge: relu(1 − real) and relu(1 + fake), each averaged
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert train_vae.hinge_d_loss(real, fake).item() == pytest.approx((0 + 0.5) / 2 + (0 + 1.5) / 2)
    # gradient penalty of a linear critic D(x) = Σ_c w_c x_c per pixel: ∇ₓ Σ D = w at every pixel, so
    # ‖∇‖ = ‖w‖·√(H·W) for every sample
    w = torch.tensor([0.01, -0.02, 0.03]).view(1, 3, 1, 1)
    real = torch.randn(2, 3, 5, 4, requires_grad=True)
    gp = train_vae.gradient_penalty(F.conv2d(real, w), real)
    assert gp.item() == pytest.approx((w.norm().item() * math.sqrt(20) - 1) ** 2, rel=1e-5)


def test_train_vae_trains_only_the_decoder_and_exports_f16(_train_vae_assets, tmp_path):
    """3 steps in this process: all logged terms finite, the export loads with load_vae as F16 (file and diffusers
    folder), its encoder is the pretrained one bit for bit (so the encoder's output is unchanged), its decoder is the
    EMA of the trained one, and the unreadable file is skipped."""
    root, run = _train_vae_assets, tmp_path / "run"
    train_vae.main(_train_vae_args(root, run, "--steps", "3", "--batch-size", "2", "--gp-weight", "10"))
    log = _train_vae_log(run)
    assert [r["step"] for r in log] == [1, 2, 3]
    for r in log:
        for k in ("total", "l2", "sc", "lpips", "adv", "w", "d", "gp", "grad_norm"):
            assert math.isfinite(r[k]), (k, r)
    assert sum(r["skipped_images"] for r in log) >= 1  # 6 draws cover the first epoch of 5 files: broken.jpg too

    start = _train_vae_tensors(root / "ae.safetensors")
    for path in (run / "vae-f16.safetensors", run / "vae-f16"):
        ae = vae.load_vae(path)
        assert ae.params.stride == 2 and ae.factor == 4
        assert (ae.params.scale_factor, ae.params.shift_factor, ae.params.groups) == (0.5, 0.1, 4)
        sd = ae.state_dict()
        # bitwise: the encoder is frozen, its weights are copied and never recomputed
        assert all(torch.equal(sd[k], start[k]) for k in sd if k.startswith("encoder."))
        moved = max((sd[k] - start[k]).abs().max().item() for k in sd if k.startswith("decoder."))
        assert moved > 1e-4
    mask = os.umask(0o022)
    os.umask(mask)
    for path in (run / "vae-f16.safetensors", run / "vae-f16" / "diffusion_pytorch_model.safetensors", run / "log.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path  # not safetensors' private 0600
    exported = vae.load_vae(run / "vae-f16.safetensors")
    before = vae.load_vae(root / "ae.safetensors", stride=2)
    x = _train_vae_batch(root)
    with torch.no_grad():  # bitwise: the same weights through the same code
        assert torch.equal(exported.encode(x), before.encode(x))
    # the exported decoder is the EMA kept in the last checkpoint (bitwise: the same tensors, saved twice), which
    # differs from the raw weights (decay 0.5)
    state = torch.load(run / "checkpoints" / "step-00000003" / "state.pt", weights_only=True)
    names = [n for n, _ in exported.decoder.named_parameters()]
    for name, e in zip(names, state["ema"]):
        assert torch.equal(exported.decoder.state_dict()[name], e)
    assert any(not torch.equal(state["decoder"][n], e) for n, e in zip(names, state["ema"]))


def test_train_vae_torchrun_matches_one_process_and_resumes(_train_vae_assets, tmp_path):
    """A: torchrun 2 ranks × batch 1, 4 steps, checkpoints at 2 and 4;  B: one process, batch 2 — the same global
    batch;  C: torchrun 2 ranks resuming A's step-2 checkpoint. B matches A up to reduction order, C is A bit for bit."""
    root = _train_vae_assets
    run_a, run_b, run_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = ["--steps", "4", "--gp-weight", "10", "--max-grad-norm", "0.05", "--checkpoint-every", "2"]
    _train_vae_run(_train_vae_args(root, run_a, *common, "--batch-size", "1"), 2, tmp_path)
    _train_vae_run(_train_vae_args(root, run_b, *common, "--batch-size", "2"), 1, tmp_path)
    for step in ("00000002", "00000004"):
        shutil.copytree(run_a / "checkpoints" / f"step-{step}", run_c / "checkpoints" / f"step-{step}")
    state = run_c / "checkpoints" / "step-00000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:-10])  # a newest checkpoint cut short: rank 0 skips it, both ranks agree
    (run_c / "checkpoints" / ".step-00000003.tmp").mkdir()  # a crashed save: never picked, removed at the start
    result = _train_vae_run(_train_vae_args(root, run_c, *common, "--batch-size", "1", "--resume"), 2, tmp_path)
    assert "skipped" in result.stdout and "step-00000004: state.pt" in result.stdout and "truncated" in result.stdout
    assert "resumed from" in result.stdout and "step 2" in result.stdout
    assert not (run_c / "checkpoints" / ".step-00000003.tmp").exists()

    log_a, log_b = _train_vae_log(run_a), _train_vae_log(run_b)
    assert [r["step"] for r in log_a] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0.05 for r in log_a)  # clipping was active
    for ra, rb in zip(log_a, log_b):
        # 2 ranks × 1 against 1 × 2: the same numbers, averaged over the ranks instead of over one batch
        for k in ("l2", "sc", "lpips", "adv", "d", "gp"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5), (k, ra, rb)
        # w is a ratio of two small gradient norms: 1e-3. A per-rank w (not averaged) is off by ~25% here.
        assert ra["w"] == pytest.approx(rb["w"], rel=1e-3)
    a, b = _train_vae_tensors(run_a / "vae-f16.safetensors"), _train_vae_tensors(run_b / "vae-f16.safetensors")
    c, start = _train_vae_tensors(run_c / "vae-f16.safetensors"), _train_vae_tensors(root / "ae.safetensors")
    assert a.keys() == b.keys() == c.keys() == start.keys()
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 2e-3  # 4 Adam steps of lr 1e-3 moved it
    for k in a:
        # Adam divides by √v: entries with near-zero gradients turn reduction-order ulps into up to ~1e-5 here;
        # unsynchronized ranks or a per-rank w differ by ~2e-3.
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)
        torch.testing.assert_close(c[k], a[k], rtol=0, atol=0, msg=k)  # the resume is a re-run: bitwise
    assert sorted(p.name for p in (run_a / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert [r["step"] for r in _train_vae_log(run_c)] == [3, 4]  # the steps it ran


def test_train_vae_nan_steps_stop_the_run_and_keep_the_good_checkpoint(_train_vae_assets, tmp_path, capsys):
    """--lr 1e8: step 1 is finite, then every loss is NaN. The skipped steps save nothing, 3 in a row stop the run
    with status 2 and one line; the step-1 checkpoint (--keep-checkpoints 1) verifies, loads, and no export exists."""
    root, run = _train_vae_assets, tmp_path / "run"
    line = _train_wlf_error(train_vae.main, _train_vae_args(root, run, "--lr", "1e8", "--steps", "8", "--batch-size",
                                                            "2", "--checkpoint-every", "1", "--keep-checkpoints", "1"),
                            capsys)
    assert "step 4: loss or gradient norm not finite in 3 steps in a row" in line and "step-00000001" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]
    assert runs.verify(run / "checkpoints" / "step-00000001")["step"] == 1
    state = torch.load(run / "checkpoints" / "step-00000001" / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["decoder"].values())
    assert not (run / "vae-f16.safetensors").exists() and not (run / "vae-f16").exists()
    assert [r["skipped_updates"] for r in _train_vae_log(run)] == [0, 1, 2]


def test_train_vae_resume_checks_data_settings_and_checkpoints(_train_vae_assets, tmp_path, capsys):
    """--resume refuses other images (another --data) and other loss weights, naming them; a backup copy beside the
    checkpoints is never read nor rotated; a truncated newest checkpoint is skipped (saying why) and the run
    continues from the one before, its log holding each step once; an explicit --resume of a damaged checkpoint is
    one line. A live process holding the lock keeps the run off."""
    root, run = _train_vae_assets, tmp_path / "run"
    ckpt = run / "checkpoints"
    args = lambda *extra: _train_vae_args(root, run, "--batch-size", "1", "--checkpoint-every", "1", *extra)
    train_vae.main(args("--steps", "2"))
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    shutil.copy(data / "img0.png", data / "img9.png")
    capsys.readouterr()
    for extra, needle in ((["--data", str(data)], "other data than it was trained with (bytes: "),
                          (["--lambda-sc", "2"], "other loss settings than it was trained with (lambda_sc: 1.0 then, 2.0 now)")):
        assert needle in _train_wlf_error(train_vae.main, args("--steps", "3", "--resume", *extra), capsys)

    shutil.copytree(ckpt / "step-00000002", ckpt / "step-00000002-backup")
    state = ckpt / "step-00000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:-10])
    line = _train_wlf_error(train_vae.main, args("--steps", "3", "--resume", str(ckpt / "step-00000002")), capsys)
    assert f"--resume {ckpt / 'step-00000002'}: state.pt" in line and "(truncated?)" in line
    train_vae.main(args("--steps", "3", "--resume"))
    out = capsys.readouterr().out
    assert f"skipped {ckpt / 'step-00000002'}: state.pt" in out and f"resumed from {ckpt / 'step-00000001'}" in out
    assert [r["step"] for r in _train_vae_log(run)] == [1, 2, 3]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000002", "step-00000002-backup", "step-00000003"]

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / "run.lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        line = _train_wlf_error(train_vae.main, args("--steps", "4", "--resume"), capsys)
        assert f"is in use by pid {sleeper.pid} on {socket.gethostname()}" in line
    finally:
        sleeper.kill()
        sleeper.wait()


def test_train_vae_eval_reports_f8_and_f16_before_and_after(_train_vae_assets, tmp_path):
    """Each row is the round trip of the image's centre square through the autoencoder it names, loaded from the
    file the flags give: "F16 after" is a decoder unlike the pretrained one, so a row taken from the wrong model
    would show."""
    root = _train_vae_assets
    after, f16 = vae.load_vae(root / "ae.safetensors", stride=2), tmp_path / "f16.safetensors"
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a "trained" F16 decoder: every weight moved
        for p in after.decoder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    vae.save_vae(after, f16)
    out = tmp_path / "eval.json"
    train_vae.main(["--vae", str(root / "ae.safetensors"), "--eval", str(root / "data"), "--trained", str(f16),
                    "--eval-size", "32", "--lpips-vgg", str(root / "vgg16-397923af.pth"), "--lpips-heads",
                    str(root / "vgg.pth"), "--json", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    assert list(result["summary"]) == ["F8", "F16 before", "F16 after"]
    assert result["settings"]["images"] == 4 and [s["file"].endswith("broken.jpg") for s in result["skipped"]] == [True]
    # img1.png by hand: shorter side to 32 (Lanczos), 36×64 -> 32×57, centre rows 12..44; a round trip through
    # each file, clamped, rounded to 8 bits; PSNR in numpy
    image = Image.open(root / "data" / "img1.png").convert("RGB").resize((32, 57), Image.Resampling.LANCZOS)
    rgb = np.asarray(image.crop((0, 12, 32, 44))).astype(np.float64)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1

    def psnr(ae):
        with torch.no_grad():
            y = ae.decode(ae.encode(x))
        rec = ((y[0].clamp(-1, 1).permute(1, 2, 0) + 1) * 127.5).round().double().numpy()
        return 10 * np.log10(255**2 / np.mean((rec - rgb) ** 2))

    hand = {"F8": psnr(vae.load_vae(root / "ae.safetensors")),
            "F16 before": psnr(vae.load_vae(root / "ae.safetensors", stride=2)), "F16 after": psnr(vae.load_vae(f16))}
    for name, value in hand.items():
        row = next(r for r in result["images"][name] if r["file"] == "img1.png")
        # the same float32 round trip as --eval's; only the float64 PSNR arithmetic may differ in the last bits
        assert row["psnr"] == pytest.approx(value, rel=1e-9), name
    # the three autoencoders are told apart by far more than that tolerance (0.06 dB and more here)
    assert min(abs(hand["F16 after"] - hand["F16 before"]), abs(hand["F8"] - hand["F16 before"])) > 0.01


def test_train_vae_bad_input_is_one_line(_train_vae_assets, tmp_path, capsys, monkeypatch):
    root = _train_vae_assets
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    good = _train_vae_args(root, tmp_path / "run", "--steps", "1")
    without_lpips = [a for a in good if a not in ("--lpips-vgg", str(root / "vgg16-397923af.pth"))]
    (tmp_path / "nothing").mkdir()
    cases = [
        (without_lpips, "LPIPS needs vgg16-397923af.pth"),
        ([*good, "--data", str(tmp_path / "nope")], "no such directory"),
        ([*good, "--data", str(tmp_path / "nothing")], "no images"),
        ([*good, "--vae", str(tmp_path / "nope.safetensors")], "autoencoder weights not found"),
        ([*good, "--resolution", "30"], "--resolution must be a multiple of 4"),
        ([*good, "--resume", str(tmp_path / "nope")], "no such checkpoint folder"),
        ([*good, "--ema", "1"], "--ema: must be a finite number ≥ 0 and < 1, got '1'"),
        ([*good, "--lr", "nan"], "--lr: must be a finite number > 0, got 'nan'"),
        ([*good, "--lambda-adv=-1"], "--lambda-adv: must be a finite number ≥ 0, got '-1'"),
        ([*good, "--disc-start=-1"], "--disc-start: must be a whole number of at least 0, got '-1'"),
        ([*without_lpips, "--lambda-lpips", "0"], "--lambda-adv needs --lambda-lpips > 0"),
        ([*good, "--out", str(root / "ae.safetensors")], "is a file, not a folder"),
        ([a for a in good if a not in ("--out", str(tmp_path / "run"))], "training needs --out"),
        (["--vae", str(root / "ae.safetensors"), "--eval", str(tmp_path / "nothing")], "no images"),
        (["--vae", str(root / "ae.safetensors"), "--eval", str(root / "data"), "--trained", str(tmp_path / "x")],
         "not found"),
        (["--vae", str(root / "ae.safetensors"), "--eval", str(root / "data"), "--trained", str(root / "ae.safetensors"),
          "--lpips-vgg", str(root / "vgg16-397923af.pth"), "--lpips-heads", str(root / "vgg.pth")], "not an F16"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            train_vae.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (message, err)
    # resuming with another global batch is refused
    run = tmp_path / "r"
    train_vae.main(_train_vae_args(root, run, "--steps", "1", "--batch-size", "1"))
    with pytest.raises(SystemExit):
        train_vae.main(_train_vae_args(root, run, "--steps", "2", "--batch-size", "2", "--resume"))
    assert "other data than it was trained with (global_batch: 1 then, 2 now)" in capsys.readouterr().err
    # without LPIPS (no VGG weights anywhere) the objective is L2 + λ_sc·L_sc, as the demo trains it
    run = tmp_path / "no-lpips"
    train_vae.main([*without_lpips, "--out", str(run),
                    "--lambda-lpips", "0", "--lambda-adv", "0"])
    assert (run / "vae-f16.safetensors").is_file() and _train_vae_log(run)[-1]["lpips"] == 0


# ---------------------------------------------------------------------------------------------------------
# Elastic restarts and clusters (both training scripts): launchers, devices, shared storage, rank 0's errors

def test_pick_device_follows_the_launcher(monkeypatch, capsys, tmp_path):
    """cuda: GPU LOCAL_RANK, or GPU 0 when the launcher shows each process one GPU (CUDA_VISIBLE_DEVICES); cuda:N
    with several ranks on the node (all on one GPU) is refused in one line, through the real CLI too."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for var in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)

    def pick(name, count, **env):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        try:
            return vae.pick_device(name)
        except vae.UserError as e:
            return str(e)
        finally:
            for key in env:
                monkeypatch.delenv(key)

    assert pick("cuda", 8, LOCAL_RANK=3, LOCAL_WORLD_SIZE=8) == torch.device("cuda", 3) == chosen[-1]
    assert pick("cuda", 1, LOCAL_RANK=3, LOCAL_WORLD_SIZE=8) == torch.device("cuda", 0) == chosen[-1]  # one visible
    assert pick("cuda", 1) == torch.device("cuda", 0)
    assert pick("cuda:1", 2) == torch.device("cuda", 1)  # one process: any GPU it names
    assert pick("cuda", 4, LOCAL_RANK=5, LOCAL_WORLD_SIZE=6) == ("--device cuda: LOCAL_RANK is 5 but this process "
                                                                  "sees 4 GPUs")
    assert pick("cuda:1", 2, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2) == ("--device cuda:1: 2 ranks on this node would all "
                                                                   "use that one GPU; use --device cuda (each rank "
                                                                   "takes GPU LOCAL_RANK)")
    assert pick("cuda:5", 2) == "--device cuda:5: this machine has 2 GPU(s)"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        train_vae.main(["--vae", "x.safetensors", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                        "--device", "cuda:0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["error: --device cuda:0: 2 ranks on this node would all use that one GPU; "
                                         "use --device cuda (each rank takes GPU LOCAL_RANK)"]
    assert not (tmp_path / "run").exists()  # refused before the run folder is touched


def test_srun_without_torchrun_is_refused(tmp_path, monkeypatch, capsys):
    """`srun -n 4 python train_wlf.py train ...` starts 4 processes that do not know of each other: each would be a
    1-rank run in the same folder. Refused in one line before anything is written (the real CLI, a fresh process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(SLURM_PROCID="1", SLURM_NTASKS="4", PYTHONPATH=str(Path(train_wlf.__file__).parent))
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, train_wlf.__file__, "train", "--shards", str(tmp_path / "shards"),
                             "--transformer", str(tmp_path / "t.safetensors"), "--out", str(out), "--device", "cpu"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: started 4 times by srun without torchrun: run one torchrun per node, see README"], result.stderr
    assert not out.exists()
    # torchrun --max-restarts with the rendezvous store it shares with the ranks by default: a restart would read
    # the dead group's addresses (it failed to connect, or hung, in the restart test below without the variable)
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "3",
                       "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as e:
        train_vae.main(["--vae", "x.safetensors", "--data", str(tmp_path), "--out", str(out), "--device", "cpu"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        "error: torchrun --max-restarts 3: start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its "
        "environment, or a restart cannot connect; see README"]
    assert not out.exists()


def test_train_vae_throughput_window_restarts_after_a_checkpoint(_train_vae_assets, tmp_path, monkeypatch):
    """The images/s of a log line counts the steps since the window began, over the time since then: a save
    (checkpoint every step, log every 2) starts a new window in both. A clock that ticks 1 s per reading makes
    every window 1 step in 1 s: images/s = the batch. Counting the steps from the last log line instead (as
    before) gave 2 steps over 1 s: 2× the real rate after every checkpoint."""
    import itertools
    import types
    clock = itertools.count()
    monkeypatch.setattr(train_vae, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    run = tmp_path / "run"
    train_vae.main(_train_vae_args(_train_vae_assets, run, "--steps", "4", "--batch-size", "2", "--log-every", "2",
                                   "--checkpoint-every", "1"))
    assert [(r["step"], r["images_per_s"]) for r in _train_vae_log(run)] == [(2, 2.0), (4, 2.0)]
    assert json.loads((run / "images.json").read_text()) == ["broken.jpg", "img0.png", "img1.png", "img3.png",
                                                              "sub/img2.png"]  # the list rank 0 trained on


_TWO_RANKS = '''
import json, sys
from pathlib import Path
import torch.distributed as dist
import runs
rank, world, _ = runs.setup_distributed("cpu")
out, result = Path(sys.argv[1]), {}


def bug():
    raise TypeError("an unexpected type")  # neither vae.UserError nor OSError


for name, call in (("bug", lambda: runs.on_rank0(bug)),
                   ("pick", lambda: runs.pick_checkpoint(out, None)),  # on rank 1 (rank 0: no checkpoints yet)
                   ("shared", lambda: runs.check_shared(out)),
                   ("local", lambda: runs.check_shared(out / f"local{rank}"))):  # node-local disks, one name
    try:
        result[name] = ["ok", call()]
    except Exception as e:
        result[name] = [type(e).__name__, str(e)]
(out / f"rank{rank}.json").write_text(json.dumps(result))
dist.barrier()  # both done before the group goes (gloo's teardown races otherwise, as at the end of training)
dist.destroy_process_group()
'''


def test_two_ranks_hear_of_rank0_errors_and_of_an_unshared_folder(tmp_path):
    """torchrun, 2 ranks (gloo): an exception of an unexpected type inside runs.on_rank0 is raised again on rank 0
    and reaches rank 1 as one line (it waited in the broadcast before: 30 minutes); rank 1 may not pick a checkpoint
    itself; a folder rank 1 cannot see (each rank its own folder of the same name: node-local disks) is one line
    on both ranks naming rank 1 and its host, a shared one passes."""
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    for r in (0, 1):
        (tmp_path / f"local{r}").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(runs.__file__).parent)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["bug"] == ["TypeError", "an unexpected type"]
    assert r1["bug"] == ["UserError", "rank 0 failed: TypeError: an unexpected type"]
    assert r0["pick"] == ["ok", [None, None]] and r1["pick"][0] == "RuntimeError"
    assert r0["shared"] == r1["shared"] == ["ok", None]
    blind = f"--out {tmp_path / 'local0'}: not visible to rank 1 on {socket.gethostname()}; the run folder must be"
    assert r0["local"][0] == "UserError" and r0["local"][1].startswith(blind), r0["local"]
    assert r1["local"][0] == "UserError" and "not visible to rank 1 on" in r1["local"][1]
    assert "rank 0 on" not in r0["local"][1]
    assert not [p for p in tmp_path.rglob(".shared.*")]  # the tokens are removed


def test_train_vae_torchrun_restart_after_a_killed_rank_continues_exactly(_train_vae_assets, tmp_path):
    """torchrun --max-restarts 1, 2 ranks, 4 steps, a checkpoint each step; rank 0 (the lock's pid) is killed with
    SIGKILL as soon as the first checkpoint exists. torchrun restarts both ranks with the same command (no
    --resume); they continue from the newest checkpoint that verifies, and the export equals an uninterrupted
    run's bit for bit: the same computation on the same world size."""
    import signal
    root, ref, run = _train_vae_assets, tmp_path / "ref", tmp_path / "run"
    common = ["--steps", "4", "--batch-size", "1", "--checkpoint-every", "1", "--keep-checkpoints", "2"]
    _train_vae_run(_train_vae_args(root, ref, *common), 2, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(train_vae.__file__).parent),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # see test_srun_without_torchrun_is_refused
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--max-restarts=1", "--monitor-interval=0.1", train_vae.__file__, *_train_vae_args(root, run, *common)]
    job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not runs.list_checkpoints(run):
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.005)
        rank0 = json.loads((run / "run.lock").read_text())["pid"]
        os.kill(rank0, signal.SIGKILL)
        stdout, stderr = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, stdout[-3000:] + stderr[-3000:]
    restarted = stdout[stdout.index("restart 1 by torchrun"):]  # what the second group printed
    assert f"taking over the lock of pid {rank0}" in stdout and "resumed from" in restarted
    step = int(restarted.split(" at step ")[1].split()[0])
    assert 1 <= step < 4  # the kill came before the end
    assert [r["step"] for r in _train_vae_log(run)] == [1, 2, 3, 4]  # each step once
    a, b = _train_vae_tensors(ref / "vae-f16.safetensors"), _train_vae_tensors(run / "vae-f16.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


# ====================================================================================================
# fp8 weights (fp8.py): files as distributed, storage at load, the CLI
# ====================================================================================================

import fp8

_FP8_FLUX = mmdit.FluxParams(in_channels=16, out_channels=16, vec_in_dim=12, context_in_dim=24, hidden_size=64,
                             mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=(8, 12, 12),
                             guidance_embed=False)
_FP8_T5 = te.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)


def _fp8_block_weights(model) -> list[str]:
    """The keys of the Linear weights inside the blocks: what fp8.store keeps in fp8."""
    name = {id(m): n for n, m in model.named_modules()}
    blocks = model.blocks() if isinstance(model, mmdit.Flux) else model.encoder.block
    return [f"{name[id(b)]}.{n}.weight" for b in blocks for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)]


def _fp8_files(model, kind: str, fmt=torch.float8_e4m3fn) -> tuple[dict, dict]:
    """(the tensors of an fp8 file of `model` as distributed, the dequantized state dict they stand for). plain:
    every matrix cast to fmt (block Linears and embedders alike), no scales; scaled: ComfyUI's layout, the block
    Linears quantized with a per-tensor scale_weight, a `scaled_fp8` marker written with torch.empty (here: NaN bits,
    which a loader must not screen) and scale_input keys, which it must drop."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    file, dequantized = dict(sd), dict(sd)
    for k in (_fp8_block_weights(model) if kind == "scaled" else [k for k, v in sd.items() if v.dim() == 2]):
        q, s = fp8.quantize(sd[k], fmt) if kind == "scaled" else (sd[k].to(fmt), torch.tensor(1.0))
        file[k], dequantized[k] = q, q.float() * s
        if kind == "scaled":
            file[k[:-len("weight")] + "scale_weight"] = s
            file[k[:-len("weight")] + "scale_input"] = torch.tensor(0.5)
    if kind == "scaled":
        file["scaled_fp8"] = torch.full((2,), float("nan")).to(fmt)
    return file, dequantized


@pytest.mark.parametrize("kind, fmt", [("plain", torch.float8_e4m3fn), ("plain", torch.float8_e5m2),
                                       ("scaled", torch.float8_e4m3fn)])
def test_fp8_flux_file_equals_the_model_of_its_dequantized_weights(tmp_path, kind, fmt):
    torch.manual_seed(0)
    model = mmdit.Flux(_FP8_FLUX).eval()
    file, dequantized = _fp8_files(model, kind, fmt)
    hints = {"mmdit_params": json.dumps({"axes_dims_rope": [8, 12, 12]})}
    save_file({mmdit.OFFICIAL_PREFIX + k: v for k, v in file.items()}, tmp_path / "flux1-dev-fp8.safetensors", hints)
    loaded = mmdit.load_transformer(tmp_path / "flux1-dev-fp8.safetensors", dtype=torch.float32)
    reference = mmdit.Flux(_FP8_FLUX).eval()
    reference.load_state_dict(dequantized)
    kept = loaded.state_dict()
    assert {kept[k].dtype for k in _fp8_block_weights(model)} == {fmt}  # stored in fp8, not upcast at load
    assert kept["img_in.weight"].dtype == torch.float32  # a plain file's fp8 embedder: dequantized
    inp = _mmdit_flux_inputs(h=4, w=8, n_txt=3, guidance=False)
    with torch.no_grad():
        out, ref = loaded(**inp), reference(**inp)
    # The same fp32 products (s·Q formed exactly in fp32 both ways), summed by the same kernels: round-off only.
    assert rel(out, ref) <= 1e-6
    assert rel(out, model(**inp).detach()) > 1e-4  # the fp8 rounding is there: the test sees the file's weights
    widened = mmdit.load_transformer(tmp_path / "flux1-dev-fp8.safetensors", dtype=torch.float32,
                                     weight_dtype=torch.float32)  # dequantized at load: plain Linears
    assert not any(isinstance(m, fp8.Fp8Linear) for m in widened.modules())
    with torch.no_grad():
        assert rel(widened(**inp), ref) <= 1e-6


@pytest.mark.parametrize("kind", ["plain", "scaled"])
def test_fp8_t5_file_equals_the_model_of_its_dequantized_weights(tmp_path, kind):
    torch.manual_seed(0)
    model = te.T5Encoder(_FP8_T5).eval()
    file, dequantized = _fp8_files(model, kind)
    save_file(file, tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    reference = te.T5Encoder(_FP8_T5).eval()
    reference.load_state_dict(dequantized)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    loaded = te.load_t5(tmp_path / "t5xxl_fp8_e4m3fn.safetensors", dtype=torch.float32)
    assert loaded.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        assert rel(loaded(ids), reference(ids)) <= 1e-6  # as for Flux: the same products, round-off only
        # fp16 compute: `wo` still computes in fp32 (its products overflow fp16), now from its fp8 weight.
        half = te.load_t5(tmp_path / "t5xxl_fp8_e4m3fn.safetensors", dtype=torch.float16)
        assert half.encoder.block[0].layer[1].DenseReluDense.wo.compute_dtype == torch.float32
        assert rel(half(ids).float(), reference(ids)) <= 2e-3  # fp16 activations: ~2^-11 per rounding, 2 layers


@pytest.mark.parametrize("fmt, bound", [(torch.float8_e4m3fn, 2**-4), (torch.float8_e5m2, 2**-3)])
def test_fp8_storage_of_a_checkpoint_is_within_the_rounding_bound(tmp_path, fmt, bound):
    """weight_dtype=fp8 quantizes a bf16 / fp32 checkpoint at load. Each weight is off by at most `bound` relative
    (3 or 2 mantissa bits, round to nearest); a layer's output sums fan-in such errors of random sign, so the
    output is off by far less than the bound, and the tolerance is the bound itself: a systematic error (a wrong
    scale, a weight left out of the scale) reaches it at once. Measured (e4m3 / e5m2, of the output's max): Flux
    0.0040 / 0.0064, T5 0.020 / 0.029, SD3.5-like 0.0041 / 0.0071."""
    torch.manual_seed(0)
    flux, t5 = mmdit.Flux(_FP8_FLUX).eval(), te.T5Encoder(_FP8_T5).eval()
    mmdit.save_transformer(flux.to(torch.bfloat16), tmp_path / "flux.safetensors")
    save_file(t5.state_dict(), tmp_path / "t5.safetensors")
    flux = mmdit.load_transformer(tmp_path / "flux.safetensors", dtype=torch.float32)  # the bf16 weights, in fp32
    stored = mmdit.load_transformer(tmp_path / "flux.safetensors", dtype=torch.float32, weight_dtype=fmt)
    inp = _mmdit_flux_inputs(h=4, w=8, n_txt=3, guidance=False)
    with torch.no_grad():
        error = rel(stored(**inp), flux(**inp))
    assert 1e-4 < error <= bound, error
    block_bytes = sum(stored.state_dict()[k].nbytes for k in _fp8_block_weights(flux))
    assert block_bytes == sum(flux.state_dict()[k].numel() for k in _fp8_block_weights(flux))  # one byte each
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    t5_stored = te.load_t5(tmp_path / "t5.safetensors", weight_dtype=fmt)
    with torch.no_grad():
        error = rel(t5_stored(ids), t5(ids))
    assert 1e-4 < error <= bound, error
    sd3 = mmdit.MMDiT(mmdit.SD3Params(patch_size=2, in_channels=4, out_channels=4, depth=2, hidden_size=64,
                                      num_heads=2, adm_in_channels=12, context_in_dim=24, pos_embed_max_size=16,
                                      qk_norm=True, x_block_self_attn_layers=(0,))).eval()  # pre-only last block
    mmdit.save_transformer(sd3, tmp_path / "sd3.safetensors")
    sd3_stored = mmdit.load_transformer(tmp_path / "sd3.safetensors", weight_dtype=fmt)
    x, t, y, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 12), torch.randn(1, 5, 24)
    with torch.no_grad():
        error = rel(sd3_stored(x, t, y, context), sd3(x, t, y, context))
    assert 1e-4 < error <= bound, error


def test_fp8_stored_model_saves_a_scaled_fp8_file_it_reads_back(tmp_path):
    torch.manual_seed(0)
    mmdit.save_transformer(mmdit.Flux(_FP8_FLUX), tmp_path / "flux.safetensors")
    stored = mmdit.load_transformer(tmp_path / "flux.safetensors", weight_dtype=torch.float8_e4m3fn)
    mmdit.save_transformer(stored, tmp_path / "flux-fp8.safetensors")
    with safe_open(tmp_path / "flux-fp8.safetensors", "pt") as f:
        assert f.get_tensor("scaled_fp8").dtype == torch.float8_e4m3fn  # ComfyUI's marker: it reads the scales
        assert f.get_tensor("single_blocks.0.linear1.scale_weight").shape == ()
    again = mmdit.load_transformer(tmp_path / "flux-fp8.safetensors")
    inp = _mmdit_flux_inputs(h=4, w=8, n_txt=3, guidance=False)
    saved, read = stored.state_dict(), again.state_dict()
    assert saved.keys() == read.keys() and all(torch.equal(saved[k], read[k]) for k in saved)  # bit for bit
    assert all(saved[k].dtype == read[k].dtype for k in saved)
    with torch.no_grad():  # the same tensors in other memory (mmap'd vs allocated): BLAS may block sums otherwise
        assert rel(again(**inp), stored(**inp)) <= 1e-6
    with pytest.raises(ValueError, match="official layout only"):
        mmdit.save_transformer(stored, tmp_path / "diffusers", layout="diffusers")


def test_fp8_nan_in_an_fp8_weight_is_named(tmp_path):
    torch.manual_seed(0)
    file, _ = _fp8_files(mmdit.Flux(_FP8_FLUX), "scaled")
    file["double_blocks.0.img_mlp.0.weight"][3, 5] = float("nan")
    save_file(file, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"double_blocks\.0\.img_mlp\.0\.weight holds NaN or inf"):
        mmdit.load_transformer(tmp_path / "bad.safetensors")


def test_fp8_scaled_mm_is_close_to_the_upcast_path():
    """torch._scaled_mm also quantizes the activations to e4m3 (per tensor, by their amax): ≤ 2^-4 relative per
    element on top of the weights' rounding. Its output against the upcast path's: sums over 256 products with
    independent rounding errors, so the bound 2^-4 is loose (measured 0.023); the product is right, not transposed."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64)
    q, s = fp8.quantize(linear.weight)
    layer = fp8.Fp8Linear(256, 64, True, torch.float8_e4m3fn, torch.float32)
    layer.load_state_dict({"weight": q, "scale_weight": s, "bias": linear.bias.detach()}, assign=True)
    x = torch.randn(3, 5, 256)
    with torch.no_grad():
        upcast = layer(x)
        fp8.use_scaled_mm(layer)
        fused = layer(x)
    assert fused.shape == upcast.shape and 1e-5 < rel(fused, upcast) <= 2**-4, rel(fused, upcast)
    odd = fp8.Fp8Linear(20, 12, False, torch.float8_e4m3fn, torch.float32)  # not multiples of 16: cuBLAS refuses
    q, s = fp8.quantize(torch.randn(12, 20))
    odd.load_state_dict({"weight": q, "scale_weight": s}, assign=True)
    with torch.no_grad():
        assert torch.equal(fp8.use_scaled_mm(odd)(x[..., :20]), F.linear(x[..., :20], q.float() * s))


def _fp8_psnr(a, b) -> float:
    mse = ((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean()
    return 10 * math.log10(255**2 / mse)


def test_fp8_sample_tiny_end_to_end_is_close_to_full_precision(tmp_path):
    """The tiny pipeline with its transformer and T5 block weights in fp8 against fp32 weights (fp32 compute):
    the same image up to the weights' rounding. Random weights make structured noise, which shows every error;
    measured PSNR 57.6 dB (bf16 storage: 71.6 dB). The bound, 40 dB, is an RMS error of 1% of the range."""
    common = ["a cat", "--model", "tiny", "--width", "64", "--height", "64", "--steps", "2", "--dtype", "fp32"]
    images = {}
    for weights in (None, "bf16", "fp8"):
        storage = ["--weight-dtype", weights] if weights else []
        code, out = _sample_run([*common, *storage], tmp_path, f"{weights}.png")
        assert code == 0
        images[weights] = np.asarray(Image.open(out))
    assert 40 < _fp8_psnr(images["fp8"], images[None]) < _fp8_psnr(images["bf16"], images[None]) < math.inf


def test_fp8_sample_official_files_reach_the_loaders(_sample_flux_dirs, tmp_path):
    """--weight-dtype fp8 on official single files (a tiny Flux, T5 and CLIP in fp32): the transformer and T5
    store their block weights in fp8, CLIP is untouched, and the image stays close to the fp32 one (measured
    PSNR 56.8 dB; the bound as for the tiny pipeline)."""
    common = ["a red fox", "--model", "flux-dev", "--width", "64", "--height", "64", "--steps", "2", "--vae", "f16",
              "--dtype", "fp32", "--weights", str(_sample_flux_dirs["official"])]
    code, full = _sample_run(common, tmp_path, "full.png")
    code8, low = _sample_run([*common, "--weight-dtype", "fp8"], tmp_path, "fp8.png")
    assert code == code8 == 0
    assert 40 < _fp8_psnr(Image.open(low), Image.open(full)) < math.inf
    pipe = sample.load_pipeline("flux-dev", _sample_flux_dirs["official"], device="cpu", dtype=torch.float32,
                                weight_dtype=torch.float8_e4m3fn)
    assert pipe.transformer.single_blocks[0].linear1.weight.dtype == torch.float8_e4m3fn
    assert pipe.conditioner.t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    assert pipe.conditioner.clip.text_model.embeddings.token_embedding.weight.dtype == torch.float32  # CLIP: as is


@pytest.mark.parametrize("args, message", [
    (["--weight-dtype", "fp8"], "--weight-dtype fp8 needs float8 dtypes, which torch"),
    (["--weight-dtype", "bf16", "--dtype", "fp16"], "--weight-dtype bf16 with --dtype fp16 saves no memory"),
])
def test_fp8_cli_errors_are_one_line(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fp8, "FLOAT8", ())  # a torch without float8 dtypes
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: pytest.fail("loaded the weights"))
    code, out = _sample_run(["p", "--model", "tiny", *args], tmp_path)
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_train_wlf_refuses_an_fp8_transformer_as_its_start(_train_wlf_assets, tmp_path, capsys):
    """An fp8 file keeps its blocks in fp8 when loaded; training from 3-mantissa-bit weights is refused in one line
    (the bf16 / fp32 checkpoint is the start), and export still reads a bf16 / fp32 start as plain fp32 Linears."""
    model = mmdit.load_transformer(_train_wlf_assets / "flux.safetensors", weight_dtype=torch.float8_e4m3fn)
    mmdit.save_transformer(model, tmp_path / "flux-fp8.safetensors")
    argv = _train_wlf_train_args(_train_wlf_assets, "flux", tmp_path / "run", "--steps", "1")
    argv[argv.index("--transformer") + 1] = str(tmp_path / "flux-fp8.safetensors")
    assert "stores fp8 weights: fine-tune from the bf16 or fp32 checkpoint" in _train_wlf_error(train_wlf.main, argv,
                                                                                              capsys)


# ---------------------------------------------------------------------------------------------------------
# The demo model (demo/): its data set, its caption scorer, and the weights that sample.py runs by default

DEMO_PROMPT = "a large red circle in the center on a blue background"


def test_demo_data_is_deterministic_and_never_shows_the_heldout_prompts(tmp_path):
    def make(folder, seed="0"):
        assert demo_shapes.main(["make", "--out", str(folder / "train"), "--count", "40", "--heldout",
                                 str(folder / "heldout"), "--heldout-count", "12", "--size", "64", "--seed", seed]) == 0
        return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    a, b, c = make(tmp_path / "a"), make(tmp_path / "b"), make(tmp_path / "c", seed="1")
    assert a == b and len(a) == 40 + 12 + 2  # a re-run: the same bytes
    assert a != c
    train = {r["text"] for r in metrics.read_metadata(tmp_path / "a" / "train" / "metadata.jsonl")[0]}
    heldout = [r["text"] for r in metrics.read_metadata(tmp_path / "a" / "heldout" / "metadata.jsonl")[0]]
    assert len(heldout) == len(set(heldout)) == 12 and not train & set(heldout)


def test_demo_scorer_reads_every_attribute_and_catches_each_wrong_one():
    """On drawn scenes the scorer reads back all five attributes; a caption that differs in one attribute fails in
    exactly that one (so a perfect score cannot come from a scorer that agrees with anything). Blurred as an
    autoencoder blurs (a Gaussian of σ = 3 px, corners visibly round), every scene still reads back whole."""
    rng = random.Random(0)
    values = {"size": sorted(demo_shapes.RADII), "colour": sorted(demo_shapes.PALETTE), "shape": demo_shapes.SHAPES,
              "position": sorted(demo_shapes.ANCHORS), "background": sorted(demo_shapes.PALETTE)}
    for _ in range(30):
        scene = demo_shapes.random_scene(rng)
        image = np.asarray(demo_shapes.draw(scene, 128, rng))
        assert demo_shapes.read_scene(image) == scene
        blurred = ndimage.gaussian_filter(image.astype(np.float64), (3, 3, 0), mode="nearest")
        assert demo_shapes.read_scene(blurred.round().astype(np.uint8)) == scene
        for attribute in demo_shapes.ATTRIBUTES:
            other = dict(scene)
            other[attribute] = next(v for v in values[attribute] if v not in (scene["colour"], scene["background"],
                                                                              scene[attribute]))
            result = demo_shapes.score({"x": image}, {"x": demo_shapes.caption(other)})
            wrong = [a for a, r in result["images"]["x"].items() if r["want"] != r["got"]]
            assert wrong == [attribute] and result["all"] == 0.8
    hidden = np.asarray(demo_shapes.draw({**scene, "colour": scene["background"]}, 128, rng))  # no visible shape
    assert demo_shapes.read_scene(hidden) == {**dict.fromkeys(scene), "background": scene["background"]}


def test_demo_scorer_cli_refuses_what_it_cannot_score(tmp_path, capsys):
    (tmp_path / "gen").mkdir()
    (tmp_path / "p.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a cat on a mat"}) + "\n")
    Image.new("RGB", (64, 64)).save(tmp_path / "gen" / "0.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({"file_name": "1.png", "text": DEMO_PROMPT}) + "\n")
    for prompts, message in (("p.jsonl", "not a caption of the demo's world"), ("q.jsonl", "no image for 1")):
        assert demo_shapes.main(["score", str(tmp_path / "gen"), "--prompts", str(tmp_path / prompts)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_demo_weights_are_the_default_and_draw_what_the_caption_says(tmp_path):
    """The shipped model (no --model, no --weights) at its native 128×128, seed 0: the scorer reads back every
    attribute of the caption. The weights are small enough to live in the repository."""
    files = [p for p in sample.DEMO_WEIGHTS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    code, out = _sample_run([DEMO_PROMPT], tmp_path)
    image = metrics.load_image(out)
    assert code == 0 and image.shape == (128, 128, 3)
    assert demo_shapes.read_scene(image) == demo_shapes.parse(DEMO_PROMPT)
