"""The text encoders of Flux and SD3 (CLIP-L, CLIP-G, T5-XXL v1.1), their tokenizers, and the prompt conditioners.

Diffusion-4K fine-tunes only the diffusion transformer (WLF, Eq. 10) and keeps the base models' text encoders
frozen, so this file is the prompt side of both the sampler and the embedding precomputation of training. What the
encoders feed the transformers:

    Flux:  vec = CLIP-L pooled (unprojected; transformers' `pooler_output`)              (B, 768)
           txt = T5 last hidden state, 512 tokens (dev) / 256 (schnell)                   (B, L, 4096)
    SD3:   context = [ pad_4096(CLIP-L penultimate ‖ CLIP-G penultimate) ; T5 states ]   (B, 77 + L, 4096)
           pooled  = CLIP-L pooled (unprojected) ‖ CLIP-G projected pooled                (B, 768 + 1280)

"Penultimate" is the input of the last layer, without the final LayerNorm (hidden_states[-2]). SD3's CLIP-L pooled
is the unprojected one: Stability's reference inference code builds CLIP-L with `return_projected_pooled=False`, and
diffusers' single-file loader gives SD3's CLIP-L an identity `text_projection` for the same reason, so diffusers'
`text_embeds` equals it. Without T5, its states are zeros.

Module names are the Hugging Face checkpoint keys (`text_model.encoder.layers.0.self_attn.q_proj.weight`,
`encoder.block.0.layer.1.DenseReluDense.wi_0.weight`, ...), so transformers folders, ComfyUI-style single files and
the `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` part of SD3 files load without a mapping.

Choices, and where they differ from the authors' release (diffusers pipelines over transformers' encoders):
- Pooling at the EOS token: OpenAI takes "the highest id" (EOS 49407 is the largest), as transformers does for
  configs with eos_token_id == 2 (written before transformers PR #24773, e.g. openai/clip-vit-large-patch14); else the
  first position holding eos_token_id. `CLIPTextConfig.eos_token_id = None` is the argmax rule (same as transformers).
- SD3's CLIP-G pads with "!" (id 0). transformers, given pad_token="!", also reads every "!" of the prompt as the
  pad token; OpenAI's tokenizer and the SD3 reference keep it text, and so does CLIPTokenizer here.
- T5 in half precision: T5-XXL's activations exceed fp16's range (65504) in the feed-forward layers. Here the
  residual stream is always fp32 (a (B, 512, 4096) tensor: a few MB), each sublayer reads the fp32 RMS-normalized
  stream cast to the weights' dtype, and its output is added back in fp32. In fp16 the gated product
  gelu(wi_0 x)·wi_1 x and `wo` are computed in fp32 (`load_t5` keeps the `wo` weights in fp32, as transformers does
  with `_keep_in_fp32_modules = ["wo"]`). bf16 has fp32's range and needs nothing more.
"""
import math
import re
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from torch import Tensor, nn

import fp8
from weight_files import checked_weight, open_weights, read_json

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


class CLIPAttention(nn.Module):
    def __init__(self, c: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.heads, self.causal = c.num_attention_heads, causal
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        x = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, L, D/H); CLIP's image tower is not
        return self.out_proj(x.transpose(1, 2).reshape(B, L, D))


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)  # OpenAI's sigmoid approximation of GELU


class CLIPMLP(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        if c.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"unsupported CLIP hidden_act {c.hidden_act!r} (quick_gelu: OpenAI; gelu: OpenCLIP)")
        self.act = quick_gelu if c.hidden_act == "quick_gelu" else F.gelu  # F.gelu: exact (erf)
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = CLIPAttention(c, causal)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)

    def forward(self, x: Tensor) -> Tensor:  # pre-LN
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPText(nn.Module):
    """CLIP's text tower (transformers' CLIPTextModel, plus `text_projection` when the config has one)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        c = config
        embeddings = nn.ModuleDict(dict(token_embedding=nn.Embedding(c.vocab_size, c.hidden_size),
                                        position_embedding=nn.Embedding(c.max_position_embeddings, c.hidden_size)))
        layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.num_hidden_layers))
        self.text_model = nn.ModuleDict(dict(embeddings=embeddings, encoder=nn.ModuleDict(dict(layers=layers)),
                                             final_layer_norm=nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)))
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids: Tensor, output_hidden_states: bool = False) -> dict:
        """input_ids (B, L) → {"last_hidden_state": (B, L, D) after the final LayerNorm,
        "pooled": (B, D) last_hidden_state at the EOS token, "text_embeds": (B, P) projected pooled (only with a
        projection), "hidden_states": num_hidden_layers + 1 tensors (B, L, D): the embeddings, then each layer's
        output, without the final LayerNorm (only when asked; [-2] is SD3's penultimate state)}."""
        tm = self.text_model
        x = tm.embeddings.token_embedding(input_ids) + tm.embeddings.position_embedding.weight[: input_ids.shape[1]]
        hidden_states = [x]
        for layer in tm.encoder.layers:
            x = layer(x)
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
        self.heads = c.num_heads
        inner = c.num_heads * c.d_kv
        self.q = nn.Linear(c.d_model, inner, bias=False)
        self.k = nn.Linear(c.d_model, inner, bias=False)
        self.v = nn.Linear(c.d_model, inner, bias=False)
        self.o = nn.Linear(inner, c.d_model, bias=False)
        if has_relative_attention_bias:  # block 0 only; its bias is shared by every block
            self.relative_attention_bias = nn.Embedding(c.relative_attention_num_buckets, c.num_heads)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        # T5 folds the scale into its initialization: scores are q·k + bias, with no 1/sqrt(d)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (B, H, L, d_kv)
        return self.o(x.transpose(1, 2).reshape(B, L, -1))


class T5DenseGatedActDense(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # wo(gelu_tanh(wi_0 x) ⊙ wi_1 x); the product is formed in wo's dtype: fp32 when the model runs in fp16
        dtype = getattr(self.wo, "compute_dtype", self.wo.weight.dtype)  # fp8.Fp8Linear: not its weight's dtype
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh").to(dtype) * self.wi_1(x).to(dtype))


class T5Block(nn.Module):
    def __init__(self, c: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([  # pre-norm sublayers, named as the checkpoint keys
            nn.ModuleDict(dict(SelfAttention=T5Attention(c, has_relative_attention_bias),
                               layer_norm=T5LayerNorm(c.d_model, c.layer_norm_epsilon))),
            nn.ModuleDict(dict(DenseReluDense=T5DenseGatedActDense(c),
                               layer_norm=T5LayerNorm(c.d_model, c.layer_norm_epsilon)))])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:  # x: the fp32 residual stream
        attn, ff = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x), bias).float()
        return x + ff.DenseReluDense(ff.layer_norm(x)).float()


class T5Encoder(nn.Module):
    """The encoder half of T5 v1.1 (transformers' T5EncoderModel). No attention mask: Flux and SD3 attend to the
    padding tokens too."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = nn.ModuleDict(dict(
            block=nn.ModuleList(T5Block(config, has_relative_attention_bias=i == 0) for i in range(config.num_layers)),
            final_layer_norm=T5LayerNorm(config.d_model, config.layer_norm_epsilon)))

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, L) → final hidden states (B, L, d_model) in the embedding's dtype."""
        c, attention = self.config, self.encoder.block[0].layer[0].SelfAttention
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], c.relative_attention_num_buckets,
                                           c.relative_attention_max_distance)  # (L, L): key − query
        bias = attention.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, H, L, L), for every block
        x = self.shared(input_ids).float()  # (B, L, D): the residual stream stays fp32
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x).to(self.shared.weight.dtype)


# ----------------------------------------------------------------------------------------------
# Tokenizers


class _Tokenizer:
    """Fixed-length rows [bos] + tokens + [eos] + padding; a truncation (keeping EOS) is reported once."""

    max_length: int
    name: str
    bos: list[int]  # [BOS id] for CLIP, [] for T5
    eos_id: int
    pad_id: int

    def __call__(self, texts: str | list[str]) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        token_lists, bos = self._encode(texts), self.bos
        room = self.max_length - len(bos) - 1
        out = torch.full((len(token_lists), self.max_length), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(token_lists):
            if len(ids) > room:
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"{self.name}: prompt truncated to {self.max_length} tokens ({len(ids) + len(bos) + 1} "
                                  f"given): {texts[i][:60]!r}... (further truncations are not reported)", stacklevel=3)
                ids = ids[:room]
            row = bos + ids + [self.eos_id]
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out


class CLIPTokenizer(_Tokenizer):
    """CLIP's byte-level BPE (the pipeline of transformers' CLIPTokenizer) through the `tokenizers` library.

    path: a folder holding tokenizer.json or vocab.json + merges.txt, or one of those files.
    pad_token: a token or an id; None reads it from the folder's special_tokens_map.json / tokenizer_config.json,
    else "<|endoftext|>". CLIP-L pads with "<|endoftext|>" (49407), SD3's CLIP-G with "!" (id 0). The pad token is
    only used for padding: "!" in the text stays text (module docstring).
    __call__(texts) -> LongTensor (N, max_length): BOS, at most max_length − 2 tokens, EOS, padding.
    """

    def __init__(self, path, *, pad_token: str | int | None = None, max_length: int = 77):
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        if path.is_dir():
            path = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else path / "vocab.json"
        if not path.is_file():
            raise FileNotFoundError(f"CLIP tokenizer not found: {path} (give a folder with tokenizer.json or "
                                    "vocab.json + merges.txt)")
        if path.name.endswith("vocab.json"):
            merges_file = path.parent / "merges.txt"
            if not merges_file.is_file():
                raise FileNotFoundError(f"{merges_file}: missing (a CLIP vocab.json needs merges.txt beside it)")
            vocab = read_json(path)
            merges = [line.split() for line in merges_file.read_text(encoding="utf-8").splitlines()
                      if line.strip() and not line.startswith("#version")]
        else:  # a tokenizer.json holds the same BPE: only its vocabulary and merges are read
            model = read_json(path).get("model", {})
            vocab, merges = model.get("vocab"), [m.split() if isinstance(m, str) else m for m in model.get("merges", [])]
        if not isinstance(vocab, dict) or not {"<|startoftext|>", "<|endoftext|>"} <= vocab.keys():
            raise ValueError(f"{path}: not a CLIP vocabulary (no <|startoftext|> / <|endoftext|> tokens)")
        tok = Tokenizer(BPE(vocab, [tuple(m) for m in merges], unk_token="<|endoftext|>", end_of_word_suffix="</w>",
                            continuing_subword_prefix="", fuse_unk=False))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        word = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
        tok.pre_tokenizer = pre_tokenizers.Sequence(  # keep what the pattern matches, drop the rest (spaces)
            [pre_tokenizers.Split(Regex(word), behavior="removed", invert=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        # only BOS and EOS are special (matched whole in the text); a pad token such as "!" stays text
        tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
        self.max_length, self.name, self._warned = max_length, "CLIP tokenizer", False
        self.bos_id, self.eos_id = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        self.bos = [self.bos_id]
        self._encode = lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        if pad_token is None:
            pad_token = _pad_token_from_folder(folder) or "<|endoftext|>"
        self.pad_id = pad_token if isinstance(pad_token, int) else tok.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"{path}: pad token {pad_token!r} is not in the vocabulary")


def _pad_token_from_folder(folder: Path) -> str | None:
    """The pad token written by transformers (special_tokens_map.json / tokenizer_config.json), if any."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            pad = read_json(folder / name).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if isinstance(pad, str):
                return pad
    return None


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
        self.max_length, self.name, self._warned, self.bos = max_length, "T5 tokenizer", False, []
        if path.suffix == ".json":
            try:
                tok = Tokenizer.from_file(str(path))
            except Exception as e:
                raise ValueError(f"{path}: not a tokenizers JSON file ({e})") from None
            tok.no_padding()
            tok.no_truncation()
            self.eos_id, self.pad_id = tok.token_to_id("</s>"), tok.token_to_id("<pad>")
            self._encode = lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        else:
            try:
                sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            except Exception as e:
                raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
            self.eos_id, self.pad_id = sp.eos_id(), sp.pad_id()
            self._encode = lambda texts: sp.encode(texts)
        if self.eos_id is None or self.eos_id < 0 or self.pad_id is None or self.pad_id < 0:
            raise ValueError(f"{path}: no EOS </s> or pad <pad> token; not a T5 vocabulary")


# ----------------------------------------------------------------------------------------------
# Conditioners: prompts → what the transformers read


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class _Conditioner:
    _models: tuple[str, ...]  # the attributes that hold the encoder modules

    @property
    def encoders(self) -> list[nn.Module]:
        """The encoder modules present, for a caller that moves them between devices."""
        return [m for name in self._models if (m := getattr(self, name)) is not None]


class FluxConditioner(_Conditioner):
    """Flux's conditioning: txt = T5 last hidden state (B, L, 4096), vec = CLIP-L pooled (B, 768), unprojected.

    The encoders may sit on any device (the CPU while the transformer has the GPU): prompts are encoded there and
    the results moved to `device` in `dtype` (float32 by default)."""

    _models = ("clip", "t5")

    def __init__(self, clip: CLIPText, t5: T5Encoder, clip_tokenizer: CLIPTokenizer, t5_tokenizer: T5Tokenizer):
        self.clip, self.t5, self.clip_tokenizer, self.t5_tokenizer = clip, t5, clip_tokenizer, t5_tokenizer

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], *, device=None, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        vec = self.clip(self.clip_tokenizer(prompts).to(_device_of(self.clip)))["pooled"]
        txt = self.t5(self.t5_tokenizer(prompts).to(_device_of(self.t5)))
        return {"txt": txt.to(device=device, dtype=dtype), "vec": vec.to(device=device, dtype=dtype)}


class SD3Conditioner(_Conditioner):
    """SD3's conditioning (module docstring): context (B, 77 + t5_length, context_dim), pooled (B, 768 + 1280).

    t5 / t5_tokenizer may be None: the T5 part of the context is then zeros (B, t5_length, context_dim).
    t5_length: 256 as in diffusers (the SD3 reference uses 77). context_dim: T5's width, else 4096."""

    _models = ("clip_l", "clip_g", "t5")

    def __init__(self, clip_l: CLIPText, clip_g: CLIPText, clip_l_tokenizer: CLIPTokenizer,
                 clip_g_tokenizer: CLIPTokenizer, t5: T5Encoder | None = None, t5_tokenizer: T5Tokenizer | None = None,
                 *, t5_length: int | None = None, context_dim: int | None = None):
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

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], *, device=None, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        states, pooled = [], []
        for clip, tokenizer, key in ((self.clip_l, self.clip_l_tokenizer, "pooled"),
                                     (self.clip_g, self.clip_g_tokenizer, "text_embeds")):
            out = clip(tokenizer(prompts).to(_device_of(clip)), output_hidden_states=True)
            states.append(out["hidden_states"][-2].to(device=device, dtype=dtype))  # (B, 77, D): penultimate, no LN
            pooled.append(out[key].to(device=device, dtype=dtype))
        clip_states = torch.cat(states, dim=-1)  # (B, 77, 768 + 1280)
        clip_states = F.pad(clip_states, (0, self.context_dim - clip_states.shape[-1]))  # (B, 77, 4096)
        if self.t5 is None:
            t5_states = clip_states.new_zeros(clip_states.shape[0], self.t5_length, self.context_dim)
        else:
            t5_states = self.t5(self.t5_tokenizer(prompts).to(_device_of(self.t5))).to(device=device, dtype=dtype)
        return {"context": torch.cat([clip_states, t5_states], dim=1), "pooled": torch.cat(pooled, dim=-1)}

    def negative(self, batch_size: int = 1, **kwargs) -> dict[str, Tensor]:
        """The empty prompt "", the unconditional input of classifier-free guidance."""
        return self([""] * batch_size, **kwargs)


# ----------------------------------------------------------------------------------------------
# Loading: transformers folders (single or sharded), single safetensors files, SD3 files bundling the encoders

_CLIP_BUNDLED = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer."}
_CLIP_ANCHOR = "embeddings.token_embedding.weight"  # one key every CLIP text tower has, to find its prefix
_T5_ANCHOR = "encoder.block.0.layer.0.SelfAttention.q.weight"


class _Weights(ExitStack):
    """The tensors of one safetensors file or of a sharded set, read lazily by key; `with` closes the files. Every
    file is opened here (its header checked against its size), before any tensor is read."""

    def __init__(self, files: list[Path]):
        super().__init__()
        self._file, self._path = {}, {}
        try:
            for file in files:
                f = self.enter_context(open_weights(file))
                self._file.update(dict.fromkeys(f.keys(), f))
                self._path.update(dict.fromkeys(f.keys(), file))
        except ValueError:
            self.close()  # the files opened before the bad one
            raise
        self.keys = set(self._file)

    def shape(self, key: str) -> tuple:
        return tuple(self._file[key].get_slice(key).get_shape())

    def compute_dtype(self, key: str) -> torch.dtype:
        """The stored dtype; bf16 for fp8 (e.g. t5xxl_fp8_e4m3fn), which nn.Linear cannot compute in."""
        dtype = self._file[key].get_slice(key)[:1].dtype
        return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16

    def tensor(self, key: str, device, dtype) -> Tensor:
        """The tensor on `device` and checked; in `dtype` unless fp8.read_dtype keeps it as stored."""
        t = self._file[key].get_tensor(key)
        return checked_weight(t, self._path[key], key, device=device, dtype=fp8.read_dtype(key, t, dtype))


def _weight_files(path, kind: str, model_types: tuple[str, ...]) -> tuple[list[Path], dict | None]:
    """The safetensors file(s) at `path` (a file, an index json, or a transformers folder) and the config.json that
    describes them, if any (a config.json beside a single file counts only when its model_type fits)."""
    path = given = Path(path)
    hint = "give a .safetensors file or a transformers folder (config.json + model.safetensors)"
    if not path.exists():
        raise FileNotFoundError(f"{kind} weights not found: {path} ({hint})")
    folder = path if path.is_dir() else path.parent
    if path.is_dir():  # an index first (sharded), then the single file, then the folder's only safetensors file
        named = [f for n in ("model.safetensors.index.json", "model.safetensors.index.fp16.json", "model.safetensors",
                             "model.fp16.safetensors") if (f := path / n).is_file()]
        found = named or sorted(path.glob("*.safetensors"))
        if len(found) != 1 and not named:
            raise FileNotFoundError(f"{path}: no model.safetensors (or model.safetensors.index.json); {hint}")
        path = found[0]
    if path.name.endswith(".index.json"):
        weight_map = read_json(path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
            raise ValueError(f"{path}: no \"weight_map\" of tensor names to file names")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"{path}: lists no shards, or some are missing from {folder}")
    elif path.suffix == ".safetensors":
        files = [path]
    else:
        raise ValueError(f"{path}: only .safetensors weights are supported ({hint})")
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    if config and config.get("model_type") not in model_types and given.is_dir():
        raise ValueError(f"{folder / 'config.json'}: model_type {config.get('model_type')!r} is not a {kind} "
                         f"({' / '.join(model_types)})")
    return files, config if config.get("model_type") in model_types else None


def _root(keys: set[str], anchor: str, prefix: str | None, where: str, kind: str, choose: str = "prefix=",
          strip: str = "") -> str:
    """The key prefix under which the model lives: the given one, or the only one in the file."""
    if prefix is None:
        roots = {k[: -len(anchor)].removesuffix(strip) for k in keys if k == anchor or k.endswith("." + anchor)}
        if not roots:
            raise ValueError(f"{where}: no {kind} weights in this file (no key ending in {anchor!r})")
        if len(roots) > 1:
            raise ValueError(f"{where}: holds several {kind} models ({sorted(roots)}); choose one with {choose}")
        prefix = roots.pop()
    if not any(k.startswith(prefix) for k in keys):
        raise ValueError(f"{where}: no keys under the prefix {prefix!r}")
    return prefix


def _materialize(model_cls, config, w: _Weights, file_key, stored: set[str], where: str, device, dtype_of,
                 blocks=lambda model: (), weight_dtype=None):
    """The one strict check: the file's keys and shapes against model_cls(config); then fill the meta-built model
    tensor by tensor (no full-precision copy of the model). file_key(our key) -> key in the file; stored: the file's
    keys that belong to this model (any of them the model does not use is reported as unexpected). blocks(model):
    the modules whose Linears may be stored in weight_dtype (fp8.store, which reads scaled-fp8 files' scales)."""
    with torch.device("meta"):
        model = model_cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = {k: file_key(k) for k in expected}
    missing = [names[k] for k in expected if names[k] not in stored]
    unexpected = sorted(k for k in stored - set(names.values()) if not fp8.beside_weight(k, stored))
    wrong = [f"{names[k]} {list(w.shape(names[k]))} (expected {list(s)})" for k, s in expected.items()
             if names[k] in stored and w.shape(names[k]) != s]
    if missing or unexpected or wrong:
        problems = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        parts = [f"{label} ({len(items)}): {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}"
                 for label, items in problems if items]
        raise ValueError(f"{where}: weights do not fit {config}: " + "; ".join(parts))
    read = {k: f for k, f in (names | fp8.scale_keys(names)).items() if f in stored}
    sd = fp8.store(model, {k: w.tensor(f, device, dtype_of(k)) for k, f in read.items()}, blocks(model), weight_dtype,
                   dtype_of)
    model.load_state_dict(sd, assign=True)
    return model.eval().requires_grad_(False)


def _clip_config_from_json(cfg: dict, projection: int | None) -> CLIPTextConfig:
    cfg = cfg.get("text_config", cfg)  # a full CLIPModel config holds the text tower's under text_config
    eos = cfg.get("eos_token_id")
    # transformers leaves its own defaults out of config.json: those, not CLIP-L's, fill the gaps
    defaults = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                    num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return CLIPTextConfig(**{k: cfg.get(k, v) for k, v in defaults.items()}, projection_dim=projection,
                          eos_token_id=None if eos in (None, 2) else eos)  # 2: pre-#24773 configs, pooled at argmax


def _clip_config_from_shapes(w: _Weights, file_key, stored: set[str], projection: int | None) -> CLIPTextConfig:
    layer = re.compile(re.escape(file_key("text_model.encoder.layers.")) + r"(\d+)\.")
    layers = [int(m[1]) for k in stored if (m := layer.match(k))]
    vocab, width = w.shape(file_key("text_model." + _CLIP_ANCHOR))
    fc1 = file_key("text_model.encoder.layers.0.mlp.fc1.weight")
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=1 + max(layers, default=-1),
        intermediate_size=w.shape(fc1)[0] if fc1 in stored else 4 * width, num_attention_heads=max(1, width // 64),
        max_position_embeddings=w.shape(file_key("text_model.embeddings.position_embedding.weight"))[0],
        hidden_act="gelu" if width > 768 else "quick_gelu", projection_dim=projection)


def load_clip(path, *, which: str | None = None, prefix: str | None = None, device="cpu",
              dtype: torch.dtype | None = None) -> CLIPText:
    """Load a CLIP text tower: a transformers folder (CLIPTextModel / CLIPTextModelWithProjection / CLIPModel,
    single or sharded), a single safetensors file (clip_l.safetensors, clip_g.safetensors), or an SD3 file bundling
    the encoders (`which="clip_l"` or `"clip_g"` picks one; `prefix=` names any other key prefix).

    Without a config.json the config comes from the shapes: heads = width / 64, exact gelu for widths above 768
    (OpenCLIP ViT-H/bigG), quick_gelu otherwise (OpenAI); pooled at argmax(ids). The projection is loaded when the
    file has `text_projection.weight`. dtype: None keeps the file's dtype (fp8 becomes bf16).
    """
    if which is not None and which not in _CLIP_BUNDLED:
        raise ValueError(f"which must be one of {sorted(_CLIP_BUNDLED)}, got {which!r}")
    files, cfg = _weight_files(path, "CLIP text encoder", ("clip_text_model", "clip"))
    where = str(path)
    with _Weights(files) as w:
        keys = w.keys
        root = _root(keys, _CLIP_ANCHOR, _CLIP_BUNDLED.get(which) if prefix is None else prefix, where, "CLIP text",
                     choose=f"which={' / '.join(map(repr, _CLIP_BUNDLED))} or prefix=", strip="text_model.")
        # transformers >= 5 saves a bare CLIPTextModel, without the `text_model.` level
        inner = "text_model." if root + "text_model." + _CLIP_ANCHOR in keys else ""
        skip = tuple(root + k for k in ("vision_model.", "visual_projection.", "logit_scale",
                                         "text_model.embeddings.position_ids", "embeddings.position_ids"))
        stored = {k for k in keys if k.startswith(root) and not k.startswith(skip)}

        def file_key(k: str) -> str:  # our key -> the file's
            return root + (k if k.startswith("text_projection.") else inner + k.removeprefix("text_model."))

        projection_key = file_key("text_projection.weight")
        projection = w.shape(projection_key)[0] if projection_key in stored else None
        config = (_clip_config_from_json(cfg, projection) if cfg is not None
                  else _clip_config_from_shapes(w, file_key, stored, projection))
        model_dtype = dtype or w.compute_dtype(file_key("text_model." + _CLIP_ANCHOR))
        return _materialize(CLIPText, config, w, file_key, stored, where, device, lambda k: model_dtype)


def _t5_config_from_json(cfg: dict, where: str) -> T5Config:
    proj = cfg.get("feed_forward_proj", "relu")
    act = cfg.get("dense_act_fn", "gelu_new" if proj == "gated-gelu" else proj)
    if not proj.startswith("gated-") or act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{where}: feed_forward_proj {proj!r} / dense_act_fn {act!r}: only T5 v1.1 encoders "
                         "(gated-gelu, tanh approximation) are supported")
    defaults = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,  # transformers'
                    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6)
    return T5Config(**{k: cfg.get(k, v) for k, v in defaults.items()})


def _t5_config_from_shapes(w: _Weights, root: str, embed: str, stored: set[str], where: str) -> T5Config:
    """Heads from `relative_attention_bias` [buckets, heads], d_kv = inner / heads; max_distance stays 128."""
    bias = root + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    wi_0 = root + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
    if absent := [k for k in (embed, bias, wi_0) if k not in stored]:
        raise ValueError(f"{where}: not a T5 v1.1 encoder checkpoint (no {', '.join(absent)})")
    (buckets, heads), (vocab, width) = w.shape(bias), w.shape(embed)
    layers = [int(m[1]) for k in stored if (m := re.match(re.escape(root) + r"encoder\.block\.(\d+)\.", k))]
    return T5Config(vocab_size=vocab, d_model=width, d_kv=w.shape(root + _T5_ANCHOR)[0] // heads,
                    d_ff=w.shape(wi_0)[0], num_layers=1 + max(layers), num_heads=heads,
                    relative_attention_num_buckets=buckets)


def load_t5(path, *, prefix: str | None = None, device="cpu", dtype: torch.dtype | None = None,
            weight_dtype=None) -> T5Encoder:
    """Load a T5 v1.1 encoder: a transformers folder (T5EncoderModel, or the encoder of a full T5; single or
    sharded), a single safetensors file (t5xxl_fp16.safetensors), or an SD3 file bundling the encoders (the
    `text_encoders.t5xxl.transformer.` prefix is found by itself; `prefix=` names any other).

    The embedding may be stored as `shared.weight` and/or `encoder.embed_tokens.weight`.
    dtype: None keeps the file's dtype (bf16 for fp8); in fp16 the `wo` weights stay fp32 (module docstring).
    weight_dtype: the storage dtype of the blocks' Linear weights (fp8.store), None: as the file stores them.
    """
    files, cfg = _weight_files(path, "T5 encoder", ("t5",))
    where = str(path)
    with _Weights(files) as w:
        keys = w.keys
        root = _root(keys, _T5_ANCHOR, prefix, where, "T5 encoder")
        embed = root + ("shared.weight" if root + "shared.weight" in keys else "encoder.embed_tokens.weight")
        skip = tuple(root + k for k in ("decoder.", "lm_head.", "encoder.embed_tokens.weight"))  # tied to `shared`
        stored = {k for k in keys if k.startswith(root) and not k.startswith(skip)} | ({embed} & keys)
        if root + "encoder.block.0.layer.1.DenseReluDense.wi.weight" in stored:
            raise ValueError(f"{where}: a T5 with a plain ReLU feed-forward (wi); only T5 v1.1 encoders "
                             "(gated-gelu: wi_0, wi_1) are supported")
        config = (_t5_config_from_json(cfg, where) if cfg is not None
                  else _t5_config_from_shapes(w, root, embed, stored, where))
        model_dtype = dtype or w.compute_dtype(embed)
        fp32_wo = model_dtype == torch.float16  # `wo` stays fp32 in fp16 (module docstring)
        return _materialize(T5Encoder, config, w, lambda k: embed if k == "shared.weight" else root + k, stored, where,
                            device, lambda k: torch.float32 if fp32_wo and k.endswith(".wo.weight") else model_dtype,
                            lambda model: model.encoder.block, weight_dtype)
