"""Wavelet-based Latent Fine-tuning (WLF, paper Sec. 4.2, Eq. 10) of Flux or SD3 with torchrun + FSDP2.

Two stages, so that no encoder is ever loaded while the transformer trains:

    # 1. encode images (VAE, F8 or F16) and prompts (CLIP / T5) once, into safetensors shards
    python train_wlf.py precompute --data Aesthetic-4K/train --model flux-dev --vae ae_f16.safetensors --f16 \\
        --clip-l clip_l/ --t5 t5xxl/ --resolution 4096 --flip --out shards/
    # 2. fine-tune the transformer on the shards, on 8 GPUs (or 1, without torchrun)
    torchrun --nproc_per_node 8 train_wlf.py train --shards shards/ --transformer flux1-dev.safetensors \\
        --out runs/wlf --steps 20000 --batch-size 4
    # the per-GPU memory plan, without weights or GPUs
    python train_wlf.py train --dry-run --model flux-dev --resolution 4096 --f16 --batch-size 4 --world-size 8

The objective (rectified flow, as Flux and SD3 were trained):

    x_t = (1 − t)·x0 + t·ε,   the model predicts v ≈ ε − x0,   t ~ uniform | logit-normal(m, s), optional shift
    WLF (Eq. 10): x̂0 = x_t − t·v  and  L = Σ_bands w_band·‖DWT(x̂0)_band − DWT(x0)_band‖² / #coefficients

As the authors do, the wavelet loss compares x̂0 with x0 (not v with ε − x0). Since x̂0 − x0 = t·(ε − x0 − v),
it is the velocity error weighted by t². With one level and equal band weights it IS x0-space MSE, because
the Haar transform is orthonormal (Parseval); only unequal weights make the wavelets matter.

Parallelism: torch's own FSDP2 (`fully_shard` per transformer block, then the root) keeps fp32 parameters,
gradients and AdamW state sharded over the ranks and gathers one block's parameters in bf16 at a time;
gradients are reduce-scattered in fp32. Each block is recomputed in the backward pass (activation
checkpointing), so only block inputs stay alive between forward and backward. Checkpoints are sharded
(torch.distributed.checkpoint) and resharded on load, so a run may resume on a different number of GPUs.

Determinism: the sample order is one global permutation per epoch, and each sample's noise and t are drawn
from a generator seeded by (seed, position in the sample stream). The run therefore depends on the global
batch, not on how it is split over GPUs and accumulation steps, and resuming reproduces the same updates.
"""
import argparse
import datetime
import json
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import mmdit
import text_encoders
import vae
import wavelet

SHARD_FORMAT = "diffusion4k-wlf-shards"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------------
# Data: an image folder with metadata.jsonl lines {"file_name": ..., "text": ...} (the Aesthetic-4K format)


def read_metadata(folder: Path) -> tuple[list[dict], list[dict]]:
    """Rows {"file_name", "text"} of folder/metadata.jsonl, and the lines that could not be used."""
    path = folder / "metadata.jsonl"
    if not path.is_file():
        raise vae.UserError(f"{path} not found: the data folder needs a metadata.jsonl with one "
                        '{"file_name": ..., "text": ...} object per line')
    rows, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append({"file_name": str(row["file_name"]), "text": str(row["text"])})
        except (ValueError, KeyError, TypeError) as e:
            bad.append({"file_name": f"metadata.jsonl:{number}", "reason": f"bad line ({type(e).__name__}: {e})"})
    return rows, bad


def load_image(path: Path, resolution: int, rng: random.Random, flip: bool) -> Tensor:
    """Resize the shorter side to `resolution`, take a random square crop, flip with probability ½ when asked;
    (3, resolution, resolution) in [−1, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")  # also forces the full decode, so truncated files fail here
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)  # anti-aliased when shrinking 6K-8K originals
    left, top = rng.randint(0, size[0] - resolution), rng.randint(0, size[1] - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return x.float() / 127.5 - 1


class ImageFolder(torch.utils.data.Dataset):
    """Item i: {"row", "text", "image" (3, R, R) in [−1, 1]} or {"row", "file_name", "error"} for a file that
    cannot be read: bad files are reported, never fatal. The crop and flip of item i depend only on (seed, i),
    so an interrupted precompute continues with the same augmentations."""

    def __init__(self, folder: Path, rows: list[dict], resolution: int, flip: bool, seed: int, start: int = 0):
        self.folder, self.rows, self.resolution, self.flip, self.seed, self.start = folder, rows, resolution, flip, seed, start

    def __len__(self) -> int:
        return len(self.rows) - self.start

    def __getitem__(self, i: int) -> dict:
        i += self.start
        row = self.rows[i]
        try:
            rng = random.Random(f"{self.seed}/{i}")
            image = load_image(self.folder / row["file_name"], self.resolution, rng, self.flip)
        except Exception as e:  # unreadable, truncated, not an image, missing, too large, ...
            return {"row": i, "file_name": row["file_name"], "error": f"{type(e).__name__}: {e}".split("\n")[0]}
        return {"row": i, "text": row["text"], "image": image}


# ---------------------------------------------------------------------------------------------------------
# Precomputed shards: shard-NNNNN.safetensors {"latents", "context", "pooled", "row"} + manifest.json


class ShardWriter:
    """Buffers encoded samples and writes `shard_size` of them at a time as one shard, atomically; manifest.json
    is rewritten (atomically) after every shard, so an interrupted precompute resumes after its last shard."""

    def __init__(self, out: Path, manifest: dict, shard_size: int, store_dtype: torch.dtype):
        self.out, self.manifest, self.shard_size, self.store_dtype = out, manifest, shard_size, store_dtype
        self.buffer: dict[str, list[Tensor]] = {"latents": [], "context": [], "pooled": [], "row": []}

    def add(self, latents: Tensor, context: Tensor, pooled: Tensor, rows: list[int]) -> None:
        for name, value in (("latents", latents), ("context", context), ("pooled", pooled)):
            self.buffer[name].extend(value.detach().to("cpu", self.store_dtype).unbind(0))
        self.buffer["row"].extend(torch.tensor(rows, dtype=torch.int64).unbind(0))
        while len(self.buffer["row"]) >= self.shard_size:
            self.flush(self.shard_size)

    def flush(self, count: int | None = None) -> None:
        """Write the first `count` buffered samples (default all) as the next shard."""
        from safetensors.torch import save_file

        count = len(self.buffer["row"]) if count is None else count
        if count == 0:
            return
        tensors = {name: torch.stack(values[:count]).contiguous() for name, values in self.buffer.items()}
        self.buffer = {name: values[count:] for name, values in self.buffer.items()}
        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        vae.atomic_write(self.out / name, lambda tmp: save_file(tensors, tmp))
        self.manifest["shards"].append({"file": name, "count": count})
        self.manifest["num_samples"] += count
        self.manifest["next_row"] = int(tensors["row"][-1]) + 1  # rows after it are encoded again on resume
        vae.write_json(self.out / "manifest.json", self.manifest)


class LatentShards:
    """Reads the shards written by `precompute`, sample by sample, memory-mapped (safetensors), so a data set
    much larger than host memory is fine. `max_samples` keeps only the first N (to overfit a few samples)."""

    def __init__(self, folder: str | Path, max_samples: int | None = None):
        from safetensors import safe_open

        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise vae.UserError(f"{path} not found: create the shards first with `python train_wlf.py precompute ...`")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != SHARD_FORMAT:
            raise vae.UserError(f"{path} is not a {SHARD_FORMAT} manifest")
        if not self.manifest.get("complete"):
            raise vae.UserError(f"{self.folder}: precompute did not finish; run the same precompute command again to "
                            "complete it")
        self._safe_open = safe_open
        self.files = [self.folder / s["file"] for s in self.manifest["shards"]]
        self.counts = [s["count"] for s in self.manifest["shards"]]
        missing = [str(f) for f in self.files if not f.is_file()]
        if missing:
            raise vae.UserError(f"shard files missing: {', '.join(missing[:3])}")
        self.starts = [sum(self.counts[:i]) for i in range(len(self.counts))]
        self.length = sum(self.counts) if max_samples is None else min(max_samples, sum(self.counts))
        if self.length == 0:
            raise vae.UserError(f"{self.folder} holds no samples")
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return self.length

    def _locate(self, index: int) -> tuple[int, int]:
        for shard in reversed(range(len(self.starts))):
            if index >= self.starts[shard]:
                return shard, index - self.starts[shard]
        raise IndexError(index)

    def get(self, indices: list[int]) -> dict[str, Tensor]:
        """{"latents" (B, 16, h, w), "context" (B, L, 4096), "pooled" (B, D)} for the given sample indices."""
        out: dict[str, list[Tensor]] = {"latents": [], "context": [], "pooled": []}
        for index in indices:
            shard, i = self._locate(index)
            if shard not in self._open:
                self._open[shard] = self._safe_open(str(self.files[shard]), "pt")
            f = self._open[shard]
            for name in out:
                out[name].append(f.get_slice(name)[i : i + 1])
        return {name: torch.cat(values) for name, values in out.items()}


class SampleStream:
    """An endless stream of sample indices: epoch after epoch, each a permutation drawn from (seed, epoch).
    Position p of the stream is the data position a checkpoint stores."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self._epoch, self._perm = length, seed, -1, None

    def __getitem__(self, position: int) -> int:
        epoch, i = divmod(position, self.length)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.length, generator=generator).tolist()
        return self._perm[i]


def t5_tokens(args) -> int:
    """512 for flux-dev, 256 for flux-schnell and SD3 (diffusers' length), as the samplers encode prompts."""
    return args.t5_tokens or (512 if args.model == "flux-dev" else 256)


def load_conditioner(args, device: torch.device, dtype: torch.dtype):
    """FluxConditioner (CLIP-L + T5) or SD3Conditioner (CLIP-L + CLIP-G + T5) from --weights (a diffusers
    snapshot: text_encoder*/ and tokenizer*/) and/or the explicit --clip-l / --clip-g / --t5 paths."""
    flux = args.model.startswith("flux")
    t5_length = t5_tokens(args)
    root = Path(args.weights) if args.weights else None
    sub = (lambda name: str(root / name) if root else None)
    clip_l = args.clip_l or sub("text_encoder")
    clip_g = args.clip_g or (None if flux else sub("text_encoder_2"))
    t5 = args.t5 or sub("text_encoder_2" if flux else "text_encoder_3")
    need = {"--clip-l": clip_l, "--t5": t5, **({} if flux else {"--clip-g": clip_g})}
    if missing := [flag for flag, value in need.items() if value is None]:
        raise vae.UserError(f"precompute --model {args.model} needs {', '.join(missing)} (or --weights DIR, a diffusers "
                        "snapshot with text_encoder*/ and tokenizer*/ folders)")
    tok = {  # explicit > the snapshot's tokenizer*/ folder > beside the encoder
        "clip_l": args.clip_l_tokenizer or (sub("tokenizer") if root and not args.clip_l else None) or clip_l,
        "clip_g": args.clip_g_tokenizer or (sub("tokenizer_2") if root and not args.clip_g else None) or clip_g,
        "t5": args.t5_tokenizer or (sub("tokenizer_2" if flux else "tokenizer_3") if root and not args.t5 else None) or t5,
    }
    tok = {k: (None if v is None else (Path(v) if Path(v).is_dir() else Path(v).parent)) for k, v in tok.items()}
    try:
        clip_l_model = text_encoders.load_clip(clip_l, device=device, dtype=dtype)
        t5_model = text_encoders.load_t5(t5, device=device, dtype=dtype)
        clip_l_tok = text_encoders.CLIPTokenizer(tok["clip_l"], pad_token="<|endoftext|>")
        t5_tok = text_encoders.T5Tokenizer(tok["t5"], max_length=t5_length)
        if flux:
            return text_encoders.FluxConditioner(clip_l_model, t5_model, clip_l_tok, t5_tok)
        clip_g_model = text_encoders.load_clip(clip_g, device=device, dtype=dtype)
        clip_g_tok = text_encoders.CLIPTokenizer(tok["clip_g"], pad_token=0)  # SD3's CLIP-G pads with id 0
        return text_encoders.SD3Conditioner(clip_l_model, clip_g_model, clip_l_tok, clip_g_tok, t5_model, t5_tok,
                                            t5_length=t5_length)
    except (OSError, ValueError) as e:
        raise vae.UserError(f"cannot load the text encoders: {e}") from None


def precompute(args) -> None:
    """Encode every image of --data with the VAE and its prompt with the text encoders, into shards."""
    if args.model not in mmdit.CONFIGS:
        raise vae.UserError(f"unknown --model {args.model!r}; choose one of {', '.join(sorted(mmdit.CONFIGS))}")
    family = "flux" if args.model.startswith("flux") else "sd3"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    data, out = Path(args.data), Path(args.out)
    rows, bad_lines = read_metadata(data)
    vae_path = args.vae or args.weights
    if vae_path is None:
        raise vae.UserError("precompute needs --vae (ae.safetensors, an SD3 checkpoint or a diffusers vae/ folder)")
    try:
        ae = vae.load_vae(vae_path, stride=2 if args.f16 else None, device=device, dtype=dtype)
    except (OSError, ValueError) as e:
        raise vae.UserError(f"cannot load the autoencoder: {e}") from None
    if args.resolution % (2 * ae.factor):
        raise vae.UserError(f"--resolution {args.resolution} must be a multiple of {2 * ae.factor} (F{ae.factor} "
                        "autoencoder, 2×2 latent patches)")
    settings = {"model": args.model, "family": family, "data": str(data.resolve()), "rows": len(rows),
                "resolution": args.resolution, "flip": args.flip, "seed": args.seed, "vae": str(vae_path),
                "vae_factor": ae.factor, "vae_scale": ae.scale_factor, "vae_shift": ae.shift_factor,
                "text_encoders": [str(p) for p in (args.weights, args.clip_l, args.clip_g, args.t5) if p],
                "t5_tokens": t5_tokens(args), "store_dtype": args.store_dtype}
    manifest = {"format": SHARD_FORMAT, "version": 1, **settings, "complete": False, "shards": [], "num_samples": 0,
                "next_row": 0, "skipped": []}
    path = out / "manifest.json"
    if path.is_file():
        old = json.loads(path.read_text())
        same = all(old.get(k) == v for k, v in settings.items())
        if args.overwrite or not same:
            if not args.overwrite:
                raise vae.UserError(f"{out} holds shards made with other settings; use another --out or --overwrite")
            for f in out.glob("shard-*.safetensors"):
                f.unlink()
            path.unlink()
        elif old.get("complete"):
            print(f"{out}: already complete ({old['num_samples']} samples); nothing to do")
            return
        else:
            manifest = old
            print(f"{out}: continuing an interrupted precompute at metadata row {old['next_row']}")
    out.mkdir(parents=True, exist_ok=True)
    conditioner = load_conditioner(args, device, dtype)

    skipped = [s for s in manifest["skipped"] if s.get("row", -1) < manifest["next_row"]]
    skipped += [b for b in bad_lines if b not in skipped]
    writer = ShardWriter(out, manifest, args.shard_size, DTYPES[args.store_dtype])
    dataset = ImageFolder(data, rows, args.resolution, args.flip, args.seed, start=manifest["next_row"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=list)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(rows), initial=manifest["next_row"], desc="encode", unit="img", dynamic_ncols=True)
    with torch.no_grad():
        for items in loader:
            good = [item for item in items if "image" in item]
            for item in items:
                if "error" in item:
                    skipped.append({"row": item["row"], "file_name": item["file_name"], "reason": item["error"]})
                    (progress.write if progress else print)(f"skipped {item['file_name']}: {item['error']}")
            manifest["skipped"] = skipped
            if good:
                images = torch.stack([item["image"] for item in good]).to(device, dtype)
                latents = ae.encode(images)  # (B, 16, R/f, R/f), normalized: scale·(mean − shift)
                text = conditioner([item["text"] for item in good], device=device, dtype=torch.float32)
                context, pooled = (text["txt"], text["vec"]) if family == "flux" else (text["context"], text["pooled"])
                if not manifest.get("latent_shape"):
                    manifest["latent_shape"] = list(latents.shape[1:])
                    manifest["context_shape"], manifest["pooled_dim"] = list(context.shape[1:]), pooled.shape[-1]
                writer.add(latents, context, pooled, [item["row"] for item in good])
            if progress:
                progress.update(len(items))
    writer.flush()
    if progress:
        progress.close()
    manifest["next_row"], manifest["skipped"], manifest["complete"] = len(rows), skipped, True
    if manifest["num_samples"] == 0:
        raise vae.UserError(f"{data}: no readable image among {len(rows)} metadata rows; nothing was written")
    vae.write_json(path, manifest)
    print(f"encoded {manifest['num_samples']} samples into {len(manifest['shards'])} shard(s) in {out}; "
          f"skipped {len(skipped)} unreadable or bad entries" + (" (listed in manifest.json)" if skipped else ""))


# ---------------------------------------------------------------------------------------------------------
# The objective (Sec. 4.2, Eq. 10)


@dataclass
class Objective:
    loss: str = "wlf"  # "wlf": wavelet loss in x0 space (the authors'); "mse": velocity MSE
    band_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # (LL, LH, HL, HH)
    levels: int = 1
    timesteps: str = "uniform"  # or "logit-normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # t ← shift·t / (1 + (shift − 1)·t), SD3's resolution shift; 1 = none


def sample_noise(objective: Objective, shape: tuple[int, ...], seed: int, position: int) -> tuple[Tensor, Tensor]:
    """t (scalar) and ε (shape) for the sample at `position` of the stream, on the CPU in fp32: the same on
    any device, world size and gradient-accumulation split."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + position) % (2**63))
    if objective.timesteps == "uniform":
        t = torch.rand((), generator=generator)
    elif objective.timesteps == "logit-normal":  # SD3's sampling: sigmoid(N(m, s²)) favours the middle
        t = torch.sigmoid(objective.logit_mean + objective.logit_std * torch.randn((), generator=generator))
    else:
        raise ValueError(f"unknown timestep sampling {objective.timesteps!r}")
    if objective.shift != 1.0:
        t = objective.shift * t / (1 + (objective.shift - 1) * t)
    return t, torch.randn(shape, generator=generator)


def training_loss(velocity, x0: Tensor, noise: Tensor, t: Tensor, objective: Objective) -> Tensor:
    """The rectified-flow loss of one batch. velocity(x_t, t) -> v (same shape as x0); x0, noise (B, C, h, w),
    t (B,) in [0, 1]. The loss is computed in x0's dtype (fp32 in training) whatever the model's dtype."""
    t_ = t.view(-1, *[1] * (x0.ndim - 1))
    x_t = (1 - t_) * x0 + t_ * noise
    v = velocity(x_t, t).to(x0.dtype)
    if objective.loss == "mse":
        return F.mse_loss(v, noise - x0)
    if objective.loss == "wlf":  # Eq. 10 on x̂0 = x_t − t·v, as the authors' code compares
        x0_hat = x_t - t_ * v
        return wavelet.wlf_loss(x0_hat, x0, objective.band_weights, objective.levels)
    raise ValueError(f"unknown loss {objective.loss!r}")


# ---------------------------------------------------------------------------------------------------------
# The transformer: Flux takes packed latents, ids, t in [0, 1] and (dev) guidance; SD3 latents and t·1000


def family_of(model: nn.Module) -> str:
    return "flux" if isinstance(model, mmdit.Flux) else "sd3"


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the units of FSDP sharding and of activation checkpointing."""
    return model.blocks()


def velocity_fn(model: nn.Module, context: Tensor, pooled: Tensor, guidance: float):
    """velocity(x_t (B, 16, h, w), t (B,)) -> v (B, 16, h, w) for either architecture. The models cast their
    inputs to their weights' dtype themselves; t stays fp32 into the sinusoidal embedding, and the Flux
    position ids stay fp32 as in the official pipeline."""
    if isinstance(model, mmdit.Flux):
        def velocity(x_t: Tensor, t: Tensor) -> Tensor:
            B, _, h, w = x_t.shape
            g = torch.full((B,), guidance, device=x_t.device) if model.params.guidance_embed else None
            out = model(img=mmdit.pack(x_t), img_ids=mmdit.flux_img_ids(h, w, B, x_t.device), txt=context,
                        txt_ids=mmdit.flux_txt_ids(context.shape[1], B, x_t.device), timesteps=t, y=pooled, guidance=g)
            return mmdit.unpack(out, h, w)
    else:
        def velocity(x_t: Tensor, t: Tensor) -> Tensor:
            return model(x_t, t * 1000, y=pooled, context=context)  # SD3 takes t = σ·1000
    return velocity


def tokens_per_sample(family: str, latent_hw: tuple[int, int], text_tokens: int, patch: int = 2) -> int:
    """Sequence length through the blocks: image tokens (2×2 latent patches) + text tokens."""
    return (latent_hw[0] // patch) * (latent_hw[1] // patch) + text_tokens


def train_flops_per_sample(params, latent_hw: tuple[int, int], text_tokens: int) -> float:
    """Model FLOPs of one sample's forward + backward (3 × forward; the recomputation of checkpointing is not
    counted, as MFU conventionally does). The forward is counted by torch's FlopCounterMode on a meta-device
    copy: exact for this implementation (each stream's weights see only its own tokens, attention is L²)."""
    from torch.utils.flop_counter import FlopCounterMode

    flux = isinstance(params, mmdit.FluxParams)
    with torch.device("meta"):
        model = (mmdit.Flux if flux else mmdit.MMDiT)(params).to(torch.bfloat16)
    context = torch.empty(1, text_tokens, params.context_in_dim, device="meta")
    pooled = torch.empty(1, params.vec_in_dim if flux else params.adm_in_channels, device="meta")
    x0, t = torch.empty(1, 16, *latent_hw, device="meta"), torch.empty(1, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        velocity_fn(model, context, pooled, 1.0)(x0, t)
    return 3.0 * counter.get_total_flops()


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs (for the MFU estimate); None when unknown (then no MFU is printed)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0), ("B200", 2250.0),
                       ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("4090", 165.0)):
        if key in name:
            return value
    return None


# ---------------------------------------------------------------------------------------------------------
# Distributed set-up, FSDP2 and activation checkpointing


def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a 1-rank group, so the same code
    (FSDP2 included) runs as a plain `python train_wlf.py train ...`."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_arg:
        device = torch.device(device_arg)
    else:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=30)  # saving 12B parameters of optimizer state takes a while
        if launched:
            dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def load_model(path: str, device: torch.device, precision: str, activation_checkpointing: bool,
               rank: int) -> nn.Module:
    """Build the transformer on the meta device on every rank, shard it with FSDP2, then fill the shards from
    the checkpoint that rank 0 alone reads (broadcast): host memory holds one copy of the weights, not one per
    GPU, and the fp32 master shards are filled straight from the file's bf16 tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    payload = [None]
    loaded = None
    if rank == 0:
        try:
            loaded = mmdit.load_transformer(path, device="cpu")
            payload = [(type(loaded).__name__, loaded.params)]
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            payload = [("error", f"cannot load the transformer from {path}: {e}")]
    dist.broadcast_object_list(payload, src=0)
    kind, params = payload[0]
    if kind == "error":
        raise vae.UserError(params)
    with torch.device("meta"):
        model = getattr(mmdit, kind)(params)
    # Each block runs under torch.utils.checkpoint (non-reentrant) inside the model's forward; FSDP's hooks on
    # the block fire again in the recompute, so its parameters are gathered for it.
    model.gradient_checkpointing = activation_checkpointing

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # Parameters stay fp32 (sharded); each block's are gathered in the compute dtype just before use and its
    # gradients are reduce-scattered in fp32. FSDP does not cast inputs: the models cast activations to their
    # weights' dtype themselves, and RoPE's fp32 frequencies must reach the blocks as fp32.
    param_dtype = None if precision == "fp32" else DTYPES[precision]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the rest: embedders, final layer

    model.to_empty(device=device)
    full = loaded.state_dict() if rank == 0 else {}  # file dtype (bf16): copied into the fp32 shards
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers outside the state dict (none in the official models, but cheap to be sure) come from rank 0.
    for name, buffer in model.named_buffers():
        module_name, _, buffer_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        if buffer_name in module._non_persistent_buffers_set:
            if rank == 0:
                buffer.copy_(loaded.get_buffer(name))
            dist.broadcast(buffer, src=0)
    del loaded, full
    return model


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: sharded (torch.distributed.checkpoint), written to a temporary folder and renamed when whole


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first: only a whole checkpoint is ever renamed to step-NNNNNNNN."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(run: Path, model: nn.Module, optimizer, step: int, position: int, keep: int,
                    extra: dict) -> Path:
    """Every rank writes its shards of the model and the optimizer state plus its RNG state into
    checkpoints/.step-N.tmp; when all are done rank 0 adds meta.json and renames the folder to step-N, then
    deletes all but the newest `keep`. A crash at any point leaves the previous checkpoints untouched."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank()
    final = run / "checkpoints" / f"step-{step:08d}"
    tmp = run / "checkpoints" / f".step-{step:08d}.tmp"
    if (final / "meta.json").is_file():  # this very state is saved already (a resumed, finished run)
        return final
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash during an earlier save
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng-rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        meta = {"step": step, "position": position, "world_size": dist.get_world_size(), **extra}
        vae.write_json(tmp / "meta.json", meta)
        if final.exists():  # an incomplete folder of that name (no meta.json) cannot be resumed from anyway
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(folder: Path, model: nn.Module, optimizer) -> dict:
    """Restore model, optimizer and (same world size) this rank's RNG state; returns meta.json. Resharding is
    DCP's job, so the world size may differ from the saving run's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = json.loads((folder / "meta.json").read_text())
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = folder / f"rng-rank{dist.get_rank():05d}.pt"
    if meta.get("world_size") == dist.get_world_size() and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return meta


# ---------------------------------------------------------------------------------------------------------
# Export: one official-layout safetensors file (what load_transformer and sample.py read)

def export_state_dict(state: dict[str, Tensor], params, path: Path, dtype: torch.dtype) -> None:
    """Write a full state dict as one official-layout safetensors file through mmdit.save_transformer (atomic;
    the config hints that shapes cannot tell, like Flux's RoPE split, go into its metadata)."""
    with torch.device("meta"):
        model = (mmdit.Flux if isinstance(params, mmdit.FluxParams) else mmdit.MMDiT)(params)
    model.load_state_dict({k: v.to("cpu", dtype) for k, v in state.items()}, assign=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    mmdit.save_transformer(model, str(path))


def export_model(model: nn.Module, path: Path, dtype: torch.dtype) -> None:
    """Gather the full state dict (tensor by tensor, onto rank 0's CPU) and write it on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        export_state_dict(state, model.params, path, dtype)
    dist.barrier()


# ---------------------------------------------------------------------------------------------------------
# --dry-run: the per-GPU memory plan


class _FlashLikeAttention(torch.autograd.Function):
    """Stands in for SDPA while probing on the meta device: it keeps for backward what the flash / cuDNN
    kernels keep on a GPU (q, k, v, the output and an fp32 log-sum-exp per query), not the L×L score
    matrix that the math fallback (the only one meta tensors get) would keep."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def probe_activations(model: nn.Module, latent_shape: tuple[int, ...], text_tokens: int, pooled_dim: int,
                      context_dim: int, dtype: torch.dtype) -> dict:
    """Run one training forward of `model` (built on the meta device: shapes only, no memory, no FLOPs) and
    record what autograd saves for the backward pass, per transformer block and outside the blocks, plus each
    block's inputs (what activation checkpointing keeps). Tensors saved twice or as views count once."""
    blocks = transformer_blocks(model)
    params = {id(p) for p in model.parameters()}
    saved: dict[int, dict[int, int]] = {}  # scope (block index, −1 = outside) -> {id(storage base): bytes}
    largest: dict[int, int] = {}
    inputs: dict[int, int] = {}  # id(tensor) -> bytes, unique over all blocks
    block_inputs: dict[int, int] = {}  # block index -> bytes of its inputs
    scope = [-1]
    keep_alive = []  # ids are only unique among live objects

    def nbytes(t: Tensor) -> int:
        return t.numel() * t.element_size()

    def pack(t: Tensor):
        if id(t) not in params and not isinstance(t, nn.Parameter):
            base = t if t._base is None else t._base
            keep_alive.append(base)
            saved.setdefault(scope[0], {})[id(base)] = nbytes(base)
            largest[scope[0]] = max(largest.get(scope[0], 0), nbytes(base))
        return t

    def enter(index):
        def hook(module, args, kwargs):
            scope[0] = index
            for value in [*args, *kwargs.values()]:
                if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):  # RoPE: complex
                    keep_alive.append(value)
                    inputs[id(value)] = nbytes(value)
                    block_inputs[index] = block_inputs.get(index, 0) + nbytes(value)
        return hook

    def leave(module, args, kwargs, output):
        scope[0] = -1

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(i), with_kwargs=True))
        handles.append(block.register_forward_hook(leave, with_kwargs=True))
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: _FlashLikeAttention.apply(q, k, v)
    try:
        B = latent_shape[0]
        x0 = torch.empty(latent_shape, device="meta")
        context = torch.empty(B, text_tokens, context_dim, device="meta", dtype=dtype)
        pooled = torch.empty(B, pooled_dim, device="meta", dtype=dtype)
        t = torch.empty(B, device="meta")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            training_loss(velocity_fn(model, context, pooled, 3.5), x0, torch.empty_like(x0), t,
                          Objective(loss="wlf"))
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()
    per_block = [sum(saved.get(i, {}).values()) for i in range(len(blocks))]
    return {"block_saved": per_block, "block_largest": [largest.get(i, 0) for i in range(len(blocks))],
            "block_input": [block_inputs.get(i, 0) for i in range(len(blocks))],
            "outside_saved": sum(saved.get(-1, {}).values()), "block_inputs": sum(inputs.values())}


GiB = 1024**3
_PROBES: dict[tuple, dict] = {}


def memory_plan(params, *, latent_hw: tuple[int, int], text_tokens: int, batch: int, world_size: int,
                gpu_gib: float, precision: str = "bf16", activation_checkpointing: bool = True) -> dict:
    """The per-GPU memory of a training step with FSDP2 + AdamW + activation checkpointing.

    Parameters, gradients and AdamW's two moments are fp32 and sharded 1/world_size. FSDP gathers one block's
    parameters in the compute dtype at a time (plus one prefetched); in backward a block's unsharded gradient
    exists in the compute dtype and in fp32 for the reduce-scatter. Activations are measured, not guessed:
    `probe_activations` runs this implementation's forward on the meta device and sums what autograd keeps.
    The peak is in the backward pass; the optimizer step's temporaries (≈ one fp32 copy of the shard) come when
    the activations are gone. Returns {"rows": [(label, bytes)], "allocated": bytes the allocator hands out
    (what torch.cuda.max_memory_allocated reports), "total", "fits", "header"}."""
    dtype = DTYPES[precision]
    kind = mmdit.Flux if isinstance(params, mmdit.FluxParams) else mmdit.MMDiT
    with torch.device("meta"):
        model = kind(params).to(dtype)
    family = family_of(model)
    blocks = transformer_blocks(model)
    n = sum(p.numel() for p in model.parameters())
    block_n = [sum(p.numel() for p in b.parameters()) for b in blocks]
    other_n = n - sum(block_n)
    context_dim = model.txt_in.in_features if family == "flux" else model.context_embedder.in_features
    pooled_dim = model.vector_in.in_layer.in_features if family == "flux" else model.y_embedder.mlp[0].in_features
    key = (repr(params), latent_hw, text_tokens, batch, precision)
    if key not in _PROBES:  # a few seconds for 57 blocks on the meta device; plans often differ in world size only
        _PROBES[key] = probe_activations(model, (batch, 16, *latent_hw), text_tokens, pooled_dim, context_dim, dtype)
    probe = _PROBES[key]

    c = dtype.itemsize
    rows = [
        ("parameters, fp32, sharded", 4 * n / world_size),
        ("gradients, fp32, sharded", 4 * n / world_size),
        ("AdamW moments m and v, fp32, sharded", 8 * n / world_size),
        (f"gathered parameters: 2 blocks ({precision}) + non-block layers", c * (2 * max(block_n) + other_n)),
        (f"unsharded gradients of 1 block ({precision} + fp32 for reduce-scatter)", (c + 4) * max(block_n)),
    ]
    # In a block's backward: its recomputed activations, plus gradient buffers: the incoming and outgoing
    # activation gradients (≈ 2 × the block's inputs) and about two of its largest intermediates.
    transients = [2 * probe["block_input"][i] + 2 * probe["block_largest"][i] for i in range(len(blocks))]
    worst = max(range(len(blocks)), key=lambda i: probe["block_saved"][i] + transients[i])
    if activation_checkpointing:
        rows += [
            (f"checkpointed block inputs ({len(blocks)} blocks)", probe["block_inputs"]),
            (f"block {worst} recomputed in backward (the worst)", probe["block_saved"][worst]),
        ]
    else:
        rows += [(f"activations of all {len(blocks)} blocks (no checkpointing)", sum(probe["block_saved"]))]
    rows += [
        ("activations outside the blocks (embedders, final layer, loss)", probe["outside_saved"]),
        ("backward transients (activation gradients)", transients[worst]),
    ]
    allocated = sum(b for _, b in rows)
    rows += [("allocator fragmentation, assumed +10%", 0.10 * allocated),
             ("CUDA context, NCCL buffers, assumed", 2.5 * GiB)]
    total = sum(b for _, b in rows)
    tokens = tokens_per_sample(family, latent_hw, text_tokens)
    header = (f"Memory plan per GPU: {n / 1e9:.2f} B parameters ({len(blocks)} blocks), latents 16×{latent_hw[0]}×"
              f"{latent_hw[1]} → {tokens - text_tokens} image + {text_tokens} text tokens, batch {batch} per GPU × "
              f"{world_size} GPUs, {precision} compute, FSDP2, activation checkpointing "
              f"{'on' if activation_checkpointing else 'off'}")
    return {"rows": rows, "allocated": allocated, "total": total, "fits": total <= gpu_gib * GiB,
            "gpu_gib": gpu_gib, "header": header, "parameters": n}


def format_plan(plan: dict) -> str:
    lines = [plan["header"]] + [f"  {label:<72} {value / GiB:8.2f} GiB" for label, value in plan["rows"]]
    total, gpu = plan["total"] / GiB, plan["gpu_gib"]
    verdict = f"fits ({gpu - total:.1f} GiB headroom)" if plan["fits"] else f"does NOT fit (short by {total - gpu:.1f} GiB)"
    lines.append(f"  {'total':<72} {total:8.2f} GiB of {gpu:g} GiB -> {verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Training


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def train(args) -> None:
    # Our output is reshaped, not modified in place, so FSDP's pre-backward hook on it stays intact.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    rank, world, device = setup_distributed(args.device)
    run = Path(args.out)
    shards = LatentShards(args.shards, args.max_samples)
    m = shards.manifest
    objective = Objective(args.loss, tuple(args.band_weights), args.wavelet_levels, args.timesteps,
                          args.logit_mean, args.logit_std, args.shift)
    global_batch = args.batch_size * args.grad_accum * world
    resume = None
    if args.resume is not None:
        found = list_checkpoints(run)
        if args.resume != "latest":
            resume = Path(args.resume)
            if not (resume / "meta.json").is_file():
                raise vae.UserError(f"--resume {resume}: not a complete checkpoint (no meta.json)")
        elif found:
            resume = found[-1]
        else:
            _log(rank, f"--resume: no checkpoint under {run / 'checkpoints'} yet; starting from {args.transformer}")

    model = load_model(args.transformer, device, args.precision, not args.no_activation_checkpointing, rank)
    family = family_of(model)
    if m["family"] != family:
        raise vae.UserError(f"{args.shards} was encoded for {m['family']} but {args.transformer} is a {family} "
                        "transformer; precompute the shards with the matching --model")
    p = model.params
    wanted = (p.context_in_dim, p.vec_in_dim if family == "flux" else p.adm_in_channels,
              p.in_channels // 4 if family == "flux" else p.in_channels)
    got = (m["context_shape"][-1], m["pooled_dim"], m["latent_shape"][0])
    if wanted != got:
        raise vae.UserError(f"{args.shards} holds (text width, pooled width, latent channels) = {got} but the transformer "
                        f"expects {wanted}: precompute with this model's text encoders and autoencoder")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2),
                                  weight_decay=args.weight_decay, eps=1e-8)
    step, position, saved_step = 0, 0, None
    if resume is not None:
        meta = load_checkpoint(resume, model, optimizer)
        step, position, saved_step = meta["step"], meta["position"], meta["step"]
        _log(rank, f"resumed from {resume} (step {step}, sample position {position})")
        if meta.get("global_batch") != global_batch:
            _log(rank, f"note: global batch {global_batch} differs from the checkpoint's {meta.get('global_batch')}; "
                       "the data continue from the saved sample position")

    stream = SampleStream(len(shards), args.seed)
    latent_hw = tuple(m["latent_shape"][-2:])
    tokens = tokens_per_sample(family, latent_hw, m["context_shape"][0])
    flops = train_flops_per_sample(model.params, latent_hw, m["context_shape"][0]) if rank == 0 else 0.0
    peak = args.peak_tflops or peak_tflops(device)
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        vae.write_json(run / "args.json", vars(args))
        n = sum(p.numel() for p in model.parameters())  # DTensors: global sizes
        print(f"{family} transformer, {n / 1e6:,.1f} M parameters; {len(shards)} samples; {world} rank(s) × batch "
              f"{args.batch_size} × accumulation {args.grad_accum} = global batch {global_batch}; {tokens} tokens "
              f"per sample; loss {objective.loss}; {args.precision} on {device.type}", flush=True)
    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True)
    log_file = open(run / "log.jsonl", "a") if rank == 0 else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    tic, window_steps = time.perf_counter(), 0
    while step < args.steps:
        lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            # This rank's samples: positions first + j of the stream, the noise keyed by the same positions.
            first = position + (micro * world + rank) * args.batch_size
            batch = shards.get([stream[first + j] for j in range(args.batch_size)])
            x0 = batch["latents"].to(device, torch.float32)
            draws = [sample_noise(objective, tuple(x0.shape[1:]), args.seed, first + j) for j in range(args.batch_size)]
            t = torch.stack([d[0] for d in draws]).to(device)
            noise = torch.stack([d[1] for d in draws]).to(device)
            velocity = velocity_fn(model, batch["context"].to(device), batch["pooled"].to(device), args.guidance)
            loss = training_loss(velocity, x0, noise, t, objective)
            # FSDP averages gradients over ranks; dividing by the accumulation steps makes it the global mean.
            (loss / args.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        position += global_batch
        window_steps += 1

        if step % args.log_every == 0 or step == args.steps:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            loss_value = loss_sum.item() / (args.grad_accum * world)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            elapsed = time.perf_counter() - tic
            images = window_steps * global_batch / elapsed
            record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(),
                      "images_per_s": images, "tokens_per_s": images * tokens}
            if peak:
                record["mfu"] = images * flops / world / (peak * 1e12)
            if device.type == "cuda":
                record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / GiB
            if rank == 0:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                text = (f"step {step} loss {loss_value:.5f} lr {lr:.2e} grad-norm {record['grad_norm']:.3f} "
                        f"{images:.2f} img/s {images * tokens:,.0f} tok/s")
                text += f" MFU {record['mfu']:.1%}" if "mfu" in record else ""
                text += f" peak {record['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in record else ""
                (progress.write if progress else print)(text)
            tic, window_steps = time.perf_counter(), 0
        if progress:
            progress.update(1)
        periodic = args.checkpoint_every and step % args.checkpoint_every == 0
        stopping = args.stop_after is not None and step >= args.stop_after
        if (periodic or stopping) and step < args.steps:
            path = save_checkpoint(run, model, optimizer, step, position, args.keep_checkpoints,
                                   {"global_batch": global_batch, "shards": str(args.shards)})
            saved_step = step
            _log(rank, f"saved {path}")
            tic = time.perf_counter()  # saving is not training throughput
        if stopping and step < args.steps:
            _log(rank, f"stopped after step {step} (--stop-after); continue with the same command and --resume")
            break
    if progress:
        progress.close()
    if step >= args.steps:
        if args.checkpoint_every and saved_step != step:
            save_checkpoint(run, model, optimizer, step, position, args.keep_checkpoints,
                            {"global_batch": global_batch, "shards": str(args.shards)})
        out = run / (args.export_name or ("transformer.safetensors"))
        export_model(model, out, DTYPES[args.export_dtype])
        _log(rank, f"exported {out} ({args.export_dtype}, official {family} layout)")
    if log_file:
        log_file.close()


def export_checkpoint(args) -> None:
    """`export`: one sharded checkpoint -> one official-layout safetensors file, in a single process."""
    import torch.distributed.checkpoint as dcp

    folder = Path(args.checkpoint)
    if not (folder / "meta.json").is_file():
        raise vae.UserError(f"{folder}: not a complete checkpoint (no meta.json)")
    try:
        model = mmdit.load_transformer(args.transformer, device="cpu", dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise vae.UserError(f"cannot load the transformer from {args.transformer}: {e}") from None
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)  # reassembles the shards of any world size
    export_state_dict(state["model"], model.params, Path(args.out), DTYPES[args.dtype])
    print(f"exported {args.out} ({args.dtype}, official {family_of(model)} layout) from {folder}")


def dry_run(args) -> None:
    if args.shards:
        m = LatentShards(args.shards).manifest
        latent_hw, text_tokens = tuple(m["latent_shape"][-2:]), m["context_shape"][0]
        name = args.model or m["model"]
    else:
        if not args.model:
            raise vae.UserError("--dry-run needs --model NAME (or --shards) to know the architecture")
        name = args.model
        factor = 16 if args.f16 else 8
        if args.resolution % (2 * factor):
            raise vae.UserError(f"--resolution must be a multiple of {2 * factor} with the F{factor} autoencoder")
        latent_hw = (args.resolution // factor, args.resolution // factor)
        text_tokens = args.text_tokens or default_text_tokens(name)
    if name not in mmdit.CONFIGS:
        raise vae.UserError(f"unknown --model {name!r}; choose one of {', '.join(sorted(mmdit.CONFIGS))}")
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    plan = memory_plan(mmdit.CONFIGS[name], latent_hw=latent_hw, text_tokens=text_tokens, batch=args.batch_size,
                       world_size=world, gpu_gib=args.gpu_memory, precision=args.precision,
                       activation_checkpointing=not args.no_activation_checkpointing)
    print(f"{name}: {format_plan(plan)}")


def default_text_tokens(model_name: str) -> int:
    """Context length through the transformer, as `precompute` encodes by default: T5 tokens for Flux (512 dev,
    256 schnell); SD3: 77 CLIP + 256 T5 tokens (diffusers' length)."""
    if model_name.startswith("flux"):
        return 256 if "schnell" in model_name else 512
    return 77 + 256


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _band_weights(text: str) -> list[float]:
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if len(weights) != 4:
        raise argparse.ArgumentTypeError("give 4 comma-separated numbers w_LL,w_LH,w_HL,w_HH, e.g. 1,1,1,1")
    return weights


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__[: __doc__.index("The objective")].rstrip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{precompute,train,export}")

    p = commands.add_parser("precompute", help="encode images and prompts once into latent shards")
    p.add_argument("--data", required=True, help="image folder with metadata.jsonl ({\"file_name\", \"text\"} lines)")
    p.add_argument("--out", required=True, help="folder for the shards and manifest.json")
    p.add_argument("--model", required=True, help="flux-dev, flux-schnell, sd3-medium, sd3.5-medium, sd3.5-large: "
                   "decides the prompt encoding (Flux: CLIP-L + T5; SD3: CLIP-L + CLIP-G + T5)")
    p.add_argument("--weights", help="a diffusers snapshot (FLUX.1-dev, stable-diffusion-3-medium-diffusers, ...): "
                   "text_encoder*/ + tokenizer*/ (and vae/ unless --vae); the flags below override its parts")
    p.add_argument("--vae", help="autoencoder: ae.safetensors, an SD3 checkpoint, a diffusers vae/ folder, or the "
                   "authors' SC-VAE (F16) weights")
    p.add_argument("--f16", action="store_true", help="run the autoencoder as F16 (stride-2 first conv, "
                   "Diffusion-4K's SC-VAE): 4096² -> 256² latents; default: F8 unless the file says F16")
    p.add_argument("--clip-l", help="CLIP-L text encoder (transformers folder or safetensors file)")
    p.add_argument("--clip-g", help="CLIP-G text encoder with projection (SD3 only)")
    p.add_argument("--t5", help="T5-XXL v1.1 encoder (transformers folder or safetensors file)")
    p.add_argument("--clip-l-tokenizer", help="CLIP-L tokenizer folder (default: the --clip-l folder)")
    p.add_argument("--clip-g-tokenizer", help="CLIP-G tokenizer folder (default: the --clip-g folder)")
    p.add_argument("--t5-tokenizer", help="T5 tokenizer folder (default: the --t5 folder)")
    p.add_argument("--t5-tokens", type=int, help="T5 sequence length (default: 512 flux-dev, 256 flux-schnell and "
                   "SD3, as in sampling; the authors trained Flux with 77)")
    p.add_argument("--resolution", type=int, default=4096, help="square crop size after resizing the shorter side")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and flips")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per VAE call")
    p.add_argument("--workers", type=int, default=4, help="image decoding processes")
    p.add_argument("--shard-size", type=positive_int, default=256, help="samples per shard file")
    p.add_argument("--store-dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the stored tensors")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="encoder compute dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", help="default cuda if available")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards made with other settings")
    p.add_argument("--no-progress", action="store_true")

    t = commands.add_parser("train", help="fine-tune the transformer on the shards (torchrun for several GPUs)")
    t.add_argument("--shards", help="folder written by `precompute`")
    t.add_argument("--transformer", help="transformer weights: flux1-dev.safetensors, sd3 checkpoint, diffusers folder")
    t.add_argument("--out", help="run folder: checkpoints/, log.jsonl, args.json, transformer.safetensors")
    t.add_argument("--steps", type=positive_int, default=20000, help="optimizer steps (the authors: 20k)")
    t.add_argument("--batch-size", type=positive_int, default=4, help="samples per GPU per micro-step (the authors: 4)")
    t.add_argument("--grad-accum", type=positive_int, default=1, help="micro-steps per optimizer step")
    t.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (the paper: 1e-6, constant)")
    t.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (the paper: 1e-4)")
    t.add_argument("--beta1", type=float, default=0.9)
    t.add_argument("--beta2", type=float, default=0.999)
    t.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up, then constant")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    t.add_argument("--loss", choices=["wlf", "mse"], default="wlf",
                   help="wlf: Eq. 10 on x̂0 = x_t − t·v (the authors'); mse: plain velocity MSE")
    t.add_argument("--band-weights", type=_band_weights, default=[1.0, 1.0, 1.0, 1.0],
                   help="WLF weights w_LL,w_LH,w_HL,w_HH (default 1,1,1,1 = x0-space MSE)")
    t.add_argument("--wavelet-levels", type=positive_int, default=1)
    t.add_argument("--timesteps", choices=["uniform", "logit-normal"], default="uniform",
                   help="t sampling (the authors' Flux run: uniform)")
    t.add_argument("--logit-mean", type=float, default=0.0)
    t.add_argument("--logit-std", type=float, default=1.0)
    t.add_argument("--shift", type=float, default=1.0, help="t ← s·t/(1+(s−1)·t); 1 = no shift")
    t.add_argument("--guidance", type=float, default=3.5, help="Flux-dev's guidance input during training")
    t.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="compute dtype (parameters, gradients, optimizer state stay fp32)")
    t.add_argument("--no-activation-checkpointing", action="store_true")
    t.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (0: none)")
    t.add_argument("--keep-checkpoints", type=positive_int, default=2, help="how many recent checkpoints to keep")
    t.add_argument("--resume", nargs="?", const="latest", help="continue from a checkpoint folder, or (no value) "
                   "from the newest one under --out, if any")
    t.add_argument("--stop-after", type=int, help="save a checkpoint and exit after this step (job time limits)")
    t.add_argument("--export-dtype", choices=["bf16", "fp32"], default="bf16")
    t.add_argument("--export-name", help="file name of the final export (default transformer.safetensors)")
    t.add_argument("--max-samples", type=positive_int, help="use only the first N samples (e.g. overfit one batch)")
    t.add_argument("--seed", type=int, default=0, help="seed of the sample order, noise and timesteps")
    t.add_argument("--log-every", type=positive_int, default=10)
    t.add_argument("--peak-tflops", type=float, help="per-GPU peak for the MFU estimate (default: known GPUs)")
    t.add_argument("--device", help="default cuda:LOCAL_RANK if available, else cpu")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--dry-run", action="store_true", help="print the per-GPU memory plan and exit")
    t.add_argument("--model", help="--dry-run: config name (flux-dev, sd3-medium, ...)")
    t.add_argument("--resolution", type=int, default=4096, help="--dry-run: image size")
    t.add_argument("--f16", action="store_true", help="--dry-run: F16 autoencoder (default F8)")
    t.add_argument("--text-tokens", type=int, help="--dry-run: context length (default per model)")
    t.add_argument("--world-size", type=int, help="--dry-run: number of GPUs (default $WORLD_SIZE or 1)")
    t.add_argument("--gpu-memory", type=float, default=80, help="--dry-run: GiB per GPU")

    e = commands.add_parser("export", help="write one checkpoint as an official-layout safetensors file")
    e.add_argument("--checkpoint", required=True, help="checkpoints/step-NNNNNNNN folder of a run")
    e.add_argument("--transformer", required=True, help="the weights the run started from (gives the architecture)")
    e.add_argument("--out", required=True, help="output .safetensors file")
    e.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    return parser


def run_command(command, args) -> None:
    """command(args); a vae.UserError ends the process with its one-line message and status 2. The process group
    (torchrun's or the 1-rank one) is closed either way."""
    try:
        command(args)
    except vae.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _command(args) -> None:
    if args.command == "precompute":
        precompute(args)
    elif args.command == "export":
        export_checkpoint(args)
    elif args.dry_run:
        dry_run(args)
    else:
        missing = [f"--{n}" for n in ("shards", "transformer", "out") if getattr(args, n) is None]
        if missing:
            raise vae.UserError(f"train needs {', '.join(missing)} (or --dry-run)")
        train(args)


def main(argv: list[str] | None = None) -> None:
    run_command(_command, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
