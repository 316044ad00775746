"""The Flux / SD3 autoencoder (16 latent channels, F8) and Diffusion-4K's F16 variant (Sec. 4.1).

F16 (`stride=2`), as in the authors' released SC-VAE weights: the encoder's first conv keeps its
pretrained 3×3 kernel but runs with stride 2, so a 4096² image becomes 256² latents. The decoder is
unchanged until its last stage, which now starts from an H/2 map, so it gains a nearest ×2 upsample:

    x = conv_out(nearest×2(swish(norm_out(h))))          h: (B, 128, H/2, W/2),  x: (B, 3, H, W)

At 4096² the upsampled 128-channel map alone is 8 GB in fp32, so Sec. 4.1 runs this stage on an n×n
grid of tiles (`partitioned_last_stage`). Differs from the authors' release: their partitioned decoder
crops one pixel too few after the ×2 upsample and so shifts the image by a pixel; ours derives the crop.
Module names are the official checkpoint keys (Flux `ae.safetensors`, SD3's `first_stage_model.`).
"""
import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from weight_files import atomic_write, checked_weight, fsync, open_weights, read_json  # noqa: F401 (re-exported)


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


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1×1 conv where the width changes (no parameters, hence no checkpoint keys, otherwise).
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions (scale 1/√C), with a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # Contiguous: with a strided last dimension CPU SDPA takes the math kernel, which builds the
        # (HW)² score matrix (2.3 GB at 128² latents).
        q, k, v = (p(h).flatten(2).transpose(1, 2).unsqueeze(1).contiguous() for p in (self.q, self.k, self.v))
        attend = F.scaled_dot_product_attention if torch.is_grad_enabled() else attention_in_chunks  # see below
        h = attend(q, k, v)  # q, k, v, h: (B, 1, HW, C)
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

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(w: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(w, w, groups), AttnBlock(w, groups), ResnetBlock(w, w, groups)
    return mid


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, stride=p.stride, padding=1)  # F16: the same kernel, stride 2
        widths = [p.ch * m for m in p.ch_mult]
        self.down = nn.ModuleList()
        for i, (w_in, w) in enumerate(zip([p.ch, *widths], widths)):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(w if j else w_in, w, p.groups) for j in range(p.num_res_blocks))
            if i != len(widths) - 1:
                level.downsample = Downsample(w)
            self.down.append(level)
        self.mid = _mid(widths[-1], p.groups)
        self.norm_out = nn.GroupNorm(p.groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * p.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2·z, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.stride, self.partitions = p.stride, p.partitions
        # Without autograd: row strips of about this many pixels (2^16 × 256 channels = 64 MB in fp32); None: plain.
        self.strip_pixels: int | None = 1 << 16
        widths = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.z_channels, widths[-1], 3, padding=1)
        self.mid = _mid(widths[-1], p.groups)
        self.up = nn.ModuleList()  # up[i] works at the resolution of encoder level i; run from last to first
        for i, (w_in, w) in enumerate(zip([*widths[1:], widths[-1]], widths)):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(w if j else w_in, w, p.groups) for j in range(p.num_res_blocks + 1))
            if i != 0:
                level.upsample = Upsample(w)
            self.up.append(level)
        self.norm_out = nn.GroupNorm(p.groups, widths[0], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[0], p.out_ch, 3, padding=1)

    def forward(self, z: Tensor, return_feature: bool = False, partitions: int | None = None):
        """Un-normalized latents (B, z, h, w) -> x (B, out_ch, f·h, f·w) [, swish(norm_out(·)): SC-VAE's feature]."""
        n = self.partitions if partitions is None else partitions
        if not torch.is_grad_enabled() and self.strip_pixels is not None:
            return decode_bounded(self, z, return_feature, n)
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        x, feat = partitioned_last_stage(h, self.norm_out, self.conv_out, self.stride, n)
        return (x, feat) if return_feature else x


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder, self.decoder = Encoder(params), Decoder(params)
        self.scale_factor, self.shift_factor = params.scale_factor, params.shift_factor

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel along each side: 8 (F8) or 16 (F16)."""
        return 2 ** (len(self.params.ch_mult) - 1) * self.params.stride

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """x (B, 3, H, W) in [−1, 1] -> normalized latent z = scale·(mean − shift), (B, z, H/f, W/f): the
        posterior mean, as Flux pipelines encode; sample=True draws mean + std·ε instead."""
        f, c = self.factor, self.params.in_channels
        if x.ndim != 4 or x.shape[1] != c or x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"encode expects (B, {c}, H, W) with H, W multiples of {f}, got {tuple(x.shape)}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            mean = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.scale_factor * (mean - self.shift_factor)

    def decode(self, z: Tensor, return_feature: bool = False, partitions: int | None = None):
        """Normalized latent z (B, z, h, w) -> image (B, 3, f·h, f·w), nominally in [−1, 1] [, feature]. partitions:
        n of the last stage's n×n grid (default params.partitions); the result does not depend on it."""
        if z.ndim != 4 or z.shape[1] != self.params.z_channels:
            raise ValueError(f"decode expects (B, {self.params.z_channels}, h, w) latents, got {tuple(z.shape)}")
        return self.decoder(z / self.scale_factor + self.shift_factor, return_feature, partitions)


# ----------------------------------------------------------------------------------------------
# Sec. 4.1: the partitioned last stage


def _split(size: int, parts: int) -> list[tuple[int, int]]:  # range(size) in pieces of lengths differing ≤ 1
    parts = max(1, min(parts, size))
    return [(i * size // parts, (i + 1) * size // parts) for i in range(parts)]


def partitioned_last_stage(h: Tensor, norm: nn.GroupNorm, conv: nn.Conv2d, s: int, n: int) -> tuple[Tensor, Tensor]:
    """x = conv(nearest×s(swish(norm(h)))) on an n×n grid of tiles; returns (x, swish(norm(h))).

    GroupNorm takes its statistics over the whole map h (B, C, H, W). Output row y of the 3×3 conv (zero
    padding 1) reads upsampled rows y − 1 .. y + 1, i.e. input rows ⌊(y − 1)/s⌋ .. ⌊(y + 1)/s⌋: the output
    of input rows [r0, r1) needs rows [r0 − 1, r1 + 1), a one-pixel halo from the neighbouring tiles
    (columns alike). At the border of the map there is no halo and the conv's zero padding is the true
    one. Inside, the padding spoils only output rows that read past the halo: the upsampled halo, s rows
    wide, which is cropped (2 pixels per side for ×2; cropping 1 shifts the image by a pixel)."""
    B, C, H, W = h.shape
    feat = F.silu(norm(h))
    x = h.new_empty(B, conv.out_channels, s * H, s * W)
    for r0, r1 in _split(H, n):
        for c0, c1 in _split(W, n):
            a0, b0 = max(r0 - 1, 0), max(c0 - 1, 0)  # first row / column of the tile with its halo
            y = conv(F.interpolate(feat[:, :, a0 : r1 + 1, b0 : c1 + 1], scale_factor=s, mode="nearest"))
            top, left = s * (r0 - a0), s * (c0 - b0)  # the upsampled halo above / left of the tile
            x[:, :, s * r0 : s * r1, s * c0 : s * c1] = y[:, :, top : top + s * (r1 - r0), left : left + s * (c1 - c0)]
    return x, feat


# ----------------------------------------------------------------------------------------------
# Memory-bounded decoding (engineering, not in the paper): what Decoder.forward runs without autograd. The
# same computation (tested equal to the plain one and to an unpartitioned peer), with ResnetBlocks and Upsamples
# in row strips and the last stage normalized tile by tile: a peak of about input + output of the largest block.


def decode_bounded(dec: Decoder, z: Tensor, return_feature: bool, n: int):
    h = dec.mid.block_2(dec.mid.attn_1(dec.mid.block_1(dec.conv_in(z))))  # at the latents' size: plain
    for level in reversed(dec.up):
        for block in level.block:
            if (k := math.ceil(h.shape[-2] * h.shape[-1] / dec.strip_pixels)) == 1:  # a small map: as it is
                h = block(h)
                continue
            x, h = h, conv_tiles(h, block.conv1, norm=block.norm1, grid=(k, 1))
            h = conv_tiles(h, block.conv2, norm=block.norm2, grid=(k, 1), out=h)  # in place
            for r0, r1 in _split(h.shape[-2], k):
                h[:, :, r0:r1] += block.nin_shortcut(x[:, :, r0:r1])
            del x  # the block's input: not held through the next block
        if hasattr(level, "upsample"):
            k = math.ceil(4 * h.shape[-2] * h.shape[-1] / dec.strip_pixels)
            h = level.upsample(h) if k == 1 else conv_tiles(h, level.upsample.conv, s=2, grid=(k, 1))
    if return_feature:  # SC-VAE compares the feature (Eq. 1): it is materialized anyway
        return partitioned_last_stage(h, dec.norm_out, dec.conv_out, dec.stride, n)
    return conv_tiles(h, dec.conv_out, norm=dec.norm_out, s=dec.stride, grid=(n, n))


def conv_tiles(x: Tensor, conv: nn.Conv2d, *, norm=None, s: int = 1, grid=(1, 1), out=None) -> Tensor:
    """conv(nearest×s(swish(norm(x)))) by tiles, with the last stage's halo and crop; norm (optional) uses the WHOLE
    map's statistics, taken one group at a time (no full-size fp32 copy of a bf16 map). `out` may be x itself (s = 1,
    full-width strips): each strip is then written once the next one has read its last original row."""
    B, C, H, W = x.shape
    if norm is not None:
        G, dtype = norm.num_groups, torch.promote_types(x.dtype, torch.float32)
        groups = x.unflatten(1, (G, C // G)).unbind(1)
        stats = [torch.var_mean(xg.flatten(1).to(dtype), dim=1, correction=0) for xg in groups]
        var, mean = (torch.stack(v, 1)[:, :, None, None, None] for v in zip(*stats))  # (B, G, 1, 1, 1)
        rstd = (var + norm.eps).rsqrt()
    out = x.new_empty(B, conv.out_channels, s * H, s * W) if out is None else out
    in_place, pending = out is x, None
    for r0, r1 in _split(H, grid[0]):
        for c0, c1 in _split(W, grid[1]):
            a0, b0 = max(r0 - 1, 0), max(c0 - 1, 0)
            t = x[:, :, a0 : r1 + 1, b0 : c1 + 1]
            if norm is not None:  # one tile-sized temporary in ≥ fp32, the rest in place
                t = (t.unflatten(1, (G, C // G)) - mean).mul_(rstd).flatten(1, 2)
                t = F.silu(t.mul_(norm.weight[:, None, None]).add_(norm.bias[:, None, None]), inplace=True).to(x.dtype)
            if s > 1:
                t = F.interpolate(t, scale_factor=s, mode="nearest")
            y = F.conv2d(t, conv.weight, conv.bias, padding=1)
            top, left = s * (r0 - a0), s * (c0 - b0)
            y = y[:, :, top : top + s * (r1 - r0), left : left + s * (c1 - c0)]
            rows, cols = slice(s * r0, s * r1), slice(s * c0, s * c1)
            if in_place:
                if pending is not None:
                    out[:, :, pending[0]] = pending[1]
                pending = (rows, y)
            else:
                out[:, :, rows, cols] = y
    if pending is not None:
        out[:, :, pending[0]] = pending[1]
    return out


def attention_in_chunks(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA with at most 2^26 scores per chunk of queries: C = 512 is too wide for some fused kernels,
    whose math fallback builds the whole (HW)² score matrix. Softmax is per query row: same result."""
    chunk = max(1, (1 << 26) // k.shape[2])
    return torch.cat([F.scaled_dot_product_attention(q[:, :, i : i + chunk], k, v)
                      for i in range(0, q.shape[2], chunk)], dim=2)


# ----------------------------------------------------------------------------------------------
# Loading and saving: the official layout is the module names; diffusers' goes through one table.

_DIFFUSERS_NAMES = [  # official -> diffusers key parts, after up.i became up.(L − 1 − i) (see _diffusers_key)
    (r"\.(down|up)\.(\d+)\.block\.", r".\1_blocks.\2.resnets."),
    (r"\.(down|up)\.(\d+)\.\1sample\.", r".\1_blocks.\2.\1samplers.0."),  # downsample, upsample
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"\.norm_out\.", ".conv_norm_out."),
]
_ATTN_WEIGHT = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")  # 1×1 convs here, Linear in diffusers
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
_SD3_PREFIX = "first_stage_model."


def _diffusers_key(key: str, levels: int) -> str:
    """An official key in diffusers' naming; diffusers numbers the up blocks in execution order."""
    key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", key)
    for official, diffusers in _DIFFUSERS_NAMES:
        key = re.sub(official, diffusers, key)
    return key


def diffusers_config(params: AutoEncoderParams) -> dict:
    """The config.json of a diffusers AutoencoderKL folder holding these weights; "stride" marks F16."""
    levels = len(params.ch_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": params.in_channels, "out_channels": params.out_ch,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": [params.ch * m for m in params.ch_mult], "layers_per_block": params.num_res_blocks,
            "act_fn": "silu", "latent_channels": params.z_channels, "norm_num_groups": params.groups,
            "sample_size": 1024, "scaling_factor": params.scale_factor, "shift_factor": params.shift_factor,
            "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False,
            "mid_block_add_attention": True, "stride": params.stride}


def save_vae(ae: AutoEncoder, path: str | os.PathLike) -> None:
    """`*.safetensors`: the official single-file layout (config in the file's metadata);
    anything else: a diffusers `vae/` folder (config.json with "stride" + diffusion_pytorch_model.safetensors)."""
    path, p = Path(path), ae.params
    sd = {k: v.detach().contiguous() for k, v in ae.state_dict().items()}
    if path.suffix == ".safetensors":
        meta = {k: str(getattr(p, k)) for k in ("scale_factor", "shift_factor", "stride", "groups")}
        atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
        return
    sd = {_diffusers_key(k, len(p.ch_mult)): v.flatten(1) if _ATTN_WEIGHT.search(k) else v for k, v in sd.items()}
    atomic_write(path / _DIFFUSERS_WEIGHTS[0], lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    write_json(path / "config.json", diffusers_config(p))


def load_vae(path, *, stride=None, device="cpu", dtype=None, config=None) -> AutoEncoder:
    """Load a Flux `ae.safetensors`, an SD3 checkpoint (keys under `first_stage_model.`), a diffusers `vae/`
    folder (or a pipeline folder holding one) or a file written by `save_vae`. stride: 1 (F8) or 2 (F16),
    default from the diffusers config / file metadata, else 1. config: "flux" or "sd3" sets scale / shift,
    default from the config / metadata, else SD3 for a `first_stage_model.` prefix, Flux otherwise."""
    if config is not None and config not in VAE_CONFIGS:
        raise ValueError(f"config must be one of {sorted(VAE_CONFIGS)}, got {config!r}")
    path = Path(path)
    if path.is_dir():  # a diffusers vae/ folder, or a pipeline folder holding one
        folder = path if (path / "config.json").is_file() else path / "vae"
        path = next((folder / w for w in _DIFFUSERS_WEIGHTS if (folder / w).is_file()), folder / _DIFFUSERS_WEIGHTS[0])
    if not path.is_file():
        raise FileNotFoundError(f"autoencoder weights not found: {path} (give ae.safetensors, an SD3 .safetensors "
                                "or a diffusers vae/ folder with config.json)")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors files are supported")
    with open_weights(path) as f:
        prefix = _SD3_PREFIX if any(k.startswith(_SD3_PREFIX) for k in f.keys()) else ""
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(prefix)}  # the autoencoder's
        meta = f.metadata() or {}  # from save_vae: scale_factor, shift_factor, stride, groups
        if diffusers := any(".down_blocks." in k for k in shapes):  # its settings are in config.json beside it
            cfg = read_json(path.parent / "config.json")
            meta = {"scale_factor": cfg.get("scaling_factor", 0.18215), "shift_factor": cfg.get("shift_factor") or 0.0,
                    "stride": cfg.get("stride", 1), "groups": cfg.get("norm_num_groups", 32)}  # shift: null if none
        base = VAE_CONFIGS[config or ("sd3" if prefix else "flux")]
        if config is None and "scale_factor" in meta:
            base = replace(base, scale_factor=float(meta["scale_factor"]), shift_factor=float(meta["shift_factor"]))

        def file_key(key: str, levels: int = 0) -> str:  # levels matter only for the decoder's up blocks
            return _diffusers_key(key, levels) if diffusers else prefix + key

        def shape_of(key: str) -> tuple | None:
            return shapes.get(file_key(key))

        # The one shape -> config inference, from the encoder's tensors and the decoder's ends.
        need = ["encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "decoder.conv_in.weight",
                "decoder.conv_out.weight"]
        if absent := [k for k in need if shape_of(k) is None]:
            raise ValueError(f"{path}: not a Flux/SD3 autoencoder checkpoint (no {', '.join(absent[:3])}); expected keys "
                             f"encoder.*/decoder.* (Flux), {_SD3_PREFIX}* (SD3) or a diffusers vae/ folder")
        ch, in_channels = shape_of("encoder.conv_in.weight")[:2]
        ch_mult, blocks = [], 1
        while width := shape_of(f"encoder.down.{len(ch_mult)}.block.0.conv1.weight"):  # a level's first block
            ch_mult.append(width[0] // ch)
        while shape_of(f"encoder.down.0.block.{blocks}.conv1.weight"):
            blocks += 1
        params = replace(base, in_channels=in_channels, ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=blocks,
                         out_ch=shape_of("decoder.conv_out.weight")[0], z_channels=shape_of("decoder.conv_in.weight")[1],
                         stride=stride or int(meta.get("stride", 1)), groups=int(meta.get("groups", 32)))
        # The one strict key / shape check; the meta-built model is then filled tensor by tensor, converted on the way.
        with torch.device("meta"):
            ae = AutoEncoder(params)
        expected = {file_key(k, len(ch_mult)): (k, tuple(v.shape)) for k, v in ae.state_dict().items()}
        wrong = [f"{name} {list(shapes[name])} (expected {list(shape)})" for name, (k, shape) in expected.items()
                 if shapes.get(name, shape) != shape and not (_ATTN_WEIGHT.search(k) and shapes[name] == shape[:2])]
        problems = {"missing": [name for name in expected if name not in shapes],
                    "unexpected": sorted(shapes.keys() - expected.keys()), "wrong shape": wrong}
        if any(problems.values()):
            raise ValueError(f"{path}: weights do not fit the autoencoder config {params}: " + "; ".join(
                f"{label} ({len(items)}): {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}"
                for label, items in problems.items() if items))
        ae.load_state_dict({k: checked_weight(f.get_tensor(name), path, name, device=device, dtype=dtype)
                            .reshape(shape)
                            for name, (k, shape) in expected.items()}, assign=True)  # diffusers' Linear: 1×1 convs
    return ae.eval()


# ----------------------------------------------------------------------------------------------
# Shared with the scripts, which may import this model file.


class UserError(Exception):
    """Bad input to a script: its main() prints the message as one line and exits with status 2."""


def pick_device(name: str) -> torch.device:
    """--device as a torch.device, or UserError in one line. A bare "cuda" is GPU LOCAL_RANK (set by torchrun), or
    GPU 0 when the launcher shows each process just one (CUDA_VISIBLE_DEVICES), made the current device:
    synchronize() and the memory statistics read that one. "cuda:N" with several ranks on a node is refused:
    they would all share GPU N."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        count, local = torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", 0))
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        if device.index is None:
            if local >= count > 1:
                raise UserError(f"--device cuda: LOCAL_RANK is {local} but this process sees {count} GPUs")
            device = torch.device("cuda", local if local < count else 0)
        elif ranks > 1:
            raise UserError(f"--device {name}: {ranks} ranks on this node would all use that one GPU; use --device "
                            "cuda (each rank takes GPU LOCAL_RANK)")
        if device.index >= count:
            raise UserError(f"--device {device}: this machine has {count} GPU(s)")
        torch.cuda.set_device(device)
    return device


def check_writable(path: Path, what: str, *, folder: bool = False) -> None:
    """Fail before the work, not after it: `path` (a file; with folder=True a folder) can be written, that is the
    nearest existing folder on its way takes new files. `what` names the target in the message ("--out x.png")."""
    path = Path(path).absolute()
    if not folder and path.is_dir():
        raise UserError(f"{what}: is a folder, not a file")
    existing = next(p for p in (path if folder else path.parent, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):  # also false on a read-only file system, even for root
        raise UserError(f"{what}: cannot write in {existing} (read-only)")


def write_json(path: Path, obj) -> None:
    """Indented JSON, written atomically; inf / nan (PSNR of equal images) become null: strict JSON has none."""
    obj = json.loads(json.dumps(obj), parse_constant=lambda _: None)  # Infinity / NaN tokens read back as None
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
