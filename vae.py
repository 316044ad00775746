"""The Flux / SD3 autoencoder (16 latent channels, F8) and Diffusion-4K's partitioned F16 variant (Sec. 4.1).

Module names are the official checkpoint keys (`encoder.down.0.block.0.conv1.weight`, ...), so the
Flux `ae.safetensors` and the `first_stage_model.` part of an SD3 file load without a mapping;
diffusers `vae/` folders are mapped through one table (`diffusers_key_map`), used both ways.

F16 (`stride=2`), as in the authors' released SC-VAE weights: the encoder's first conv keeps its
pretrained 3×3 kernel but runs with stride 2, so a 4096² image becomes 256² latents. The decoder is
unchanged until its last stage, which now starts from an H/2 map, so it gains a nearest ×2 upsample:

    x = conv_out(nearest×2(swish(norm_out(h))))          h: (B, 128, H/2, W/2),  x: (B, 3, H, W)

At 4096² the upsampled 128-channel map alone is 8 GB in fp32; the partitioned decoder never builds
it. GroupNorm statistics are taken over the whole H/2 map; the map is cut into an n×n grid of tiles;
each tile takes a one-pixel halo from its neighbours (none at the image border, where the conv's
zero padding is the true one), is normalized, upsampled and convolved, the upsampled halo (2 pixels)
is cropped, and the tile is written into the preallocated (B, 3, H, W) output. Everything after the
statistics is pointwise or local, so the result is the unpartitioned computation exactly (up to
float summation order). The authors' code crops one pixel too few after the upsample and shifts
the image by one pixel; `_tiled_conv` derives the crop.

Without autograd, large maps in the decoder's ResnetBlocks and Upsamples also run strip by strip
(`Decoder.strip_pixels`), with the same halo argument and whole-map GroupNorm statistics: exact as
well, and the peak memory becomes about input + output of the largest block instead of 3-4 full maps.
"""
import json
import math
import os
import re
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn


@dataclass
class AutoEncoderParams:
    in_channels: int
    ch: int
    out_ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    scale_factor: float
    shift_factor: float
    stride: int = 1  # 1: F8, the official autoencoder; 2: F16, Diffusion-4K's SC-VAE
    partitions: int = 2  # n of the n×n grid of the decoder's last stage
    groups: int = 32  # GroupNorm groups (32 in Flux / SD3; tiny test configs may use fewer)


VAE_CONFIGS = {
    "flux": AutoEncoderParams(3, 128, 3, (1, 2, 4, 4), 2, 16, scale_factor=0.3611, shift_factor=0.1159),
    "sd3": AutoEncoderParams(3, 128, 3, (1, 2, 4, 4), 2, 16, scale_factor=1.5305, shift_factor=0.0609),
}


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def _swish(x: Tensor) -> Tensor:
    # In place when nothing records the graph: x is always a fresh GroupNorm output here.
    return F.silu(x, inplace=not torch.is_grad_enabled())


# ----------------------------------------------------------------------------------------------
# Exact tiled evaluation: whole-map GroupNorm statistics, then tiles with a one-pixel halo


def _group_stats(x: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """Mean and 1/std per (sample, group) of x (B, C, H, W) over the WHOLE map, each (B, G), ≥ fp32.

    One group at a time, so a bf16 map never gets a full-size fp32 copy."""
    B, C = x.shape[:2]
    dtype = torch.promote_types(x.dtype, torch.float32)
    xg = x.unflatten(1, (groups, C // groups))  # (B, G, C/G, H, W), a view
    mean = x.new_empty(B, groups, dtype=dtype)
    var = torch.empty_like(mean)
    for g in range(groups):
        var[:, g], mean[:, g] = torch.var_mean(xg[:, g].flatten(1).to(dtype), dim=1, correction=0)
    return mean, (var + eps).rsqrt()


def _group_norm_swish(norm: nn.GroupNorm, x: Tensor):
    """f(tile) = swish(norm(x))[tile]: the normalization of the whole map x, applied to one tile of it."""
    mean, rstd = _group_stats(x, norm.num_groups, norm.eps)
    mean, rstd = mean[:, :, None, None, None], rstd[:, :, None, None, None]  # (B, G, 1, 1, 1)
    weight, bias = norm.weight[:, None, None], norm.bias[:, None, None]

    def apply(t: Tensor) -> Tensor:  # t: (B, C, h, w), a slice of x
        y = t.unflatten(1, (norm.num_groups, -1)) - mean  # (B, G, C/G, h, w), a new tensor in ≥ fp32
        if torch.is_grad_enabled():
            y = (y * rstd).flatten(1, 2) * weight + bias
        else:  # one tile-sized temporary instead of four
            y = y.mul_(rstd).flatten(1, 2).mul_(weight).add_(bias)
        return _swish(y).to(t.dtype)

    return apply


def _bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """Split range(size) into `parts` contiguous pieces whose lengths differ by at most one."""
    parts = max(1, min(parts, size))
    return [(i * size // parts, (i + 1) * size // parts) for i in range(parts)]


def _tiled_conv(x, conv, *, pre=None, scale=1, grid=(1, 1), out=None, residual=None) -> Tensor:
    """conv(nearest_up(pre(x), scale)) [+ residual] for a 3×3 conv with zero padding 1, tile by tile.

    x (B, C, H, W) -> (B, C', s·H, s·W). `pre` is pointwise (it may carry whole-map statistics),
    nearest upsampling and the conv are local: output pixel row y reads upsampled rows y − 1 .. y + 1,
    i.e. input rows ⌊(y − 1)/s⌋ .. ⌊(y + 1)/s⌋. So output tile [s·r0, s·r1) needs input rows
    [r0 − 1, r1 + 1): a one-pixel halo (same for columns). Each tile with the halo that exists is
    run through pre, the upsample and the conv with its own zero padding; the output rows whose window
    leaves the tile are all inside the upsampled halo, s rows wide, and are cropped. At the map's
    border there is no halo and the conv's zero padding is the true one.
    (F16, s = 2: crop 2 pixels per halo side; cropping 1 shifts the image by a pixel.)

    `out` is the destination; it may be x itself (same channels, scale 1, full-width strips): each
    strip then reads the last original row of the strip above, so rows are written one strip late.
    `residual(rows, cols)` returns what to add to that output tile.
    """
    B, _, H, W = x.shape
    s = scale
    if out is None:
        out = x.new_empty(B, conv.out_channels, s * H, s * W)
    in_place = out is x
    assert not in_place or (s == 1 and grid[1] == 1 and pre is not None), "in place needs full-width strips"
    pending = None
    for r0, r1 in _bounds(H, grid[0]):
        for c0, c1 in _bounds(W, grid[1]):
            a0, b0 = max(r0 - 1, 0), max(c0 - 1, 0)  # first row / column of the tile with its halo
            t = x[:, :, a0 : r1 + 1, b0 : c1 + 1]
            if pre is not None:
                t = pre(t)
            if s > 1:
                t = F.interpolate(t, scale_factor=s, mode="nearest")
            y = F.conv2d(t, conv.weight, conv.bias, padding=1)  # (B, C', s·(tile + halo))
            top, left = s * (r0 - a0), s * (c0 - b0)  # the upsampled halo above / left of the tile
            y = y[:, :, top : top + s * (r1 - r0), left : left + s * (c1 - c0)]
            rows, cols = slice(s * r0, s * r1), slice(s * c0, s * c1)
            if residual is not None:
                y = y + residual(rows, cols)
            if in_place:
                if pending is not None:
                    out[:, :, pending[0]] = pending[1]
                pending = (rows, y)
            else:
                out[:, :, rows, cols] = y
    if pending is not None:
        out[:, :, pending[0]] = pending[1]
    return out


# ----------------------------------------------------------------------------------------------
# Blocks (attribute names are the checkpoint keys)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def shortcut(self, x: Tensor) -> Tensor:
        return self.nin_shortcut(x) if self.in_channels != self.out_channels else x

    def forward(self, x: Tensor, strips: int = 1) -> Tensor:
        if strips > 1:  # no autograd: the same math in row strips, never 3-4 full maps at once
            h = _tiled_conv(x, self.conv1, pre=_group_norm_swish(self.norm1, x), grid=(strips, 1))
            return _tiled_conv(
                h, self.conv2, pre=_group_norm_swish(self.norm2, h), grid=(strips, 1), out=h,
                residual=lambda rows, cols: self.shortcut(x[:, :, rows, cols]),
            )
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions (scale 1/√C), with a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # Contiguous: with a strided last dimension CPU SDPA takes the math kernel, which builds the
        # (HW)² score matrix (2.3 GB at 128² latents).
        q, k, v = (p(h).flatten(2).transpose(1, 2).unsqueeze(1).contiguous() for p in (self.q, self.k, self.v))
        if torch.is_grad_enabled() or H * W <= 4096:
            h = F.scaled_dot_product_attention(q, k, v)  # q, k, v, h: (B, 1, HW, C)
        else:  # C = 512 is too wide for some fused kernels: bound a math fallback to 2^26 scores per chunk
            chunk = max(1, (1 << 26) // (H * W))
            h = torch.cat([F.scaled_dot_product_attention(q[:, :, i : i + chunk], k, v)
                           for i in range(0, H * W, chunk)], dim=2)
        return x + self.proj_out(h.squeeze(1).transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: right and bottom only, as trained


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, strips: int = 1) -> Tensor:
        if strips > 1:  # without the full-size upsampled copy
            return _tiled_conv(x, self.conv, scale=2, grid=(strips, 1))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, groups)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, groups)
    return mid


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        # F16: the pretrained 3×3 kernel with stride 2 halves the resolution once more.
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, stride=p.stride, padding=1)
        self.down = nn.ModuleList()
        block_in = p.ch
        for i_level, mult in enumerate(p.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(p.num_res_blocks):
                level.block.append(ResnetBlock(block_in, p.ch * mult, p.groups))
                block_in = p.ch * mult
            if i_level != len(p.ch_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _mid(block_in, p.groups)
        self.norm_out = _norm(block_in, p.groups)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i_level != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_swish(self.norm_out(h)))  # (B, 2·z, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.stride, self.partitions = p.stride, p.partitions
        # Without autograd, maps above this many pixels run ResnetBlocks / Upsamples in row strips of
        # about this size (exact; None turns it off). 2^16 pixels of 256 channels = 64 MB in fp32.
        self.strip_pixels: int | None = 1 << 16
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, p.groups)
        self.up = nn.ModuleList()  # up[i] works at the resolution of encoder level i; run from last to first
        for i_level, mult in enumerate(p.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            block_in = p.ch * (p.ch_mult[i_level + 1] if i_level + 1 < len(p.ch_mult) else mult)
            for _ in range(p.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, p.ch * mult, p.groups))
                block_in = p.ch * mult
            if i_level != 0:
                level.upsample = Upsample(block_in)
            self.up.append(level)
        self.norm_out = _norm(p.ch * p.ch_mult[0], p.groups)
        self.conv_out = nn.Conv2d(p.ch * p.ch_mult[0], p.out_ch, 3, padding=1)

    def _strips(self, pixels: int) -> int:
        if self.strip_pixels is None or torch.is_grad_enabled():
            return 1
        return math.ceil(pixels / self.strip_pixels)

    def forward(self, z: Tensor, return_feature: bool = False, partitions: int | None = None):
        """z (B, z, h, w) un-normalized latents -> x (B, out_ch, H, W), H = 8·stride·h with four levels.

        return_feature=True also returns the penultimate feature swish(norm_out(·)), (B, ch, H/s, W/s):
        at H/2 for F16, at H for F8 (the SC-VAE teacher's). partitions: n (default self.partitions)."""
        n = self.partitions if partitions is None else partitions
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(len(self.up))):
            level = self.up[i_level]
            for block in level.block:
                h = block(h, self._strips(h.shape[-2] * h.shape[-1]))
            if i_level != 0:
                h = level.upsample(h, self._strips(4 * h.shape[-2] * h.shape[-1]))
        # Last stage on an n×n grid (Sec. 4.1): norm_out, swish, [F16: nearest ×2], conv_out.
        if return_feature:  # SC-VAE (Eq. 1) compares this feature, so it is materialized whole
            feat = F.silu(self.norm_out(h))
            return _tiled_conv(feat, self.conv_out, scale=self.stride, grid=(n, n)), feat
        pre = _group_norm_swish(self.norm_out, h)  # statistics of the whole map, applied per tile
        return _tiled_conv(h, self.conv_out, pre=pre, scale=self.stride, grid=(n, n))


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.scale_factor, self.shift_factor = params.scale_factor, params.shift_factor

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel along each side: 8 (F8) or 16 (F16)."""
        return 2 ** (len(self.params.ch_mult) - 1) * self.params.stride

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """x (B, 3, H, W) in [−1, 1] -> normalized latent z = scale·(mean − shift), (B, z, H/f, W/f).

        The posterior mean, as Flux pipelines encode; sample=True draws mean + std·ε instead."""
        f = self.factor
        if x.ndim != 4 or x.shape[1] != self.params.in_channels or x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"encode expects (B, {self.params.in_channels}, H, W) with H, W multiples of {f}, "
                             f"got {tuple(x.shape)}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            mean = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.scale_factor * (mean - self.shift_factor)

    def decode(self, z: Tensor, return_feature: bool = False, partitions: int | None = None):
        """Normalized latent z (B, z, h, w) -> image (B, 3, f·h, f·w), nominally in [−1, 1].

        partitions: n of the n×n grid of the last stage (default params.partitions); the result does
        not depend on it. return_feature=True returns (image, swish(norm_out(·))) from one pass."""
        if z.ndim != 4 or z.shape[1] != self.params.z_channels:
            raise ValueError(f"decode expects (B, {self.params.z_channels}, h, w) latents, got {tuple(z.shape)}")
        return self.decoder(z / self.scale_factor + self.shift_factor, return_feature, partitions)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


# ----------------------------------------------------------------------------------------------
# Key layouts: official (the module names) <-> diffusers AutoencoderKL, one table for both ways

_DIFFUSERS_RENAMES = [  # (official pattern, diffusers replacement), applied in order
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"^(en|de)coder\.norm_out\.", r"\1coder.conv_norm_out."),
]
_UP_PARTS = {"block": "resnets", "upsample": "upsamplers.0"}
# Attention projections: 1×1 convs [C, C, 1, 1] here, Linear weights [C, C] in diffusers.
_ATTN_WEIGHT = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def diffusers_key_map(params: AutoEncoderParams) -> dict[str, str]:
    """Official key -> diffusers key for every tensor of AutoEncoder(params); invert it for the other way.

    diffusers numbers the decoder's up blocks in execution order, so up.i is up_blocks.(L − 1 − i)."""
    levels = len(params.ch_mult)
    with torch.device("meta"):
        keys = list(AutoEncoder(params).state_dict())
    table = {}
    for key in keys:
        new = re.sub(r"^decoder\.up\.(\d+)\.(block|upsample)\.",
                     lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.{_UP_PARTS[m[2]]}.", key)
        for pattern, replacement in _DIFFUSERS_RENAMES:
            new = re.sub(pattern, replacement, new)
        table[key] = new
    return table


def diffusers_config(params: AutoEncoderParams) -> dict:
    """The config.json of a diffusers AutoencoderKL folder holding these weights; "stride" marks F16."""
    levels = len(params.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": params.in_channels,
        "out_channels": params.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [params.ch * m for m in params.ch_mult],
        "layers_per_block": params.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": params.z_channels,
        "norm_num_groups": params.groups,
        "sample_size": 1024,
        "scaling_factor": params.scale_factor,
        "shift_factor": params.shift_factor,
        "force_upcast": True,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
        "stride": params.stride,
    }


def to_diffusers_state_dict(ae: AutoEncoder) -> dict[str, Tensor]:
    """ae's weights in diffusers' AutoencoderKL layout (attention projections as Linear weights)."""
    table = diffusers_key_map(ae.params)
    return {table[k]: (v.flatten(1) if _ATTN_WEIGHT.search(k) else v) for k, v in ae.state_dict().items()}


def save_vae(ae: AutoEncoder, path: str | os.PathLike) -> None:
    """`*.safetensors`: the official single-file layout (config in the file's metadata);
    anything else: a diffusers `vae/` folder (config.json with "stride" + diffusion_pytorch_model.safetensors)."""
    path, p = Path(path), ae.params
    if path.suffix == ".safetensors":
        sd = {k: v.detach().contiguous() for k, v in ae.state_dict().items()}
        meta = {k: str(getattr(p, k)) for k in ("scale_factor", "shift_factor", "stride", "groups")}
        atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
        return
    sd = {k: v.detach().contiguous() for k, v in to_diffusers_state_dict(ae).items()}
    atomic_write(path / "diffusion_pytorch_model.safetensors", lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(diffusers_config(p), indent=2) + "\n"))


# ----------------------------------------------------------------------------------------------
# Loading

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
_SD3_PREFIX = "first_stage_model."


def _infer_params(shapes: dict[str, tuple], base: AutoEncoderParams, where: str) -> AutoEncoderParams:
    """ch, ch_mult, num_res_blocks, channels from official-layout tensor shapes."""
    levels = 1 + max((int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))), default=0)
    need = ["encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"]
    need += [f"encoder.down.{i}.block.0.conv1.weight" for i in range(levels)]
    if absent := [k for k in need if k not in shapes]:
        raise ValueError(f"{where}: not a Flux/SD3 autoencoder checkpoint (no {', '.join(absent[:3])}); expected keys "
                         f"encoder.*/decoder.* (Flux ae.safetensors), {_SD3_PREFIX}* (SD3) or a diffusers vae/ folder")
    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    ch_mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
    blocks = 1 + max(int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    return replace(base, in_channels=in_channels, ch=ch, out_ch=shapes["decoder.conv_out.weight"][0], ch_mult=ch_mult,
                   num_res_blocks=blocks, z_channels=shapes["decoder.conv_in.weight"][1])


def _materialize(params, f, stored: set[str], file_key, where, device, dtype) -> AutoEncoder:
    """Check the file's keys and shapes against AutoEncoder(params), then fill a meta-built model
    tensor by tensor, converting on the way (no full-precision copy of the whole model).

    stored: the file's keys that belong to the autoencoder; file_key(official key) -> its key in the file."""
    with torch.device("meta"):
        ae = AutoEncoder(params)
    expected = {k: tuple(v.shape) for k, v in ae.state_dict().items()}
    file_key = {k: file_key(k) for k in expected}
    missing = [file_key[k] for k in expected if file_key[k] not in stored]
    unexpected = sorted(stored - set(file_key.values()))
    wrong = []
    for k, shape in expected.items():
        if file_key[k] in stored:
            got = tuple(f.get_slice(file_key[k]).get_shape())
            if got != shape and not (_ATTN_WEIGHT.search(k) and got == shape[:2]):
                wrong.append(f"{file_key[k]} {list(got)} (expected {list(shape)})")
    if missing or unexpected or wrong:
        problems = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        parts = [f"{label} ({len(items)}): {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}"
                 for label, items in problems if items]
        raise ValueError(f"{where}: weights do not fit the autoencoder config {params}: " + "; ".join(parts))
    sd = {}
    for k, shape in expected.items():
        t = f.get_tensor(file_key[k]).reshape(shape)  # diffusers' Linear attention weights become 1×1 convs
        sd[k] = t.to(device=device, dtype=dtype or t.dtype)
    ae.load_state_dict(sd, assign=True)
    return ae.eval()


def load_vae(path, *, stride: int | None = None, device="cpu", dtype: torch.dtype | None = None,
             config: str | None = None) -> AutoEncoder:
    """Load a Flux `ae.safetensors`, an SD3 checkpoint (keys under `first_stage_model.`), a diffusers
    `vae/` folder (or a pipeline folder holding one), or a file written by `save_vae`.

    stride: 1 (F8) or 2 (F16); default from the diffusers config / file metadata, else 1.
    config: "flux" or "sd3" sets scale/shift; default from the config / metadata, else SD3 for a
    `first_stage_model.` prefix and Flux otherwise. dtype: None keeps the file's dtype.
    """
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if path.is_file() and path.suffix == ".safetensors" and (path.parent / "config.json").is_file():
        with safe_open(path, "pt") as f:
            if any(".down_blocks." in k for k in f.keys()):  # diffusers weights inside their folder
                path = path.parent
    if config is not None and config not in VAE_CONFIGS:
        raise ValueError(f"config must be one of {sorted(VAE_CONFIGS)}, got {config!r}")
    if path.is_dir():
        return _load_diffusers(path, stride, device, dtype, config)
    if not path.is_file():
        raise FileNotFoundError(f"autoencoder weights not found: {path} (give ae.safetensors, an SD3 .safetensors "
                                "or a diffusers vae/ folder with config.json)")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors files are supported")
    with safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata() or {}
        prefix = _SD3_PREFIX if any(k.startswith(_SD3_PREFIX) for k in keys) else ""
        keys_in_file = {k[len(prefix):] for k in keys if k.startswith(prefix)}
        shapes = {k: tuple(f.get_slice(prefix + k).get_shape()) for k in keys_in_file}
        base = VAE_CONFIGS[config or ("sd3" if prefix else "flux")]
        if config is None and "scale_factor" in meta:  # written by save_vae
            base = replace(base, scale_factor=float(meta["scale_factor"]), shift_factor=float(meta["shift_factor"]))
        base = replace(base, stride=stride or int(meta.get("stride", 1)), groups=int(meta.get("groups", 32)))
        params = _infer_params(shapes, base, str(path))
        stored = {prefix + k for k in keys_in_file}
        return _materialize(params, f, stored, lambda k: prefix + k, str(path), device, dtype)


def _load_diffusers(folder: Path, stride, device, dtype, config) -> AutoEncoder:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json; a diffusers vae/ folder needs config.json and "
                                f"{_DIFFUSERS_WEIGHTS[0]}")
    weights = next((folder / w for w in _DIFFUSERS_WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: no {_DIFFUSERS_WEIGHTS[0]} (only safetensors weights are supported)")
    cfg = json.loads((folder / "config.json").read_text())
    boc = list(cfg.get("block_out_channels", [64]))
    if cfg.get("act_fn", "silu") != "silu" or any(c % boc[0] for c in boc):
        raise ValueError(f"{folder}/config.json: not a Flux/SD3-style AutoencoderKL config")
    base = VAE_CONFIGS[config or "flux"]
    if not config:
        shift = cfg.get("shift_factor") or 0.0  # null in configs without a shift
        base = replace(base, scale_factor=cfg.get("scaling_factor", 0.18215), shift_factor=shift)
    params = replace(base, in_channels=cfg.get("in_channels", 3), out_ch=cfg.get("out_channels", 3), ch=boc[0],
                     ch_mult=tuple(c // boc[0] for c in boc), num_res_blocks=cfg.get("layers_per_block", 1),
                     z_channels=cfg.get("latent_channels", 4), groups=cfg.get("norm_num_groups", 32),
                     stride=stride or cfg.get("stride", 1))
    with safe_open(weights, "pt") as f:
        keys_in_file = set(f.keys())
        if "quant_conv.weight" in keys_in_file:
            raise ValueError(f"{weights}: has quant_conv / post_quant_conv (an SD1/SDXL-style VAE); only the "
                             "Flux / SD3 autoencoder (no quant convs) is supported")
        table = diffusers_key_map(params)
        return _materialize(params, f, keys_in_file, table.__getitem__, str(weights), device, dtype)


# ----------------------------------------------------------------------------------------------
# Shared with the scripts (sample, metrics, train_wlf, train_vae): model files may not import one
# another, and this is the one project file every script can import, so the scripts' user-error
# type and their atomic file writing live here.


class UserError(Exception):
    """Bad input to a script: its main() prints the message as one line and exits with status 2."""


def atomic_write(path: Path, write) -> None:
    """write(tmp_path), then rename onto `path`: readers and crashes never see a half-written file. The file
    gets the permissions of any file the user creates (umask), whatever the writer gave it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # a unique name beside the target
    try:
        write(tmp)
        mask = os.umask(0o022)  # read the umask (and put it back): safetensors writes its files 0600,
        os.umask(mask)  # but exported weights should get the permissions of any file the user creates
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):  # the writer may have failed before creating it
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    """Indented JSON, written atomically; inf / nan (the PSNR of identical images) become null, since
    strict JSON has no infinity."""
    def safe(x):
        if isinstance(x, dict):
            return {k: safe(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [safe(v) for v in x]
        return None if isinstance(x, float) and not math.isfinite(x) else x

    text = json.dumps(safe(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
