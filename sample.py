"""Text-to-image sampling up to 4096×4096 with Flux or SD3 (paper Sec. 6.1): a rectified-flow Euler sampler.

Rectified flow: x_t = (1 − t)·x0 + t·ε, the transformer predicts v = ε − x0, and t runs from 1 (noise) to 0
(image), so one Euler step is x ← x + (t_prev − t_curr)·v. The sampler is a handful of plain functions:

    noise = get_noise(...)
    timesteps = flux_schedule(...) | sd3_schedule(...)
    latents = denoise(flux_velocity(...) | sd3_cfg_velocity(...), noise, timesteps)
    images = ae.decode(latents, partitions=n)     # F16: the last decoder stage in an n×n grid (Sec. 4.1)

The schedules and the Euler step equal diffusers' FlowMatchEulerDiscreteScheduler, with which the authors' release
samples. Differences from that release: the Euler state stays in fp32 while the transformer runs in bf16 (diffusers
rounds it back to bf16 after every step, so the rounding accumulates over 50 steps); a single image is lossless PNG by
default (theirs are JPEG, quality 95, as --prompts writes them); flux-dev's guidance defaults to FLUX.1-dev's own 3.5
(their script defaults to 7.0).

The paper's evaluation generates one square image per prompt of the evaluation set's metadata.jsonl, every prompt
from seed 0, and scores them against the real images (metrics.py): --prompts does the generating half. It reads the
prompts with metrics.read_prompts, the one reader of an evaluation set's metadata.jsonl that metrics.py also uses.

Memory: --weight-dtype fp8 stores the transformer's and T5's large Linear weights in fp8 (fp8.py: weight-only,
upcast per layer; fp8 files, plain casts or ComfyUI's scaled fp8, load as they are); --offload blocks streams the
transformer's blocks through the GPU (offload.stream_blocks). Without --weights, --model demo: the small model this
project trained with demo/train.sh, from demo/weights, at 128².
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from tqdm import tqdm

import fp8
import mmdit
import text_encoders as te
import vae as vae_lib
from metrics import read_prompts
from offload import stream_blocks

MODELS = ("demo", "flux-dev", "flux-schnell", "sd3-medium", "sd3.5-medium", "sd3.5-large", "tiny")
FAMILY = {m: "sd3" if m.startswith("sd3") else "flux" for m in MODELS}  # demo and tiny are small Fluxes
DEFAULT_STEPS = {"demo": 20, "flux-dev": 50, "flux-schnell": 4, "tiny": 4}  # SD3 family: 28, as in the paper
DEFAULT_GUIDANCE = {"demo": 0.0, "flux-dev": 3.5, "flux-schnell": 0.0, "tiny": 3.5}  # SD3 family: CFG 7.0
NATIVE_SIZE = {"demo": 128, "tiny": 512}  # the rest: 4096, Diffusion-4K's
T5_TOKENS = {"demo": 16, "flux-dev": 512}  # the rest: 256 (diffusers); the demo's captions, as demo/train.sh encodes
# The model this project trained itself with demo/train.sh: what runs when no --weights are given.
DEMO_WEIGHTS = Path(__file__).resolve().parent / "demo" / "weights"


def get_noise(num: int, height: int, width: int, downsample: int, seed: int, channels: int = 16) -> torch.Tensor:
    """Gaussian latents (num, channels, height/downsample, width/downsample) in fp32, drawn on the CPU
    from `seed` so that the same seed gives the same image on any device. The CPU generator (mt19937) keeps only
    the seed's low 32 bits: seeds that differ by a multiple of 2**32 draw the same noise."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(num, channels, height // downsample, width // downsample, generator=generator)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """Flux's resolution-dependent shift t ← e^mu / (e^mu + 1/t − 1): more of the steps at high noise."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def flux_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu is linear in the number of image tokens, through (256, base_shift) and (4096, max_shift);
    at 4096² with the F16 autoencoder (16384 tokens) it extrapolates to about 3.23."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return base_shift + slope * (image_seq_len - 256)


def flux_schedule(steps: int, image_seq_len: int, shift: bool = True) -> torch.Tensor:
    """steps + 1 values of t from 1 to 0. flux-dev shifts them by the image sequence length; schnell does not."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    if shift:
        t[:-1] = time_shift(flux_mu(image_seq_len), t[:-1])  # the final 0 stays 0 (1/t would divide by zero)
    return t


def sd3_schedule(steps: int, shift: float = 3.0) -> torch.Tensor:
    """steps + 1 values of t from 1 to 0, as the SD3 reference samples them: timesteps linear in
    [1000, 1000·σ_min] with σ(s) = shift·s / (1 + (shift − 1)·s) and σ_min = σ(1/1000), then σ(t/1000),
    then a final 0."""

    def sigma(s):
        return shift * s / (1 + (shift - 1) * s)

    timesteps = torch.linspace(1000, 1000 * sigma(1 / 1000), steps, dtype=torch.float64)
    return torch.cat([sigma(timesteps / 1000), timesteps.new_zeros(1)])


def flux_velocity(model: mmdit.Flux, cond: dict, img_ids, txt_ids, guidance: float):
    """v(x, t) of a Flux transformer for packed latents x (N, L, 64). The guidance is the distilled scale
    embedded by flux-dev (one pass, no CFG); schnell ignores it."""
    dtype = next(model.parameters()).dtype

    def velocity(x, t):
        return model(img=x.to(dtype), img_ids=img_ids, txt=cond["txt"], txt_ids=txt_ids,
                     timesteps=torch.full((len(x),), t, device=x.device), y=cond["vec"],
                     guidance=torch.full((len(x),), guidance, device=x.device)).float()

    return velocity


def sd3_cfg_velocity(model: mmdit.MMDiT, positive: dict, negative: dict, guidance: float):
    """v(x, t) of SD3 with classifier-free guidance, v = v_uncond + guidance·(v_cond − v_uncond), both
    halves in one doubled batch (negative: the empty prompt). SD3 takes the timestep as 1000·t."""
    dtype = next(model.parameters()).dtype
    context = torch.cat([positive["context"], negative["context"]])
    pooled = torch.cat([positive["pooled"], negative["pooled"]])

    def velocity(x, t):
        timesteps = torch.full((2 * x.shape[0],), t * 1000, device=x.device)
        v_cond, v_uncond = model(torch.cat([x, x]).to(dtype), timesteps, pooled, context).float().chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    return velocity


def denoise(velocity, x: torch.Tensor, timesteps: torch.Tensor, progress=None) -> torch.Tensor:
    """Euler integration of dx/dt = v(x, t) from timesteps[0] down to timesteps[-1]. velocity(x, t) gets
    t as a Python float; `progress`, if given, is called once per step."""
    for t_curr, t_prev in zip(timesteps[:-1].tolist(), timesteps[1:].tolist()):
        v = velocity(x, t_curr)
        x = x + (t_prev - t_curr) * v
        if progress is not None:
            progress()
    return x


# ---------------------------------------------------------------------------------------------------------
# The pipeline: loading the pieces, and one text-to-image call


@dataclass
class Pipeline:
    """Everything one text-to-image call needs. `family` is "flux" or "sd3"."""

    model: str
    family: str
    transformer: torch.nn.Module
    ae: vae_lib.AutoEncoder
    conditioner: te.FluxConditioner | te.SD3Conditioner
    notes: list[str] = field(default_factory=list)


def load_pipeline(model: str, weights, *, transformer=None, vae: str | None = None, device="cpu",
                  dtype=torch.bfloat16, weight_dtype=None) -> Pipeline:
    """Load `model` from `weights` onto `device` (the CPU when offloading) in `dtype`; the large Linear weights of
    the transformer and T5 in `weight_dtype` (None: as the files store them; see fp8.py).
    transformer: a file or diffusers folder that replaces the transformer found in `weights` (a WLF fine-tune).
    vae: "f8", "f16" or None (what the weights' autoencoder config says; F8 for the official files)."""
    if model == "tiny":
        return tiny_pipeline(vae=vae, device=device, dtype=dtype, weight_dtype=weight_dtype)
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
    paths = find_weights(model, weights, transformer)
    ae = vae_lib.load_vae(paths["vae"], stride={"f8": 1, "f16": 2, None: None}[vae], device=device, dtype=dtype)
    transformer = mmdit.load_transformer(str(paths["transformer"]), device=device, dtype=dtype,
                                         weight_dtype=weight_dtype)
    family = "flux" if isinstance(transformer, mmdit.Flux) else "sd3"
    if family != FAMILY[model]:
        raise vae_lib.UserError(f"{paths['transformer']} holds a {family} transformer, not {model}")

    def clip(which):  # `which` picks the encoder out of an SD3 checkpoint that bundles them
        return te.load_clip(paths[which], which=which if paths[which] == paths["transformer"] else None,
                            device=device, dtype=dtype)

    clip_l_tokenizer = te.CLIPTokenizer(paths["clip_l_tokenizer"], pad_token="<|endoftext|>")
    t5 = te.load_t5(paths["t5"], device=device, dtype=dtype, weight_dtype=weight_dtype)
    if family == "flux":
        t5_tokenizer = te.T5Tokenizer(paths["t5_tokenizer"], max_length=T5_TOKENS.get(model, 256))
        conditioner = te.FluxConditioner(clip("clip_l"), t5, clip_l_tokenizer, t5_tokenizer)
    else:
        conditioner = te.SD3Conditioner(clip("clip_l"), clip("clip_g"), clip_l_tokenizer,
                                        te.CLIPTokenizer(paths["clip_g_tokenizer"], pad_token=0), t5,
                                        te.T5Tokenizer(paths["t5_tokenizer"], max_length=256))
    return Pipeline(model, family, transformer, ae, conditioner)


# Where each piece may lie inside --weights DIR, in order: a diffusers snapshot's sub-folder first, then the
# official single files (the Hugging Face repos of FLUX.1 and SD3 hold both layouts).
_TRANSFORMER_FILES = {"demo": "transformer.safetensors",
                      "flux-dev": "flux1-dev*.safetensors", "flux-schnell": "flux1-schnell*.safetensors",
                      "sd3-medium": "sd3_medium*.safetensors", "sd3.5-medium": "sd3.5_medium*.safetensors",
                      "sd3.5-large": "sd3.5_large*.safetensors"}


def find_weights(model: str, root: str | os.PathLike, transformer: str | os.PathLike | None = None) -> dict[str, Path]:
    """The path of every piece `model` needs under `root`: transformer (unless given), vae, text encoders,
    tokenizers (a diffusers sub-folder is returned as the folder). Two files matching one pattern are an error:
    which one is meant (flux1-dev.safetensors or a fine-tune beside it?) is not ours to guess."""
    root = Path(root)
    if not root.is_dir():
        raise vae_lib.UserError(f"weights directory not found: {root} (give --weights DIR with the official files "
                                "or a diffusers snapshot)")

    def find(what: str, *candidates: str, fallback: Path | None = None) -> Path:
        for pattern in candidates:
            matches = sorted(p for p in root.glob(pattern) if not p.name.startswith("."))
            if len(matches) > 1:
                choose = "choose one with --transformer FILE" if what.endswith("transformer") else \
                    "leave only the one to use in the folder"
                raise vae_lib.UserError(f"{what}: {len(matches)} files in {root} match {pattern} "
                                        f"({', '.join(p.name for p in matches)}); {choose}")
            if matches:
                return matches[0].parent if matches[0].name == "config.json" else matches[0]
        if fallback is not None:
            return fallback
        raise vae_lib.UserError(f"{what} not found in {root} (looked for: {', '.join(candidates)})")

    if transformer is None:
        transformer = find(f"{model} transformer", "transformer/config.json", _TRANSFORMER_FILES[model])
    elif not (transformer := Path(transformer)).exists():
        raise vae_lib.UserError(f"--transformer {transformer}: not found")
    if FAMILY[model] == "flux":
        return {
            "transformer": transformer,
            "vae": find("autoencoder", "vae/config.json", "ae.safetensors"),
            "clip_l": find("CLIP-L text encoder", "text_encoder/config.json", "clip_l.safetensors",
                           "text_encoders/clip_l.safetensors"),
            "t5": find("T5-XXL text encoder", "text_encoder_2/config.json", "t5xxl*.safetensors",
                       "text_encoders/t5xxl*.safetensors"),
            "clip_l_tokenizer": find("CLIP tokenizer", "tokenizer"),
            "t5_tokenizer": find("T5 tokenizer", "tokenizer_2"),
        }
    bundled = transformer if transformer.suffix == ".safetensors" else None  # "incl_clips" files hold them all
    return {
        "transformer": transformer,
        "vae": find("autoencoder", "vae/config.json", fallback=bundled),
        "clip_l": find("CLIP-L text encoder", "text_encoder/config.json", "text_encoders/clip_l.safetensors",
                       "clip_l.safetensors", fallback=bundled),
        "clip_g": find("CLIP-G text encoder", "text_encoder_2/config.json", "text_encoders/clip_g.safetensors",
                       "clip_g.safetensors", fallback=bundled),
        "t5": find("T5-XXL text encoder", "text_encoder_3/config.json", "text_encoders/t5xxl*.safetensors",
                   "t5xxl*.safetensors", fallback=bundled),
        "clip_l_tokenizer": find("CLIP-L tokenizer", "tokenizer"),
        "clip_g_tokenizer": find("CLIP-G tokenizer", "tokenizer_2", "tokenizer"),
        "t5_tokenizer": find("T5 tokenizer", "tokenizer_3"),
    }


def tiny_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """A byte-level CLIP vocabulary (every byte, alone and word-final, no merges) and a character-level
    T5 unigram vocabulary, written to `folder`: enough to tokenize any prompt for the tiny model."""
    from tokenizers import Tokenizer, models

    byte_chars = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] + \
        [chr(c) for c in range(174, 256)] + [chr(256 + n) for n in range(68)]  # CLIP's printable byte alphabet
    clip_dir, t5_dir = folder / "clip", folder / "t5"
    for d in (clip_dir, t5_dir):
        d.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(byte_chars + [c + "</w>" for c in byte_chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (clip_dir / "vocab.json").write_text(json.dumps(vocab))
    (clip_dir / "merges.txt").write_text("#version: 0.2\n")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(chr(c), -1.0) for c in range(32, 127)]
    Tokenizer(models.Unigram(pieces, unk_id=2)).save(str(t5_dir / "tokenizer.json"))
    return clip_dir, t5_dir


def tiny_pipeline(*, vae: str | None = None, device="cpu", dtype=torch.float32, seed: int = 0,
                  weight_dtype=None) -> Pipeline:
    """A TINY FLUX-LIKE MODEL WITH RANDOM WEIGHTS: the whole pipeline (tokenizers, CLIP and T5 encoders,
    transformer, F16 autoencoder with the partitioned decoder) at toy sizes, for a machine without weights.
    Its images are structured noise, not pictures."""
    torch.manual_seed(seed)
    ae = vae_lib.AutoEncoder(vae_lib.AutoEncoderParams(3, 16, 3, (1, 1, 2, 2), 1, 16, scale_factor=0.3611,
                                                       shift_factor=0.1159, stride=1 if vae == "f8" else 2, groups=8))
    transformer = mmdit.Flux(mmdit.FluxParams(vec_in_dim=32, context_in_dim=32, hidden_size=64, mlp_ratio=4.0,
                                              num_heads=2, depth=1, depth_single_blocks=2, axes_dim=(8, 12, 12)))
    with tempfile.TemporaryDirectory(prefix="tiny-tokenizers-") as folder:  # the tokenizers read it all at once
        clip_dir, t5_dir = tiny_tokenizer_files(Path(folder))
        clip_tok, t5_tok = te.CLIPTokenizer(clip_dir, pad_token="<|endoftext|>"), te.T5Tokenizer(t5_dir, max_length=64)
        clip_vocab = len(json.loads((clip_dir / "vocab.json").read_text()))
    clip = te.CLIPText(te.CLIPTextConfig(vocab_size=clip_vocab, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    t5 = te.T5Encoder(te.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2))
    conditioner = te.FluxConditioner(clip, t5, clip_tok, t5_tok)
    for module in (ae, transformer, clip, t5):
        module.to(device=device, dtype=dtype).eval()
    if weight_dtype is not None:
        fp8.convert(transformer, transformer.blocks(), weight_dtype)
        fp8.convert(t5, t5.encoder.block, weight_dtype)
    return Pipeline("tiny", "flux", transformer, ae, conditioner,
                    notes=["tiny model with RANDOM weights: a pipeline check, not a picture"])


@contextmanager
def on_device(modules, device, offload: bool):
    """With offload, `modules` visit `device` for the block and go back to the CPU after it (also on error)."""
    modules = modules if offload else []
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m in modules:
            m.to("cpu")


def generate(pipe: Pipeline, prompt: str, *, width: int, height: int, steps: int, guidance: float, seed: int,
             num_images: int = 1, partitions: int | None = None, device="cpu", offload: str | None = None,
             progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Sample `num_images` images (N, 3, height, width) in [−1, 1] for one prompt; returns them and
    {"seconds_per_step": ...}. With offload ("components") the components live on the CPU and visit `device` one
    at a time: the text encoders, then the transformer, then the autoencoder; with "blocks" the transformer's
    blocks stream through it one block ahead (offload.py) instead of the whole transformer visiting."""
    f = pipe.ae.factor
    if width % (2 * f) or height % (2 * f) or width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive multiples of {2 * f} (the {f}× autoencoder and 2×2 "
                         f"latent patches), got {width}×{height}")
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    model, cond = pipe.transformer, pipe.conditioner
    dtype = next(model.parameters()).dtype
    with on_device(cond.encoders, device, offload):
        positive = cond([prompt] * num_images, device=device, dtype=dtype)
        negative = cond.negative(num_images, device=device, dtype=dtype) if pipe.family == "sd3" else None

    noise = get_noise(num_images, height, width, f, seed).to(device)
    h, w = noise.shape[-2:]
    if pipe.family == "flux":
        x = mmdit.pack(noise)  # (N, h/2·w/2, 64)
        timesteps = flux_schedule(steps, x.shape[1], shift=pipe.model not in ("flux-schnell", "demo"))
        velocity = flux_velocity(model, positive, mmdit.flux_img_ids(h, w, num_images, device=device),
                                 mmdit.flux_txt_ids(positive["txt"].shape[1], num_images, device=device), guidance)
    else:
        x = noise
        p = model.params.patch_size
        model.cropped_pos_embed(h // p, w // p)  # fails now, with the size limit, rather than mid-way
        timesteps = sd3_schedule(steps, shift=3.0)
        velocity = sd3_cfg_velocity(model, positive, negative, guidance)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    transformer_on_device = stream_blocks(model, model.blocks(), device) if offload == "blocks" else \
        on_device([model], device, offload)
    with transformer_on_device, torch.inference_mode(), \
            tqdm(total=steps, desc="denoising", unit="step", file=sys.stderr, disable=not progress) as bar:
        sync()
        start = time.perf_counter()
        x = denoise(velocity, x, timesteps, progress=bar.update)
        sync()
        stats = {"seconds_per_step": (time.perf_counter() - start) / steps}
    latents = mmdit.unpack(x, h, w) if pipe.family == "flux" else x

    # One image at a time: at 4096² the decoder's activations, not its weights, fill the memory.
    with on_device([pipe.ae], device, offload), torch.inference_mode():
        images = torch.cat([pipe.ae.decode(latents[i:i + 1].to(dtype), partitions=partitions)
                            for i in range(num_images)])
    if not torch.isfinite(images).all():  # saved, it would be a flat black image that passes for a result
        raise vae_lib.UserError("the images hold NaN or inf (non-finite weights, or an fp16 overflow: try --dtype "
                                "bf16 or fp32); none written")
    return images.float().clamp(-1, 1), stats


# ---------------------------------------------------------------------------------------------------------
# Saving, and the prompts of an evaluation set

FORMATS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}  # file extension -> --format


def save_image(image: torch.Tensor, path, metadata: dict, fmt: str = "png", quality: int = 95) -> None:
    """Write one (3, H, W) image in [−1, 1] as PNG (`metadata` in text chunks) or JPEG at `quality` (`metadata` as
    JSON in its comment), atomically: a crash or a full disk never leaves a partial file under the final name."""
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_text(key, str(value))
        options = {"format": "PNG", "pnginfo": info}
    else:
        options = {"format": "JPEG", "quality": quality, "comment": json.dumps(metadata)}
    vae_lib.atomic_write(Path(path).absolute(), lambda tmp: Image.fromarray(array).save(tmp, **options))


# ---------------------------------------------------------------------------------------------------------
# Command line: every check that can fail runs before the weights load


def plan_jobs(a, rank: int, world: int) -> tuple[list, str]:
    """[(prompt, output paths)] and the image format: one prompt's --num-images images, or one image for each of
    this rank's --prompts lines (rank, rank + world, ...)."""
    if a.prompts:
        if a.num_images != 1:
            raise vae_lib.UserError("--num-images: --prompts makes one image per prompt")
        fmt, out = a.format or "jpg", Path(a.out or f"out/{a.model}")
        vae_lib.check_writable(out, f"--out {out}", folder=True)
        return [(text, [out / f"{name}.{fmt}"]) for text, name in read_prompts(a.prompts)[rank::world]], fmt
    fmt = a.format or FORMATS.get(Path(a.out or "").suffix.lower(), "png")
    out = Path(a.out or f"out/{a.model}-{a.seed}.{fmt}")
    if out.is_dir():
        raise vae_lib.UserError(f"--out {out} is a folder: give an image file name (--prompts fills a folder)")
    if FORMATS.get(out.suffix.lower()) != fmt:
        raise vae_lib.UserError(f"--out {out}: name a .png, .jpg or .jpeg file" +
                                (f" for --format {a.format}" if a.format else ""))
    vae_lib.check_writable(out, f"--out {out}")
    if a.num_images > 1:  # -0, -1, ... before the extension
        return [(a.prompt, [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(a.num_images)])], fmt
    return [(a.prompt, [out])], fmt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Text-to-image up to 4096×4096 with Flux or SD3 (Diffusion-4K).")
    p.add_argument("prompt", nargs="?", help="the text (or --prompts FILE)")
    p.add_argument("--prompts", help='metadata.jsonl ({"file_name", "text"} lines): one image per line, named after '
                   "file_name, in the --out folder; images already there are skipped; under torchrun rank r of N "
                   "takes lines r, r+N, ...")
    p.add_argument("--model", help=f"one of {', '.join(MODELS)}; default: flux-dev with --weights, else demo (the "
                   "model this project trained, in demo/weights); tiny: random weights")
    p.add_argument("--weights", help="folder with the official files or a diffusers snapshot (not for tiny; demo: "
                   "demo/weights)")
    p.add_argument("--transformer", help="transformer file or folder instead of the one in --weights (a fine-tune)")
    p.add_argument("--width", type=int, help="pixels (default 4096; demo 128, tiny 512)")
    p.add_argument("--height", type=int, help="pixels (default 4096; demo 128, tiny 512)")
    p.add_argument("--steps", type=int, help="Euler steps (50 flux-dev, 4 flux-schnell, 28 SD3)")
    p.add_argument("--guidance", type=float, help="Flux: distilled guidance (3.5); SD3: CFG scale (7.0)")
    p.add_argument("--seed", type=int, default=0, help="0 to 2**32-1; with --prompts the seed of every prompt")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--vae", choices=("f8", "f16"), help="autoencoder: F8 (official) or F16 (Diffusion-4K); "
                   "default: what the weights' VAE config says (stride 2 = F16), else F8; tiny: F16")
    p.add_argument("--partitions", type=int, help="n of the n×n grid of the F16 decoder's last stage (default 2)")
    p.add_argument("--offload", nargs="?", const="components", metavar="{components,blocks}",
                   help="components (or no value): keep components on the CPU, each on the GPU while it works; "
                   "blocks: the same, the transformer's blocks streamed")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--weight-dtype", choices=("bf16", "fp8"), help="storage of the transformer's and T5's large "
                   "Linear weights (fp8: float8_e4m3fn, half of bf16's memory); default: as the files store them")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="image path (default out/MODEL-SEED.png; -i suffixes for several images); with "
                   "--prompts a folder (default out/MODEL)")
    p.add_argument("--format", choices=("png", "jpg"), help="default: --out's extension, else png; jpg with --prompts")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95, as the authors' evaluation)")
    a = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    start = time.perf_counter()
    try:
        a.model = a.model or ("flux-dev" if a.weights else "demo")
        if a.model == "demo" and not a.weights:
            a.weights = DEMO_WEIGHTS
        if a.model not in MODELS:  # checked before --weights, so a typo is not reported as missing weights
            raise vae_lib.UserError(f"unknown model {a.model!r}: choose one of {', '.join(MODELS)}")
        if a.model != "tiny" and not a.weights:
            raise vae_lib.UserError(f"--model {a.model} needs --weights DIR (the official files or a diffusers "
                                    "snapshot); --model tiny runs without weights")
        if a.offload not in (None, "components", "blocks"):  # a prompt after a bare --offload lands here too
            raise vae_lib.UserError(f"--offload takes components, blocks or no value, got {a.offload!r} (a prompt "
                                    "goes before --offload)")
        if (a.prompt is None) == (a.prompts is None):
            raise vae_lib.UserError("give one prompt or --prompts FILE (one of the two)")
        for name in ("width", "height", "steps", "num_images", "partitions"):
            if (value := getattr(a, name)) is not None and value < 1:
                raise vae_lib.UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not 0 <= a.seed < 2**32:
            raise vae_lib.UserError(f"--seed must be in 0..{2**32 - 1} (the noise generator keeps the seed's low "
                                    f"32 bits, so other seeds repeat these), got {a.seed}")
        if not 1 <= a.quality <= 100:
            raise vae_lib.UserError(f"--quality must be in 1..100, got {a.quality}")
        if a.weight_dtype == "fp8" and not fp8.FLOAT8:
            raise vae_lib.UserError(f"--weight-dtype fp8 needs float8 dtypes, which torch {torch.__version__} lacks "
                                    "(2.1 and newer have them)")
        if a.weight_dtype == "bf16" and a.dtype == "fp16":
            raise vae_lib.UserError("--weight-dtype bf16 with --dtype fp16 saves no memory (2 bytes each) and upcasts "
                                    "into fp16's narrower range: give one of the two")
        device = vae_lib.pick_device(a.device)
        jobs, fmt = plan_jobs(a, rank, world)
        share = len(jobs)
        if a.prompts:  # a killed run continues where it stopped: the images it wrote are whole (atomic_write)
            jobs = [(prompt, paths) for prompt, paths in jobs if not paths[0].exists()]
        sd3 = FAMILY[a.model] == "sd3"
        size = NATIVE_SIZE.get(a.model, 4096)
        width, height = a.width or size, a.height or size
        steps = a.steps if a.steps is not None else (28 if sd3 else DEFAULT_STEPS[a.model])
        guidance = a.guidance if a.guidance is not None else (7.0 if sd3 else DEFAULT_GUIDANCE[a.model])
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                 None: torch.bfloat16 if device.type == "cuda" else torch.float32}[a.dtype]
        weight_dtype = {"bf16": torch.bfloat16, "fp8": getattr(torch, "float8_e4m3fn", None)}.get(a.weight_dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds_per_step = []
        if jobs:
            pipe = load_pipeline(a.model, a.weights, transformer=a.transformer, vae=a.vae,
                                 device="cpu" if a.offload else device, dtype=dtype, weight_dtype=weight_dtype)
            for note in pipe.notes:
                print(f"note: {note}", file=sys.stderr)
            metadata = {"model": a.model, "seed": a.seed, "steps": steps, "guidance": guidance, "width": width,
                        "height": height, "vae": f"F{pipe.ae.factor}"}
        with tqdm(total=share, initial=share - len(jobs), desc="images", unit="image", file=sys.stderr,
                  disable=not a.prompts or rank != 0) as bar:
            for prompt, paths in jobs:
                images, stats = generate(pipe, prompt, width=width, height=height, steps=steps, guidance=guidance,
                                         seed=a.seed, num_images=len(paths), partitions=a.partitions, device=device,
                                         offload=a.offload, progress=not a.prompts)
                for i, path in enumerate(paths):
                    save_image(images[i], path, {"prompt": prompt, **metadata, "index": i}, fmt, a.quality)
                    print(path, flush=True)
                seconds_per_step.append(stats["seconds_per_step"])
                bar.update()
    except (vae_lib.UserError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    who = f"rank {rank} of {world}: " if world > 1 else ""
    counts = f"{len(jobs)} written, {share - len(jobs)} already there; " if a.prompts else ""
    speed = f"{sum(seconds_per_step) / len(seconds_per_step):.3f} s/step, " if seconds_per_step else ""
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB GPU" if device.type == "cuda" else "n/a on CPU"
    print(f"{who}{counts}{speed}total {time.perf_counter() - start:.1f} s, peak memory {peak}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
