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
from a generator seeded by (seed, position in the sample stream); nothing draws from a global RNG. The run
therefore depends on the global batch, not on how it is split over GPUs and accumulation steps, and
resuming reproduces the same updates.

Differences from the authors' release: the crop and flip are drawn once, when the latents are encoded (they
re-crop every epoch), the price of encoding once; prompts get as many T5 tokens as the samplers give them
(512 flux-dev, 256 otherwise; they trained Flux with 77).

From the other scripts: `metrics.load_image`, the project's one image reader (EXIF orientation, alpha
dropped, 16-bit high byte), so that training sees an image as the metrics do; vae's `UserError`,
`atomic_write` and `write_json`, shared by all scripts.
"""
import argparse
import bisect
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

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import metrics
import mmdit
import text_encoders
import vae
import wavelet

SHARD_FORMAT = "diffusion4k-wlf-shards"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GiB = 1024**3


# =========================================================================================================
# The method: rectified flow with the wavelet loss (Sec. 4.2, Eq. 10)


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


def velocity_fn(model: nn.Module, context: Tensor, pooled: Tensor, guidance: float):
    """velocity(x_t (B, 16, h, w), t (B,)) -> v (B, 16, h, w) for either architecture: Flux takes packed
    latents, position ids, t in [0, 1] and (dev) guidance; SD3 latents and t·1000. The models cast their
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


# =========================================================================================================
# Training: FSDP2 per block then the root, activation checkpointing, AdamW, clipping, accumulation


def train(args) -> None:
    # Our output is reshaped, not modified in place, so FSDP's pre-backward hook on it stays intact.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    rank, world, device = setup_distributed(args.device)
    run, shards = Path(args.out), LatentShards(args.shards, args.max_samples)
    objective = Objective(args.loss, tuple(args.band_weights), args.wavelet_levels, args.timesteps,
                          args.logit_mean, args.logit_std, args.shift)
    global_batch = args.batch_size * args.grad_accum * world
    resume = find_resume(args, run, rank)

    model, full_state = build_on_meta(args.transformer, rank)  # rank 0 alone reads the file
    shards.check_fits(model, args.transformer)
    # Each block runs under torch.utils.checkpoint (non-reentrant) inside the model's forward; FSDP's hooks on
    # the block fire again in the recompute, so its parameters are gathered for it.
    model.gradient_checkpointing = not args.no_activation_checkpointing
    # Parameters stay fp32 (sharded); each block's are gathered in the compute dtype just before use and its
    # gradients are reduce-scattered in fp32. FSDP does not cast inputs: the models cast activations to their
    # weights' dtype themselves, and RoPE's fp32 frequencies must reach the blocks as fp32.
    policy = MixedPrecisionPolicy(param_dtype=None if args.precision == "fp32" else DTYPES[args.precision],
                                  reduce_dtype=torch.float32, cast_forward_inputs=False)
    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks():
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the rest: embedders, final layer
    model.to_empty(device=device)
    # Rank 0's tensors (the file's dtype) are broadcast and copied into every rank's fp32 shards.
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full_state  # a whole copy of the weights in rank 0's host memory
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2),
                                  weight_decay=args.weight_decay, eps=1e-8)
    step, position = 0, 0
    if resume is not None:
        meta = load_checkpoint(resume, model, optimizer)
        step, position = meta["step"], meta["position"]
        _log(rank, f"resumed from {resume} (step {step}, sample position {position})")
        if meta.get("global_batch") != global_batch:
            _log(rank, f"note: global batch {global_batch} differs from the checkpoint's {meta.get('global_batch')}; "
                       "the data continue from the saved sample position")

    stream = SampleStream(len(shards), args.seed)
    latent_hw, text_tokens = tuple(shards.manifest["latent_shape"][-2:]), shards.manifest["context_shape"][0]
    tokens = tokens_per_sample(latent_hw, text_tokens)
    flops = train_flops_per_sample(model.params, latent_hw, text_tokens) if rank == 0 else 0.0
    peak = args.peak_tflops or gpu_peak_tflops(device)
    log_file = progress = None
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        vae.write_json(run / "args.json", vars(args))
        log_file = open(run / "log.jsonl", "a")
        n = sum(p.numel() for p in model.parameters())  # DTensors: global sizes
        print(f"{family_of(model)} transformer, {n / 1e6:,.1f} M parameters; {len(shards)} samples; {world} rank(s) × "
              f"batch {args.batch_size} × accumulation {args.grad_accum} = global batch {global_batch}; {tokens} "
              f"tokens per sample; loss {objective.loss}; {args.precision} on {device.type}", flush=True)
        if not args.no_progress:
            progress = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    tic, since = time.perf_counter(), step  # the throughput window
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

        if step % args.log_every == 0 or step == args.steps:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor
            images = (step - since) * global_batch / (time.perf_counter() - tic)
            record = {"step": step, "loss": loss_sum.item() / (args.grad_accum * world), "lr": lr,
                      "grad_norm": grad_norm.item(), "images_per_s": images, "tokens_per_s": images * tokens}
            if peak:
                record["mfu"] = images * flops / world / (peak * 1e12)
            if device.type == "cuda":
                record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / GiB
            if rank == 0:
                write_log(record, log_file, progress)
            tic, since = time.perf_counter(), step
        if progress:
            progress.update(1)
        stopping = args.stop_after is not None and args.stop_after <= step < args.steps
        if stopping or (args.checkpoint_every and (step % args.checkpoint_every == 0 or step == args.steps)):
            path = save_checkpoint(run, model, optimizer, step, position, args.keep_checkpoints,
                                   {"global_batch": global_batch, "shards": str(args.shards)})
            _log(rank, f"saved {path}")
            tic, since = time.perf_counter(), step  # saving is not training throughput
        if stopping:
            _log(rank, f"stopped after step {step} (--stop-after); continue with the same command and --resume")
            break
    if progress:
        progress.close()
    if step >= args.steps:
        out = run / (args.export_name or "transformer.safetensors")
        export_model(model, out, DTYPES[args.export_dtype])
        _log(rank, f"exported {out} ({args.export_dtype}, official {family_of(model)} layout)")
    if log_file:
        log_file.close()


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def write_log(record: dict, log_file, progress) -> None:
    """One JSON line in log.jsonl, one readable line on the console."""
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
    text = (f"step {record['step']} loss {record['loss']:.5f} lr {record['lr']:.2e} grad-norm "
            f"{record['grad_norm']:.3f} {record['images_per_s']:.2f} img/s {record['tokens_per_s']:,.0f} tok/s")
    text += f" MFU {record['mfu']:.1%}" if "mfu" in record else ""
    text += f" peak {record['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in record else ""
    (progress.write if progress else print)(text)


# =========================================================================================================
# Data: an image folder with metadata.jsonl lines {"file_name": ..., "text": ...} (the Aesthetic-4K format),
# encoded once into shard-NNNNN.safetensors {"latents", "context", "pooled", "row"} + manifest.json


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


def prepare_image(path: Path, resolution: int, rng: random.Random, flip: bool) -> Tensor:
    """metrics.load_image, then the shorter side resized to `resolution`, a random square crop and, when asked,
    a flip with probability ½; (3, resolution, resolution) in [−1, 1]."""
    image = Image.fromarray(metrics.load_image(path))
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)  # anti-aliased when shrinking 6K-8K originals
    left, top = rng.randint(0, size[0] - resolution), rng.randint(0, size[1] - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1


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
            image = prepare_image(self.folder / row["file_name"], self.resolution, random.Random(f"{self.seed}/{i}"),
                                  self.flip)
        # Missing, truncated, not an image (PIL's UnidentifiedImageError is an OSError), an unsupported mode
        # (ValueError), or more pixels than PIL agrees to decode.
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return {"row": i, "file_name": row["file_name"], "error": f"{type(e).__name__}: {e}".split("\n")[0]}
        return {"row": i, "text": row["text"], "image": image}


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


def default_t5_tokens(model: str) -> int:
    """512 for flux-dev, 256 for flux-schnell and SD3 (diffusers' length), as the samplers encode prompts."""
    return 512 if model == "flux-dev" else 256


def load_conditioner(args, t5_length: int, device: torch.device, dtype: torch.dtype):
    """FluxConditioner (CLIP-L + T5) or SD3Conditioner (CLIP-L + CLIP-G + T5) from --weights (a diffusers
    snapshot: text_encoder*/ and tokenizer*/) and/or the explicit --clip-l / --clip-g / --t5 paths."""
    flux = args.model.startswith("flux")
    # name: (--NAME, --NAME-tokenizer, the snapshot's encoder and tokenizer folders)
    parts = {"clip_l": (args.clip_l, args.clip_l_tokenizer, "text_encoder", "tokenizer"),
             "t5": (args.t5, args.t5_tokenizer, "text_encoder_2" if flux else "text_encoder_3",
                    "tokenizer_2" if flux else "tokenizer_3")}
    if not flux:
        parts["clip_g"] = (args.clip_g, args.clip_g_tokenizer, "text_encoder_2", "tokenizer_2")
    encoders, tokenizers = {}, {}
    for name, (encoder, tokenizer, encoder_dir, tokenizer_dir) in parts.items():
        if encoder is None and args.weights:
            encoder, tokenizer = str(Path(args.weights) / encoder_dir), tokenizer or str(Path(args.weights) / tokenizer_dir)
        # The tokenizer: explicit > the snapshot's tokenizer*/ folder > beside the encoder (folder or file).
        encoders[name], tokenizers[name] = encoder, tokenizer or encoder
    if missing := ["--" + name.replace("_", "-") for name, path in encoders.items() if path is None]:
        raise vae.UserError(f"precompute --model {args.model} needs {', '.join(missing)} (or --weights DIR, a "
                            "diffusers snapshot with text_encoder*/ and tokenizer*/ folders)")
    tokenizers = {name: Path(p) if Path(p).is_dir() else Path(p).parent for name, p in tokenizers.items()}
    try:
        clip_l = text_encoders.load_clip(encoders["clip_l"], device=device, dtype=dtype)
        t5 = text_encoders.load_t5(encoders["t5"], device=device, dtype=dtype)
        clip_l_tok = text_encoders.CLIPTokenizer(tokenizers["clip_l"], pad_token="<|endoftext|>")
        t5_tok = text_encoders.T5Tokenizer(tokenizers["t5"], max_length=t5_length)
        if flux:
            return text_encoders.FluxConditioner(clip_l, t5, clip_l_tok, t5_tok)
        clip_g = text_encoders.load_clip(encoders["clip_g"], device=device, dtype=dtype)
        clip_g_tok = text_encoders.CLIPTokenizer(tokenizers["clip_g"], pad_token=0)  # SD3's CLIP-G pads with id 0
        return text_encoders.SD3Conditioner(clip_l, clip_g, clip_l_tok, clip_g_tok, t5, t5_tok, t5_length=t5_length)
    except (OSError, ValueError) as e:
        raise vae.UserError(f"cannot load the text encoders: {e}") from None


def precompute(args) -> None:
    """`precompute`: encode every image of --data with the VAE and its prompt with the text encoders, into
    shards. Run again with the same settings, it continues an interrupted run."""
    check_model_name(args.model)
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
    check_resolution(args.resolution, ae.factor)
    t5_length = args.t5_tokens or default_t5_tokens(args.model)
    settings = {"model": args.model, "family": family, "data": str(data.resolve()), "rows": len(rows),
                "resolution": args.resolution, "flip": args.flip, "seed": args.seed, "vae": str(vae_path),
                "vae_factor": ae.factor, "vae_scale": ae.scale_factor, "vae_shift": ae.shift_factor,
                "text_encoders": [str(p) for p in (args.weights, args.clip_l, args.clip_g, args.t5) if p],
                "t5_tokens": t5_length, "store_dtype": args.store_dtype}
    manifest = {"format": SHARD_FORMAT, "version": 1, **settings, "complete": False, "shards": [], "num_samples": 0,
                "next_row": 0, "skipped": []}
    path = out / "manifest.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if args.overwrite:
            for f in out.glob("shard-*.safetensors"):
                f.unlink()
            path.unlink()
        elif any(old.get(k) != v for k, v in settings.items()):
            raise vae.UserError(f"{out} holds shards made with other settings; use another --out or --overwrite")
        elif old.get("complete"):
            print(f"{out}: already complete ({old['num_samples']} samples); nothing to do")
            return
        else:
            manifest = old
            print(f"{out}: continuing an interrupted precompute at metadata row {old['next_row']}")
    out.mkdir(parents=True, exist_ok=True)
    conditioner = load_conditioner(args, t5_length, device, dtype)

    skipped = [s for s in manifest["skipped"] if s.get("row", -1) < manifest["next_row"]]
    skipped += [b for b in bad_lines if b not in skipped]
    writer = ShardWriter(out, manifest, args.shard_size, DTYPES[args.store_dtype])
    dataset = ImageFolder(data, rows, args.resolution, args.flip, args.seed, start=manifest["next_row"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=list)
    progress = None if args.no_progress else tqdm(total=len(rows), initial=manifest["next_row"], desc="encode",
                                                  unit="img", dynamic_ncols=True)
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


class LatentShards:
    """Reads the shards written by `precompute`, sample by sample, memory-mapped (safetensors), so a data set
    much larger than host memory is fine. `max_samples` keeps only the first N (to overfit a few samples)."""

    def __init__(self, folder: str | Path, max_samples: int | None = None):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise vae.UserError(f"{path} not found: create the shards first with `python train_wlf.py precompute ...`")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != SHARD_FORMAT:
            raise vae.UserError(f"{path} is not a {SHARD_FORMAT} manifest")
        if not self.manifest.get("complete"):
            raise vae.UserError(f"{self.folder}: precompute did not finish; run the same precompute command again "
                                "to complete it")
        self.files = [self.folder / s["file"] for s in self.manifest["shards"]]
        if missing := [str(f) for f in self.files if not f.is_file()]:
            raise vae.UserError(f"shard files missing: {', '.join(missing[:3])}")
        counts = [s["count"] for s in self.manifest["shards"]]
        self.starts = [sum(counts[:i]) for i in range(len(counts))]  # the index of each shard's first sample
        self.length = sum(counts) if max_samples is None else min(max_samples, sum(counts))
        if self.length == 0:
            raise vae.UserError(f"{self.folder} holds no samples")
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return self.length

    def get(self, indices: list[int]) -> dict[str, Tensor]:
        """{"latents" (B, 16, h, w), "context" (B, L, 4096), "pooled" (B, D)} for the given sample indices."""
        out: dict[str, list[Tensor]] = {"latents": [], "context": [], "pooled": []}
        for index in indices:
            shard = bisect.bisect_right(self.starts, index) - 1
            if shard not in self._open:
                self._open[shard] = safe_open(str(self.files[shard]), "pt")
            i = index - self.starts[shard]
            for name in out:
                out[name].append(self._open[shard].get_slice(name)[i : i + 1])
        return {name: torch.cat(values) for name, values in out.items()}

    def check_fits(self, model: nn.Module, transformer: str) -> None:
        """The shards were encoded for this transformer's family, text widths and latent channels."""
        m, family, p = self.manifest, family_of(model), model.params
        if m["family"] != family:
            raise vae.UserError(f"{self.folder} was encoded for {m['family']} but {transformer} is a {family} "
                                "transformer; precompute the shards with the matching --model")
        wanted = (*text_widths(p), p.in_channels // 4 if family == "flux" else p.in_channels)
        got = (m["context_shape"][-1], m["pooled_dim"], m["latent_shape"][0])
        if wanted != got:
            raise vae.UserError(f"{self.folder} holds (text width, pooled width, latent channels) = {got} but the "
                                f"transformer expects {wanted}: precompute with this model's text encoders and autoencoder")


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


# =========================================================================================================
# Distributed set-up, and the transformer built on the meta device


def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a 1-rank group, so the same code
    (FSDP2 included) runs as a plain `python train_wlf.py train ...`."""
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if device.index is None else device.index)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=30)  # saving 12B parameters of optimizer state takes a while
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def family_of(model: nn.Module) -> str:
    return "flux" if isinstance(model, mmdit.Flux) else "sd3"


def text_widths(params) -> tuple[int, int]:
    """(width of the text tokens, width of the pooled vector) the transformer takes."""
    if isinstance(params, mmdit.FluxParams):
        return params.context_in_dim, params.vec_in_dim
    return params.context_in_dim, params.adm_in_channels


def meta_model(params, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The transformer of `params` on the meta device: shapes without memory."""
    with torch.device("meta"):
        return (mmdit.Flux if isinstance(params, mmdit.FluxParams) else mmdit.MMDiT)(params).to(dtype)


def build_on_meta(path: str, rank: int) -> tuple[nn.Module, dict[str, Tensor]]:
    """The transformer on the meta device on every rank, and its full state dict on rank 0 ({} elsewhere):
    rank 0 alone reads the file and broadcasts the config, so host memory holds one copy of the weights, not
    one per GPU."""
    payload, state = [None], {}
    if rank == 0:
        try:
            loaded = mmdit.load_transformer(path, device="cpu")
            payload, state = [loaded.params], loaded.state_dict()
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            payload = [f"cannot load the transformer from {path}: {e}"]
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        raise vae.UserError(payload[0])
    return meta_model(payload[0]), state


# =========================================================================================================
# Checkpoints: sharded (torch.distributed.checkpoint), written to a temporary folder and renamed when whole


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first: only a whole checkpoint is ever renamed to step-NNNNNNNN."""
    root = run / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / "meta.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def find_resume(args, run: Path, rank: int) -> Path | None:
    """--resume DIR, or --resume alone: the newest complete checkpoint of the run, if there is one yet."""
    if args.resume is None:
        return None
    if args.resume != "latest":
        if not (Path(args.resume) / "meta.json").is_file():
            raise vae.UserError(f"--resume {args.resume}: not a complete checkpoint (no meta.json)")
        return Path(args.resume)
    if found := list_checkpoints(run):
        return found[-1]
    _log(rank, f"--resume: no checkpoint under {run / 'checkpoints'} yet; starting from {args.transformer}")
    return None


def save_checkpoint(run: Path, model: nn.Module, optimizer, step: int, position: int, keep: int,
                    extra: dict) -> Path:
    """Every rank writes its shards of the model and the optimizer state into checkpoints/.step-N.tmp; when all
    are done rank 0 adds meta.json and renames the folder to step-N, then deletes all but the newest `keep`.
    A crash at any point leaves the previous checkpoints untouched."""
    final = run / "checkpoints" / f"step-{step:08d}"
    tmp = run / "checkpoints" / f".step-{step:08d}.tmp"
    if (final / "meta.json").is_file():  # this very state is saved already (a resumed, finished run)
        return final
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash during an earlier save
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        vae.write_json(tmp / "meta.json", {"step": step, "position": position, "world_size": dist.get_world_size(),
                                           **extra})
        if final.exists():  # an incomplete folder of that name (no meta.json) cannot be resumed from anyway
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(folder: Path, model: nn.Module, optimizer) -> dict:
    """Restore model and optimizer; returns meta.json. Resharding is DCP's job, so the world size may differ
    from the saving run's."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((folder / "meta.json").read_text())


# =========================================================================================================
# Export: one official-layout safetensors file (what load_transformer and sample.py read), written through
# mmdit.save_transformer (atomic; the config hints that shapes cannot tell, like Flux's RoPE split, go into
# its metadata)


def export_model(model: nn.Module, path: Path, dtype: torch.dtype) -> None:
    """Gather the full state dict (tensor by tensor, onto rank 0's CPU) and write it on rank 0."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        full = meta_model(model.params)
        full.load_state_dict({k: v.to("cpu", dtype) for k, v in state.items()}, assign=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        mmdit.save_transformer(full, str(path))
    dist.barrier()


def export_checkpoint(args) -> None:
    """`export`: one sharded checkpoint -> one official-layout safetensors file, in a single process."""
    folder, out = Path(args.checkpoint), Path(args.out)
    if not (folder / "meta.json").is_file():
        raise vae.UserError(f"{folder}: not a complete checkpoint (no meta.json)")
    try:
        model = mmdit.load_transformer(args.transformer, device="cpu", dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise vae.UserError(f"cannot load the transformer from {args.transformer}: {e}") from None
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        # In place into the model's tensors; reassembles the shards of any world size.
        dcp.load({"model": model.state_dict()}, checkpoint_id=str(folder), no_dist=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    mmdit.save_transformer(model.to(DTYPES[args.dtype]), str(out))
    print(f"exported {out} ({args.dtype}, official {family_of(model)} layout) from {folder}")


# =========================================================================================================
# Throughput: tokens, FLOPs and the GPU's peak, for the log's tokens/s and MFU


def tokens_per_sample(latent_hw: tuple[int, int], text_tokens: int) -> int:
    """Sequence length through the blocks: image tokens (2×2 latent patches) + text tokens."""
    return (latent_hw[0] // 2) * (latent_hw[1] // 2) + text_tokens


def train_flops_per_sample(params, latent_hw: tuple[int, int], text_tokens: int) -> float:
    """Model FLOPs of one sample's forward + backward (3 × forward; the recomputation of checkpointing is not
    counted, as MFU conventionally does). The forward is counted by torch's FlopCounterMode on a meta-device
    copy: exact for this implementation (each stream's weights see only its own tokens, attention is L²)."""
    context_width, pooled_width = text_widths(params)
    context = torch.empty(1, text_tokens, context_width, device="meta")
    x0, t = torch.empty(1, 16, *latent_hw, device="meta"), torch.empty(1, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        velocity_fn(meta_model(params, torch.bfloat16), context, torch.empty(1, pooled_width, device="meta"), 1.0)(x0, t)
    return 3.0 * counter.get_total_flops()


def gpu_peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs (for the MFU estimate); None when unknown (then no MFU is printed)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0), ("B200", 2250.0),
                       ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("4090", 165.0)):
        if key in name:
            return value
    return None


# =========================================================================================================
# --dry-run: the per-GPU memory plan, with activations measured on the meta device


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


def probe_activations(model: nn.Module, latent_shape: tuple[int, ...], text_tokens: int, dtype: torch.dtype) -> dict:
    """Run one training forward of `model` (built on the meta device: shapes only, no memory, no FLOPs) and
    record what autograd saves for the backward pass, per transformer block and outside the blocks, plus each
    block's inputs (what activation checkpointing keeps). Tensors saved twice or as views count once."""
    blocks = model.blocks()
    params = {id(p) for p in model.parameters()}
    saved = [{} for _ in range(len(blocks) + 1)]  # per block, then outside them: {id(storage base): bytes}
    inputs = [{} for _ in blocks]  # per block: {id(input): bytes}
    scope = [-1]  # the block running now; −1 = outside (the last entry of `saved`)
    keep_alive = []  # ids are only unique among live objects

    def pack(t: Tensor):
        if id(t) not in params:
            base = t if t._base is None else t._base
            keep_alive.append(base)
            saved[scope[0]][id(base)] = base.numel() * base.element_size()
        return t

    def enter(index):
        def hook(module, args, kwargs):
            scope[0] = index
            for value in [*args, *kwargs.values()]:
                if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):  # RoPE: complex
                    keep_alive.append(value)
                    inputs[index][id(value)] = value.numel() * value.element_size()
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
        context_width, pooled_width = text_widths(model.params)
        x0 = torch.empty(latent_shape, device="meta")
        context = torch.empty(B, text_tokens, context_width, device="meta", dtype=dtype)
        pooled = torch.empty(B, pooled_width, device="meta", dtype=dtype)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            training_loss(velocity_fn(model, context, pooled, 3.5), x0, torch.empty_like(x0),
                          torch.empty(B, device="meta"), Objective(loss="wlf"))
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()
    unique_inputs = {k: v for block in inputs for k, v in block.items()}  # vec and RoPE are shared by all blocks
    return {"block_saved": [sum(s.values()) for s in saved[:-1]],
            "block_largest": [max(s.values(), default=0) for s in saved[:-1]],
            "block_input": [sum(i.values()) for i in inputs], "outside_saved": sum(saved[-1].values()),
            "block_inputs": sum(unique_inputs.values())}


_PROBES: dict[tuple, dict] = {}  # the probe depends on neither the world size nor the GPU memory: plans share it


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
    model = meta_model(params, dtype)
    blocks = model.blocks()
    n = sum(p.numel() for p in model.parameters())
    block_n = [sum(p.numel() for p in b.parameters()) for b in blocks]
    key = (repr(params), latent_hw, text_tokens, batch, precision)
    if key not in _PROBES:  # a few seconds for 57 blocks
        _PROBES[key] = probe_activations(model, (batch, 16, *latent_hw), text_tokens, dtype)
    probe = _PROBES[key]

    c = dtype.itemsize
    rows = [
        ("parameters, fp32, sharded", 4 * n / world_size),
        ("gradients, fp32, sharded", 4 * n / world_size),
        ("AdamW moments m and v, fp32, sharded", 8 * n / world_size),
        (f"gathered parameters: 2 blocks ({precision}) + non-block layers", c * (2 * max(block_n) + n - sum(block_n))),
        (f"unsharded gradients of 1 block ({precision} + fp32 for reduce-scatter)", (c + 4) * max(block_n)),
    ]
    # In a block's backward: its recomputed activations, plus gradient buffers: the incoming and outgoing
    # activation gradients (≈ 2 × the block's inputs) and about two of its largest intermediates.
    transients = [2 * probe["block_input"][i] + 2 * probe["block_largest"][i] for i in range(len(blocks))]
    worst = max(range(len(blocks)), key=lambda i: probe["block_saved"][i] + transients[i])
    if activation_checkpointing:
        rows += [(f"checkpointed block inputs ({len(blocks)} blocks)", probe["block_inputs"]),
                 (f"block {worst} recomputed in backward (the worst)", probe["block_saved"][worst])]
    else:
        rows += [(f"activations of all {len(blocks)} blocks (no checkpointing)", sum(probe["block_saved"]))]
    rows += [("activations outside the blocks (embedders, final layer, loss)", probe["outside_saved"]),
             ("backward transients (activation gradients)", transients[worst])]
    allocated = sum(b for _, b in rows)
    rows += [("allocator fragmentation, assumed +10%", 0.10 * allocated),
             ("CUDA context, NCCL buffers, assumed", 2.5 * GiB)]
    total = sum(b for _, b in rows)
    header = (f"Memory plan per GPU: {n / 1e9:.2f} B parameters ({len(blocks)} blocks), latents 16×{latent_hw[0]}×"
              f"{latent_hw[1]} → {tokens_per_sample(latent_hw, 0)} image + {text_tokens} text tokens, batch {batch} "
              f"per GPU × {world_size} GPUs, {precision} compute, FSDP2, activation checkpointing "
              f"{'on' if activation_checkpointing else 'off'}")
    return {"rows": rows, "allocated": allocated, "total": total, "fits": total <= gpu_gib * GiB,
            "gpu_gib": gpu_gib, "header": header, "parameters": n}


def format_plan(plan: dict) -> str:
    lines = [plan["header"]] + [f"  {label:<72} {value / GiB:8.2f} GiB" for label, value in plan["rows"]]
    total, gpu = plan["total"] / GiB, plan["gpu_gib"]
    verdict = f"fits ({gpu - total:.1f} GiB headroom)" if plan["fits"] else f"does NOT fit (short by {total - gpu:.1f} GiB)"
    lines.append(f"  {'total':<72} {total:8.2f} GiB of {gpu:g} GiB -> {verdict}")
    return "\n".join(lines)


def dry_run(args) -> None:
    """`train --dry-run`: the plan for --model at --resolution, or for the shards' model and shapes."""
    if args.shards:
        m = LatentShards(args.shards).manifest
        latent_hw, text_tokens = tuple(m["latent_shape"][-2:]), m["context_shape"][0]
        name = args.model or m["model"]
    elif not args.model:
        raise vae.UserError("--dry-run needs --model NAME (or --shards) to know the architecture")
    else:
        name, factor = args.model, 16 if args.f16 else 8
        check_resolution(args.resolution, factor)
        latent_hw = (args.resolution // factor, args.resolution // factor)
        # As `precompute` encodes by default: T5 tokens (Flux), 77 CLIP + T5 tokens (SD3).
        text_tokens = args.text_tokens or default_t5_tokens(name) + (0 if name.startswith("flux") else 77)
    check_model_name(name)
    plan = memory_plan(mmdit.CONFIGS[name], latent_hw=latent_hw, text_tokens=text_tokens, batch=args.batch_size,
                       world_size=args.world_size or int(os.environ.get("WORLD_SIZE", 1)), gpu_gib=args.gpu_memory,
                       precision=args.precision, activation_checkpointing=not args.no_activation_checkpointing)
    print(f"{name}: {format_plan(plan)}")


# =========================================================================================================
# Command line


def check_model_name(name: str) -> None:
    if name not in mmdit.CONFIGS:
        raise vae.UserError(f"unknown --model {name!r}; choose one of {', '.join(sorted(mmdit.CONFIGS))}")


def check_resolution(resolution: int, factor: int) -> None:
    if resolution % (2 * factor):
        raise vae.UserError(f"--resolution {resolution} must be a multiple of {2 * factor} (F{factor} autoencoder, "
                            "2×2 latent patches)")


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
    for name in ("clip-l", "clip-g", "t5"):
        p.add_argument(f"--{name}-tokenizer", help=f"{name.upper()} tokenizer folder (default: the --{name} folder)")
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
    t.add_argument("--max-samples", type=positive_int, help="use only the first N samples (e.g. overfit one batch)")
    t.add_argument("--seed", type=int, default=0, help="seed of the sample order, noise and timesteps")

    o = t.add_argument_group("optimizer (AdamW, the paper's settings by default)")
    o.add_argument("--lr", type=float, default=1e-6, help="learning rate (the paper: 1e-6, constant)")
    o.add_argument("--weight-decay", type=float, default=1e-4, help="(the paper: 1e-4)")
    o.add_argument("--beta1", type=float, default=0.9)
    o.add_argument("--beta2", type=float, default=0.999)
    o.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up, then constant")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")

    j = t.add_argument_group("objective (Eq. 10) and timesteps")
    j.add_argument("--loss", choices=["wlf", "mse"], default="wlf",
                   help="wlf: Eq. 10 on x̂0 = x_t − t·v (the authors'); mse: plain velocity MSE")
    j.add_argument("--band-weights", type=_band_weights, default=[1.0, 1.0, 1.0, 1.0],
                   help="WLF weights w_LL,w_LH,w_HL,w_HH (default 1,1,1,1 = x0-space MSE)")
    j.add_argument("--wavelet-levels", type=positive_int, default=1)
    j.add_argument("--timesteps", choices=["uniform", "logit-normal"], default="uniform",
                   help="t sampling (the authors' Flux run: uniform)")
    j.add_argument("--logit-mean", type=float, default=0.0)
    j.add_argument("--logit-std", type=float, default=1.0)
    j.add_argument("--shift", type=float, default=1.0, help="t ← s·t/(1+(s−1)·t); 1 = no shift")
    j.add_argument("--guidance", type=float, default=3.5, help="Flux-dev's guidance input during training")

    r = t.add_argument_group("precision, memory, checkpoints, logging")
    r.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="compute dtype (parameters, gradients, optimizer state stay fp32)")
    r.add_argument("--no-activation-checkpointing", action="store_true")
    r.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (0: none)")
    r.add_argument("--keep-checkpoints", type=positive_int, default=2, help="how many recent checkpoints to keep")
    r.add_argument("--resume", nargs="?", const="latest", help="continue from a checkpoint folder, or (no value) "
                   "from the newest one under --out, if any")
    r.add_argument("--stop-after", type=int, help="save a checkpoint and exit after this step (job time limits)")
    r.add_argument("--export-dtype", choices=["bf16", "fp32"], default="bf16")
    r.add_argument("--export-name", help="file name of the final export (default transformer.safetensors)")
    r.add_argument("--log-every", type=positive_int, default=10)
    r.add_argument("--peak-tflops", type=float, help="per-GPU peak for the MFU estimate (default: known GPUs)")
    r.add_argument("--device", help="default cuda:LOCAL_RANK if available, else cpu")
    r.add_argument("--no-progress", action="store_true")

    d = t.add_argument_group("--dry-run: print the per-GPU memory plan and exit (no weights, no GPU)")
    d.add_argument("--dry-run", action="store_true")
    d.add_argument("--model", help="config name (flux-dev, sd3-medium, ...)")
    d.add_argument("--resolution", type=int, default=4096, help="image size")
    d.add_argument("--f16", action="store_true", help="F16 autoencoder (default F8)")
    d.add_argument("--text-tokens", type=int, help="context length (default per model)")
    d.add_argument("--world-size", type=int, help="number of GPUs (default $WORLD_SIZE or 1)")
    d.add_argument("--gpu-memory", type=float, default=80, help="GiB per GPU")

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
        if missing := [f"--{n}" for n in ("shards", "transformer", "out") if getattr(args, n) is None]:
            raise vae.UserError(f"train needs {', '.join(missing)} (or --dry-run)")
        train(args)


def main(argv: list[str] | None = None) -> None:
    run_command(_command, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
