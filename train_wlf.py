"""Wavelet-based Latent Fine-tuning (WLF, paper Sec. 4.2, Eq. 10) of Flux or SD3 with torchrun + FSDP2.

Two stages, so that no encoder is loaded while the transformer trains; and a memory plan without GPUs:

    python train_wlf.py precompute --data Aesthetic-4K/train --model flux-dev --vae ae_f16.safetensors --f16 \\
        --clip-l clip_l/ --t5 t5xxl/ --resolution 4096 --flip --out shards/
    torchrun --nproc_per_node 8 train_wlf.py train --shards shards/ --transformer flux1-dev.safetensors \\
        --out runs/wlf --steps 20000 --batch-size 4      # on one GPU: python train_wlf.py train ...
    python train_wlf.py train --dry-run --model flux-dev --resolution 4096 --f16 --batch-size 4 --world-size 8

The objective (rectified flow, as Flux and SD3 were trained):

    x_t = (1 − t)·x0 + t·ε,   the model predicts v ≈ ε − x0,   t ~ uniform | logit-normal(m, s), optional shift
    WLF (Eq. 10): x̂0 = x_t − t·v  and  L = Σ_bands w_band·‖DWT(x̂0)_band − DWT(x0)_band‖² / #coefficients

As the authors do, the wavelet loss compares x̂0 with x0 (not v with ε − x0). Since x̂0 − x0 = t·(ε − x0 − v),
it is the velocity error weighted by t². With one level and equal band weights it IS x0-space MSE, because
the Haar transform is orthonormal (Parseval); only unequal weights make the wavelets matter.

Parallelism: FSDP2 (`fully_shard` per block, then the root) keeps fp32 parameters, gradients and AdamW state
sharded and gathers one block's parameters in bf16 at a time; gradients are reduce-scattered in fp32; each
block is recomputed in backward (activation checkpointing). Checkpoints are sharded (DCP), resharded on load.
Determinism: the sample order is one permutation per epoch, and each sample's t and ε are drawn from
(seed, its position in the sample stream); nothing draws from a global RNG. A run thus depends on the global
batch, not on its split over GPUs and accumulation steps, and resuming reproduces it exactly.
Safety (runs.py): the run folder is locked; a step with a non-finite loss or gradient norm makes no update, and
--max-bad-steps of them in a row stop the run; checkpoints carry checksums, the data's fingerprint and the loss
settings, and --resume takes the newest one that verifies and refuses other data unless told.

Differences from the authors' release: the crop and flip are drawn once, at precompute (they re-crop every
epoch); prompts get the samplers' T5 length (512 flux-dev, else 256; they trained Flux with 77).
From the other scripts: `metrics.read_metadata`, the one reader of metadata.jsonl, and `metrics.load_image`, the
one image reader (EXIF orientation, alpha dropped, 16-bit high byte), so training sees an image as the metrics do,
with its resize and unreadable-file types; vae's `UserError`, `atomic_write`, `check_writable`, `write_json`; runs.py, the machinery shared with train_vae.py (process group,
run folder, checkpoints, fingerprints, argument checks, one-line errors).
"""
import argparse
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
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
import runs
import text_encoders
import vae
import wavelet
from runs import number, positive_int, whole_number

SHARD_FORMAT = "diffusion4k-wlf-shards"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GiB = 1024**3


# ===== The method: rectified flow with the wavelet loss (Sec. 4.2, Eq. 10) ====================================

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
    else:  # logit-normal, SD3's sampling: sigmoid(N(m, s²)) favours the middle
        t = torch.sigmoid(objective.logit_mean + objective.logit_std * torch.randn((), generator=generator))
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
    x0_hat = x_t - t_ * v  # Eq. 10 on x̂0 = x_t − t·v, as the authors' code compares
    return wavelet.wlf_loss(x0_hat, x0, objective.band_weights, objective.levels)


def velocity_fn(model: nn.Module, context: Tensor, pooled: Tensor, guidance: float):
    """velocity(x_t (B, 16, h, w), t (B,)) -> v for either architecture: Flux takes packed latents, position
    ids, t in [0, 1] and (dev) guidance; SD3 latents and t·1000. The models cast inputs to their weights' dtype
    themselves; t stays fp32 into the sinusoidal embedding, the Flux position ids fp32 as officially."""
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


# ===== Training: FSDP2, activation checkpointing, AdamW, clipping, accumulation ===============================

def train(args) -> None:
    # Our output is reshaped, not modified in place, so FSDP's pre-backward hook on it stays intact.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    rank, world, device = runs.setup_distributed(args.device)
    say = tqdm.write if rank == 0 else (lambda message: None)  # rank 0 speaks (above the progress bar)
    run = Path(args.out)
    export = run / (args.export_name or "transformer.safetensors")
    runs.on_rank0(runs.open_run, run, files=(export,))  # locked, writable, leftovers of killed runs removed
    runs.check_shared(run)  # every rank sees rank 0's run folder (a shared file system)
    shards = LatentShards(args.shards, args.max_samples)
    objective = Objective(args.loss, tuple(args.band_weights), args.wavelet_levels, args.timesteps,
                          args.logit_mean, args.logit_std, args.shift)
    global_batch = args.batch_size * args.grad_accum * world
    # What a checkpoint records and a resume must match: the data (its order too) and the loss.
    data = {"shards": shards.fingerprint, "samples": len(shards), "seed": args.seed}
    loss_settings = {**asdict(objective), "band_weights": list(objective.band_weights), "guidance": args.guidance}
    resume, meta = runs.on_rank0(runs.pick_checkpoint, run, args.resume)  # rank 0 verifies, all agree
    runs.require_same(resume, meta, args, data=data, loss=loss_settings)

    model, full_state = build_on_meta(args.transformer, rank)  # rank 0 alone reads the file
    family = "flux" if isinstance(model, mmdit.Flux) else "sd3"
    if shards.manifest["family"] != family:
        raise vae.UserError(f"{args.shards} was encoded for {shards.manifest['family']} but {args.transformer} is a "
                            f"{family} transformer; precompute the shards with the matching --model")
    # Each block runs under torch.utils.checkpoint inside the model's forward; FSDP's hooks on it fire again in
    # the recompute, so its parameters are gathered for it.
    model.gradient_checkpointing = not args.no_activation_checkpointing
    # fp32 parameters, sharded; each block's are gathered in the compute dtype just before use, its gradients
    # reduce-scattered in fp32. Inputs are not cast: RoPE's fp32 frequencies must reach the blocks as fp32.
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
    step, position, bad = 0, 0, runs.BadSteps(args.max_bad_steps, run)
    if resume is not None:
        load_checkpoint(resume, model, optimizer)
        step, position, bad.skipped = meta["step"], meta["position"], meta["skipped"]
        say(f"resumed from {resume} (step {step}, sample position {position}; global batch "
            f"{meta['global_batch']} then, {global_batch} now)")

    stream = SampleStream(len(shards), args.seed)
    latent_hw, text_tokens = tuple(shards.manifest["latent_shape"][-2:]), shards.manifest["context_shape"][0]
    tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2) + text_tokens  # 2×2 latent patches, then the text
    flops = train_flops_per_sample(model.params, latent_hw, text_tokens) if rank == 0 else 0.0
    peak = args.peak_tflops or gpu_peak_tflops(device)
    log_file = None
    if rank == 0:
        log_file = runs.open_log(run, step, vars(args))  # args.json; log.jsonl without the records after `step`
        n = sum(p.numel() for p in model.parameters())  # DTensors: global sizes
        print(f"{family}, {n / 1e6:,.1f} M parameters; {len(shards)} samples; global batch {global_batch} = {world} "
              f"rank(s) × {args.batch_size} × {args.grad_accum} accumulation; {tokens} tokens/sample", flush=True)
    progress = tqdm(total=args.steps, initial=step, desc="train", disable=rank != 0 or args.no_progress)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
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
            t, noise = (torch.stack(column).to(device) for column in zip(*draws))
            velocity = velocity_fn(model, batch["context"].to(device), batch["pooled"].to(device), args.guidance)
            loss = training_loss(velocity, x0, noise, t, objective)
            # FSDP averages gradients over ranks; dividing by the accumulation steps makes it the global mean.
            (loss / args.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor
        if bad.ok(step + 1, say, loss=loss_sum, grad_norm=grad_norm):  # NaN / inf: no update, on every rank
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        position += global_batch

        if step % args.log_every == 0 or step == args.steps:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            images = (step - since) * global_batch / (time.perf_counter() - tic)
            record = {"step": step, "loss": loss_sum.item() / (args.grad_accum * world), "lr": lr,
                      "grad_norm": grad_norm.item(), "skipped_updates": bad.skipped, "images_per_s": images,
                      "tokens_per_s": images * tokens}
            if peak:
                record["mfu"] = images * flops / world / (peak * 1e12)
            if device.type == "cuda":
                record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / GiB
            if rank == 0:
                runs.log_line(log_file, record)
                say(" ".join(f"{k} {v:.4g}" for k, v in record.items()))
            tic, since = time.perf_counter(), step
        progress.update(1)
        stopping = args.stop_after is not None and args.stop_after <= step < args.steps
        saving = stopping or (args.checkpoint_every and (step % args.checkpoint_every == 0 or step == args.steps))
        if saving and not bad.streak:  # none amid skipped updates: they must not rotate the good ones out
            meta = {"step": step, "position": position, "global_batch": global_batch, "shards": str(args.shards),
                    "data": data, "loss": loss_settings, "skipped": bad.skipped}
            say(f"saved {save_checkpoint(run, model, optimizer, meta, args.keep_checkpoints)}")
            tic, since = time.perf_counter(), step  # saving is not training throughput
        if stopping:
            say(f"stopped after step {step} (--stop-after); continue with the same command and --resume")
            break
    progress.close()
    if step >= args.steps:
        export_model(model, export, DTYPES[args.export_dtype])
        say(f"exported {export} ({args.export_dtype}, official {family} layout)")
    if log_file:
        log_file.close()
    dist.barrier()  # every rank is done before the process group is destroyed (gloo's teardown races otherwise)


# ===== Data: images + metadata.jsonl (Aesthetic-4K's format) -> precompute -> shards + manifest.json ==========

def read_metadata(folder: Path) -> tuple[list[dict], list[dict]]:
    """Rows {"file_name", "text", "line"} of folder/metadata.jsonl (metrics.read_metadata), and the lines that could
    not be used, each reported in one line naming the file and line number: they are skipped, the rest trains."""
    if not (path := folder / "metadata.jsonl").is_file():
        raise vae.UserError(f"{path} not found: the data folder needs a metadata.jsonl with one "
                            '{"file_name": ..., "text": ...} object per line')
    rows, lines = metrics.read_metadata(path)
    bad = [{"file_name": f"metadata.jsonl:{line}", "reason": f"bad line ({why})"} for line, why in lines]
    for line, why in lines:
        print(f"skipped {path}:{line}: bad line ({why})", flush=True)
    if not rows:
        first = f" ({bad[0]['file_name']}: {bad[0]['reason']})" if bad else ""
        raise vae.UserError(f"{path}: no usable line{first}")
    return rows, bad


def prepare_image(path: Path, resolution: int, rng: random.Random, flip: bool) -> Tensor:
    """metrics.load_image, then the shorter side resized to `resolution`, a random square crop and, when asked,
    a flip with probability ½; (3, resolution, resolution) in [−1, 1]."""
    # Lanczos: anti-aliased when shrinking 6K-8K originals
    image = metrics.resize_shorter_side(Image.fromarray(metrics.load_image(path)), resolution)
    left, top = rng.randint(0, image.width - resolution), rng.randint(0, image.height - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return metrics.image_to_tensor(image)[0]


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
        except metrics.UNREADABLE as e:
            return {"row": i, "file_name": row["file_name"], "error": f"{type(e).__name__}: {e}".split("\n")[0]}
        return {"row": i, "text": row["text"], "image": image}


def write_shard(out: Path, manifest: dict, samples: list[dict[str, Tensor]]) -> None:
    """Write `samples` as the next shard, then manifest.json, both atomically: a rerun resumes after it."""
    tensors = {name: torch.stack([sample[name] for sample in samples]) for name in samples[0]}
    name = f"shard-{len(manifest['shards']):05d}.safetensors"
    vae.atomic_write(out / name, lambda tmp: save_file(tensors, tmp))
    manifest["shards"].append({"file": name, "count": len(samples), "bytes": (out / name).stat().st_size})
    manifest["num_samples"] += len(samples)
    manifest["next_row"] = int(tensors["row"][-1]) + 1  # rows after it are encoded again on resume
    vae.write_json(out / "manifest.json", manifest)


def load_conditioner(args, t5_length: int, device: torch.device, dtype: torch.dtype):
    """FluxConditioner (CLIP-L + T5) or SD3Conditioner (CLIP-L + CLIP-G + T5) from --weights (a diffusers
    snapshot: text_encoder*/ and tokenizer*/) and/or the explicit --clip-l / --clip-g / --t5 paths."""
    flux = args.model.startswith("flux")
    snapshot = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2"),
                "t5": ("text_encoder_2", "tokenizer_2") if flux else ("text_encoder_3", "tokenizer_3")}
    encoders, tokenizers = {}, {}
    for name in ("clip_l", "t5") if flux else ("clip_l", "t5", "clip_g"):
        encoder, tokenizer = getattr(args, name), getattr(args, f"{name}_tokenizer")
        if encoder is None and args.weights:
            encoder_dir, tokenizer_dir = (Path(args.weights) / d for d in snapshot[name])
            encoder, tokenizer = str(encoder_dir), tokenizer or tokenizer_dir
        # The tokenizer: explicit > the snapshot's tokenizer*/ folder > beside the encoder (folder or file).
        encoders[name], tokenizers[name] = encoder, tokenizer or encoder
    if missing := ["--" + name.replace("_", "-") for name, path in encoders.items() if path is None]:
        raise vae.UserError(f"precompute --model {args.model} needs {', '.join(missing)} (or --weights DIR, a "
                            "diffusers snapshot with text_encoder*/ and tokenizer*/ folders)")
    folder = {name: Path(p) if Path(p).is_dir() else Path(p).parent for name, p in tokenizers.items()}
    try:
        clip_l = text_encoders.load_clip(encoders["clip_l"], device=device, dtype=dtype)
        t5 = text_encoders.load_t5(encoders["t5"], device=device, dtype=dtype)
        clip_l_tok = text_encoders.CLIPTokenizer(folder["clip_l"], pad_token="<|endoftext|>")
        t5_tok = text_encoders.T5Tokenizer(folder["t5"], max_length=t5_length)
        if flux:
            return text_encoders.FluxConditioner(clip_l, t5, clip_l_tok, t5_tok)
        clip_g = text_encoders.load_clip(encoders["clip_g"], device=device, dtype=dtype)
        clip_g_tok = text_encoders.CLIPTokenizer(folder["clip_g"], pad_token=0)  # SD3's CLIP-G pads with id 0
        return text_encoders.SD3Conditioner(clip_l, clip_g, clip_l_tok, clip_g_tok, t5, t5_tok, t5_length=t5_length)
    except (OSError, ValueError) as e:
        raise vae.UserError(f"cannot load the text encoders: {e}") from None


def encoder_files(args) -> dict[str, str]:
    """Fingerprints (names, sizes, times) of the weight and tokenizer files precompute reads, by path."""
    paths = [args.vae, args.clip_l, args.clip_g, args.t5, args.clip_l_tokenizer, args.clip_g_tokenizer,
             args.t5_tokenizer]
    if args.weights:
        paths += [Path(args.weights) / d for d in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                                                   "tokenizer", "tokenizer_2", "tokenizer_3")]
    return {f"files:{p}": runs.tree_fingerprint(Path(p)) for p in paths if p and Path(p).exists()}


def check_same_job(out: Path, manifest: dict, settings: dict, table: list, rows: list[dict]) -> None:
    """Continue (or call complete) only the job `manifest` was made by: the same settings and encoder files,
    and the same data row for row (file name, size, mtime, caption). Otherwise one line says what changed."""
    if changed := runs.differences({k: manifest.get(k) for k in settings}, settings):
        raise vae.UserError(f"{out} holds shards made with other settings ({'; '.join(changed)}); use another --out "
                            "or --overwrite")
    if manifest.get("rows") != runs.digest(table):
        old = runs.read_json(out / "rows.json") if (out / "rows.json").is_file() else []
        names = [f"line {row['line']} ({row['file_name']})" for row in rows]
        changes = runs.changed_rows(old, table, ("file name", "file size", "file time", "caption"), names)
        raise vae.UserError(f"{out} holds shards of other data: {changes} in {settings['data']}; precompute it "
                            "again with --overwrite, or use another --out")


def precompute(args) -> None:
    """`precompute`: encode every image of --data with the VAE and its prompt with the text encoders, into
    shards. Run again with the same settings and data, it continues an interrupted run; other data or settings
    (an edited caption, a replaced image) are refused, naming them, so that shards never mix two versions."""
    check_model_name(args.model)
    family = "flux" if args.model.startswith("flux") else "sd3"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    data, out = Path(args.data), Path(args.out)
    runs.open_run(out)  # locked, writable, leftovers of a killed precompute removed
    rows, bad_lines = read_metadata(data)
    table = [[r["file_name"], *runs.file_stats(data / r["file_name"]), r["text"]] for r in rows]
    vae_path = args.vae or args.weights
    if vae_path is None:
        raise vae.UserError("precompute needs --vae (ae.safetensors, an SD3 checkpoint or a diffusers vae/ folder)")
    try:
        ae = vae.load_vae(vae_path, stride=2 if args.f16 else None, device=device, dtype=dtype)
    except (OSError, ValueError) as e:
        raise vae.UserError(f"cannot load the autoencoder: {e}") from None
    check_resolution(args.resolution, ae.factor)
    t5_length = args.t5_tokens or (512 if args.model == "flux-dev" else 256)  # as sample.py encodes prompts
    settings = {"model": args.model, "family": family, "data": str(data.resolve()),
                "resolution": args.resolution, "flip": args.flip, "seed": args.seed, "vae": str(vae_path),
                "vae_factor": ae.factor, "vae_scale": ae.scale_factor, "vae_shift": ae.shift_factor,
                "text_encoders": [str(p) for p in (args.weights, args.clip_l, args.clip_g, args.t5) if p],
                "t5_tokens": t5_length, "store_dtype": args.store_dtype, **encoder_files(args)}
    path = out / "manifest.json"
    if path.is_file() and args.overwrite:
        for f in [path, out / "rows.json", *out.glob("shard-*.safetensors")]:
            f.unlink(missing_ok=True)
    if path.is_file():
        manifest = runs.read_json(path)
    else:  # a new job: what each row was made from goes beside the shards, its digest into the manifest
        manifest = {"format": SHARD_FORMAT, "version": 2, **settings, "rows": runs.digest(table), "complete": False,
                    "shards": [], "num_samples": 0, "next_row": 0, "skipped": []}
        vae.write_json(out / "rows.json", table)
    check_same_job(out, manifest, settings, table, rows)
    if manifest["complete"]:
        print(f"{out}: already complete ({manifest['num_samples']} samples); nothing to do")
        return
    if manifest["next_row"]:
        print(f"{out}: continuing an interrupted precompute at metadata row {manifest['next_row']}")
    conditioner = load_conditioner(args, t5_length, device, dtype)

    # Entries skipped before the resume point stay listed, bad metadata lines once; saved with every shard.
    skipped = manifest["skipped"] = [s for s in manifest["skipped"] if s.get("row", -1) < manifest["next_row"]]
    skipped += [b for b in bad_lines if b not in skipped]
    dataset = ImageFolder(data, rows, args.resolution, args.flip, args.seed, start=manifest["next_row"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=list)
    progress = tqdm(total=len(rows), initial=manifest["next_row"], desc="encode", unit="img", disable=args.no_progress)
    pending = []  # encoded samples not yet in a shard
    with torch.no_grad():
        for items in loader:
            for item in items:
                if "error" in item:
                    skipped.append({"row": item["row"], "file_name": item["file_name"], "reason": item["error"]})
                    progress.write(f"skipped {item['file_name']}: {item['error']}")
            if good := [item for item in items if "image" in item]:
                images = torch.stack([item["image"] for item in good]).to(device, dtype)
                latents = ae.encode(images)  # (B, 16, R/f, R/f), normalized: scale·(mean − shift)
                text = conditioner([item["text"] for item in good], device=device, dtype=torch.float32)
                context, pooled = (text["txt"], text["vec"]) if family == "flux" else (text["context"], text["pooled"])
                if not manifest.get("latent_shape"):
                    manifest["latent_shape"] = list(latents.shape[1:])
                    manifest["context_shape"], manifest["pooled_dim"] = list(context.shape[1:]), pooled.shape[-1]
                stored = (x.to("cpu", DTYPES[args.store_dtype]) for x in (latents, context, pooled))
                pending += [{"latents": lat, "context": ctx, "pooled": pool, "row": torch.tensor(item["row"])}
                            for lat, ctx, pool, item in zip(*stored, good)]
            while len(pending) >= args.shard_size:
                write_shard(out, manifest, pending[: args.shard_size])
                pending = pending[args.shard_size :]
            progress.update(len(items))
    if pending:
        write_shard(out, manifest, pending)
    progress.close()
    manifest["next_row"], manifest["complete"] = len(rows), True
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
        if not (path := self.folder / "manifest.json").is_file():
            raise vae.UserError(f"{path} not found: create the shards first with `python train_wlf.py precompute ...`")
        self.manifest = runs.read_json(path)
        if self.manifest.get("format") != SHARD_FORMAT or not self.manifest.get("complete"):
            raise vae.UserError(f"{path} is not a complete {SHARD_FORMAT} manifest; if precompute was interrupted, "
                                "run the same command again")
        self.fingerprint = runs.digest(self.manifest)[:16]  # the shards' identity, recorded in every checkpoint
        files = [self.folder / s["file"] for s in self.manifest["shards"]]
        runs.check_sizes(self.folder, {s["file"]: s.get("bytes") for s in self.manifest["shards"]}, "manifest.json")
        for file, shard in zip(files, self.manifest["shards"]):  # a damaged shard fails now, not hours in
            try:
                with safe_open(str(file), "pt") as f:
                    count = f.get_slice("latents").get_shape()[0]
            except (SafetensorError, OSError) as e:
                raise vae.UserError(f"shard {file}: unreadable ({e})") from None
            if count != shard["count"]:
                raise vae.UserError(f"shard {file}: {count} samples, manifest.json says {shard['count']}")
        # sample index -> (shard file, row in it)
        self.index = [(f, i) for f, s in zip(files, self.manifest["shards"]) for i in range(s["count"])][:max_samples]
        self._open = {}

    def __len__(self) -> int:
        return len(self.index)

    def get(self, indices: list[int]) -> dict[str, Tensor]:
        """{"latents" (B, 16, h, w), "context" (B, L, 4096), "pooled" (B, D)} for the given sample indices."""
        out: dict[str, list[Tensor]] = {"latents": [], "context": [], "pooled": []}
        for file, i in (self.index[index] for index in indices):
            if file not in self._open:
                try:
                    self._open[file] = safe_open(str(file), "pt")
                except (SafetensorError, OSError) as e:  # changed since the check at the start
                    raise vae.UserError(f"shard {file}: unreadable ({e})") from None
            for name in out:
                out[name].append(self._open[file].get_slice(name)[i : i + 1])
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


# ===== The transformer built on the meta device ================================================================

def meta_model(params, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The transformer of `params` on the meta device: shapes without memory."""
    with torch.device("meta"):
        return (mmdit.Flux if isinstance(params, mmdit.FluxParams) else mmdit.MMDiT)(params).to(dtype)


def meta_batch(params, batch: int, latent_hw: tuple[int, int], text_tokens: int, dtype: torch.dtype):
    """x0, context and pooled of a batch, as the shards hold them, on the meta device."""
    pooled_width = params.vec_in_dim if isinstance(params, mmdit.FluxParams) else params.adm_in_channels
    return (torch.empty(batch, 16, *latent_hw, device="meta"),
            torch.empty(batch, text_tokens, params.context_in_dim, device="meta", dtype=dtype),
            torch.empty(batch, pooled_width, device="meta", dtype=dtype))


def build_on_meta(path: str, rank: int) -> tuple[nn.Module, dict[str, Tensor]]:
    """The transformer on the meta device on every rank, its full state dict on rank 0 ({} elsewhere): rank 0
    alone reads the file, so host memory holds one copy of the weights, not one per GPU."""
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


# ===== Checkpoints: sharded (DCP) in a folder that runs.py seals (checksums, meta.json last) and verifies ======

def save_checkpoint(run: Path, model: nn.Module, optimizer, meta: dict, keep: int) -> Path:
    """Every rank writes its shards of the model and the optimizer state into checkpoints/.step-N.tmp; then rank
    0 seals it as step-N (runs.seal_checkpoint) and deletes all but the newest `keep`. A crash at any point
    leaves the previous checkpoints untouched; a state holding NaN or inf is refused before anything is written."""
    model_state, optim_state = get_state_dict(model, optimizer)
    runs.check_finite({"model": model_state, "optim": optim_state}, f"the checkpoint of step {meta['step']}")
    tmp = runs.on_rank0(runs.begin_checkpoint, run, meta["step"])
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    dist.barrier()
    return runs.on_rank0(runs.seal_checkpoint, tmp, {**meta, "world_size": dist.get_world_size()}, keep)


def load_checkpoint(folder: Path, model: nn.Module, optimizer=None) -> None:
    """Restore model (and optimizer) from a verified checkpoint, resharded by DCP: the world size may differ."""
    model_state, optim_state = get_state_dict(model, optimizer) if optimizer else (model.state_dict(), None)
    state = {"model": model_state, "optim": optim_state} if optimizer else {"model": model_state}
    try:
        dcp.load(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    except (dcp.api.CheckpointException, RuntimeError, ValueError, KeyError) as e:  # another architecture, mostly
        raise vae.UserError(f"cannot load {folder} into {type(model).__name__} "
                            f"(another --transformer than the run's?): {str(e).splitlines()[0]}") from None
    if optimizer:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


# ===== Export: one official-layout safetensors file (mmdit.save_transformer), as sample.py reads ==============

def export_model(model: nn.Module, path: Path, dtype: torch.dtype) -> None:
    """Gather the full state dict (tensor by tensor, onto rank 0's CPU) and write it on rank 0."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    runs.check_finite(state, f"the export {path}")  # rank 0 holds every tensor, the others none
    full = None
    if dist.get_rank() == 0:
        full = meta_model(model.params)
        full.load_state_dict({k: v.to("cpu", dtype) for k, v in state.items()}, assign=True)
    runs.on_rank0(write_transformer, full, path)


def write_transformer(model: nn.Module, path: Path) -> None:
    """mmdit.save_transformer through vae.atomic_write: fsynced, and a kill leaves a temp name runs.py cleans."""
    vae.atomic_write(path, lambda tmp: mmdit.save_transformer(model, tmp))


def export_checkpoint(args) -> None:
    """`export`: one sharded checkpoint -> one official-layout safetensors file, in a single process."""
    folder, out = Path(args.checkpoint), Path(args.out)
    vae.check_writable(out, f"--out {out}")
    meta = runs.verify(folder)
    try:
        model = mmdit.load_transformer(args.transformer, device="cpu", dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise vae.UserError(f"cannot load the transformer from {args.transformer}: {e}") from None
    warnings.filterwarnings("ignore", message=".*load in a single process")  # it is
    load_checkpoint(folder, model)  # in place into the model's tensors; reassembles the shards of any world size
    runs.check_finite(model.state_dict(), f"the export {out}")
    runs.on_rank0(write_transformer, model.to(DTYPES[args.dtype]), out)  # an OSError: one line naming the file
    print(f"exported {out} ({args.dtype}, official {type(model).__name__} layout) from {folder} (step {meta['step']})")


# ===== On the meta device: FLOPs for the log's MFU, and the --dry-run per-GPU memory plan =====================

def train_flops_per_sample(params, latent_hw: tuple[int, int], text_tokens: int) -> float:
    """Model FLOPs of one sample's forward + backward (3 × forward; the recomputation of checkpointing is not
    counted, as MFU conventionally does). The forward is counted by torch's FlopCounterMode on a meta-device
    copy: exact for this implementation (each stream's weights see only its own tokens, attention is L²)."""
    x0, context, pooled = meta_batch(params, 1, latent_hw, text_tokens, torch.bfloat16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        velocity_fn(meta_model(params, torch.bfloat16), context, pooled, 1.0)(x0, torch.empty(1, device="meta"))
    return 3.0 * counter.get_total_flops()


def gpu_peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of known GPUs (for the MFU estimate); None when unknown (then no MFU is printed)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    known = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "B200": 2250.0, "A100": 312.0, "A800": 312.0,
             "L40S": 362.0, "4090": 165.0}
    return next((value for key, value in known.items() if key in name), None)


class _FlashLikeAttention(torch.autograd.Function):
    """Stands in for SDPA while probing on the meta device: it keeps for backward what the flash / cuDNN
    kernels keep on a GPU (q, k, v, the output and an fp32 log-sum-exp per query), not the L×L score
    matrix that the math fallback (the only one meta tensors get) would keep. The probe runs no backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


def probe_activations(model: nn.Module, latent_shape: tuple[int, ...], text_tokens: int, dtype: torch.dtype) -> dict:
    """Run one training forward of `model` (built on the meta device: shapes only, no memory, no FLOPs) and
    record what autograd saves for the backward pass, per transformer block and outside the blocks, plus each
    block's inputs (what activation checkpointing keeps). Tensors saved twice or as views count once."""
    blocks = model.blocks()
    params = {id(p) for p in model.parameters()}
    # {id: tensor} per scope; holding the tensors keeps them alive, so their ids stay unique.
    saved = [{} for _ in range(len(blocks) + 1)]  # per block, then outside the blocks: storage bases
    inputs = [{} for _ in blocks]  # per block: its floating-point inputs (RoPE's are complex)
    scope = [-1]  # the block running now; −1 = outside (the last entry of `saved`)

    def nbytes(tensors: dict) -> list[int]:
        return [t.numel() * t.element_size() for t in tensors.values()]

    def pack(t: Tensor):
        if id(t) not in params:
            base = t if t._base is None else t._base
            saved[scope[0]][id(base)] = base
        return t

    def enter(index):
        def hook(module, args, kwargs):
            scope[0] = index
            inputs[index].update({id(v): v for v in [*args, *kwargs.values()]
                                  if isinstance(v, Tensor) and (v.is_floating_point() or v.is_complex())})
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
        x0, context, pooled = meta_batch(model.params, latent_shape[0], latent_shape[-2:], text_tokens, dtype)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            training_loss(velocity_fn(model, context, pooled, 3.5), x0, torch.empty_like(x0),
                          torch.empty(latent_shape[0], device="meta"), Objective(loss="wlf"))
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()
    unique_inputs = {k: v for block in inputs for k, v in block.items()}  # vec and RoPE are shared by all blocks
    return {"block_saved": [sum(nbytes(s)) for s in saved[:-1]],
            "block_largest": [max(nbytes(s), default=0) for s in saved[:-1]],
            "block_input": [sum(nbytes(i)) for i in inputs], "outside_saved": sum(nbytes(saved[-1])),
            "block_inputs": sum(nbytes(unique_inputs))}


def memory_plan(params, *, latent_hw: tuple[int, int], text_tokens: int, batch: int, world_size: int,
                gpu_gib: float, precision: str = "bf16", activation_checkpointing: bool = True) -> dict:
    """The per-GPU memory at the peak of a training step (in backward; the optimizer step's temporaries come
    when the activations are gone): {"rows": [(label, bytes)], "allocated" (what torch.cuda.max_memory_allocated
    reports), "total", "fits", "header"}. Parameters, gradients and AdamW's moments are fp32, sharded; FSDP
    gathers one block (plus one prefetched) in the compute dtype, whose gradient exists in that dtype and in
    fp32 for the reduce-scatter. Activations are measured by `probe_activations`, not guessed."""
    dtype = DTYPES[precision]
    model = meta_model(params, dtype)
    blocks = model.blocks()
    n = sum(p.numel() for p in model.parameters())
    block_n = [sum(p.numel() for p in b.parameters()) for b in blocks]
    probe = probe_activations(model, (batch, 16, *latent_hw), text_tokens, dtype)  # a few seconds for 57 blocks

    c = dtype.itemsize
    rows = [("parameters, fp32, sharded", 4 * n / world_size),
            ("gradients, fp32, sharded", 4 * n / world_size),
            ("AdamW moments m and v, fp32, sharded", 8 * n / world_size),
            (f"gathered parameters: 2 blocks ({precision}) + non-block layers", c * (2 * max(block_n) + n - sum(block_n))),
            (f"unsharded gradients of 1 block ({precision} + fp32 for reduce-scatter)", (c + 4) * max(block_n))]
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
              f"{latent_hw[1]} → {(latent_hw[0] // 2) * (latent_hw[1] // 2)} image + {text_tokens} text tokens, "
              f"batch {batch} per GPU × {world_size} GPUs, {precision} compute, FSDP2, activation checkpointing "
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
        text_tokens = args.text_tokens or (512 if name == "flux-dev" else 256) + (0 if name.startswith("flux") else 77)
    check_model_name(name)
    plan = memory_plan(mmdit.CONFIGS[name], latent_hw=latent_hw, text_tokens=text_tokens, batch=args.batch_size,
                       world_size=args.world_size or int(os.environ.get("WORLD_SIZE", 1)), gpu_gib=args.gpu_memory,
                       precision=args.precision, activation_checkpointing=not args.no_activation_checkpointing)
    print(f"{name}: {format_plan(plan)}")


# ===== Command line ===========================================================================================

def check_model_name(name: str) -> None:
    if name not in mmdit.CONFIGS:
        raise vae.UserError(f"unknown --model {name!r}; choose one of {', '.join(sorted(mmdit.CONFIGS))}")


def check_resolution(resolution: int, factor: int) -> None:
    if resolution % (2 * factor):
        raise vae.UserError(f"--resolution {resolution} must be a multiple of {2 * factor} (F{factor}, 2×2 patches)")


def _band_weights(text: str) -> list[float]:
    if len(text.split(",")) != 4:
        raise argparse.ArgumentTypeError("give 4 comma-separated numbers w_LL,w_LH,w_HL,w_HH, e.g. 1,1,1,1")
    weights = [number(0)(w) for w in text.split(",")]  # each finite and ≥ 0: a negative one has no minimum
    if not any(weights):
        raise argparse.ArgumentTypeError(f"all four are 0 in {text!r}: nothing would be learned")
    return weights


def build_parser() -> argparse.ArgumentParser:
    parser = runs.Parser(description=__doc__[: __doc__.index("The objective")].rstrip(),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{precompute,train,export}")

    p = commands.add_parser("precompute", help="encode images and prompts once into latent shards")
    p.add_argument("--data", required=True, help='image folder with metadata.jsonl ({"file_name", "text"} lines)')
    p.add_argument("--out", required=True, help="folder for the shards and manifest.json")
    p.add_argument("--model", required=True, help="config name; decides the prompt encoders (Flux: CLIP-L, T5)")
    p.add_argument("--weights", help="a diffusers snapshot (text_encoder*/, tokenizer*/, vae/); flags override parts")
    p.add_argument("--vae", help="ae.safetensors, an SD3 checkpoint, a diffusers vae/ folder, the authors' SC-VAE")
    p.add_argument("--f16", action="store_true", help="run the autoencoder as F16 (default: F8 unless the file is F16)")
    p.add_argument("--clip-l", help="CLIP-L text encoder (transformers folder or safetensors file)")
    p.add_argument("--clip-g", help="CLIP-G text encoder with projection (SD3 only)")
    p.add_argument("--t5", help="T5-XXL v1.1 encoder (transformers folder or safetensors file)")
    for name in ("clip-l", "clip-g", "t5"):
        p.add_argument(f"--{name}-tokenizer", help=f"{name.upper()} tokenizer folder (default: the --{name} folder)")
    p.add_argument("--t5-tokens", type=positive_int, help="T5 length (default: as sample.py, 512 flux-dev, else 256)")
    p.add_argument("--resolution", type=positive_int, default=4096, help="square crop after resizing the shorter side")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and flips")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per VAE call")
    p.add_argument("--workers", type=whole_number, default=4, help="image decoding processes")
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
    t.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="compute dtype (the state: fp32)")
    t.add_argument("--no-activation-checkpointing", action="store_true")
    t.add_argument("--checkpoint-every", type=whole_number, default=1000, help="steps between checkpoints (0: none)")
    t.add_argument("--keep-checkpoints", type=positive_int, default=2, help="how many recent checkpoints to keep")
    t.add_argument("--resume", nargs="?", const="latest", help="a checkpoint folder; alone: --out's newest good one")
    t.add_argument("--allow-data-change", action="store_true", help="--resume on other shards, samples or seed")
    t.add_argument("--allow-loss-change", action="store_true", help="--resume with another objective or guidance")
    t.add_argument("--max-bad-steps", type=positive_int, default=3, help="stop after N non-finite steps in a row")
    t.add_argument("--stop-after", type=positive_int, help="save a checkpoint, exit after this step (job time limits)")
    t.add_argument("--export-dtype", choices=["bf16", "fp32"], default="bf16")
    t.add_argument("--export-name", help="file name of the final export (default transformer.safetensors)")
    t.add_argument("--log-every", type=positive_int, default=10)
    t.add_argument("--peak-tflops", type=number(0, above=True), help="per-GPU peak for MFU (default: known GPUs)")
    t.add_argument("--device", help="default cuda:LOCAL_RANK if available, else cpu")
    t.add_argument("--no-progress", action="store_true")
    g = t.add_argument_group("AdamW (defaults: the paper's)")
    g.add_argument("--lr", type=number(0, above=True), default=1e-6, help="learning rate, constant after warm-up")
    g.add_argument("--warmup-steps", type=whole_number, default=0, help="linear warm-up")
    g.add_argument("--weight-decay", type=number(0), default=1e-4)
    g.add_argument("--beta1", type=number(0, 1, below=True), default=0.9)
    g.add_argument("--beta2", type=number(0, 1, below=True), default=0.999)
    g.add_argument("--max-grad-norm", type=number(0), default=1.0, help="gradient clipping (0: off)")
    g = t.add_argument_group("the objective (Eq. 10) and its timesteps")
    g.add_argument("--loss", choices=["wlf", "mse"], default="wlf", help="wlf: Eq. 10 on x̂0; mse: velocity MSE")
    g.add_argument("--band-weights", type=_band_weights, default=[1.0] * 4, help="w_LL,w_LH,w_HL,w_HH (1,1,1,1: x0 MSE)")
    g.add_argument("--wavelet-levels", type=positive_int, default=1)
    g.add_argument("--timesteps", choices=["uniform", "logit-normal"], default="uniform", help="t sampling")
    g.add_argument("--logit-mean", type=number(), default=0.0, help="logit-normal: mean m of logit(t)")
    g.add_argument("--logit-std", type=number(0, above=True), default=1.0, help="logit-normal: std s of logit(t)")
    g.add_argument("--shift", type=number(0, above=True), default=1.0, help="t ← s·t/(1+(s−1)·t); 1: no shift")
    g.add_argument("--guidance", type=number(), default=3.5, help="Flux-dev's guidance input during training")
    g = t.add_argument_group("--dry-run: print the per-GPU memory plan and exit (no weights, no GPU)")
    g.add_argument("--dry-run", action="store_true")
    g.add_argument("--model", help="config name (flux-dev, sd3-medium, ...; default: the shards')")
    g.add_argument("--resolution", type=positive_int, default=4096, help="image size")
    g.add_argument("--f16", action="store_true", help="F16 autoencoder (default F8)")
    g.add_argument("--text-tokens", type=positive_int, help="context length (default: as precompute encodes)")
    g.add_argument("--world-size", type=positive_int, help="number of GPUs (default $WORLD_SIZE or 1)")
    g.add_argument("--gpu-memory", type=number(0, above=True), default=80, help="GiB per GPU")

    e = commands.add_parser("export", help="write one checkpoint as an official-layout safetensors file")
    e.add_argument("--checkpoint", required=True, help="checkpoints/step-NNNNNNNN folder of a run")
    e.add_argument("--transformer", required=True, help="the weights the run started from (gives the architecture)")
    e.add_argument("--out", required=True, help="output .safetensors file")
    e.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    return parser


def _command(args) -> None:
    if args.command == "precompute":
        precompute(args)
    elif args.command == "export":
        export_checkpoint(args)
    elif args.dry_run:
        dry_run(args)
    elif missing := [f"--{n}" for n in ("shards", "transformer", "out") if getattr(args, n) is None]:
        raise vae.UserError(f"train needs {', '.join(missing)} (or --dry-run)")
    else:
        train(args)


def main(argv: list[str] | None = None) -> None:
    runs.run_command(_command, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
