"""The text encoders of Flux and SD3 (CLIP-L, CLIP-G, T5-XXL v1.1), their tokenizers, and the prompt conditioners.

Module names are the Hugging Face checkpoint keys (`text_model.encoder.layers.0.self_attn.q_proj.weight`,
`encoder.block.0.layer.1.DenseReluDense.wi_0.weight`, ...), so transformers folders, ComfyUI-style single files and
the `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` part of SD3 files load without a mapping. transformers ≥ 5
saves a bare CLIPTextModel without the `text_model.` level; the loader accepts both.

What the models feed the diffusion transformers:

    Flux:  vec = CLIP-L pooled (unprojected; transformers' `pooler_output`)              (B, 768)
           txt = T5 last hidden state, 512 tokens (dev) / 256 (schnell)                   (B, L, 4096)
    SD3:   context = [ pad_4096(CLIP-L penultimate ⊕ CLIP-G penultimate) ; T5 states ]   (B, 77 + L, 4096)
           pooled  = CLIP-L pooled (unprojected) ⊕ CLIP-G projected pooled                (B, 768 + 1280)

"Penultimate" is the input of the last layer, without the final LayerNorm (hidden_states[-2]). SD3's CLIP-L pooled
is the unprojected one: Stability's reference builds CLIP-L with `return_projected_pooled=False` (sd3_infer.py), and
diffusers' single-file loader gives SD3's CLIP-L an identity `text_projection` for the same reason
(`loaders/single_file_utils.py`), so diffusers' `text_embeds` equals it. Without T5, its states are zeros.

Pooling: CLIP pools the final-LayerNorm output at the EOS token. OpenAI's rule is "the highest id" (EOS 49407 is
the largest id of the vocabulary); transformers keeps that rule when the config says eos_token_id == 2 (configs
written before transformers PR #24773, e.g. openai/clip-vit-large-patch14) and otherwise takes the first position
holding eos_token_id. `CLIPTextConfig.eos_token_id = None` means the argmax rule; both agree on CLIP's vocabulary.

T5 in half precision: T5-XXL's activations exceed fp16's range (65504) in the feed-forward layers. Here the
residual stream is always fp32 (a (B, 512, 4096) tensor: a few MB), each sublayer reads the fp32 RMS-normalized
stream cast to the weights' dtype, and its output is added back in fp32. In fp16 the gated product
gelu(wi_0 x)·wi_1 x and `wo` are computed in fp32 (`load_t5` keeps the `wo` weights in fp32, as transformers does
with `_keep_in_fp32_modules = ["wo"]`). bf16 has fp32's range and needs nothing more.
"""
import hashlib
import json
import math
import os
import re
import uuid
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------
# CLIP text transformer


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # OpenAI CLIP-L; OpenCLIP bigG uses exact "gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # out features of `text_projection` (no bias); None: no projection
    eos_token_id: int | None = None  # pool at the first EOS; None: at argmax(ids) (see the module docstring)


CLIP_CONFIGS = {
    "clip-l": CLIPTextConfig(),
    "clip-g": CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                             hidden_act="gelu", projection_dim=1280),
}


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)  # OpenAI's sigmoid approximation of GELU


_ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,  # exact (erf)
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class CLIPEmbeddings(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D)


class CLIPAttention(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, D/H); the text tower is causal
        return self.out_proj(x.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        if c.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported CLIP hidden_act {c.hidden_act!r}; expected one of {sorted(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = CLIPAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)

    def forward(self, x: Tensor) -> Tensor:  # pre-LN
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(c)
        self.encoder = CLIPEncoder(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class CLIPText(nn.Module):
    """CLIP's text tower (transformers' CLIPTextModel, plus `text_projection` when the config has one)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids: Tensor, output_hidden_states: bool = False) -> dict:
        """input_ids (B, L) → {"last_hidden_state": (B, L, D) after the final LayerNorm,
        "pooled": (B, D) last_hidden_state at the EOS token, "text_embeds": (B, P) projected pooled (only with a
        projection), "hidden_states": num_hidden_layers + 1 tensors (B, L, D): the embeddings, then each layer's
        output, without the final LayerNorm (only when asked; [-2] is SD3's penultimate state)}."""
        tm = self.text_model
        x = tm.embeddings(input_ids)
        hidden_states = [x]
        for layer in tm.encoder.layers:
            x = layer(x)
            if output_hidden_states:
                hidden_states.append(x)
        x = tm.final_layer_norm(x)
        eos = self.config.eos_token_id
        index = input_ids.argmax(-1) if eos is None else (input_ids == eos).int().argmax(-1)  # first max / first EOS
        out = {"last_hidden_state": x, "pooled": x[torch.arange(x.shape[0], device=x.device), index]}
        if self.config.projection_dim is not None:
            out["text_embeds"] = self.text_projection(out["pooled"])
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        return out


# ----------------------------------------------------------------------------------------------
# T5 v1.1 encoder


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6


T5_CONFIGS = {"t5-xxl": T5Config()}


class T5LayerNorm(nn.Module):
    """RMS norm: no mean subtraction, no bias; statistics in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def relative_position_bucket(relative_position: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """T5's bidirectional bucketing of key − query offsets: half the buckets per direction; in each, offsets below
    num_buckets/4 get their own bucket, larger ones share log-spaced buckets up to max_distance (and beyond)."""
    half = num_buckets // 2
    exact = half // 2
    bucket = (relative_position > 0).long() * half  # keys after the query use the upper half
    n = relative_position.abs()
    log_scale = torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)  # 0 at exact, 1 at max
    log_bucket = exact + (log_scale * (half - exact)).long()
    return bucket + torch.where(n < exact, n, log_bucket.clamp(max=half - 1))


class T5Attention(nn.Module):
    def __init__(self, c: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.heads, self.c = c.num_heads, c
        inner = c.num_heads * c.d_kv
        self.q = nn.Linear(c.d_model, inner, bias=False)
        self.k = nn.Linear(c.d_model, inner, bias=False)
        self.v = nn.Linear(c.d_model, inner, bias=False)
        self.o = nn.Linear(inner, c.d_model, bias=False)
        if has_relative_attention_bias:  # block 0 only; its bias is shared by every block
            self.relative_attention_bias = nn.Embedding(c.relative_attention_num_buckets, c.num_heads)

    def position_bias(self, length: int, device) -> Tensor:
        pos = torch.arange(length, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.c.relative_attention_num_buckets,
                                           self.c.relative_attention_max_distance)  # (L, L): key − query
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, L, L)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        # T5 folds the scale into its initialization: scores are q·k + bias, with no 1/sqrt(d)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (B, H, L, d_kv)
        return self.o(x.transpose(1, 2).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, c: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(c, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:  # x: the fp32 residual stream
        return x + self.SelfAttention(self.layer_norm(x), bias).float()


class T5DenseGatedActDense(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # wo(gelu_tanh(wi_0 x) ⊙ wi_1 x); the product is formed in wo's dtype: fp32 when the model runs in fp16
        dtype = self.wo.weight.dtype
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh").to(dtype) * self.wi_1(x).to(dtype))


class T5LayerFF(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(c)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x)).float()


class T5Block(nn.Module):
    def __init__(self, c: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(c, has_relative_attention_bias), T5LayerFF(c)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.block = nn.ModuleList(T5Block(c, has_relative_attention_bias=i == 0) for i in range(c.num_layers))
        self.final_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """The encoder half of T5 v1.1 (transformers' T5EncoderModel). No attention mask: Flux and SD3 attend to the
    padding tokens too."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, L) → final hidden states (B, L, d_model) in the embedding's dtype."""
        x = self.shared(input_ids).float()  # (B, L, D): the residual stream stays fp32
        attention = self.encoder.block[0].layer[0].SelfAttention
        bias = attention.position_bias(input_ids.shape[1], input_ids.device).to(attention.q.weight.dtype)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x).to(self.shared.weight.dtype)


# ----------------------------------------------------------------------------------------------
# Loading

_CLIP_BUNDLED = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer."}
_T5_BUNDLED = {"t5xxl": "text_encoders.t5xxl.transformer."}
_CLIP_ANCHOR = "embeddings.token_embedding.weight"
_T5_ANCHOR = "encoder.block.0.layer.0.SelfAttention.q.weight"
_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _Weights:
    """The tensors of one safetensors file or of a sharded set, read lazily by key."""

    def __init__(self, files: list[Path]):
        self.files, self._stack, self._handle = files, ExitStack(), {}

    def __enter__(self):
        for file in self.files:
            f = self._stack.enter_context(safe_open(file, "pt"))
            self._handle.update((k, f) for k in f.keys())
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def keys(self) -> set[str]:
        return set(self._handle)

    def shape(self, key: str) -> tuple:
        return tuple(self._handle[key].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return self._handle[key].get_slice(key)[:1].dtype

    def tensor(self, key: str) -> Tensor:
        return self._handle[key].get_tensor(key)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable JSON ({e})") from None


def _weight_files(path, kind: str, model_types: tuple[str, ...]) -> tuple[list[Path], dict | None]:
    """The safetensors file(s) at `path` (a file, an index json, or a transformers folder) and the config.json that
    describes them, if any (a config.json beside a single file counts only when its model_type fits)."""
    path = Path(path)
    hint = "give a .safetensors file or a transformers folder (config.json + model.safetensors)"
    if not path.exists():
        raise FileNotFoundError(f"{kind} weights not found: {path} ({hint})")
    folder = path if path.is_dir() else path.parent
    index = None
    if path.is_dir():
        index = next((path / n for n in ("model.safetensors.index.json", "model.safetensors.index.fp16.json")
                      if (path / n).is_file()), None)
        files = [f for n in ("model.safetensors", "model.fp16.safetensors") if (f := path / n).is_file()][:1]
        if index is None and not files:
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                raise FileNotFoundError(f"{path}: no model.safetensors (or model.safetensors.index.json); {hint}")
    elif path.name.endswith(".index.json"):
        index = path
    elif path.suffix == ".safetensors":
        files = [path]
    else:
        raise ValueError(f"{path}: only .safetensors weights are supported ({hint})")
    if index is not None:
        files = [folder / name for name in sorted(set(_read_json(index).get("weight_map", {}).values()))]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"{index}: lists no shards, or some are missing from {folder}")
    config = None
    if (folder / "config.json").is_file():
        cfg = _read_json(folder / "config.json")
        if cfg.get("model_type") in model_types:
            config = cfg
        elif path.is_dir():
            raise ValueError(f"{folder / 'config.json'}: model_type {cfg.get('model_type')!r} is not a {kind} "
                             f"({' / '.join(model_types)})")
    return files, config


def _root(keys: set[str], anchor: str, bundled: dict[str, str], which, prefix, where: str, kind: str,
          strip: str = "") -> str:
    """The key prefix under which the model lives: given, chosen by `which`, or the only one in the file."""
    if prefix is not None:
        root = prefix
    elif which is not None:
        if which not in bundled:
            raise ValueError(f"which must be one of {sorted(bundled)}, got {which!r}")
        root = bundled[which]
    else:
        roots = set()
        for k in keys:
            if k.endswith(anchor) and (k == anchor or k[-len(anchor) - 1] == "."):
                r = k[: -len(anchor)]
                roots.add(r[: -len(strip)] if strip and r.endswith(strip) else r)
        if not roots:
            raise ValueError(f"{where}: no {kind} weights in this file (no key ending in {anchor!r})")
        if len(roots) > 1:
            names = [n for n, p in bundled.items() if p in roots]
            raise ValueError(f"{where}: holds several {kind} models (prefixes {sorted(roots)}); choose one with "
                             f"{'which=' + repr(names) + ' or ' if names else ''}prefix=")
        root = roots.pop()
    if not any(k.startswith(root) for k in keys):
        raise ValueError(f"{where}: no keys under the prefix {root!r}")
    return root


def _model_dtype(dtype, stored: torch.dtype) -> torch.dtype:
    # fp8 files (e.g. t5xxl_fp8_e4m3fn) are upcast to bf16: fp8 weights do not run through nn.Linear
    return dtype or (stored if stored in _COMPUTE_DTYPES else torch.bfloat16)


def _materialize(model_cls, config, w: _Weights, file_key, stored: set[str], where: str, device, dtype_of):
    """Check the file's keys and shapes against model_cls(config), then fill the meta-built model tensor by tensor
    (no full-precision copy of the model). file_key(our key) -> key in the file; stored: the file's keys that
    belong to this model (any of them the model does not use is reported as unexpected)."""
    with torch.device("meta"):
        model = model_cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = {k: file_key(k) for k in expected}
    missing = [names[k] for k in expected if names[k] not in stored]
    unexpected = sorted(stored - set(names.values()))
    wrong = [f"{names[k]} {list(w.shape(names[k]))} (expected {list(s)})" for k, s in expected.items()
             if names[k] in stored and w.shape(names[k]) != s]
    if missing or unexpected or wrong:
        problems = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        parts = [f"{label} ({len(items)}): {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}"
                 for label, items in problems if items]
        raise ValueError(f"{where}: weights do not fit {config}: " + "; ".join(parts))
    sd = {k: w.tensor(names[k]).to(device=device, dtype=dtype_of(k)) for k in expected}
    model.load_state_dict(sd, assign=True)
    return model.eval().requires_grad_(False)


def _fingerprint(path: Path) -> str:
    """name:size:sha256 of the first and last MiB. Tells checkpoints apart (a fine-tune changes every tensor)
    without reading gigabytes, and does not depend on where the file lies."""
    size, h = path.stat().st_size, hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), f.tell()))
        h.update(f.read())
    return f"{path.name}:{size}:{h.hexdigest()[:16]}"


def _describe(files: list[Path], root: str, dtype: torch.dtype) -> str:
    """What the weights are, for cache keys: the files' fingerprints, the prefix and the dtype they run in."""
    return json.dumps({"files": [_fingerprint(f) for f in files], "prefix": root, "dtype": str(dtype)})


def _clip_config_from_json(cfg: dict) -> CLIPTextConfig:
    projection = cfg.get("projection_dim")
    if "text_config" in cfg:  # a full CLIPModel config
        cfg = cfg["text_config"]
    eos = cfg.get("eos_token_id")
    return CLIPTextConfig(
        vocab_size=cfg.get("vocab_size", 49408), hidden_size=cfg.get("hidden_size", 512),
        intermediate_size=cfg.get("intermediate_size", 2048), num_hidden_layers=cfg.get("num_hidden_layers", 12),
        num_attention_heads=cfg.get("num_attention_heads", 8),
        max_position_embeddings=cfg.get("max_position_embeddings", 77), hidden_act=cfg.get("hidden_act", "quick_gelu"),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5), projection_dim=projection,
        eos_token_id=None if eos in (None, 2) else eos)  # 2: pre-#24773 configs, pooled at argmax (transformers)


def load_clip(path, *, which: str | None = None, prefix: str | None = None, device="cpu",
              dtype: torch.dtype | None = None) -> CLIPText:
    """Load a CLIP text tower: a transformers folder (CLIPTextModel / CLIPTextModelWithProjection / CLIPModel,
    single or sharded), a single safetensors file (clip_l.safetensors, clip_g.safetensors), or an SD3 file bundling
    the encoders (`which="clip_l"` or `"clip_g"` picks one; `prefix=` names any other key prefix).

    Without a config.json the config comes from the shapes: heads = width / 64, exact gelu for widths above 768
    (OpenCLIP ViT-H/bigG), quick_gelu otherwise (OpenAI); pooled at argmax(ids). The projection is loaded when the
    file has `text_projection.weight`. dtype: None keeps the file's dtype (fp8 becomes bf16).
    """
    files, cfg = _weight_files(path, "CLIP text encoder", ("clip_text_model", "clip"))
    where = str(path)
    with _Weights(files) as w:
        keys = w.keys()
        root = _root(keys, _CLIP_ANCHOR, _CLIP_BUNDLED, which, prefix, where, "CLIP text", strip="text_model.")
        # transformers >= 5 saves a bare CLIPTextModel, without the `text_model.` level
        inner = "text_model." if root + "text_model." + _CLIP_ANCHOR in keys else ""
        skip = tuple(root + k for k in ("vision_model.", "visual_projection.", "logit_scale",
                                         "text_model.embeddings.position_ids", "embeddings.position_ids"))
        stored = {k for k in keys if k.startswith(root) and not k.startswith(skip)}

        def file_key(k: str) -> str:  # our key -> the file's
            return root + (k if k.startswith("text_projection.") else inner + k.removeprefix("text_model."))

        projection_key = file_key("text_projection.weight")
        projection = w.shape(projection_key)[0] if projection_key in stored else None
        if cfg is not None:
            config = replace(_clip_config_from_json(cfg), projection_dim=projection)
        else:
            layer = re.compile(re.escape(root + inner) + r"encoder\.layers\.(\d+)\.")
            layers = [int(m[1]) for k in stored if (m := layer.match(k))]
            vocab, width = w.shape(file_key("text_model." + _CLIP_ANCHOR))
            fc1 = file_key("text_model.encoder.layers.0.mlp.fc1.weight")
            config = CLIPTextConfig(
                vocab_size=vocab, hidden_size=width, num_hidden_layers=1 + max(layers, default=-1),
                intermediate_size=w.shape(fc1)[0] if fc1 in stored else 4 * width,
                num_attention_heads=max(1, width // 64),
                max_position_embeddings=w.shape(file_key("text_model.embeddings.position_embedding.weight"))[0],
                hidden_act="gelu" if width > 768 else "quick_gelu", projection_dim=projection)
        model_dtype = _model_dtype(dtype, w.dtype(file_key("text_model." + _CLIP_ANCHOR)))
        model = _materialize(CLIPText, config, w, file_key, stored, where, device, lambda k: model_dtype)
    model.source = _describe(files, root, model_dtype)
    return model


def _t5_config_from_json(cfg: dict, where: str) -> T5Config:
    proj = cfg.get("feed_forward_proj", "relu")
    act = cfg.get("dense_act_fn", "gelu_new" if proj == "gated-gelu" else proj)
    if not proj.startswith("gated-") or act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{where}: feed_forward_proj {proj!r} / dense_act_fn {act!r}: only T5 v1.1 encoders "
                         "(gated-gelu, tanh approximation) are supported")
    return T5Config(
        vocab_size=cfg.get("vocab_size", 32128), d_model=cfg.get("d_model", 512), d_kv=cfg.get("d_kv", 64),
        d_ff=cfg.get("d_ff", 2048), num_layers=cfg.get("num_layers", 6), num_heads=cfg.get("num_heads", 8),
        relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-6))


def load_t5(path, *, prefix: str | None = None, device="cpu", dtype: torch.dtype | None = None) -> T5Encoder:
    """Load a T5 v1.1 encoder: a transformers folder (T5EncoderModel, or the encoder of a full T5; single or
    sharded), a single safetensors file (t5xxl_fp16.safetensors), or an SD3 file bundling the encoders (the
    `text_encoders.t5xxl.transformer.` prefix is found by itself; `prefix=` names any other).

    Without a config.json: heads from `relative_attention_bias` [buckets, heads], d_kv = inner / heads, max_distance
    128. The embedding may be stored as `shared.weight` and/or `encoder.embed_tokens.weight`.
    dtype: None keeps the file's dtype (fp8 becomes bf16); in fp16 the `wo` weights stay fp32 (module docstring).
    """
    files, cfg = _weight_files(path, "T5 encoder", ("t5",))
    where = str(path)
    with _Weights(files) as w:
        keys = w.keys()
        root = _root(keys, _T5_ANCHOR, _T5_BUNDLED, None, prefix, where, "T5 encoder")
        embed = root + ("shared.weight" if root + "shared.weight" in keys else "encoder.embed_tokens.weight")
        skip = tuple(root + k for k in ("decoder.", "lm_head.", "encoder.embed_tokens.weight"))  # tied to `shared`
        stored = {k for k in keys if k.startswith(root) and not k.startswith(skip)} | ({embed} & keys)
        if root + "encoder.block.0.layer.1.DenseReluDense.wi.weight" in stored:
            raise ValueError(f"{where}: a T5 with a plain ReLU feed-forward (wi); only T5 v1.1 encoders "
                             "(gated-gelu: wi_0, wi_1) are supported")

        def file_key(k: str) -> str:
            return embed if k == "shared.weight" else root + k

        if cfg is not None:
            config = _t5_config_from_json(cfg, where)
        else:
            bias, wi_0 = (root + f"encoder.block.0.layer.{i}" for i in (0, 1))
            bias, wi_0 = bias + ".SelfAttention.relative_attention_bias.weight", wi_0 + ".DenseReluDense.wi_0.weight"
            if absent := [k for k in (embed, bias, wi_0) if k not in stored]:
                raise ValueError(f"{where}: not a T5 v1.1 encoder checkpoint (no {', '.join(absent)})")
            buckets, heads = w.shape(bias)
            layers = [int(m[1]) for k in stored if (m := re.match(re.escape(root) + r"encoder\.block\.(\d+)\.", k))]
            config = T5Config(vocab_size=w.shape(embed)[0], d_model=w.shape(embed)[1],
                              d_kv=w.shape(root + _T5_ANCHOR)[0] // heads, d_ff=w.shape(wi_0)[0],
                              num_layers=1 + max(layers), num_heads=heads, relative_attention_num_buckets=buckets)
        model_dtype = _model_dtype(dtype, w.dtype(embed))

        def dtype_of(k: str) -> torch.dtype:
            fp32 = model_dtype == torch.float16 and k.endswith("DenseReluDense.wo.weight")
            return torch.float32 if fp32 else model_dtype

        model = _materialize(T5Encoder, config, w, file_key, stored, where, device, dtype_of)
    model.source = _describe(files, root, model_dtype)
    return model


# ----------------------------------------------------------------------------------------------
# Tokenizers


def _tokenizer_source(files: list[Path], settings: dict) -> str:
    return json.dumps({"files": [_fingerprint(f) for f in files], **settings})


def _pad_token_from_folder(folder: Path):
    """The pad token written by transformers (tokenizer_config.json / special_tokens_map.json), if any."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            pad = _read_json(folder / name).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str):
                return pad
    return None


class _Tokenizer:
    """Shared by both tokenizers: fixed-length rows of ids, truncation (keeping EOS) reported once."""

    max_length: int
    name: str

    def _rows(self, token_lists: list[list[int]], texts: list[str], bos: list[int], eos: int, pad: int) -> Tensor:
        room = self.max_length - len(bos) - 1
        out = torch.full((len(token_lists), self.max_length), pad, dtype=torch.long)
        for i, ids in enumerate(token_lists):
            if len(ids) > room:
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"{self.name}: prompt truncated to {self.max_length} tokens ({len(ids) + len(bos) + 1} "
                                  f"given): {texts[i][:60]!r}... (further truncations are not reported)", stacklevel=3)
                ids = ids[:room]
            row = bos + ids + [eos]
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out


class CLIPTokenizer(_Tokenizer):
    """CLIP's byte-level BPE through the `tokenizers` library, from a tokenizer.json or from vocab.json + merges.txt
    (the pipeline of transformers' CLIPTokenizer: NFC, runs of whitespace to one space, lowercase; CLIP's
    word-splitting pattern; bytes as printable characters; `</w>` marks the end of a word).

    path: a folder holding tokenizer.json or vocab.json + merges.txt, or one of those files.
    pad_token: a token or an id; None reads it from the folder's special_tokens_map.json / tokenizer_config.json,
    else "<|endoftext|>". CLIP-L pads with "<|endoftext|>" (49407), SD3's CLIP-G with "!" (id 0). The pad token is
    only used for padding: "!" in the text stays text (transformers' tokenizer with pad_token="!" would read every
    "!" as the special pad token; OpenAI's tokenizer and the SD3 reference do not).
    __call__(texts) -> LongTensor (N, max_length): BOS, at most max_length − 2 tokens, EOS, padding.
    """

    def __init__(self, path, *, pad_token: str | int | None = None, max_length: int = 77):
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        if path.is_dir():
            path = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else path / "vocab.json"
        if not path.is_file():
            raise FileNotFoundError(f"CLIP tokenizer not found: {path} (give a folder with tokenizer.json or "
                                    "vocab.json + merges.txt)")
        if path.name.endswith("vocab.json"):
            merges = path.parent / "merges.txt"
            if not merges.is_file():
                raise FileNotFoundError(f"{merges}: missing (a CLIP vocab.json needs merges.txt beside it)")
            files = [path, merges]
            vocab = _read_json(path)
            pairs = [tuple(line.split()) for line in merges.read_text(encoding="utf-8").splitlines()
                     if line.strip() and not line.startswith("#version")]
            tok = Tokenizer(BPE(vocab, pairs, unk_token="<|endoftext|>", end_of_word_suffix="</w>",
                                continuing_subword_prefix="", fuse_unk=False))
            tok.normalizer = normalizers.Sequence(
                [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
            word = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
            tok.pre_tokenizer = pre_tokenizers.Sequence(  # keep what the pattern matches, drop the rest (spaces)
                [pre_tokenizers.Split(Regex(word), behavior="removed", invert=True),
                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
            tok.decoder = decoders.ByteLevel()
            tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])  # matched whole in the text
        else:
            files = [path]
            spec = _read_json(path)
            # transformers registers a pad token given as text ("!" for SD3's CLIP-G) as a special token, which then
            # splits "!!" as two pad ids instead of "!" + "!</w>"; OpenAI's tokenizer and the SD3 reference do not
            vocab = spec.get("model", {}).get("vocab", {})
            spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t.get("content") not in vocab
                                    or t.get("content") in ("<|startoftext|>", "<|endoftext|>")]
            try:
                tok = Tokenizer.from_str(json.dumps(spec))
            except Exception as e:
                raise ValueError(f"{path}: not a tokenizers JSON file ({e})") from None
        tok.no_padding()
        tok.no_truncation()
        self.tokenizer, self.max_length, self.name, self._warned = tok, max_length, "CLIP tokenizer", False
        self.bos_id, self.eos_id = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"{path}: not a CLIP vocabulary (no <|startoftext|> / <|endoftext|> tokens)")
        if pad_token is None:
            pad_token = _pad_token_from_folder(folder) or "<|endoftext|>"
        self.pad_id = pad_token if isinstance(pad_token, int) else tok.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"{path}: pad token {pad_token!r} is not in the vocabulary")
        self.source = _tokenizer_source(files, {"pad": self.pad_id, "max_length": max_length})

    def __call__(self, texts: str | list[str]) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        return self._rows(ids, texts, [self.bos_id], self.eos_id, self.pad_id)


class T5Tokenizer(_Tokenizer):
    """T5's SentencePiece vocabulary, through `sentencepiece` (spiece.model, preferred when both are there) or
    `tokenizers` (tokenizer.json). __call__(texts) -> LongTensor (N, max_length): at most max_length − 1 tokens,
    EOS (1), then padding (0). max_length: 512 for flux-dev, 256 for flux-schnell and SD3 (diffusers).
    Text that spells a special token ("</s>") stays text with sentencepiece; transformers maps it to the token."""

    def __init__(self, path, *, max_length: int = 512):
        path = Path(path)
        if path.is_dir():
            path = path / "spiece.model" if (path / "spiece.model").is_file() else path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"T5 tokenizer not found: {path} (give a folder with spiece.model or tokenizer.json)")
        self.max_length, self.name, self._warned = max_length, "T5 tokenizer", False
        if path.suffix == ".json":
            from tokenizers import Tokenizer

            try:
                tok = Tokenizer.from_file(str(path))
            except Exception as e:
                raise ValueError(f"{path}: not a tokenizers JSON file ({e})") from None
            tok.no_padding()
            tok.no_truncation()
            self.eos_id, self.pad_id = tok.token_to_id("</s>"), tok.token_to_id("<pad>")
            self._encode = lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        else:
            import sentencepiece

            try:
                sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            except Exception as e:
                raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
            self.eos_id, self.pad_id = sp.eos_id(), sp.pad_id()
            self._encode = lambda texts: sp.encode(texts)
        if self.eos_id is None or self.eos_id < 0 or self.pad_id is None or self.pad_id < 0:
            raise ValueError(f"{path}: no EOS </s> or pad <pad> token; not a T5 vocabulary")
        self.source = _tokenizer_source([path], {"max_length": max_length})

    def __call__(self, texts: str | list[str]) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self._rows(self._encode(texts) if texts else [], texts, [], self.eos_id, self.pad_id)


# ----------------------------------------------------------------------------------------------
# Conditioners


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class _Conditioner:
    kind: str

    def _check(self):
        if self.freed:
            raise RuntimeError(f"{type(self).__name__}: the encoders were freed; load them again to encode prompts")

    def negative(self, batch_size: int = 1, **kwargs) -> dict[str, Tensor]:
        """The empty prompt "", the unconditional input of classifier-free guidance."""
        return self([""] * batch_size, **kwargs)

    def free(self) -> None:
        """Drop the encoders (T5-XXL is 9.5 GB in bf16). The conditioner can still make cache keys; the caller must
        drop its own references to the models too for the memory to come back."""
        try:
            self.model_id  # computed while the models are still here, so cache keys stay the same
        except ValueError:
            pass
        for name in self._models:
            setattr(self, name, None)
        self.freed = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def model_id(self) -> str:
        """What produced the embeddings: the given model_id, or the files, prefixes, dtypes and settings of the
        loaded encoders and tokenizers."""
        if self._model_id is None:
            if self.freed:
                raise ValueError(f"{type(self).__name__}: the encoders were freed and had no model_id")
            parts = {}
            for name in self._models + self._tokenizers:
                obj = getattr(self, name)
                if obj is not None and not hasattr(obj, "source"):
                    raise ValueError(f"{type(self).__name__}: {name} was not loaded from files; pass model_id= to "
                                     "name the encoders for the embedding cache")
                parts[name] = None if obj is None else obj.source
            self._model_id = json.dumps({"kind": self.kind, **parts, **self._settings}, sort_keys=True)
        return self._model_id

    def cache_key(self, prompt: str) -> str:
        """sha256 of (prompt, model_id): store it with save_embeddings, check it with load_embeddings."""
        return hashlib.sha256(json.dumps([prompt, self.model_id]).encode()).hexdigest()


class FluxConditioner(_Conditioner):
    """Flux's conditioning: txt = T5 last hidden state (B, L, 4096), vec = CLIP-L pooled (B, 768), unprojected.

    The encoders may sit on any device (the CPU while the transformer has the GPU): prompts are encoded there and
    the results moved to `device` in `dtype` (float32 by default)."""

    kind = "flux"
    _models = ("clip", "t5")
    _tokenizers = ("clip_tokenizer", "t5_tokenizer")

    def __init__(self, clip: CLIPText, t5: T5Encoder, clip_tokenizer: CLIPTokenizer, t5_tokenizer: T5Tokenizer,
                 *, model_id: str | None = None):
        self.clip, self.t5, self.clip_tokenizer, self.t5_tokenizer = clip, t5, clip_tokenizer, t5_tokenizer
        self._model_id, self.freed = model_id, False
        self._settings = {}

    @classmethod
    def from_folder(cls, root, *, t5_length: int = 512, device="cpu", dtype: torch.dtype | None = None):
        """From a diffusers FLUX.1 folder: text_encoder/ + tokenizer/ (CLIP-L), text_encoder_2/ + tokenizer_2/ (T5).
        t5_length: 512 for flux-dev, 256 for flux-schnell."""
        root = Path(root)
        return cls(load_clip(root / "text_encoder", device=device, dtype=dtype),
                   load_t5(root / "text_encoder_2", device=device, dtype=dtype),
                   CLIPTokenizer(root / "tokenizer", pad_token="<|endoftext|>"),
                   T5Tokenizer(root / "tokenizer_2", max_length=t5_length))

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], *, device=None, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        self._check()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        vec = self.clip(self.clip_tokenizer(prompts).to(_device_of(self.clip)))["pooled"]
        txt = self.t5(self.t5_tokenizer(prompts).to(_device_of(self.t5)))
        return {"txt": txt.to(device=device, dtype=dtype), "vec": vec.to(device=device, dtype=dtype)}


class SD3Conditioner(_Conditioner):
    """SD3's conditioning (module docstring): context (B, 77 + t5_length, context_dim), pooled (B, 768 + 1280).

    t5 / t5_tokenizer may be None: the T5 part of the context is then zeros (B, t5_length, context_dim).
    t5_length: 256 as in diffusers (the SD3 reference uses 77). context_dim: T5's width, else 4096."""

    kind = "sd3"
    _models = ("clip_l", "clip_g", "t5")
    _tokenizers = ("clip_l_tokenizer", "clip_g_tokenizer", "t5_tokenizer")

    def __init__(self, clip_l: CLIPText, clip_g: CLIPText, clip_l_tokenizer: CLIPTokenizer,
                 clip_g_tokenizer: CLIPTokenizer, t5: T5Encoder | None = None, t5_tokenizer: T5Tokenizer | None = None,
                 *, t5_length: int | None = None, context_dim: int | None = None, model_id: str | None = None):
        if clip_g.config.projection_dim is None:
            raise ValueError("SD3Conditioner: clip_g has no text_projection; SD3's pooled vector uses CLIP-G's "
                             "projected pooled output")
        if (t5 is None) != (t5_tokenizer is None):
            raise ValueError("SD3Conditioner: give both t5 and t5_tokenizer, or neither")
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.clip_l_tokenizer, self.clip_g_tokenizer, self.t5_tokenizer = clip_l_tokenizer, clip_g_tokenizer, t5_tokenizer
        self.t5_length = t5_length or (t5_tokenizer.max_length if t5_tokenizer is not None else 256)
        if t5_tokenizer is not None and t5_tokenizer.max_length != self.t5_length:
            raise ValueError(f"SD3Conditioner: t5_length {self.t5_length} != t5_tokenizer.max_length "
                             f"{t5_tokenizer.max_length}")
        self.context_dim = context_dim or (t5.config.d_model if t5 is not None else 4096)
        width = clip_l.config.hidden_size + clip_g.config.hidden_size
        if width > self.context_dim or (t5 is not None and t5.config.d_model != self.context_dim):
            raise ValueError(f"SD3Conditioner: context_dim {self.context_dim} must be at least the CLIP widths ({width})"
                             " and equal T5's width")
        self._model_id, self.freed = model_id, False
        self._settings = {"t5_length": self.t5_length, "context_dim": self.context_dim}

    @classmethod
    def from_folder(cls, root, *, t5: bool = True, t5_length: int = 256, context_dim: int | None = None, device="cpu",
                    dtype: torch.dtype | None = None):
        """From a diffusers SD3 folder: text_encoder/ + tokenizer/ (CLIP-L), text_encoder_2/ + tokenizer_2/
        (CLIP-G), text_encoder_3/ + tokenizer_3/ (T5, skipped with t5=False)."""
        root = Path(root)
        return cls(load_clip(root / "text_encoder", device=device, dtype=dtype),
                   load_clip(root / "text_encoder_2", device=device, dtype=dtype),
                   CLIPTokenizer(root / "tokenizer", pad_token="<|endoftext|>"),
                   CLIPTokenizer(root / "tokenizer_2", pad_token=0),
                   load_t5(root / "text_encoder_3", device=device, dtype=dtype) if t5 else None,
                   T5Tokenizer(root / "tokenizer_3", max_length=t5_length) if t5 else None, t5_length=t5_length,
                   context_dim=context_dim)

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], *, device=None, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        self._check()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        states, pooled = [], []
        for clip, tokenizer, key in ((self.clip_l, self.clip_l_tokenizer, "pooled"),
                                     (self.clip_g, self.clip_g_tokenizer, "text_embeds")):
            out = clip(tokenizer(prompts).to(_device_of(clip)), output_hidden_states=True)
            states.append(out["hidden_states"][-2].to(device=device, dtype=dtype))  # (B, 77, D): penultimate, no LN
            pooled.append(out[key].to(device=device, dtype=dtype))
        clip_states = torch.cat(states, dim=-1)  # (B, 77, 768 + 1280)
        clip_states = F.pad(clip_states, (0, self.context_dim - clip_states.shape[-1]))  # (B, 77, 4096)
        if self.t5 is None:
            t5_states = clip_states.new_zeros(len(prompts), self.t5_length, self.context_dim)
        else:
            t5_states = self.t5(self.t5_tokenizer(prompts).to(_device_of(self.t5))).to(device=device, dtype=dtype)
        return {"context": torch.cat([clip_states, t5_states], dim=1), "pooled": torch.cat(pooled, dim=-1)}


# ----------------------------------------------------------------------------------------------
# Embedding cache


def save_embeddings(path, tensors: dict[str, Tensor], key: str) -> None:
    """Write tensors to a safetensors file with `key` (e.g. conditioner.cache_key(prompt)) in its metadata,
    atomically (a temp file, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"  # a unique name beside the target
    try:
        save_file(data, tmp, metadata={"key": key})
        mask = os.umask(0o022)  # read the umask (and put it back): safetensors writes its files 0600,
        os.umask(mask)  # but exported weights should get the permissions of any file the user creates
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):  # the writer may have failed before creating it
            os.unlink(tmp)
        raise


def load_embeddings(path, key: str, *, device="cpu") -> dict[str, Tensor]:
    """Read what save_embeddings wrote, refusing a file whose key differs (another prompt, encoder or setting)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cached embeddings not found: {path}")
    with safe_open(path, "pt", device=str(device)) as f:
        stored = (f.metadata() or {}).get("key")
        if stored != key:
            raise ValueError(f"{path}: cached embeddings belong to another prompt or model (key {str(stored)[:12]}… "
                             f"≠ {key[:12]}…); delete the file or recompute")
        return {k: f.get_tensor(k) for k in f.keys()}
