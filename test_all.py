import warnings

import numpy as np
import pytest
import pywt
import torch
import torch.nn.functional as F

import wavelet

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
    # Same filters in fp32, different summation order (conv vs slices): a few ulps; the issue asks ≤1e-6.
    assert ll.shape == ref_ll.shape
    torch.testing.assert_close(ll, ref_ll, rtol=0, atol=1e-6)
    assert len(highs) == len(ref_highs)
    for ours, ref in zip(highs, ref_highs):
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # And the peer's inverse reads our coefficients (cropped to even sizes, as the peer returns).
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
    torch.testing.assert_close(g_wlf, g_mse, rtol=1e-12, atol=1e-15)
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
    assert abs(loss.item() - mse.item()) > 1e-3 * mse.item()
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
