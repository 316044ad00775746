"""The denoisers: Flux.1 (dev, schnell) and SD3 / SD3.5 MM-DiT in plain PyTorch, with their loaders.

Two families share this file (SPEC §1 and §3):

- `Flux` (black-forest-labs/flux): double-stream blocks (text and image keep their own weights but
  attend jointly), then single-stream blocks over the concatenated sequence; 3-axis RoPE on q and k;
  latents packed 2×2 into tokens of 64 channels; timestep (and, for dev, distilled guidance) embedded
  after a ×1000 scale.
- `MMDiT` (Stability-AI sd3 / sd3.5 `mmditx.py`): joint blocks of a context and an x stream with a
  stored 2-D sin-cos `pos_embed` cropped to the token grid; SD3.5 adds RMSNorm on q and k and, in
  SD3.5-medium, a second self-attention over the image tokens ("dual attention") in the first blocks.

Module attribute names are the official checkpoint keys, so `state_dict()` IS the official layout
and loading an official file needs no mapping. Only the diffusers layout is translated, through one
table per family (`FLUX_DIFFUSERS_TABLE`, `SD3_DIFFUSERS_TABLE`) read in both directions.

Numerics follow the official code: weights and activations stay in the checkpoint dtype (bf16), the
affine-free LayerNorms and the modulation run in that dtype, while QK-RMSNorm and RoPE run in fp32 and
are cast back once, just before attention (the official code rounds to bf16 once more in between).
Attention is `F.scaled_dot_product_attention` on (B, H, L, D) views of (B, L, H, D) tensors, so flash
kernels need no transposed copies.

Use: `model = load_transformer(path, device="cuda", dtype=torch.bfloat16)`; for Flux feed
`pack(latents)`, `flux_img_ids(h, w, B)`, `flux_txt_ids(L, B)` and `unpack(out, h, w)` (h, w: latent
size). Training: `model.blocks()` lists the blocks to shard one by one, `model.gradient_checkpointing =
True` recomputes each block in backward; `save_transformer` writes the official or diffusers layout.
"""
import json
import math
import os
import re
import uuid
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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

# ------------------------------------------------------------------------------- shared functions


def timestep_embedding(t: torch.Tensor, dim: int = 256, time_factor: float = 1.0, max_period: float = 10_000):
    """Sinusoidal embedding of t·time_factor: (B,) -> (B, dim) fp32, [cos | sin], ω_i = max_period^(−i/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * time_factor)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(1 + scale)·LayerNorm(x) + shift, with the affine-free LayerNorm (eps 1e-6) of both families.

    x (B, L, C); shift, scale (B, 1, C). With one sample the modulation is LayerNorm's own affine, so
    the whole thing is a single fused kernel; otherwise it is LayerNorm then one fused multiply-add.
    """
    if x.shape[0] == 1:
        return F.layer_norm(x, x.shape[-1:], (1 + scale).flatten(), shift.flatten(), eps)
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=eps), 1 + scale)


def split_heads(qkv: torch.Tensor, num_heads: int):
    """(B, L, 3·H·D) -> q, k, v views of (B, L, H, D): the rows of a fused qkv are [q | k | v], head-major."""
    B, L, _ = qkv.shape
    return qkv.view(B, L, 3, num_heads, -1).unbind(2)


def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim (head_dim) computed in fp32, times the learned scale; returns fp32."""
    return F.rms_norm(x.float(), x.shape[-1:], weight.float(), eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) attention, scale 1/sqrt(D): q, k, v (B, L, H, D) -> (B, L, H·D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)  # kernels write (B, L, H, D) memory: usually no copy


def rope_freqs(ids: torch.Tensor, axes_dim, theta: float) -> torch.Tensor:
    """Rotations for RoPE: ids (B, L, n_axes) positions -> (B, L, 1, D/2) complex64 unit numbers.

    Axis i owns d_i channels = d_i/2 pairs with ω_k = θ^(−2k/d_i); the axes are concatenated. Angles
    are formed in float64 (positions reach 10^3 at 4K and fp32 would lose the low bits), as the
    official code does, then rounded once to complex64.
    """
    f64 = torch.float64 if ids.device.type != "mps" else torch.float32
    angles = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=f64, device=ids.device) / d)  # (d/2,)
        angles.append(ids[..., i].to(f64)[..., None] * omega)  # (B, L, d/2)
    angles = torch.cat(angles, dim=-1)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64).unsqueeze(2)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2j, 2j+1) of x (B, L, H, D) by freqs (B, L, 1, D/2), in fp32.

    (x_2j + i·x_2j+1)·(cos + i·sin) is the official 2×2 rotation [[cos, −sin], [sin, cos]]; one
    complex multiply is one kernel where the real form takes six.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs).flatten(-2)


def _as_batch(t, batch: int, device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    return t.expand(batch) if t.ndim == 0 else t


# -------------------------------------------------------------------------------------------- Flux


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """Flux's QK RMSNorm: only a learned `scale` (the key name in the checkpoint); applied by QKNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q, k):  # (B, L, H, D) -> fp32
        return rms_norm_fp32(q, self.query_norm.scale), rms_norm_fp32(k, self.key_norm.scale)


class SelfAttention(nn.Module):
    """Flux attention parameters: fused qkv, QK-norm, output projection (applied by the blocks)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        """x (B, L, C) -> q, k normalized in fp32 and v (B, L, H, D) in x's dtype."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k)
        return q, k, v


class Modulation(nn.Module):
    """adaLN: lin(silu(vec)) -> n × (B, 1, C), in the order (shift, scale, gate)[, shift, scale, gate]."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


class DoubleStreamBlock(nn.Module):
    """Image and text keep separate weights and attend jointly over [txt, img]. (img|txt)_norm1/2 are
    affine-free LayerNorms with no keys; `modulate` applies them."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden, hidden_size))
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden, hidden_size))

    def forward(self, img, txt, vec, pe):
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, txt_shift1, txt_scale1))

        # joint attention over [txt, img]; RoPE in fp32 on the concatenated sequence, then one cast back
        q = apply_rope(torch.cat((txt_q, img_q), dim=1), pe).to(img_v.dtype)  # (B, L, H, D)
        k = apply_rope(torch.cat((txt_k, img_k), dim=1), pe).to(img_v.dtype)
        v = torch.cat((txt_v, img_v), dim=1)
        attn = attention(q, k, v)  # (B, L, C)
        n_txt = txt.shape[1]
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        img = torch.addcmul(img, img_gate1, self.img_attn.proj(img_attn))  # x += gate·f(...), fused
        img = torch.addcmul(img, img_gate2, self.img_mlp(modulate(img, img_shift2, img_scale2)))
        txt = torch.addcmul(txt, txt_gate1, self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, txt_gate2, self.txt_mlp(modulate(txt, txt_shift2, txt_scale2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence: linear1 -> [qkv | mlp], linear2 on [attn | gelu(mlp)]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x, vec, pe):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(modulate(x, shift, scale)), [3 * self.hidden_size, self.mlp_hidden_dim],
                               dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k)
        q, k = apply_rope(q, pe).to(v.dtype), apply_rope(k, pe).to(v.dtype)
        out = self.linear2(torch.cat((attention(q, k, v), F.gelu(mlp, approximate="tanh")), dim=-1))
        return torch.addcmul(x, gate, out)


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # shift first (official order)
        return self.linear(modulate(x, shift, scale))


class Flux(nn.Module):
    """Flux.1 transformer. forward(img, img_ids, txt, txt_ids, timesteps, y, guidance=None) -> (B, L_img, 64).

    img (B, L_img, in_channels) packed latents (`pack`), img_ids (B, L_img, 3) or (L_img, 3) (`flux_img_ids`),
    txt (B, L_txt, context_in_dim), txt_ids likewise (`flux_txt_ids`), timesteps (B,) in [0, 1],
    y (B, vec_in_dim) pooled CLIP-L, guidance (B,) distilled guidance scale (dev only).
    """

    def __init__(self, params: FluxParams):
        super().__init__()
        H = params.hidden_size
        if H % params.num_heads:
            raise ValueError(f"hidden_size {H} is not divisible by num_heads {params.num_heads}")
        if sum(params.axes_dim) != H // params.num_heads:
            raise ValueError(f"axes_dim {tuple(params.axes_dim)} must sum to head_dim {H // params.num_heads}")
        self.params = params
        self.gradient_checkpointing = False  # per-block activation checkpointing when grads are on
        self.img_in = nn.Linear(params.in_channels, H)
        self.time_in = MLPEmbedder(256, H)
        self.vector_in = MLPEmbedder(params.vec_in_dim, H)
        self.guidance_in = MLPEmbedder(256, H) if params.guidance_embed else None
        self.txt_in = nn.Linear(params.context_in_dim, H)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(H, params.num_heads, params.mlp_ratio, params.qkv_bias) for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(H, params.num_heads, params.mlp_ratio) for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(H, params.out_channels)

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks in execution order: the units for FSDP sharding and checkpointing."""
        return [*self.double_blocks, *self.single_blocks]

    def _run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"Flux expects packed img (B, L, C) and txt (B, L, C), got {tuple(img.shape)} and "
                             f"{tuple(txt.shape)}: pack latents with mmdit.pack")
        B, dtype = img.shape[0], self.img_in.weight.dtype
        img = self.img_in(img.to(dtype))
        vec = self.time_in(timestep_embedding(_as_batch(timesteps, B, img.device), 256, 1000.0).to(img.dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this Flux checkpoint is guidance-distilled (dev): pass guidance, e.g. 3.5")
            g = timestep_embedding(_as_batch(guidance, B, img.device), 256, 1000.0)  # ×1000 like timesteps
            vec = vec + self.guidance_in(g.to(img.dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt.to(dtype))

        txt_ids = txt_ids[None] if txt_ids.ndim == 2 else txt_ids
        img_ids = img_ids[None] if img_ids.ndim == 2 else img_ids
        n = max(txt_ids.shape[0], img_ids.shape[0])
        ids = torch.cat((txt_ids.expand(n, -1, -1), img_ids.expand(n, -1, -1)), dim=1)  # sequence is [txt, img]
        pe = rope_freqs(ids.to(img.device), self.params.axes_dim, self.params.theta)  # once per forward

        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, pe)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = self._run(block, x, vec, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)


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
    if h % 2 or w % 2 or L != (h // 2) * (w // 2):
        raise ValueError(f"cannot unpack {L} tokens into an even {h}×{w} latent")
    x = x.reshape(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(B, D // 4, h, w)


def flux_img_ids(h: int, w: int, batch: int = 1, device=None) -> torch.Tensor:
    """Image position ids (B, h/2·w/2, 3) = (0, row, col) over the token grid of an h × w latent."""
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even, got {h}×{w}")
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(1, -1, 3).repeat(batch, 1, 1)


def flux_txt_ids(length: int, batch: int = 1, device=None) -> torch.Tensor:
    """Text position ids (B, length, 3): all zero, so text tokens get no rotation."""
    return torch.zeros(batch, length, 3, device=device)


# ------------------------------------------------------------------------------------ SD3 / MM-DiT


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """The SD3 fixed 2-D sin-cos embedding (grid², dim): channels [col sin | col cos | row sin | row cos],
    ω_k = 1/10000^(k/(dim/4)); tokens in row-major order. Official checkpoints store it; tiny configs use this."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    angles = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None]  # (grid, dim/4)
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, dim/2) per coordinate
    col = emb[None, :, :].expand(grid, grid, -1)
    row = emb[:, None, :].expand(grid, grid, -1)
    return torch.cat([col, row], dim=-1).reshape(grid * grid, dim).float()


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, C, H, W) -> (B, h·w, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t, dtype):
        return self.mlp(timestep_embedding(t, 256).to(dtype))  # t = σ·1000 already: no ×1000 here


class VectorEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x):
        return self.mlp(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SD3SelfAttention(nn.Module):
    """The official `SelfAttention` of mmditx: keys qkv, proj (absent when pre_only), ln_q / ln_k (SD3.5)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = None if pre_only else nn.Linear(dim, dim)
        self.ln_q = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else None
        self.ln_k = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else None

    def qkv_heads(self, x):
        """x (B, L, C) -> q, k, v (B, L, H, D) in x's dtype (QK-norm computed in fp32)."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        if self.ln_q is not None:
            q, k = rms_norm_fp32(q, self.ln_q.weight).to(v.dtype), rms_norm_fp32(k, self.ln_k.weight).to(v.dtype)
        return q, k, v


class DismantledBlock(nn.Module):
    """One stream of a joint block. adaLN chunks: (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
    gate_mlp[, shift_msa2, scale_msa2, gate_msa2]); a pre-only block (the last context block) has only
    (shift_msa, scale_msa) and no output projection or MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool = False,
                 x_block_self_attn: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.attn = SD3SelfAttention(dim, num_heads, qk_norm, pre_only)
        self.attn2 = SD3SelfAttention(dim, num_heads, qk_norm) if x_block_self_attn else None
        self.mlp = None if pre_only else Mlp(dim, int(dim * mlp_ratio))
        self.n_mods = 9 if x_block_self_attn else 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mods * dim))

    def modulation(self, c):
        return self.adaLN_modulation(c)[:, None, :].chunk(self.n_mods, dim=-1)

    def post_attention(self, x, attn, mods):
        """Residuals after the joint attention: x += gate_msa·proj(attn); x += gate_mlp·mlp(modulate(x))."""
        x = torch.addcmul(x, mods[2], self.attn.proj(attn))
        return torch.addcmul(x, mods[5], self.mlp(modulate(x, mods[3], mods[4])))


class JointBlock(nn.Module):
    """Joint attention of the context and x streams over [context, x], each with its own weights."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool,
                 x_block_self_attn: bool):
        super().__init__()
        self.context_block = DismantledBlock(dim, num_heads, mlp_ratio, qk_norm, pre_only=pre_only)
        self.x_block = DismantledBlock(dim, num_heads, mlp_ratio, qk_norm, x_block_self_attn=x_block_self_attn)

    def forward(self, context, x, c):
        c_mods, x_mods = self.context_block.modulation(c), self.x_block.modulation(c)
        c_q, c_k, c_v = self.context_block.attn.qkv_heads(modulate(context, c_mods[0], c_mods[1]))
        attn2 = self.x_block.attn2
        if attn2 is None:
            x_q, x_k, x_v = self.x_block.attn.qkv_heads(modulate(x, x_mods[0], x_mods[1]))
        else:  # SD3.5 dual attention: both attentions read the same LayerNorm(x), modulated differently
            x_norm = F.layer_norm(x, x.shape[-1:], eps=1e-6)
            x_q, x_k, x_v = self.x_block.attn.qkv_heads(torch.addcmul(x_mods[0], x_norm, 1 + x_mods[1]))
            x_q2, x_k2, x_v2 = attn2.qkv_heads(torch.addcmul(x_mods[6], x_norm, 1 + x_mods[7]))

        attn = attention(torch.cat((c_q, x_q), 1), torch.cat((c_k, x_k), 1), torch.cat((c_v, x_v), 1))
        n_ctx = context.shape[1]
        c_attn, x_attn = attn[:, :n_ctx], attn[:, n_ctx:]

        if attn2 is None:
            x = self.x_block.post_attention(x, x_attn, x_mods)
        else:  # x += gate_msa·proj(attn); x += gate_msa2·proj2(self-attn over x); then the MLP
            x = torch.addcmul(x, x_mods[2], self.x_block.attn.proj(x_attn))
            x = torch.addcmul(x, x_mods[8], attn2.proj(attention(x_q2, x_k2, x_v2)))
            x = torch.addcmul(x, x_mods[5], self.x_block.mlp(modulate(x, x_mods[3], x_mods[4])))
        context = None if self.context_block.pre_only else self.context_block.post_attention(context, c_attn, c_mods)
        return context, x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale))


class MMDiT(nn.Module):
    """SD3 / SD3.5 MM-DiT. forward(x, t, y, context) -> (B, 16, H, W) velocity.

    x (B, 16, H, W) latents (H, W multiples of the patch size), t (B,) = σ·1000, y (B, 2048) pooled
    CLIP-L ‖ CLIP-G, context (B, L, 4096) text states.
    """

    def __init__(self, params: SD3Params):
        super().__init__()
        H = params.hidden_size
        if H % params.num_heads:
            raise ValueError(f"hidden_size {H} is not divisible by num_heads {params.num_heads}")
        self.params = params
        self.gradient_checkpointing = False  # per-block activation checkpointing when grads are on
        self.x_embedder = PatchEmbed(params.patch_size, params.in_channels, H)
        self.t_embedder = TimestepEmbedder(H)
        self.y_embedder = VectorEmbedder(params.adm_in_channels, H)
        self.context_embedder = nn.Linear(params.context_in_dim, H)
        # Persistent like the official buffer: checkpoints store it and load_transformer loads it. Built from
        # the formula here so that a model made from a config alone is complete.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(H, params.pos_embed_max_size)[None])
        self.joint_blocks = nn.ModuleList(
            JointBlock(H, params.num_heads, params.mlp_ratio, params.qk_norm, pre_only=i == params.depth - 1,
                       x_block_self_attn=i in params.x_block_self_attn_layers) for i in range(params.depth))
        self.final_layer = FinalLayer(H, params.patch_size, params.out_channels)

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
        grid = self.pos_embed.view(1, m, m, -1)[:, top:top + h, left:left + w]
        return grid.reshape(1, h * w, -1)

    def _run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x, t, y, context):
        B, _, Hl, Wl = x.shape
        p, dtype = self.params.patch_size, self.x_embedder.proj.weight.dtype
        if Hl % p or Wl % p:
            raise ValueError(f"latent size {Hl}×{Wl} is not a multiple of the patch size {p}")
        h, w = Hl // p, Wl // p
        x = self.x_embedder(x.to(dtype)) + self.cropped_pos_embed(h, w).to(dtype)  # (B, h·w, C)
        c = self.t_embedder(_as_batch(t, B, x.device), x.dtype) + self.y_embedder(y.to(dtype))
        context = self.context_embedder(context.to(dtype))
        for block in self.joint_blocks:
            context, x = self._run(block, context, x, c)
        x = self.final_layer(x, c)  # (B, h·w, p·p·C): channel fastest within a token
        C = self.params.out_channels
        return x.view(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, Hl, Wl)


# --------------------------------------------------------------------- diffusers <-> official tables
#
# One row per official tensor: (official key, diffusers key(s), op). "#" is a block index and "*" is
# "weight" or "bias". Several diffusers keys are stacked along dim 0 in the order given (diffusers splits
# the fused projections); going the other way the official tensor is split, every part but the last
# having hidden_size rows (the last takes the rest: the MLP part of Flux's linear1). op "shift_scale":
# a 2-way adaLN is (shift, scale) officially and (scale, shift) in diffusers (the final layers, SD3's
# pre-only last context block); 6- and 9-way modulations are not reordered.

FLUX_DIFFUSERS_TABLE = (
    ("img_in.*", "x_embedder.*"),
    ("txt_in.*", "context_embedder.*"),
    ("time_in.in_layer.*", "time_text_embed.timestep_embedder.linear_1.*"),
    ("time_in.out_layer.*", "time_text_embed.timestep_embedder.linear_2.*"),
    ("vector_in.in_layer.*", "time_text_embed.text_embedder.linear_1.*"),
    ("vector_in.out_layer.*", "time_text_embed.text_embedder.linear_2.*"),
    ("guidance_in.in_layer.*", "time_text_embed.guidance_embedder.linear_1.*"),
    ("guidance_in.out_layer.*", "time_text_embed.guidance_embedder.linear_2.*"),
    ("double_blocks.#.img_mod.lin.*", "transformer_blocks.#.norm1.linear.*"),
    ("double_blocks.#.txt_mod.lin.*", "transformer_blocks.#.norm1_context.linear.*"),
    ("double_blocks.#.img_attn.qkv.*",
     "transformer_blocks.#.attn.to_q.* transformer_blocks.#.attn.to_k.* transformer_blocks.#.attn.to_v.*"),
    ("double_blocks.#.txt_attn.qkv.*", "transformer_blocks.#.attn.add_q_proj.* transformer_blocks.#.attn.add_k_proj.* "
                                       "transformer_blocks.#.attn.add_v_proj.*"),
    ("double_blocks.#.img_attn.norm.query_norm.scale", "transformer_blocks.#.attn.norm_q.weight"),
    ("double_blocks.#.img_attn.norm.key_norm.scale", "transformer_blocks.#.attn.norm_k.weight"),
    ("double_blocks.#.txt_attn.norm.query_norm.scale", "transformer_blocks.#.attn.norm_added_q.weight"),
    ("double_blocks.#.txt_attn.norm.key_norm.scale", "transformer_blocks.#.attn.norm_added_k.weight"),
    ("double_blocks.#.img_attn.proj.*", "transformer_blocks.#.attn.to_out.0.*"),
    ("double_blocks.#.txt_attn.proj.*", "transformer_blocks.#.attn.to_add_out.*"),
    ("double_blocks.#.img_mlp.0.*", "transformer_blocks.#.ff.net.0.proj.*"),
    ("double_blocks.#.img_mlp.2.*", "transformer_blocks.#.ff.net.2.*"),
    ("double_blocks.#.txt_mlp.0.*", "transformer_blocks.#.ff_context.net.0.proj.*"),
    ("double_blocks.#.txt_mlp.2.*", "transformer_blocks.#.ff_context.net.2.*"),
    ("single_blocks.#.modulation.lin.*", "single_transformer_blocks.#.norm.linear.*"),
    ("single_blocks.#.linear1.*", "single_transformer_blocks.#.attn.to_q.* single_transformer_blocks.#.attn.to_k.* "
                                  "single_transformer_blocks.#.attn.to_v.* single_transformer_blocks.#.proj_mlp.*"),
    ("single_blocks.#.norm.query_norm.scale", "single_transformer_blocks.#.attn.norm_q.weight"),
    ("single_blocks.#.norm.key_norm.scale", "single_transformer_blocks.#.attn.norm_k.weight"),
    ("single_blocks.#.linear2.*", "single_transformer_blocks.#.proj_out.*"),
    ("final_layer.linear.*", "proj_out.*"),
    ("final_layer.adaLN_modulation.1.*", "norm_out.linear.*", "shift_scale"),
)

SD3_DIFFUSERS_TABLE = (
    ("pos_embed", "pos_embed.pos_embed"),
    ("x_embedder.proj.*", "pos_embed.proj.*"),
    ("t_embedder.mlp.0.*", "time_text_embed.timestep_embedder.linear_1.*"),
    ("t_embedder.mlp.2.*", "time_text_embed.timestep_embedder.linear_2.*"),
    ("y_embedder.mlp.0.*", "time_text_embed.text_embedder.linear_1.*"),
    ("y_embedder.mlp.2.*", "time_text_embed.text_embedder.linear_2.*"),
    ("context_embedder.*", "context_embedder.*"),
    ("joint_blocks.#.x_block.adaLN_modulation.1.*", "transformer_blocks.#.norm1.linear.*"),
    ("joint_blocks.#.context_block.adaLN_modulation.1.*", "transformer_blocks.#.norm1_context.linear.*",
     "shift_scale"),
    ("joint_blocks.#.x_block.attn.qkv.*",
     "transformer_blocks.#.attn.to_q.* transformer_blocks.#.attn.to_k.* transformer_blocks.#.attn.to_v.*"),
    ("joint_blocks.#.context_block.attn.qkv.*", "transformer_blocks.#.attn.add_q_proj.* "
     "transformer_blocks.#.attn.add_k_proj.* transformer_blocks.#.attn.add_v_proj.*"),
    ("joint_blocks.#.x_block.attn.ln_q.weight", "transformer_blocks.#.attn.norm_q.weight"),
    ("joint_blocks.#.x_block.attn.ln_k.weight", "transformer_blocks.#.attn.norm_k.weight"),
    ("joint_blocks.#.context_block.attn.ln_q.weight", "transformer_blocks.#.attn.norm_added_q.weight"),
    ("joint_blocks.#.context_block.attn.ln_k.weight", "transformer_blocks.#.attn.norm_added_k.weight"),
    ("joint_blocks.#.x_block.attn.proj.*", "transformer_blocks.#.attn.to_out.0.*"),
    ("joint_blocks.#.context_block.attn.proj.*", "transformer_blocks.#.attn.to_add_out.*"),
    ("joint_blocks.#.x_block.attn2.qkv.*",
     "transformer_blocks.#.attn2.to_q.* transformer_blocks.#.attn2.to_k.* transformer_blocks.#.attn2.to_v.*"),
    ("joint_blocks.#.x_block.attn2.ln_q.weight", "transformer_blocks.#.attn2.norm_q.weight"),
    ("joint_blocks.#.x_block.attn2.ln_k.weight", "transformer_blocks.#.attn2.norm_k.weight"),
    ("joint_blocks.#.x_block.attn2.proj.*", "transformer_blocks.#.attn2.to_out.0.*"),
    ("joint_blocks.#.x_block.mlp.fc1.*", "transformer_blocks.#.ff.net.0.proj.*"),
    ("joint_blocks.#.x_block.mlp.fc2.*", "transformer_blocks.#.ff.net.2.*"),
    ("joint_blocks.#.context_block.mlp.fc1.*", "transformer_blocks.#.ff_context.net.0.proj.*"),
    ("joint_blocks.#.context_block.mlp.fc2.*", "transformer_blocks.#.ff_context.net.2.*"),
    ("final_layer.linear.*", "proj_out.*"),
    ("final_layer.adaLN_modulation.1.*", "norm_out.linear.*", "shift_scale"),
)

_TABLES = {"flux": FLUX_DIFFUSERS_TABLE, "sd3": SD3_DIFFUSERS_TABLE}


def _pattern(template: str) -> re.Pattern:
    rx = re.escape(template).replace("\\#", r"(?P<i>\d+)").replace("\\*", r"(?P<p>weight|bias)")
    return re.compile(rx)


def _fill(template: str, m: re.Match) -> str:
    groups = m.groupdict()
    return template.replace("#", groups.get("i") or "").replace("*", groups.get("p") or "")


def _swap_halves(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift) for a 2-way adaLN; leaves 6- and 9-way modulations alone."""
    if t.shape[0] != 2 * hidden:
        return t
    a, b = t.chunk(2, dim=0)
    return torch.cat((b, a), dim=0)


def _hidden_size(sd: dict, family: str) -> int:
    key = {"flux": ("img_in.weight", "x_embedder.weight"),
           "sd3": ("x_embedder.proj.weight", "pos_embed.proj.weight")}[family]
    for k in key:
        if k in sd:
            return sd[k].shape[0]
    raise ValueError(f"cannot find the input embedding ({' or '.join(key)}) to size the {family} transformer")


def to_diffusers(sd: dict, family: str) -> dict:
    """Official-layout state dict -> diffusers layout (FluxTransformer2DModel / SD3Transformer2DModel)."""
    rows = [(_pattern(o), d.split(), op[0] if op else None) for o, d, *op in _TABLES[family]]
    hidden, out, unknown = _hidden_size(sd, family), {}, []
    for key, t in sd.items():
        for rx, targets, op in rows:
            m = rx.fullmatch(key)
            if m:
                break
        else:
            unknown.append(key)
            continue
        names = [_fill(d, m) for d in targets]
        if op == "shift_scale":
            t = _swap_halves(t, hidden)
        sizes = [hidden] * (len(names) - 1) + [t.shape[0] - hidden * (len(names) - 1)]
        out.update(zip(names, t.split(sizes, dim=0) if len(names) > 1 else [t]))
    if unknown:
        raise ValueError(f"{len(unknown)} official {family} keys have no diffusers name: {', '.join(unknown[:4])}")
    return out


def from_diffusers(sd: dict, family: str) -> dict:
    """diffusers-layout state dict -> official layout; strict: any key the table does not know is an error."""
    rows = [(_pattern(d.split()[0]), o, d.split(), op[0] if op else None) for o, d, *op in _TABLES[family]]
    hidden, out, used, missing = _hidden_size(sd, family), {}, set(), []
    for key in sd:
        for rx, official, sources, op in rows:
            m = rx.fullmatch(key)
            if m:
                break
        else:
            continue  # a later part of a stacked tensor, or unknown (reported below)
        names = [_fill(s, m) for s in sources]
        if any(n not in sd for n in names):
            missing += [n for n in names if n not in sd]
            continue
        t = torch.cat([sd[n] for n in names], dim=0) if len(names) > 1 else sd[names[0]]
        out[_fill(official, m)] = _swap_halves(t, hidden) if op == "shift_scale" else t
        used.update(names)
    unexpected = [k for k in sd if k not in used and k not in missing]
    if missing or unexpected:
        raise ValueError(f"diffusers {family} checkpoint does not match the key table: "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    return out


def diffusers_config(params) -> dict:
    """The diffusers config.json for a model with these params (used by `save_transformer(layout="diffusers")`)."""
    if params.mlp_ratio != 4.0:
        raise ValueError(f"diffusers fixes mlp_ratio at 4, this model has {params.mlp_ratio}")
    head_dim = params.hidden_size // params.num_heads
    if isinstance(params, FluxParams):
        return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": params.in_channels,
                "out_channels": params.out_channels, "num_layers": params.depth,
                "num_single_layers": params.depth_single_blocks, "attention_head_dim": head_dim,
                "num_attention_heads": params.num_heads, "joint_attention_dim": params.context_in_dim,
                "pooled_projection_dim": params.vec_in_dim, "guidance_embeds": params.guidance_embed,
                "axes_dims_rope": list(params.axes_dim)}
    return {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": params.patch_size,
            "in_channels": params.in_channels, "out_channels": params.out_channels, "num_layers": params.depth,
            "attention_head_dim": head_dim, "num_attention_heads": params.num_heads,
            "joint_attention_dim": params.context_in_dim, "caption_projection_dim": params.hidden_size,
            "pooled_projection_dim": params.adm_in_channels, "pos_embed_max_size": params.pos_embed_max_size,
            "dual_attention_layers": list(params.x_block_self_attn_layers),
            "qk_norm": "rms_norm" if params.qk_norm else None}


# ------------------------------------------------------------------------------------------ loading

OFFICIAL_PREFIX = "model.diffusion_model."


def _find_files(path: str):
    """-> (list of safetensors files, the diffusers config dict or None). Raises one clear line on bad paths."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"transformer weights not found: {path} (give a .safetensors file, an index .json, "
                                f"or a diffusers folder with config.json)")
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "transformer")):  # a diffusers pipeline folder
            path = os.path.join(path, "transformer")
        names = sorted(os.listdir(path))
        indexes = [n for n in names if n.endswith(".safetensors.index.json")]
        singles = [n for n in names if n.endswith(".safetensors")]
        if indexes:
            preferred = [n for n in indexes if n.startswith("diffusion_pytorch_model")]
            return _find_files(os.path.join(path, (preferred or indexes)[0]))
        if "diffusion_pytorch_model.safetensors" in singles:
            singles = ["diffusion_pytorch_model.safetensors"]
        if len(singles) != 1:
            raise FileNotFoundError(f"{path}: expected one .safetensors file or an index .json, found "
                                    f"{len(singles)} .safetensors files: pass the file itself")
        path = os.path.join(path, singles[0])
    folder = os.path.dirname(os.path.abspath(path))
    if path.endswith(".json"):
        with open(path) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise ValueError(f"{path}: not a safetensors index (no weight_map)")
        files = [os.path.join(folder, n) for n in sorted(set(weight_map.values()))]
        absent = [f for f in files if not os.path.exists(f)]
        if absent:
            raise FileNotFoundError(f"{path}: shard {absent[0]} is missing ({len(absent)} of {len(files)} absent)")
    elif path.endswith(".safetensors"):
        files = [path]
    else:
        raise ValueError(f"{path}: expected a .safetensors file, an index .json or a folder")
    config = None
    config_path = os.path.join(folder, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
        if config.get("_class_name") not in ("FluxTransformer2DModel", "SD3Transformer2DModel"):
            config = None  # some other model's config next to the file: shapes decide everything anyway
    return files, config


def _detect(keys) -> tuple[str, str]:
    """-> (family "flux" | "sd3", layout "official" | "diffusers") from the key names."""
    if "img_in.weight" in keys or any(k.startswith("double_blocks.") for k in keys):
        return "flux", "official"
    if "x_embedder.proj.weight" in keys or any(k.startswith("joint_blocks.") for k in keys):
        return "sd3", "official"
    if "pos_embed.proj.weight" in keys:
        return "sd3", "diffusers"
    if "x_embedder.weight" in keys or any(k.startswith("single_transformer_blocks.") for k in keys):
        return "flux", "diffusers"
    raise ValueError(f"not a Flux or SD3 transformer checkpoint (first keys: {', '.join(sorted(keys)[:3])})")


def _block_indices(keys, prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)})


def infer_params(shapes: dict, family: str, hints: dict | None = None):
    """Config from the official-layout tensor shapes (SPEC §1, §3). `hints` (from a diffusers config.json
    or our own file metadata) supply what shapes cannot tell: RoPE axes and, without QK-norm, head_dim."""
    hints = hints or {}
    if family == "flux":
        H = shapes["img_in.weight"][0]
        norms = [k for k in ("double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.0.norm.query_norm.scale")
                 if k in shapes]
        head_dim = shapes[norms[0]][0] if norms else hints.get("head_dim") or 128
        # official checkpoints carry no RoPE split: (16, 56, 56) for head_dim 128, the same proportions otherwise
        axes = tuple(hints.get("axes_dim") or (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16))
        if "double_blocks.0.img_mlp.0.weight" in shapes:
            mlp_ratio = shapes["double_blocks.0.img_mlp.0.weight"][0] / H
        else:
            mlp_ratio = (shapes["single_blocks.0.linear1.weight"][0] - 3 * H) / H
        return FluxParams(
            in_channels=shapes["img_in.weight"][1], out_channels=shapes["final_layer.linear.weight"][0],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1], context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=H, mlp_ratio=mlp_ratio, num_heads=H // head_dim,
            depth=len(_block_indices(shapes, "double_blocks.")),
            depth_single_blocks=len(_block_indices(shapes, "single_blocks.")), axes_dim=axes,
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes or "single_blocks.0.linear1.bias" in shapes,
            guidance_embed="guidance_in.in_layer.weight" in shapes)
    H, C_in, p, _ = shapes["x_embedder.proj.weight"]
    if "joint_blocks.0.x_block.attn.ln_q.weight" in shapes:
        head_dim = shapes["joint_blocks.0.x_block.attn.ln_q.weight"][0]
    else:  # shapes cannot tell without QK-norm: every official SD3 has head_dim 64 (heads = depth)
        head_dim = hints.get("head_dim") or 64
    depth = len(_block_indices(shapes, "joint_blocks."))
    return SD3Params(
        patch_size=p, in_channels=C_in, out_channels=shapes["final_layer.linear.weight"][0] // (p * p), depth=depth,
        hidden_size=H, num_heads=H // head_dim, mlp_ratio=shapes["joint_blocks.0.x_block.mlp.fc1.weight"][0] / H,
        adm_in_channels=shapes["y_embedder.mlp.0.weight"][1], context_in_dim=shapes["context_embedder.weight"][1],
        pos_embed_max_size=round(math.sqrt(shapes["pos_embed"][1])),
        qk_norm="joint_blocks.0.x_block.attn.ln_q.weight" in shapes,
        x_block_self_attn_layers=tuple(i for i in range(depth)
                                       if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes))


def _check_keys(model: nn.Module, sd: dict, where: str, family: str):
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        def listing(ks):
            return f"{len(ks)} ({', '.join(ks[:3])}{', ...' if len(ks) > 3 else ''})"
        raise ValueError(f"{where}: keys do not match the {family} transformer inferred from its shapes: "
                         f"missing {listing(missing)}, unexpected {listing(unexpected)}")
    for k, t in expected.items():
        if tuple(t.shape) != tuple(sd[k].shape):
            raise ValueError(f"{where}: {k} has shape {tuple(sd[k].shape)}, the inferred config needs {tuple(t.shape)}")


def load_transformer(path: str, *, device="cpu", dtype: torch.dtype | None = None) -> "Flux | MMDiT":
    """Load a Flux or SD3/SD3.5 transformer from an official file (with or without `model.diffusion_model.`;
    SD3 files that also hold the VAE and text encoders are fine), an official sharded index, a diffusers
    `transformer/` folder or its index json. The config comes from the tensor shapes; the model is built on
    the meta device and takes the loaded tensors as they are (checkpoint dtype unless `dtype` is given)."""
    from safetensors import safe_open

    files, config = _find_files(path)
    where = {}  # key -> file
    metadata = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            metadata.update(f.metadata() or {})
            for k in f.keys():
                where[k] = file
    if any(k.startswith(OFFICIAL_PREFIX) for k in where):  # ignore first_stage_model.*, text_encoders.*
        names = {k[len(OFFICIAL_PREFIX):]: k for k in where if k.startswith(OFFICIAL_PREFIX)}
    else:
        names = {k: k for k in where}
    family, layout = _detect(names.keys())

    sd = {}
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for short, full in names.items():
                if where[full] == file:
                    t = f.get_tensor(full)
                    sd[short] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    if layout == "diffusers":
        sd = from_diffusers(sd, family)

    hints = {}
    if "mmdit_params" in metadata:  # written by save_transformer
        hints = json.loads(metadata["mmdit_params"])
    elif config:
        hints = {"axes_dim": config.get("axes_dims_rope"), "head_dim": config.get("attention_head_dim")}
    try:
        params = infer_params({k: tuple(t.shape) for k, t in sd.items()}, family, hints)
    except KeyError as e:
        raise ValueError(f"{path}: {family} checkpoint lacks {e.args[0]}, needed to infer its config") from None
    with torch.device("meta"):
        model = Flux(params) if family == "flux" else MMDiT(params)
    _check_keys(model, sd, path, family)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def save_transformer(model: "Flux | MMDiT", path: str, *, layout: str = "official"):
    """Write the weights atomically: layout "official" -> one .safetensors file (the official key layout, with
    the params in the metadata); "diffusers" -> a folder with config.json and diffusion_pytorch_model.safetensors."""
    from safetensors.torch import save_file

    family = "flux" if isinstance(model, Flux) else "sd3"
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}

    def atomic(write, target):
        # a unique name beside the target
        tmp = os.path.join(os.path.dirname(os.path.abspath(target)), f".{os.path.basename(target)}.{os.getpid()}-"
                           f"{uuid.uuid4().hex[:8]}.tmp")
        try:
            write(tmp)
            mask = os.umask(0o022)  # read the umask (and put it back): safetensors writes its files 0600,
            os.umask(mask)  # but exported weights should get the permissions of any file the user creates
            os.chmod(tmp, 0o666 & ~mask)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    if layout == "official":
        meta = {"format": "pt", "mmdit_params": json.dumps(
            {"axes_dim": list(model.params.axes_dim)} if family == "flux" else
            {"head_dim": model.params.hidden_size // model.params.num_heads})}
        atomic(lambda tmp: save_file(sd, tmp, metadata=meta), path)
    elif layout == "diffusers":
        os.makedirs(path, exist_ok=True)
        dsd = {k: v.contiguous() for k, v in to_diffusers(sd, family).items()}
        atomic(lambda tmp: save_file(dsd, tmp, metadata={"format": "pt"}),
               os.path.join(path, "diffusion_pytorch_model.safetensors"))

        def write_config(tmp):
            with open(tmp, "w") as f:
                json.dump(diffusers_config(model.params), f, indent=2)
        atomic(write_config, os.path.join(path, "config.json"))
    else:
        raise ValueError(f"layout must be 'official' or 'diffusers', got {layout!r}")
