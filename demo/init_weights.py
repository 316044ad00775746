"""Write the demo model's starting point: word-level tokenizers for the captions of demo/shapes.py, frozen
random text encoders, and the untrained transformer.

Tokenizers. The captions use 24 words; CLIP's tokenizer gets a byte-level BPE learned on them (every word one
token) and T5's a word-level vocabulary, both in the formats the real tokenizers are read from
(vocab.json + merges.txt; tokenizer.json).

Text encoders: FIXED RANDOM, not trained. The paper freezes its text encoders too; what the demo has to
show is that the transformer learns to follow a frozen encoder. A random transformer encoder is a fixed
injective-in-practice map from token sequences to vectors: T5's relative-position attention mixes each
word with its neighbours (so "red" before "circle" differs from "red" before "background"), and CLIP's
causal attention gives the pooled vector the whole caption in order. Small widths (64) keep them cheap.

Transformer: a Flux-architecture MM-DiT (2 double-stream + 2 single-stream blocks, width 128, 4 heads),
without guidance embedding (flux-schnell's form, as nothing here is guidance-distilled), initialized as
DiT's adaLN-Zero: the modulation and the final projection start at zero, so every block starts as the
identity and the model's first prediction is zero.

    python demo/init_weights.py --out demo/weights --transformer init.safetensors
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mmdit  # noqa: E402
import text_encoders as te  # noqa: E402
import vae  # noqa: E402
from demo import shapes  # noqa: E402

T5_TOKENS = 16  # the longest caption is 13 T5 tokens with its EOS
WIDTH = 64  # of both text encoders
FLUX = mmdit.FluxParams(in_channels=64, out_channels=64, vec_in_dim=WIDTH, context_in_dim=WIDTH, hidden_size=128,
                        mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=(8, 12, 12),
                        guidance_embed=False)


def caption_words() -> list[str]:
    words = {"a", "an", "in", "the", "on", "background", "center", "top", "bottom", "left", "right"}
    return sorted(words | set(shapes.PALETTE) | set(shapes.SHAPES) | set(shapes.RADII))


def write_tokenizers(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = caption_words()
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=10_000, end_of_word_suffix="</w>", show_progress=False,
                                  special_tokens=["<|startoftext|>", "<|endoftext|>"])
    bpe.train_from_iterator(words, trainer)
    model = json.loads(bpe.to_str())["model"]
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    vae.write_json(out / "tokenizer" / "vocab.json", model["vocab"])
    merges = ["#version: 0.2"] + [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vae.atomic_write(out / "tokenizer" / "merges.txt", lambda tmp: Path(tmp).write_text("\n".join(merges) + "\n"))

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    t5 = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t5.pre_tokenizer = pre_tokenizers.Whitespace()
    (out / "tokenizer_2").mkdir(parents=True, exist_ok=True)
    vae.atomic_write(out / "tokenizer_2" / "tokenizer.json", lambda tmp: t5.save(str(tmp)))


def write_text_encoders(out: Path, seed: int) -> None:
    clip_vocab = json.loads((out / "tokenizer" / "vocab.json").read_text())
    t5_vocab = len(json.loads((out / "tokenizer_2" / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(seed)
    clip = te.CLIPText(te.CLIPTextConfig(vocab_size=len(clip_vocab), hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         eos_token_id=clip_vocab["<|endoftext|>"]))
    t5 = te.T5Encoder(te.T5Config(vocab_size=t5_vocab, d_model=WIDTH, d_kv=32, d_ff=2 * WIDTH, num_layers=2,
                                  num_heads=2))
    configs = {  # transformers' config.json of each, so the encoders load as the official ones do
        "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                         "vocab_size": len(clip_vocab), "hidden_size": WIDTH, "intermediate_size": 2 * WIDTH,
                         "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
                         "hidden_act": "quick_gelu", "eos_token_id": clip_vocab["<|endoftext|>"]},
        "text_encoder_2": {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": t5_vocab,
                           "d_model": WIDTH, "d_kv": 32, "d_ff": 2 * WIDTH, "num_layers": 2, "num_heads": 2,
                           "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new"}}
    for folder, model in (("text_encoder", clip), ("text_encoder_2", t5)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        vae.atomic_write(out / folder / "model.safetensors", lambda tmp: save_file(sd, tmp, {"format": "pt"}))
        vae.write_json(out / folder / "config.json", configs[folder])


def write_transformer(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = mmdit.Flux(FLUX)
    with torch.no_grad():  # adaLN-Zero (see the module docstring)
        for name, p in model.named_parameters():
            if "modulation" in name or name.startswith("final_layer.linear"):
                p.zero_()
    mmdit.save_transformer(model, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Tokenizers, frozen random text encoders, the untrained transformer.")
    p.add_argument("--out", required=True, help="the weights folder (tokenizer*/, text_encoder*/)")
    p.add_argument("--transformer", required=True, help="where to write the untrained transformer")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = Path(a.out)
    write_tokenizers(out)
    write_text_encoders(out, a.seed)
    write_transformer(Path(a.transformer), a.seed)
    clip_tok = te.CLIPTokenizer(out / "tokenizer", pad_token="<|endoftext|>")
    t5_tok = te.T5Tokenizer(out / "tokenizer_2", max_length=T5_TOKENS)
    for word in caption_words():  # every word is one known token in both: CLIP [BOS, word, EOS], T5 [word, EOS]
        clip_ids, t5_ids = clip_tok(word)[0].tolist(), t5_tok(word)[0].tolist()
        assert clip_ids[2] == clip_tok.eos_id != clip_ids[1] and t5_ids[1] == t5_tok.eos_id and t5_ids[0] > 2, word
    print(f"wrote {out}/tokenizer*, {out}/text_encoder*, {a.transformer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
