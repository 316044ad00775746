"""The denoisers Diffusion-4K fine-tunes, unchanged: Flux.1 (dev, schnell) and SD3 / SD3.5 MM-DiT, with loaders.

- `Flux`, shaped like black-forest-labs/flux `model.py` + `modules/layers.py`: double-stream blocks (text and
  image keep their own weights but attend jointly), then single-stream blocks over the joint sequence; 3-axis
  RoPE on q and k; latents packed 2×2 into tokens of 64 channels.
- `MMDiT`, shaped like Stability-AI/sd3.5 `mmditx.py`: joint blocks of a context and an x stream, a stored 2-D
  sin-cos `pos_embed` cropped to the token grid; SD3.5 adds RMSNorm on q and k and, in SD3.5-medium, a second
  self-attention over the image tokens ("dual attention") in the first blocks.

Module attribute names are the official checkpoint keys, so `state_dict()` IS the official layout; the diffusers
layout (the authors' release uses diffusers) is translated by one table per family, read both ways. Numerics are
the official ones except that QK-RMSNorm and RoPE stay in fp32 until q, k are rounded once before attention.

Use: `model = load_transformer(path, device="cuda", dtype=torch.bfloat16)`; for Flux feed `pack(latents)`,
`flux_img_ids(h, w, B)`, `flux_txt_ids(L, B)` and `unpack(out, h, w)` (h, w: latent size). Training:
`model.blocks()` are the units to shard, `model.gradient_checkpointing = True` recomputes each in backward.
"""
import json
import math
import re
from collections import OrderedDict, namedtuple
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fp8
from weight_files import atomic_write, checked_weight, open_weights, read_json


# ----------------------------------------------------------------------------------------- configs
@dataclass
class FluxParams:
    in_channels: int = 64  # 16 latent channels × (2×2 packing)
    out_channels: int = 64
    vec_in_dim: int = 768  # pooled CLIP-L
    context_in_dim: int = 4096  # T5-XXL hidden size
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE channels per position axis (index, row, col); sum = head_dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev is guidance-distilled; schnell has no guidance input


@dataclass
class SD3Params:
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    depth: int = 24
    hidden_size: int = 1536  # 64·depth in every official checkpoint
    num_heads: int = 24  # = depth: head_dim 64
    mlp_ratio: float = 4.0
    adm_in_channels: int = 2048  # pooled CLIP-L ‖ CLIP-G
    context_in_dim: int = 4096  # T5-XXL hidden size (CLIP states zero-padded to it)
    pos_embed_max_size: int = 192  # the stored pos_embed covers a 192×192 token grid
    qk_norm: bool = False  # SD3.5: RMSNorm over head_dim on q and k
    x_block_self_attn_layers: tuple[int, ...] = ()  # SD3.5-medium: blocks whose x stream has attn2


CONFIGS = {
    "flux-dev": FluxParams(guidance_embed=True),
    "flux-schnell": FluxParams(guidance_embed=False),
    "sd3-medium": SD3Params(depth=24, hidden_size=1536, num_heads=24, pos_embed_max_size=192),
    "sd3.5-medium": SD3Params(depth=24, hidden_size=1536, num_heads=24, pos_embed_max_size=384, qk_norm=True,
                              x_block_self_attn_layers=tuple(range(13))),
    "sd3.5-large": SD3Params(depth=38, hidden_size=2432, num_heads=38, pos_embed_max_size=192, qk_norm=True),
}


# ----------------------------------------------------------------------- pieces both families use
def timestep_embedding(t: torch.Tensor, dim: int = 256, time_factor: float = 1.0, max_period: float = 10_000):
    """Sinusoidal embedding of t·time_factor: (B,) -> (B, dim) fp32, [cos | sin], ω_i = max_period^(−i/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * time_factor)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def split_qkv(qkv: torch.Tensor, num_heads: int):
    """(B, L, 3·H·D) -> q, k, v views (B, L, H, D): a fused qkv projection's rows are [q | k | v], head-major."""
    return qkv.unflatten(-1, (3, num_heads, -1)).unbind(2)


def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """QK-RMSNorm over head_dim (eps 1e-6) times the learned scale, in fp32 whatever the dtypes; returns fp32."""
    return F.rms_norm(x.float(), x.shape[-1:], weight.float(), eps=1e-6)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Turn each channel pair (x_2j, x_2j+1) of x (B, L, H, D) by its angle, in fp32: the official 2×2 rotation
    [[cos, −sin], [sin, cos]] is the complex product (x_2j + i·x_2j+1)·e^{iθ}."""
    x = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(x * freqs).flatten(-2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor | None = None) -> torch.Tensor:
    """Full attention: q, k, v (B, L, H, D) -> (B, L, H·D), RoPE on q and k first when `pe` is given (Flux); q
    and k may come in fp32 (QK-norm, RoPE) and are rounded to v's dtype here. Tokens stay on dim 1 as everywhere
    else: the transposes to SDPA's (B, H, L, D) are views of the memory layout its flash kernel works in."""
    if pe is not None:
        q, k = apply_rope(q, pe), apply_rope(k, pe)
    q, k = q.to(v.dtype), k.to(v.dtype)
    x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return x.transpose(1, 2).flatten(2)


class LastLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear to the patch channels: Flux's `LastLayer` (patch 1) and SD3's
    `FinalLayer` are this one module with the same keys; the 2-way modulation is (shift, scale)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


def run_block(block: nn.Module, *args, checkpointing: bool):
    """One block; with activation checkpointing (and grads on) its activations are recomputed in backward."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


# -------------------------------------------------------------------------------------------- Flux
class EmbedND(nn.Module):
    """RoPE angles pos·θ^(−2k/d) for the channel pairs k of 3 axes (index, row, col) of d = axes_dim[i] channels:
    ids (B, L, 3) -> (B, L, 1, head_dim/2) complex64. In float64 as officially: positions reach 10^3 at 4K."""

    def __init__(self, theta: int, axes_dim):
        super().__init__()
        self.theta, self.axes_dim = theta, tuple(axes_dim)

    def forward(self, ids):
        f64 = torch.float32 if ids.device.type == "mps" else torch.float64
        angles = []
        for i, d in enumerate(self.axes_dim):
            omega = 1.0 / self.theta ** (torch.arange(0, d, 2, dtype=f64, device=ids.device) / d)
            angles.append(ids[..., i].to(f64)[..., None] * omega)
        angles = torch.cat(angles, dim=-1)
        return torch.polar(torch.ones_like(angles), angles).to(torch.complex64).unsqueeze(2)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):  # its learned `scale`, applied by QKNorm
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q, k):  # fp32 out: `attention` rounds them once
        return rms_norm_fp32(q, self.query_norm.scale), rms_norm_fp32(k, self.key_norm.scale)


class SelfAttention(nn.Module):  # weights only: the blocks apply them step by step
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


ModulationOut = namedtuple("ModulationOut", "shift scale gate")  # each (B, 1, C)


class Modulation(nn.Module):  # adaLN: lin(silu(vec)) -> one (single-stream) or two (double-stream) ModulationOut
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec):
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.multiplier == 6 else None


class DoubleStreamBlock(nn.Module):
    """Image and text keep separate weights and attend jointly over the sequence [txt, img]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden_dim), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden_dim, hidden_size))
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden_dim), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden_dim, hidden_size))

    def forward(self, img, txt, vec, pe):
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_modulated = (1 + img_mod1.scale) * self.img_norm1(img) + img_mod1.shift
        img_q, img_k, img_v = split_qkv(self.img_attn.qkv(img_modulated), self.num_heads)
        img_q, img_k = self.img_attn.norm(img_q, img_k)
        txt_modulated = (1 + txt_mod1.scale) * self.txt_norm1(txt) + txt_mod1.shift
        txt_q, txt_k, txt_v = split_qkv(self.txt_attn.qkv(txt_modulated), self.num_heads)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k)

        q, k, v = torch.cat((txt_q, img_q), dim=1), torch.cat((txt_k, img_k), dim=1), torch.cat((txt_v, img_v), dim=1)
        attn = attention(q, k, v, pe)
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp((1 + img_mod2.scale) * self.img_norm2(img) + img_mod2.shift)
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp((1 + txt_mod2.scale) * self.txt_norm2(txt) + txt_mod2.shift)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Attention and MLP in parallel: linear1 -> [qkv | mlp in], linear2 on [attention out | gelu(mlp in)]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x, vec, pe):
        mod, _ = self.modulation(vec)
        x_mod = (1 + mod.scale) * self.pre_norm(x) + mod.shift
        qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = split_qkv(qkv, self.num_heads)
        q, k = self.norm(q, k)
        output = self.linear2(torch.cat((attention(q, k, v, pe), self.mlp_act(mlp)), dim=-1))
        return x + mod.gate * output


class Flux(nn.Module):
    """Flux.1 transformer. forward(img, img_ids, txt, txt_ids, timesteps, y, guidance=None) -> (B, L_img, 64).

    img (B, L_img, in_channels) packed latents (`pack`), img_ids (B, L_img, 3) (`flux_img_ids`), txt (B, L_txt,
    context_in_dim), txt_ids (B, L_txt, 3) (`flux_txt_ids`), timesteps (B,) in [0, 1] and guidance (B,) (dev
    only), both embedded ×1000, y (B, vec_in_dim) pooled CLIP-L. Inputs are cast to the weights' dtype.
    """

    def __init__(self, params: FluxParams):
        super().__init__()
        H = params.hidden_size
        if H % params.num_heads:
            raise ValueError(f"hidden_size {H} is not divisible by num_heads {params.num_heads}")
        if sum(params.axes_dim) != H // params.num_heads:
            raise ValueError(f"axes_dim {tuple(params.axes_dim)} must sum to head_dim {H // params.num_heads}")
        self.params = params
        self.gradient_checkpointing = False
        self.pe_embedder = EmbedND(params.theta, params.axes_dim)
        self.img_in = nn.Linear(params.in_channels, H)
        self.time_in = MLPEmbedder(256, H)
        self.vector_in = MLPEmbedder(params.vec_in_dim, H)
        self.guidance_in = MLPEmbedder(256, H) if params.guidance_embed else None
        self.txt_in = nn.Linear(params.context_in_dim, H)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(H, params.num_heads, params.mlp_ratio, params.qkv_bias) for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(H, params.num_heads, params.mlp_ratio) for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(H, 1, params.out_channels)

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks in execution order: the units for FSDP sharding and checkpointing."""
        return [*self.double_blocks, *self.single_blocks]

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"Flux expects packed img (B, L, C) and txt (B, L, C), got {tuple(img.shape)} and "
                             f"{tuple(txt.shape)}: pack latents with mmdit.pack")
        dtype = self.img_in.weight.dtype
        img = self.img_in(img.to(dtype))
        vec = self.time_in(timestep_embedding(timesteps, 256, time_factor=1000).to(dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this Flux checkpoint is guidance-distilled (dev): pass guidance, e.g. 3.5")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256, time_factor=1000).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for block in self.double_blocks:
            img, txt = run_block(block, img, txt, vec, pe, checkpointing=self.gradient_checkpointing)
        img = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            img = run_block(block, img, vec, pe, checkpointing=self.gradient_checkpointing)
        return self.final_layer(img[:, txt.shape[1]:], vec)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """Flux packing "b c (h 2) (w 2) -> b (h w) (c 2 2)": (B, C, h, w) latents -> (B, h/2·w/2, 4·C) tokens."""
    B, C, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux packs 2×2 latent patches: latent height and width must be even, got {h}×{w}")
    x = latents.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack`: (B, h/2·w/2, 4·C) -> (B, C, h, w) for a latent of h × w."""
    B, L, D = x.shape
    x = x.reshape(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(B, D // 4, h, w)


def flux_img_ids(h: int, w: int, batch: int = 1, device=None) -> torch.Tensor:
    """Image position ids (B, h/2·w/2, 3) = (0, row, col) over the token grid of an h × w latent."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(1, -1, 3).repeat(batch, 1, 1)


def flux_txt_ids(length: int, batch: int = 1, device=None) -> torch.Tensor:
    """Text position ids (B, length, 3): all zero, so text tokens get no rotation."""
    return torch.zeros(batch, length, 3, device=device)


# ------------------------------------------------------------------------------------ SD3 / MM-DiT
class VectorEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x):
        return self.mlp(x)


class SD3SelfAttention(nn.Module):  # mmditx's SelfAttention; no proj in a pre-only block, ln_q / ln_k in SD3.5
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = None if pre_only else nn.Linear(dim, dim)
        self.ln_q = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else None
        self.ln_k = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else None

    def pre_attention(self, x):  # (B, L, C) -> q, k, v (B, L, H, D)
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        if self.ln_q is not None:  # in fp32 as Flux's QK-norm: `attention` rounds them once
            q, k = rms_norm_fp32(q, self.ln_q.weight), rms_norm_fp32(k, self.ln_k.weight)
        return q, k, v


class DismantledBlock(nn.Module):
    """One stream of a joint block, adaLN-modulated by 6 chunks (9 with attn2) in the order of post_attention; a
    pre-only block (the last context block) has only (shift_msa, scale_msa) and no output projection or MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool = False,
                 x_block_self_attn: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SD3SelfAttention(hidden_size, num_heads, qk_norm, pre_only)
        self.attn2 = SD3SelfAttention(hidden_size, num_heads, qk_norm) if x_block_self_attn else None
        if not pre_only:
            mlp_hidden_dim = int(hidden_size * mlp_ratio)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(hidden_size, mlp_hidden_dim),  # mmditx's Mlp
                                                 act=nn.GELU(approximate="tanh"),
                                                 fc2=nn.Linear(mlp_hidden_dim, hidden_size)))
        self.n_mods = 9 if x_block_self_attn else 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, self.n_mods * hidden_size))

    def pre_attention(self, x, c):  # -> q, k, v; those of attn2 (or None); the modulation chunks
        mods = self.adaLN_modulation(c)[:, None, :].chunk(self.n_mods, dim=-1)
        x_norm = self.norm1(x)  # SD3.5 dual attention: both attentions read it, modulated differently
        qkv = self.attn.pre_attention((1 + mods[1]) * x_norm + mods[0])
        qkv2 = None if self.attn2 is None else self.attn2.pre_attention((1 + mods[7]) * x_norm + mods[6])
        return qkv, qkv2, mods

    def post_attention(self, x, attn, attn2, mods):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *msa2 = mods
        x = x + gate_msa * self.attn.proj(attn)
        if attn2 is not None:
            x = x + msa2[2] * self.attn2.proj(attn2)  # gate_msa2
        return x + gate_mlp * self.mlp((1 + scale_mlp) * self.norm2(x) + shift_mlp)


class JointBlock(nn.Module):
    """The context and x streams, each with its own weights, attend jointly over [context, x]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool,
                 x_block_self_attn: bool):
        super().__init__()
        self.context_block = DismantledBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=pre_only)
        self.x_block = DismantledBlock(hidden_size, num_heads, mlp_ratio, qk_norm,
                                       x_block_self_attn=x_block_self_attn)

    def forward(self, context, x, c):
        context_qkv, _, context_mods = self.context_block.pre_attention(context, c)
        x_qkv, x_qkv2, x_mods = self.x_block.pre_attention(x, c)
        q, k, v = (torch.cat((a, b), dim=1) for a, b in zip(context_qkv, x_qkv))
        attn = attention(q, k, v)
        context_attn, x_attn = attn[:, :context.shape[1]], attn[:, context.shape[1]:]
        x_attn2 = None if x_qkv2 is None else attention(*x_qkv2)  # over the x tokens alone
        x = self.x_block.post_attention(x, x_attn, x_attn2, x_mods)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, context_attn, None, context_mods), x


class MMDiT(nn.Module):
    """SD3 / SD3.5 MM-DiT. forward(x, t, y, context) -> (B, 16, H, W) velocity.

    x (B, 16, H, W) latents (H, W multiples of the patch size), t (B,) = σ·1000 (no ×1000 inside), y (B, 2048)
    pooled CLIP-L ‖ CLIP-G, context (B, L, 4096) text states. Inputs are cast to the weights' dtype.
    """

    def __init__(self, params: SD3Params):
        super().__init__()
        H, p = params.hidden_size, params.patch_size
        self.params = params
        self.gradient_checkpointing = False
        self.x_embedder = nn.Sequential(OrderedDict(proj=nn.Conv2d(params.in_channels, H, p, stride=p)))  # PatchEmbed
        self.t_embedder = VectorEmbedder(256, H)  # mmditx's TimestepEmbedder: the same MLP, on timestep_embedding(t)
        self.y_embedder = VectorEmbedder(params.adm_in_channels, H)
        self.context_embedder = nn.Linear(params.context_in_dim, H)
        # the fixed 2-D sin-cos embedding of a max×max token grid, as officially a buffer the checkpoint fills
        self.register_buffer("pos_embed", torch.zeros(1, params.pos_embed_max_size ** 2, H))
        self.joint_blocks = nn.ModuleList(
            JointBlock(H, params.num_heads, params.mlp_ratio, params.qk_norm, pre_only=i == params.depth - 1,
                       x_block_self_attn=i in params.x_block_self_attn_layers) for i in range(params.depth))
        self.final_layer = LastLayer(H, params.patch_size, params.out_channels)

    def blocks(self) -> list[nn.Module]:
        """The joint blocks in execution order: the units for FSDP sharding and checkpointing."""
        return list(self.joint_blocks)

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The centre h × w window of the stored max×max grid: (1, h·w, C)."""
        m, p = self.params.pos_embed_max_size, self.params.patch_size
        if h > m or w > m:
            raise ValueError(f"latent grid {h * p}×{w * p} is {h}×{w} tokens, more than pos_embed_max_size {m} per "
                             f"side: this checkpoint handles latents up to {m * p}×{m * p} ({m * p * 8} px per side "
                             f"with the 8× VAE)")
        top, left = (m - h) // 2, (m - w) // 2
        return self.pos_embed.view(1, m, m, -1)[:, top:top + h, left:left + w].reshape(1, h * w, -1)

    def forward(self, x, t, y, context):
        B, _, Hl, Wl = x.shape
        p, C, dtype = self.params.patch_size, self.params.out_channels, self.x_embedder.proj.weight.dtype
        if Hl % p or Wl % p:
            raise ValueError(f"latent size {Hl}×{Wl} is not a multiple of the patch size {p}")
        h, w = Hl // p, Wl // p
        x = self.x_embedder(x.to(dtype)).flatten(2).transpose(1, 2) + self.cropped_pos_embed(h, w).to(dtype)
        c = self.t_embedder(timestep_embedding(t).to(dtype)) + self.y_embedder(y.to(dtype))
        context = self.context_embedder(context.to(dtype))
        for block in self.joint_blocks:
            context, x = run_block(block, context, x, c, checkpointing=self.gradient_checkpointing)
        x = self.final_layer(x, c)  # (B, h·w, p·p·C): channel fastest within a token
        return x.view(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, Hl, Wl)


# ------------------------------------------------------------------ diffusers <-> official key tables
# (official key, diffusers key): "#" is a block index, "*" weight or bias, and "{a,b,...}" lists alternatives.
# With alternatives on both sides a row is several tensors, paired in order; on the diffusers side only, they
# are the parts diffusers splits one fused projection into, stacked along dim 0 in this order (each hidden_size
# rows but the last, which takes the rest: the MLP part of Flux's linear1). A 2-way adaLN_modulation (the final
# layers, SD3's pre-only last context block) is (shift, scale) officially and (scale, shift) in diffusers.
FLUX_DIFFUSERS_TABLE = (
    ("img_in.*", "x_embedder.*"),
    ("txt_in.*", "context_embedder.*"),
    ("time_in.{in_layer,out_layer}.*", "time_text_embed.timestep_embedder.{linear_1,linear_2}.*"),
    ("vector_in.{in_layer,out_layer}.*", "time_text_embed.text_embedder.{linear_1,linear_2}.*"),
    ("guidance_in.{in_layer,out_layer}.*", "time_text_embed.guidance_embedder.{linear_1,linear_2}.*"),
    ("double_blocks.#.{img_mod,txt_mod}.lin.*", "transformer_blocks.#.{norm1,norm1_context}.linear.*"),
    ("double_blocks.#.img_attn.qkv.*", "transformer_blocks.#.attn.{to_q,to_k,to_v}.*"),
    ("double_blocks.#.txt_attn.qkv.*", "transformer_blocks.#.attn.{add_q_proj,add_k_proj,add_v_proj}.*"),
    ("double_blocks.#.{img,txt}_attn.norm.query_norm.scale", "transformer_blocks.#.attn.{norm_q,norm_added_q}.weight"),
    ("double_blocks.#.{img,txt}_attn.norm.key_norm.scale", "transformer_blocks.#.attn.{norm_k,norm_added_k}.weight"),
    ("double_blocks.#.{img,txt}_attn.proj.*", "transformer_blocks.#.attn.{to_out.0,to_add_out}.*"),
    ("double_blocks.#.img_mlp.{0,2}.*", "transformer_blocks.#.ff.net.{0.proj,2}.*"),
    ("double_blocks.#.txt_mlp.{0,2}.*", "transformer_blocks.#.ff_context.net.{0.proj,2}.*"),
    ("single_blocks.#.modulation.lin.*", "single_transformer_blocks.#.norm.linear.*"),
    ("single_blocks.#.linear1.*", "single_transformer_blocks.#.{attn.to_q,attn.to_k,attn.to_v,proj_mlp}.*"),
    ("single_blocks.#.norm.{query_norm,key_norm}.scale", "single_transformer_blocks.#.attn.{norm_q,norm_k}.weight"),
    ("single_blocks.#.linear2.*", "single_transformer_blocks.#.proj_out.*"),
    ("final_layer.{linear,adaLN_modulation.1}.*", "{proj_out,norm_out.linear}.*"),
)

SD3_DIFFUSERS_TABLE = (
    ("pos_embed", "pos_embed.pos_embed"),
    ("x_embedder.proj.*", "pos_embed.proj.*"),
    ("t_embedder.mlp.{0,2}.*", "time_text_embed.timestep_embedder.{linear_1,linear_2}.*"),
    ("y_embedder.mlp.{0,2}.*", "time_text_embed.text_embedder.{linear_1,linear_2}.*"),
    ("context_embedder.*", "context_embedder.*"),
    ("joint_blocks.#.x_block.adaLN_modulation.1.*", "transformer_blocks.#.norm1.linear.*"),
    ("joint_blocks.#.context_block.adaLN_modulation.1.*", "transformer_blocks.#.norm1_context.linear.*"),
    ("joint_blocks.#.x_block.attn.qkv.*", "transformer_blocks.#.attn.{to_q,to_k,to_v}.*"),
    ("joint_blocks.#.context_block.attn.qkv.*", "transformer_blocks.#.attn.{add_q_proj,add_k_proj,add_v_proj}.*"),
    ("joint_blocks.#.x_block.attn.{ln_q,ln_k}.weight", "transformer_blocks.#.attn.{norm_q,norm_k}.weight"),
    ("joint_blocks.#.context_block.attn.{ln_q,ln_k}.weight",
     "transformer_blocks.#.attn.{norm_added_q,norm_added_k}.weight"),
    ("joint_blocks.#.{x_block,context_block}.attn.proj.*", "transformer_blocks.#.attn.{to_out.0,to_add_out}.*"),
    ("joint_blocks.#.x_block.attn2.qkv.*", "transformer_blocks.#.attn2.{to_q,to_k,to_v}.*"),
    ("joint_blocks.#.x_block.attn2.{ln_q,ln_k}.weight", "transformer_blocks.#.attn2.{norm_q,norm_k}.weight"),
    ("joint_blocks.#.x_block.attn2.proj.*", "transformer_blocks.#.attn2.to_out.0.*"),
    ("joint_blocks.#.x_block.mlp.{fc1,fc2}.*", "transformer_blocks.#.ff.net.{0.proj,2}.*"),
    ("joint_blocks.#.context_block.mlp.{fc1,fc2}.*", "transformer_blocks.#.ff_context.net.{0.proj,2}.*"),
    ("final_layer.{linear,adaLN_modulation.1}.*", "{proj_out,norm_out.linear}.*"),
)

# The input embedding's key tells a checkpoint's family and layout; its rows are hidden_size.
EMBEDDING = {("flux", "official"): "img_in.weight", ("flux", "diffusers"): "x_embedder.weight",
             ("sd3", "official"): "x_embedder.proj.weight", ("sd3", "diffusers"): "pos_embed.proj.weight"}


def _alternatives(key: str) -> list[str]:  # "a.{x,y}.b" -> ["a.x.b", "a.y.b"]
    m = re.fullmatch(r"(.*)\{(.*)\}(.*)", key)
    return [m[1] + part + m[3] for part in m[2].split(",")] if m else [key]


def _table(family: str, keys) -> list[tuple[str, list[str]]]:
    """The table for the block indices in `keys` (either layout): (official key, [diffusers keys])."""
    blocks = sorted({m[1] for k in keys if (m := re.search(r"blocks\.(\d+)\.", k))})
    rows = []
    for official, diffusers in FLUX_DIFFUSERS_TABLE if family == "flux" else SD3_DIFFUSERS_TABLE:
        officials, names = _alternatives(official), _alternatives(diffusers)
        pairs = zip(officials, ([n] for n in names)) if len(officials) > 1 else [(official, names)]  # else stacked
        for o, ds in pairs:
            for i in blocks if "#" in o else [""]:
                for w in ("weight", "bias") if "*" in o else [""]:
                    rows.append((o.replace("#", i).replace("*", w), [d.replace("#", i).replace("*", w) for d in ds]))
    return rows


def _swap_shift_scale(key: str, t: torch.Tensor, hidden: int) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift) of a 2-way adaLN_modulation; anything else is left alone."""
    return torch.cat(t.chunk(2)[::-1]) if "adaLN_modulation" in key and t.shape[0] == 2 * hidden else t


def to_diffusers(sd: dict, family: str) -> dict:
    """Official-layout state dict -> diffusers layout (FluxTransformer2DModel / SD3Transformer2DModel)."""
    names_of, hidden, out = dict(_table(family, sd)), sd[EMBEDDING[family, "official"]].shape[0], {}
    for key, t in sd.items():
        names, t = names_of[key], _swap_shift_scale(key, t, hidden)
        out.update(zip(names, t.split([hidden] * (len(names) - 1) + [t.shape[0] - hidden * (len(names) - 1)])))
    return out


def from_diffusers(sd: dict, family: str) -> dict:
    """diffusers-layout state dict -> official layout; an unknown key or a missing part is an error."""
    hidden, out, used, missing = sd[EMBEDDING[family, "diffusers"]].shape[0], {}, set(), []
    for official, names in _table(family, sd):
        parts = [n for n in names if n in sd]  # none: a tensor this model lacks (schnell's guidance_in, attn2)
        used.update(parts)
        if parts and len(parts) < len(names):
            missing += [n for n in names if n not in sd]
        elif parts:
            t = torch.cat([sd[n] for n in names]) if len(names) > 1 else sd[names[0]]
            out[official] = _swap_shift_scale(official, t, hidden)
    unexpected = [k for k in sd if k not in used]
    if missing or unexpected:
        raise ValueError(f"diffusers {family} checkpoint does not match the key table: "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    return out


def diffusers_config(p) -> dict:
    """The diffusers config.json of a model with params `p`."""
    if p.mlp_ratio != 4.0:
        raise ValueError(f"diffusers fixes mlp_ratio at 4, this model has {p.mlp_ratio}")
    common = dict(in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.depth,
                  attention_head_dim=p.hidden_size // p.num_heads, num_attention_heads=p.num_heads,
                  joint_attention_dim=p.context_in_dim)
    if isinstance(p, FluxParams):
        return dict(_class_name="FluxTransformer2DModel", patch_size=1, **common,
                    num_single_layers=p.depth_single_blocks, pooled_projection_dim=p.vec_in_dim,
                    guidance_embeds=p.guidance_embed, axes_dims_rope=list(p.axes_dim))
    return dict(_class_name="SD3Transformer2DModel", sample_size=128, patch_size=p.patch_size, **common,
                caption_projection_dim=p.hidden_size, pooled_projection_dim=p.adm_in_channels,
                pos_embed_max_size=p.pos_embed_max_size, dual_attention_layers=list(p.x_block_self_attn_layers),
                qk_norm="rms_norm" if p.qk_norm else None)


# ------------------------------------------------------------------------------- loading and saving
OFFICIAL_PREFIX = "model.diffusion_model."


def _find_files(path) -> tuple[list[Path], dict]:
    """-> (the safetensors files, the diffusers config beside them or {}) for an official file (with or without
    `model.diffusion_model.`), an index .json, a folder holding one of them, or a diffusers pipeline folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"transformer weights not found: {path} (give a .safetensors file, an index .json, "
                                f"or a diffusers folder with config.json)")
    path = path / "transformer" if (path / "transformer").is_dir() else path  # a diffusers pipeline folder
    if path.is_dir():
        found = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.safetensors"))
        found = [f for f in found if f.name.startswith("diffusion_pytorch_model")] or found
        if len(found) != 1:
            raise FileNotFoundError(f"{path}: expected one .safetensors file or index .json, found {len(found)}")
        path = found[0]
    if path.suffix not in (".safetensors", ".json"):
        raise ValueError(f"{path}: expected a .safetensors file, an index .json or a folder")
    files = [path]
    if path.suffix == ".json":
        weight_map = read_json(path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
            raise ValueError(f"{path}: no \"weight_map\" of tensor names to file names")
        files = [path.parent / n for n in sorted(set(weight_map.values()))]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"{path}: lists no shards, or some are missing from {path.parent}")
    config = read_json(path.parent / "config.json") if (path.parent / "config.json").exists() else {}
    if config.get("_class_name") not in ("FluxTransformer2DModel", "SD3Transformer2DModel"):
        config = {}  # another model's config next to the file: the shapes decide everything anyway
    return files, config


def infer_params(shapes: dict, family: str, hints: dict | None = None):
    """The config of an official-layout state dict from its tensor shapes. `hints` (a diffusers config, or the
    metadata save_transformer writes) give what shapes cannot: RoPE axes and, without QK-norm, head_dim."""
    hints = hints or {}

    def count(prefix):
        return len({k.split(".")[1] for k in shapes if k.startswith(prefix)})

    if family == "flux":
        H = shapes["img_in.weight"][0]
        norm = shapes.get("double_blocks.0.img_attn.norm.query_norm.scale")
        head_dim = norm[0] if norm else hints.get("attention_head_dim") or 128
        # official files carry no RoPE split: (16, 56, 56) for head_dim 128, the same proportions otherwise
        axes = tuple(hints.get("axes_dims_rope") or (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16))
        return FluxParams(
            in_channels=shapes["img_in.weight"][1], out_channels=shapes["final_layer.linear.weight"][0],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1], context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=H, mlp_ratio=shapes["double_blocks.0.img_mlp.0.weight"][0] / H, num_heads=H // head_dim,
            depth=count("double_blocks."), depth_single_blocks=count("single_blocks."), axes_dim=axes,
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
            guidance_embed="guidance_in.in_layer.weight" in shapes)
    H, C_in, p, _ = shapes["x_embedder.proj.weight"]
    norm = shapes.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = norm[0] if norm else hints.get("attention_head_dim") or 64  # every official SD3 has head_dim 64
    depth = count("joint_blocks.")
    dual = tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes)
    return SD3Params(
        patch_size=p, in_channels=C_in, out_channels=shapes["final_layer.linear.weight"][0] // (p * p), depth=depth,
        hidden_size=H, num_heads=H // head_dim, mlp_ratio=shapes["joint_blocks.0.x_block.mlp.fc1.weight"][0] / H,
        adm_in_channels=shapes["y_embedder.mlp.0.weight"][1], context_in_dim=shapes["context_embedder.weight"][1],
        pos_embed_max_size=math.isqrt(shapes["pos_embed"][1]), qk_norm=norm is not None, x_block_self_attn_layers=dual)


def _check_keys(model: nn.Module, sd: dict, where, family: str):
    """The one strict check of names and shapes: a wrong file fails naming its keys, never half-loaded."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        def listing(ks):
            return f"{len(ks)} ({', '.join(ks[:3])}{', ...' if len(ks) > 3 else ''})"
        raise ValueError(f"{where}: keys do not match the {family} transformer inferred from its shapes: "
                         f"missing {listing(missing)}, unexpected {listing(unexpected)}")
    for k, t in expected.items():
        if t.shape != sd[k].shape:
            raise ValueError(f"{where}: {k} has shape {tuple(sd[k].shape)}, the inferred config needs {tuple(t.shape)}")


def load_transformer(path, *, device="cpu", dtype: torch.dtype | None = None, weight_dtype=None) -> "Flux | MMDiT":
    """Load a Flux or SD3/SD3.5 transformer (layouts: see `_find_files`; SD3 files that also hold the VAE and text
    encoders are fine). The config comes from the tensor shapes; the model is built on the meta device and takes
    the loaded tensors as they are (checkpoint dtype unless `dtype` is given; see fp8.store for fp8). weight_dtype:
    the storage dtype of the blocks' Linear weights (fp8.store), None: as the file stores them."""
    files, config = _find_files(path)
    sd, metadata = {}, {}
    with ExitStack() as stack:  # every shard opened (its header checked against its size) before any is read
        opened = [(file, stack.enter_context(open_weights(file, device))) for file in files]
        for file, f in opened:
            metadata.update(f.metadata() or {})
            prefix = OFFICIAL_PREFIX if any(k.startswith(OFFICIAL_PREFIX) for k in f.keys()) else ""  # not the VAE
            for key in (k for k in f.keys() if k.startswith(prefix) and not fp8.dropped(k)):
                t = f.get_tensor(key)
                sd[key[len(prefix):]] = checked_weight(t, file, key, dtype=fp8.read_dtype(key, t, dtype))
    family, layout = next((fl for fl, key in EMBEDDING.items() if key in sd), (None, None))
    if family is None:
        raise ValueError(f"{path}: not a Flux or SD3 transformer checkpoint "
                         f"(first keys: {', '.join(sorted(sd)[:3]) or 'none'})")
    if layout == "diffusers":
        sd = from_diffusers(sd, family)
    try:
        hints = json.loads(metadata["mmdit_params"]) if "mmdit_params" in metadata else config
    except ValueError as e:
        raise ValueError(f"{path}: its mmdit_params metadata is not JSON ({e})") from None
    try:
        params = infer_params({k: t.shape for k, t in sd.items()}, family, hints)
    except KeyError as e:
        raise ValueError(f"{path}: {family} checkpoint lacks {e.args[0]}, needed to infer its config") from None
    with torch.device("meta"):
        model = Flux(params) if family == "flux" else MMDiT(params)
    sd = fp8.store(model, sd, model.blocks(), weight_dtype, lambda key: dtype)
    _check_keys(model, sd, path, family)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def save_transformer(model: "Flux | MMDiT", path, *, layout: str = "official"):
    """Write the weights atomically: layout "official" -> one .safetensors file (the official key layout, with
    what shapes cannot tell in the metadata); "diffusers" -> a folder with config.json and the weights."""
    from safetensors.torch import save_file

    family, p, path = ("flux" if isinstance(model, Flux) else "sd3"), model.params, Path(path)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    sd |= fp8.marker(sd)  # fp8-stored blocks: the file is a ComfyUI-style scaled-fp8 file
    if layout == "official":
        hints = {"attention_head_dim": p.hidden_size // p.num_heads, "axes_dims_rope": getattr(p, "axes_dim", None)}
        atomic_write(path, lambda tmp: save_file(sd, tmp, {"format": "pt", "mmdit_params": json.dumps(hints)}))
    elif layout == "diffusers":
        if fp8.marker(sd):
            raise ValueError("an fp8-stored transformer saves in the official layout only (diffusers': no scales)")
        path.mkdir(parents=True, exist_ok=True)
        dsd = {k: v.contiguous() for k, v in to_diffusers(sd, family).items()}
        atomic_write(path / "diffusion_pytorch_model.safetensors", lambda tmp: save_file(dsd, tmp, {"format": "pt"}))
        atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(diffusers_config(p), indent=2)))
    else:
        raise ValueError(f"layout must be 'official' or 'diffusers', got {layout!r}")
