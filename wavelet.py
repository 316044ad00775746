"""Orthonormal Haar wavelet transform and the Wavelet-based Latent Fine-tuning loss (paper Sec. 4.2, Eq. 10).

One level of the 2-D Haar DWT splits every 2×2 block [[a, b], [c, d]] of each channel into four
coefficients (filters ±1/√2 along each axis, so ±1/2 in 2-D):

    LL = (a + b + c + d) / 2      approximation
    LH = (a + b − c − d) / 2      detail along the height (pywt's cH, "horizontal")
    HL = (a − b + c − d) / 2      detail along the width  (pywt's cV, "vertical")
    HH = (a − b − c + d) / 2      diagonal detail          (pywt's cD)

These are the conventions of `pywt.dwt2(x, "haar")` -> (cA, (cH, cV, cD)) and of pytorch-wavelets
`DWTForward(J, wave="haar", mode="zero")`. The transform is orthonormal: it preserves the sum of
squares (Parseval), which is why WLF with equal band weights equals plain MSE (for even sizes). That is
the authors' released setting (one level, the four bands concatenated, one mean); `wlf_loss` adds what
Eq. 10 allows beyond it: a weight per band, and more levels.

Odd sizes: a row / column of zeros is appended at the bottom / right before the transform, as both
peers do in mode "zero"; the bands then have ⌈H/2⌉ × ⌈W/2⌉ coefficients. `idwt` crops the padding
back off, using the next finer level's band shape, or `size` for the finest level.
"""
import torch
import torch.nn.functional as F


def _dwt1(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Haar level. x (B, C, H, W) -> ll (B, C, h, w), highs (B, C, 3, h, w), h = ⌈H/2⌉, w = ⌈W/2⌉."""
    x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))  # zero row/column at the end for odd sizes
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]  # top-left, top-right of each 2×2 block
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]  # bottom-left, bottom-right
    top, bottom = a + b, c + d  # row sums: low-pass along the width
    left_minus_right_top, left_minus_right_bottom = a - b, c - d  # high-pass along the width
    ll = (top + bottom) * 0.5
    lh = (top - bottom) * 0.5
    hl = (left_minus_right_top + left_minus_right_bottom) * 0.5
    hh = (left_minus_right_top - left_minus_right_bottom) * 0.5
    return ll, torch.stack((lh, hl, hh), dim=2)


def _idwt1(ll: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Inverse of one level: ll (B, C, h, w), high (B, C, 3, h, w) -> (B, C, 2h, 2w)."""
    lh, hl, hh = high.unbind(dim=2)
    top, bottom = (ll + lh) * 0.5, (ll - lh) * 0.5  # (a + b)/2 and (c + d)/2
    dtop, dbottom = (hl + hh) * 0.5, (hl - hh) * 0.5  # (a − b)/2 and (c − d)/2
    a, b = top + dtop, top - dtop
    c, d = bottom + dbottom, bottom - dbottom
    B, C, h, w = ll.shape
    # Interleave the four phases back into 2×2 blocks: (B, C, h, 2, w, 2) -> (B, C, 2h, 2w).
    rows = torch.stack((torch.stack((a, b), dim=-1), torch.stack((c, d), dim=-1)), dim=3)
    return rows.reshape(B, C, 2 * h, 2 * w)


def dwt(x: torch.Tensor, levels: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Multi-level 2-D Haar DWT of x (B, C, H, W).

    Returns (ll, highs): ll is the coarsest approximation, highs a list, finest first, of
    (B, C, 3, h, w) tensors holding (LH, HL, HH) of each level.
    """
    if x.ndim != 4:
        raise ValueError(f"dwt expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    highs = []
    ll = x
    for _ in range(levels):
        ll, high = _dwt1(ll)
        highs.append(high)
    return ll, highs


def idwt(ll: torch.Tensor, highs: list[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of `dwt`: rebuilds x from (ll, highs). `size` = (H, W) of the original input, needed
    only to drop the zero padding of an odd-sized input at the finest level."""
    x = ll
    for level in reversed(range(len(highs))):
        x = _idwt1(x, highs[level])
        # The padding of this level is known from the next finer level's band shape.
        target = highs[level - 1].shape[-2:] if level > 0 else size
        if target is not None:
            x = x[..., : target[0], : target[1]]
    return x


def wlf_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    band_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    levels: int = 1,
) -> torch.Tensor:
    """Wavelet-based latent fine-tuning loss (Eq. 10): weighted squared error between the Haar bands
    of pred and target, over the mean of all coefficients.

        L = Σ_bands w_band · ‖DWT(pred)_band − DWT(target)_band‖² / (number of coefficients)

    band_weights = (w_LL, w_LH, w_HL, w_HH); the detail weights apply at every level, w_LL to the
    coarsest approximation. Because the Haar transform is orthonormal, equal weights of 1 give
    exactly F.mse_loss(pred, target) for even sizes (Parseval); other weights re-balance low and
    high frequencies.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if len(band_weights) != 4:
        raise ValueError(f"band_weights must be 4 numbers (LL, LH, HL, HH), got {band_weights!r}")
    # The transform is linear, so transform the difference once instead of pred and target.
    ll, highs = dwt(pred - target, levels)
    w_ll, w_details = band_weights[0], torch.tensor(band_weights[1:], dtype=pred.dtype, device=pred.device)
    total = w_ll * ll.square().sum()
    count = ll.numel()
    for high in highs:  # (B, C, 3, h, w): weight each of LH, HL, HH
        total = total + (high.square().sum(dim=(0, 1, 3, 4)) * w_details).sum()
        count += high.numel()
    return total / count
