"""The test suite: every component on CPU with tiny random configurations, against peer implementations.

Run: python -m pytest -q test_all.py
"""
import warnings
import numpy as np
import pytest
import pywt
import torch
import torch.nn.functional as F
import wavelet
import gzip
import importlib.util
import json
import random
import subprocess
import sys
import types
import unicodedata
import zipfile
from safetensors.torch import load_file, save_file
import text_encoders as te

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


def _text_encoders_rel(a, b) -> float:
    """max |a − b| / max |b|: relative to the tensor's scale, so an error is judged against its values."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


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
    # fp32 on both sides, same operations up to summation order: 1e-5 of the tensor's scale
    assert _text_encoders_rel(out["last_hidden_state"], r.last_hidden_state) <= 1e-5
    assert len(out["hidden_states"]) == len(r.hidden_states)
    for a, b in zip(out["hidden_states"], r.hidden_states):
        assert _text_encoders_rel(a, b) <= 1e-5
    assert _text_encoders_rel(out["hidden_states"][-2], r.hidden_states[-2]) <= 1e-5  # SD3's penultimate
    if projected:
        assert _text_encoders_rel(out["text_embeds"], r.text_embeds) <= 1e-5
        pooled = ref.text_model(ids).pooler_output
    else:
        pooled = r.pooler_output
    assert _text_encoders_rel(out["pooled"], pooled) <= 1e-5


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
    assert _text_encoders_rel(ours(ids), expected) <= 1e-5  # fp32 both sides


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
    assert _text_encoders_rel(out, expected) <= 1e-2

    bf16 = te.load_t5(tmp_path / "t5", dtype=torch.bfloat16)(ids)
    # bf16 keeps 8 significant bits (≈ 4e-3 per rounding): 5e-2 of the scale
    assert torch.isfinite(bf16).all() and _text_encoders_rel(bf16, expected) <= 5e-2


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
    with torch.no_grad():
        assert _text_encoders_rel(t5_ours(t5_ids), t5(t5_ids).last_hidden_state) <= 1e-5
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
            assert torch.equal(got, want), source
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
        assert torch.equal(got, expected), source
        assert len([w for w in caught if "truncated" in str(w.message)]) == 1
    assert te.T5Tokenizer(folder, max_length=8)([""]).tolist() == [[1, 0, 0, 0, 0, 0, 0, 0]]
    with pytest.warns(UserWarning, match="truncated"):
        assert te.T5Tokenizer(folder, max_length=8)(["astronaut " * 20])[0, -1] == 1  # EOS survives truncation


@pytest.mark.filterwarnings("ignore:.*prompt truncated")
def test_text_encoders_real_clip_vocabulary(tmp_path, monkeypatch):
    """OpenAI's 49408-token vocabulary from the open-clip-torch wheel (downloaded, never installed; skipped
    offline): ours against transformers' CLIPTokenizer, and against OpenAI's SimpleTokenizer from the same wheel
    with ftfy replaced by NFC normalization (ftfy's fix_text also folds full-width letters and curly quotes,
    which transformers' CLIPTokenizer does not; those prompts are left out of that comparison)."""
    try:
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                              "--timeout", "10", "--retries", "0", "-q", "-d", str(tmp_path), "open-clip-torch"],
                             capture_output=True, timeout=30)
    except (subprocess.TimeoutExpired, OSError):
        pytest.skip("could not download open-clip-torch (offline)")
    wheels = list(tmp_path.glob("open_clip_torch-*.whl"))
    if run.returncode != 0 or not wheels:
        pytest.skip("could not download open-clip-torch (offline)")
    openai_dir = tmp_path / "openai"
    openai_dir.mkdir()
    with zipfile.ZipFile(wheels[0]) as z:
        bpe = z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
        (openai_dir / "tokenizer.py").write_bytes(z.read("open_clip/tokenizer.py"))
    (openai_dir / "bpe_simple_vocab_16e6.txt.gz").write_bytes(bpe)
    lines = gzip.decompress(bpe).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1: 49152 - 256 - 2 + 1]]  # OpenAI's slice of the file
    folder = tmp_path / "clip_real"
    _text_encoders_write_clip_vocab(folder, merges)
    ours = te.CLIPTokenizer(folder)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (49406, 49407, 49407)
    assert ours("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    prompts = _TEXT_ENCODERS_PROMPTS + ["An astronaut riding a horse on the moon, 8k, highly detailed, trending"]
    hf = _text_encoders_hf_clip_tokenizer(folder)
    expected = torch.tensor(hf(prompts, padding="max_length", max_length=77, truncation=True).input_ids)
    assert torch.equal(ours(prompts), expected)

    monkeypatch.setitem(sys.modules, "ftfy", types.SimpleNamespace(fix_text=lambda t: unicodedata.normalize("NFC", t)))
    spec = importlib.util.spec_from_file_location("_text_encoders_openai_tokenizer", openai_dir / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        pytest.skip(f"OpenAI's tokenizer module needs {e.name}")
    # open_clip spells the special tokens <start_of_text> / <end_of_text> (OpenAI's original and transformers:
    # <|startoftext|> / <|endoftext|>), so a literal "<|endoftext|>" in the text is left out here too
    prompts = [p for p in prompts if "ｆ" not in p and "<|" not in p]
    # OpenAI's tokenizer pads with 0, as SD3's CLIP-G does
    assert torch.equal(te.CLIPTokenizer(folder, pad_token=0)(prompts), module.SimpleTokenizer()(prompts))


# ----------------------------------------------------------------------------------------------
# Conditioners and the cache


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
    sd3 = te.SD3Conditioner.from_folder(root, t5_length=40)
    pipe = diffusers.StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, **parts)
    with torch.no_grad():
        ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, device=cpu, negative_prompt="",
                                                              do_classifier_free_guidance=True, max_sequence_length=40)
    out, neg = sd3(prompts), sd3.negative(2)
    assert out["context"].shape == (2, 77 + 40, 96) and out["pooled"].shape == (2, 32 + 40)
    # same fp32 models through two implementations: 1e-5 of the scale
    for a, b in ((out["context"], ctx), (out["pooled"], pooled), (neg["context"], neg_ctx), (neg["pooled"], neg_pooled)):
        assert _text_encoders_rel(a, b) <= 1e-5
    assert (out["context"][:, :77, 32 + 48:] == 0).all()  # the zero padding of the CLIP features

    no_t5 = te.SD3Conditioner(sd3.clip_l, sd3.clip_g, sd3.clip_l_tokenizer, sd3.clip_g_tokenizer, t5_length=40,
                              context_dim=96)(prompts)
    l_ids = torch.tensor(parts["tokenizer"](prompts, padding="max_length", max_length=77, truncation=True).input_ids)
    g_ids = torch.tensor(parts["tokenizer_2"](prompts, padding="max_length", max_length=77, truncation=True).input_ids)
    with torch.no_grad():
        rl = parts["text_encoder"](l_ids, output_hidden_states=True)
        rg = parts["text_encoder_2"](g_ids, output_hidden_states=True)
    manual = F.pad(torch.cat([rl.hidden_states[-2], rg.hidden_states[-2]], -1), (0, 96 - 80))
    manual = torch.cat([manual, torch.zeros(2, 40, 96)], 1)
    assert _text_encoders_rel(no_t5["context"], manual) <= 1e-5
    assert (no_t5["context"][:, 77:] == 0).all()
    assert _text_encoders_rel(no_t5["pooled"], torch.cat([rl.text_embeds, rg.text_embeds], -1)) <= 1e-5

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
    assert _text_encoders_rel(got["txt"], txt) <= 1e-5 and _text_encoders_rel(got["vec"], vec) <= 1e-5
    flux.free()
    with pytest.raises(RuntimeError, match="freed"):
        flux(prompts)


def test_text_encoders_embedding_cache(tmp_path):
    root, _ = _text_encoders_pipeline_parts(tmp_path)
    sd3 = te.SD3Conditioner.from_folder(root, t5=False, t5_length=16, context_dim=96)
    key = sd3.cache_key("a cat")
    assert key != sd3.cache_key("a dog")
    other = te.SD3Conditioner.from_folder(root, t5=False, t5_length=32, context_dim=96)  # another setting
    assert key != other.cache_key("a cat")
    bf16 = te.SD3Conditioner.from_folder(root, t5=False, t5_length=16, context_dim=96, dtype=torch.bfloat16)
    assert key != bf16.cache_key("a cat")  # encoders in another dtype give other numbers
    emb = sd3("a cat")
    te.save_embeddings(tmp_path / "cache" / "0.safetensors", emb, key)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["0.safetensors"]  # no temp file left behind
    back = te.load_embeddings(tmp_path / "cache" / "0.safetensors", key)
    assert all(torch.equal(back[k], emb[k]) for k in emb)
    with pytest.raises(ValueError, match="another prompt or model"):
        te.load_embeddings(tmp_path / "cache" / "0.safetensors", sd3.cache_key("a dog"))
    sd3.free()
    assert sd3.cache_key("a cat") == key  # still the same key once the encoders are gone
    with pytest.raises(ValueError, match="model_id"):
        te.SD3Conditioner(te.CLIPText(other.clip_l.config), other.clip_g, other.clip_l_tokenizer,
                          other.clip_g_tokenizer, context_dim=96).cache_key("x")  # a model built in code needs a name
