"""Wavelet-based Latent Fine-tuning (WLF, paper Sec. 4.2, Eq. 10) of Flux or SD3 with torchrun + FSDP2.

Two stages, so that no encoder is loaded while the transformer trains; and a memory plan without GPUs:

    torchrun --nproc_per_node 8 train_wlf.py precompute --data Aesthetic-4K/train --model flux-dev \\
        --vae ae_f16.safetensors --f16 --clip-l clip_l/ --t5 t5xxl/ --resolution 4096 --flip --out shards/
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
block is recomputed in backward (activation checkpointing). On several nodes, --shard-group N (a node's GPUs)
shards the state within groups of N ranks and replicates it across groups (HSDP: runs.shard_mesh). Checkpoints
are sharded (DCP), resharded on load: the world size and the shard group may change between jobs.
Determinism: the sample order is one permutation per epoch, and each sample's t and ε are drawn from
(seed, its position in the sample stream); nothing draws from a global RNG. A run thus depends on the global
batch, not on its split over GPUs and accumulation steps, and resuming reproduces it exactly.
Safety (runs.py): the run folder is locked; a step with a non-finite loss or gradient norm makes no update, and
--max-bad-steps of them in a row stop the run; checkpoints carry checksums, the data's fingerprint and the loss
settings, and --resume takes the newest one that verifies and refuses other data unless told.
Data: precompute's ranks encode batch-aligned parts of the rows, merged into the one-process order, bit for bit;
training reads its next micro-batches in a thread while it steps (log.jsonl's data_wait: the time left waiting).

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
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import fp8
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
    mesh = runs.shard_mesh(device, world, args.shard_group)  # a --shard-group that does not divide: refused now
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

    model, full_state = build_on_meta(args.transformer)  # rank 0 alone reads the file
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

    # This rank's micro-batches, read a step ahead in a background thread (the order is known in advance).
    stream = SampleStream(len(shards), args.seed)
    batches = rank_batches(stream, position, args.batch_size, args.grad_accum, world, rank)
    reader = runs.ReadAhead(lambda key: (key[0], shards.get(key[1])), batches, depth=2 * args.grad_accum)
    latent_hw, text_tokens = tuple(shards.manifest["latent_shape"][-2:]), shards.manifest["context_shape"][0]
    tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2) + text_tokens  # 2×2 latent patches, then the text
    flops = train_flops_per_sample(model.params, latent_hw, text_tokens) if rank == 0 else 0.0
    peak = args.peak_tflops or gpu_peak_tflops(device)
    log_file = None
    if rank == 0:
        log_file = runs.open_log(run, step, vars(args))  # args.json; log.jsonl without the records after `step`
        n = sum(p.numel() for p in model.parameters())  # DTensors: global sizes
        hsdp = f"; state sharded over {mesh.size(1)} ranks, {mesh.size(0)} replicas" if mesh.ndim == 2 else ""
        print(f"{family}, {n / 1e6:,.1f} M parameters; {len(shards)} samples; global batch {global_batch} = {world} "
              f"rank(s) × {args.batch_size} × {args.grad_accum} accumulation; {tokens} tokens/sample{hsdp}", flush=True)
    progress = tqdm(total=args.steps, initial=step, desc="train", disable=rank != 0 or args.no_progress)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tic, since, waited = time.perf_counter(), step, 0.0  # the throughput window
    while step < args.steps:
        lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            first, batch = reader.next()  # positions first + j of the stream; the noise is keyed by the same
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
            seconds = time.perf_counter() - tic
            images = (step - since) * global_batch / seconds
            record = {"step": step, "loss": loss_sum.item() / (args.grad_accum * world), "lr": lr,
                      "grad_norm": grad_norm.item(), "skipped_updates": bad.skipped, "images_per_s": images,
                      "tokens_per_s": images * tokens, "data_wait": (reader.waited - waited) / seconds}
            if peak:
                record["mfu"] = images * flops / world / (peak * 1e12)
            if device.type == "cuda":
                record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / GiB
            if rank == 0:
                runs.log_line(log_file, record)
                say(" ".join(f"{k} {v:.4g}" for k, v in record.items()))
            tic, since, waited = time.perf_counter(), step, reader.waited
        progress.update(1)
        stopping = args.stop_after is not None and args.stop_after <= step < args.steps
        saving = stopping or (args.checkpoint_every and (step % args.checkpoint_every == 0 or step == args.steps))
        if saving and not bad.streak:  # none amid skipped updates: they must not rotate the good ones out
            meta = {"step": step, "position": position, "global_batch": global_batch, "shards": str(args.shards),
                    "data": data, "loss": loss_settings, "skipped": bad.skipped}
            say(f"saved {save_checkpoint(run, model, optimizer, meta, args.keep_checkpoints)}")
            tic, since, waited = time.perf_counter(), step, reader.waited  # saving is not training throughput
        if stopping:
            say(f"stopped after step {step} (--stop-after); continue with the same command and --resume")
            break
    progress.close()
    reader.close()
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
    """Rows start..end−1 of the metadata; item: {"row", "text", "image" (3, R, R) in [−1, 1]} or {"row",
    "file_name", "error"} for a file that cannot be read: bad files are reported, never fatal. The crop and flip
    of row i depend only on (seed, i): not on the rank that reads it, nor on where an interrupted run resumed."""

    def __init__(self, folder: Path, rows: list[dict], resolution: int, flip: bool, seed: int, start: int, end: int):
        self.folder, self.rows, self.resolution, self.flip, self.seed = folder, rows, resolution, flip, seed
        self.start, self.end = start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i: int) -> dict:
        i += self.start
        row = self.rows[i]
        try:
            image = prepare_image(self.folder / row["file_name"], self.resolution, random.Random(f"{self.seed}/{i}"),
                                  self.flip)
        except metrics.UNREADABLE as e:
            return {"row": i, "file_name": row["file_name"], "error": f"{type(e).__name__}: {e}".split("\n")[0]}
        return {"row": i, "text": row["text"], "image": image}


def write_shard(out: Path, part: int, progress: dict, samples: list[dict[str, Tensor]]) -> None:
    """Write `samples` as the part's next shard, then its progress file, both atomically: a rerun resumes after it."""
    tensors = {name: torch.stack([sample[name] for sample in samples]) for name in samples[0]}
    name = f"part-{part:03d}-{len(progress['shards']):05d}.safetensors"
    vae.atomic_write(out / name, lambda tmp: save_file(tensors, tmp))
    progress["shards"].append({"file": name, "count": len(samples), "bytes": (out / name).stat().st_size})
    progress["next_row"] = int(tensors["row"][-1]) + 1  # rows after it are encoded again on resume
    vae.write_json(out / f"part-{part:03d}.json", progress)


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


def open_job(out: Path, data: Path, rows: list[dict], settings: dict, overwrite: bool) -> dict | None:
    """Rank 0, holding the lock: the manifest of the job to do in `out` (a new one, or an interrupted one to
    continue), or None when it is already complete. Refuses another job's shards (`check_same_job`)."""
    table = [[r["file_name"], *runs.file_stats(data / r["file_name"]), r["text"]] for r in rows]
    path = out / "manifest.json"
    if path.is_file() and overwrite:
        for f in [path, out / "rows.json", *out.glob("shard-*.safetensors")]:
            f.unlink(missing_ok=True)
    if not path.is_file():  # a new job: what each row was made from goes beside the shards, its digest in the manifest
        for f in out.glob("part-*"):  # progress of a job whose manifest is gone: not this job's
            f.unlink()
        vae.write_json(out / "rows.json", table)
        return {"format": SHARD_FORMAT, "version": 3, **settings, "rows": runs.digest(table), "complete": False,
                "shards": [], "num_samples": 0, "skipped": []}
    manifest = runs.read_json(path)
    check_same_job(out, manifest, settings, table, rows)
    if manifest["complete"]:
        print(f"{out}: already complete ({manifest['num_samples']} samples); nothing to do")
        return None
    if "parts" not in manifest:
        raise vae.UserError(f"{out} holds an interrupted precompute of an older version of this script; run it "
                            "again with --overwrite")
    return manifest


def plan_parts(out: Path, manifest: dict, n_rows: int, world: int, batch: int) -> dict:
    """Rank 0: a new job's split of the rows into `world` contiguous parts, each a whole number of batches, written
    into the manifest with the batch size (a resumed job keeps both, whatever its world size now). Part p in order holds the
    samples of rows start_p.. in order, so the parts' shards one after the other are the one-process sample
    order; and since every batch is rows k·B..(k+1)·B−1 in any split, each row is encoded in the same batch."""
    if "parts" not in manifest:
        batches = -(-n_rows // batch)
        bounds = [min(n_rows, batches * r // world * batch) for r in range(world + 1)]
        manifest["parts"], manifest["batch"] = [[a, b] for a, b in zip(bounds, bounds[1:])], batch
        vae.write_json(out / "manifest.json", manifest)
    return manifest


def plan_batch(args, ae: nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """Images per VAE call: --batch-size; else 1 on the CPU, and on a GPU as many as 80% of its free memory holds,
    by the peak of a probe encode of one blank image (at 4096² the VAE's activations dwarf the text encoders').
    The smallest over the ranks, so that every rank cuts the same batches."""
    batch = args.batch_size or 1
    if args.batch_size is None and device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            ae.encode(torch.zeros(1, 3, args.resolution, args.resolution, device=device, dtype=dtype))
        per_image = torch.cuda.max_memory_allocated(device) - before
        torch.cuda.empty_cache()
        batch = max(1, min(32, int(0.8 * torch.cuda.mem_get_info(device)[0] / per_image)))
    return runs.smallest(batch)


def encode_part(args, part: int, rows: list[dict], bounds: list[int], batch: int, encode, quiet: bool) -> None:
    """Encode rows bounds[0]..bounds[1]−1 into the part's shards; its progress file records the shards written and
    the next row, so that a killed run continues each part where it stopped."""
    out, (start, end) = Path(args.out), bounds
    path = out / f"part-{part:03d}.json"
    progress = runs.read_json(path) if path.is_file() else {"rows": bounds, "next_row": start, "shards": [],
                                                             "skipped": [], "done": False}
    if progress["done"]:
        return
    resume = progress["next_row"]
    if resume > start:
        print(f"part {part}: continuing an interrupted precompute at metadata row {resume}", flush=True)
    skipped = progress["skipped"] = [s for s in progress["skipped"] if s["row"] < resume]
    # From the start of the batch holding the resume row: each row is encoded in the batch it had before.
    first = start + (resume - start) // batch * batch
    dataset = ImageFolder(Path(args.data), rows, args.resolution, args.flip, args.seed, first, end)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=args.workers, collate_fn=list)
    progress_bar = tqdm(total=end - start, initial=resume - start, desc=f"encode part {part}", unit="img",
                        disable=quiet)
    pending = []  # encoded samples not yet in a shard
    for items in loader:
        for item in items:
            if "error" in item and item["row"] >= resume:
                skipped.append({"row": item["row"], "file_name": item["file_name"], "reason": item["error"]})
                progress_bar.write(f"skipped {item['file_name']}: {item['error']}")
        if good := [item for item in items if "image" in item]:
            latents, context, pooled = encode(good)
            progress.setdefault("latent_shape", list(latents.shape[1:]))
            progress.setdefault("context_shape", list(context.shape[1:]))
            progress.setdefault("pooled_dim", pooled.shape[-1])
            stored = (x.to("cpu", DTYPES[args.store_dtype]) for x in (latents, context, pooled))
            pending += [{"latents": lat, "context": ctx, "pooled": pool, "row": torch.tensor(item["row"])}
                        for lat, ctx, pool, item in zip(*stored, good) if item["row"] >= resume]
        while len(pending) >= args.shard_size:
            write_shard(out, part, progress, pending[: args.shard_size])
            pending = pending[args.shard_size :]
        progress_bar.update(len([item for item in items if item["row"] >= resume]))
    if pending:
        write_shard(out, part, progress, pending)
    progress_bar.close()
    progress.update(next_row=end, done=True)
    vae.write_json(path, progress)


def merge_parts(out: Path, manifest: dict, bad_lines: list[dict]) -> dict:
    """Rank 0, once every part is done: the parts' shards renamed shard-00000, shard-00001, ... in part order (a
    merge cut short is redone: a shard already renamed is found under its new name), listed in the complete
    manifest; then the progress files go."""
    shards, skipped, shapes = [], list(bad_lines), {}
    for part in range(len(manifest["parts"])):
        progress = runs.read_json(out / f"part-{part:03d}.json")
        for shard in progress["shards"]:
            name = f"shard-{len(shards):05d}.safetensors"
            if (out / shard["file"]).is_file():
                os.replace(out / shard["file"], out / name)
            shards.append({**shard, "file": name})
        skipped += progress["skipped"]
        shapes = shapes or {k: progress[k] for k in ("latent_shape", "context_shape", "pooled_dim") if k in progress}
    if not shards:
        raise vae.UserError(f"{manifest['data']}: no readable image among {manifest['parts'][-1][1]} metadata rows; "
                            "nothing was written")
    manifest = {k: v for k, v in manifest.items() if k != "parts"}
    manifest.update(shapes, shards=shards, num_samples=sum(s["count"] for s in shards), skipped=skipped,
                    complete=True)
    vae.fsync(out)  # the renames are durable before the manifest names the new files
    vae.write_json(out / "manifest.json", manifest)
    for leftover in out.glob("part-*"):
        leftover.unlink()
    return manifest


def precompute(args) -> None:
    """`precompute`: encode every image of --data with the VAE and its prompt with the text encoders, into
    shards; under torchrun each rank encodes its own part of the rows on its own GPU. Run again with the same
    settings and data, it continues an interrupted run, each part where it stopped; other data or settings
    (an edited caption, a replaced image) are refused, naming them, so that shards never mix two versions."""
    check_model_name(args.model)
    family = "flux" if args.model.startswith("flux") else "sd3"
    rank, world, device = runs.setup_distributed(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    data, out = Path(args.data), Path(args.out)
    runs.on_rank0(runs.open_run, out)  # locked, writable, leftovers of a killed precompute removed
    rows, bad_lines = runs.on_rank0(read_metadata, data)
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
    if (manifest := runs.on_rank0(open_job, out, data, rows, settings, args.overwrite)) is None:
        return
    conditioner = load_conditioner(args, t5_length, device, dtype)
    # A resumed job encodes in the batches it began with (the same bits), unless told otherwise.
    batch = manifest["batch"] if "batch" in manifest and not args.batch_size else plan_batch(args, ae, device, dtype)
    manifest = runs.on_rank0(plan_parts, out, manifest, len(rows), world, batch)

    @torch.no_grad()
    def encode(items: list[dict]) -> tuple[Tensor, Tensor, Tensor]:
        latents = ae.encode(torch.stack([item["image"] for item in items]).to(device, dtype))  # scale·(mean − shift)
        text = conditioner([item["text"] for item in items], device=device, dtype=torch.float32)
        return (latents, *((text["txt"], text["vec"]) if family == "flux" else (text["context"], text["pooled"])))

    parts = manifest["parts"]
    for part in range(rank, len(parts), world):  # a job resumed on fewer ranks: some take several parts
        encode_part(args, part, rows, parts[part], batch, encode, quiet=args.no_progress or rank != 0)
    # Files, not a collective, tell when all parts are done: a rank waiting longer than the process group's
    # timeout for a slower one is no error.
    while not all(runs.read_json(p)["done"] if p.is_file() else False
                  for p in (out / f"part-{i:03d}.json" for i in range(len(parts)))):
        time.sleep(1)
    dist.barrier()  # all have seen every part done before rank 0 merges them (and removes the progress files)
    manifest = runs.on_rank0(merge_parts, out, manifest, bad_lines)
    dist.barrier()  # every rank is done before the process group is destroyed
    if rank == 0:
        print(f"encoded {manifest['num_samples']} samples into {len(manifest['shards'])} shard(s) in {out} on {world} "
              f"rank(s), batches of {batch}; skipped {len(manifest['skipped'])} unreadable or bad entries"
              + (" (listed in manifest.json)" if manifest["skipped"] else ""))


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


def rank_batches(stream: SampleStream, position: int, batch: int, accumulation: int, world: int, rank: int):
    """(first, sample indices at stream positions first..first+batch−1) of this rank's micro-batches, step after
    step from `position`: of a step's world·accumulation micro-batches, micro-step m of rank r takes the
    (m·world + r)-th. Known in advance, so they can be read ahead."""
    while True:
        for micro in range(accumulation):
            first = position + (micro * world + rank) * batch
            yield first, [stream[first + j] for j in range(batch)]
        position += world * accumulation * batch


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


def build_on_meta(path: str) -> tuple[nn.Module, dict[str, Tensor]]:
    """The transformer on the meta device on every rank, its full state dict on rank 0 ({} elsewhere): rank 0
    alone reads the file, so host memory holds one copy of the weights, not one per GPU. A failure on rank 0, of
    any kind, reaches every rank (runs.on_rank0)."""
    state = {}

    def load():
        try:
            loaded = mmdit.load_transformer(path, device="cpu")
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise vae.UserError(f"cannot load the transformer from {path}: {e}") from None
        if any(isinstance(m, fp8.Fp8Linear) for m in loaded.modules()):  # 3 mantissa bits: no start for training
            raise vae.UserError(f"{path} stores fp8 weights: fine-tune from the bf16 or fp32 checkpoint")
        state.update(loaded.state_dict())
        return loaded.params
    return meta_model(runs.on_rank0(load)), state


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
        model = mmdit.load_transformer(args.transformer, device="cpu", dtype=torch.float32, weight_dtype=torch.float32)
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
                gpu_gib: float, precision: str = "bf16", activation_checkpointing: bool = True,
                shard_group: int | None = None) -> dict:
    """The per-GPU memory at the peak of a training step (in backward; the optimizer step's temporaries come
    when the activations are gone): {"rows": [(label, bytes)], "allocated" (what torch.cuda.max_memory_allocated
    reports), "total", "fits", "header"}. Parameters, gradients and AdamW's moments are fp32, sharded over
    `shard_group` GPUs (default all; HSDP replicates them across groups); FSDP gathers one block (plus one
    prefetched) in the compute dtype; its gradient exists in that dtype, then in fp32 for the reduce-scatter, with
    the previous block's still in flight. Activations are measured by `probe_activations`, not guessed."""
    shards = runs.check_shard_group(world_size, shard_group)
    dtype = DTYPES[precision]
    model = meta_model(params, dtype)
    blocks = model.blocks()
    n = sum(p.numel() for p in model.parameters())
    block_n = [sum(p.numel() for p in b.parameters()) for b in blocks]
    probe = probe_activations(model, (batch, 16, *latent_hw), text_tokens, dtype)  # a few seconds for 57 blocks

    c = dtype.itemsize
    rows = [(f"parameters, fp32, sharded over {shards}", 4 * n / shards),
            (f"gradients, fp32, sharded over {shards}", 4 * n / shards),
            (f"AdamW moments m and v, fp32, sharded over {shards}", 8 * n / shards),
            (f"gathered parameters: 2 blocks ({precision}) + non-block layers", c * (2 * max(block_n) + n - sum(block_n))),
            (f"unsharded gradients of 1 block ({precision})", c * max(block_n)),
            ("reduce-scatter inputs of 2 blocks in flight (fp32)", 2 * 4 * max(block_n))]
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
              f"batch {batch} per GPU × {world_size} GPUs, {precision} compute, "
              f"{'FSDP2' if shards == world_size else f'HSDP ({world_size // shards} replicas × {shards} shards)'}, "
              f"activation checkpointing {'on' if activation_checkpointing else 'off'}")
    return {"rows": rows, "allocated": allocated, "total": total, "fits": total <= gpu_gib * GiB,
            "gpu_gib": gpu_gib, "header": header, "parameters": n}


def format_plan(plan: dict) -> str:
    lines = [plan["header"]] + [f"  {label:<72} {value / GiB:8.2f} GiB" for label, value in plan["rows"]]
    total, gpu = plan["total"] / GiB, plan["gpu_gib"]
    verdict = f"fits ({gpu - total:.1f} GiB headroom)" if plan["fits"] else f"does NOT fit (short by {total - gpu:.1f} GiB)"
    lines.append(f"  {'total':<72} {total:8.2f} GiB of {gpu:.4g} GiB -> {verdict}")
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
    cuda = torch.cuda.is_available()  # default: this card's memory as torch sees it ("80 GB": ~79.2 GiB), else 80
    gpu_gib = args.gpu_memory or (torch.cuda.get_device_properties(0).total_memory / GiB if cuda else 80)
    plan = memory_plan(mmdit.CONFIGS[name], latent_hw=latent_hw, text_tokens=text_tokens, batch=args.batch_size,
                       world_size=args.world_size or int(os.environ.get("WORLD_SIZE", 1)), gpu_gib=gpu_gib,
                       precision=args.precision, activation_checkpointing=not args.no_activation_checkpointing,
                       shard_group=args.shard_group)
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
    p.add_argument("--batch-size", type=positive_int, help="images per VAE call (default: 1 on CPU, planned "
                   "from free memory on a GPU)")
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
    t.add_argument("--shard-group", type=positive_int, help="shard the state over groups of N ranks (one node), "
                   "replicated across groups (HSDP; default: one group of all ranks)")
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
    g.add_argument("--gpu-memory", type=number(0, above=True), help="GiB per GPU (default: this GPU's, else 80)")

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
