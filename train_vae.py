"""SC-VAE (paper Sec. 4.1, Eq. 1-4): fine-tune the decoder of the F16 autoencoder so that it matches the
quality of the official F8 one, while the latent space the diffusion model knows stays exactly the same.

    # train (one GPU: plain python; several: torchrun)
    torchrun --nproc_per_node 8 train_vae.py --vae ae.safetensors --data SA-1B/ --out runs/scvae --steps 20000
    # Tables 4 / 8 of the paper: F8, F16 before and F16 after, on an image folder at one resolution
    python train_vae.py --vae ae.safetensors --trained runs/scvae/vae-f16.safetensors --eval Aesthetic-Eval/ \\
        --eval-size 2048

The models: the teacher is the official autoencoder (F8), frozen; the student is the same weights run as
F16 (stride-2 first conv), and ONLY its decoder trains, so the latents stay the pretrained F16 encoder's.
The decoder minimizes Eq. 4 (L2 + scale consistency, Eq. 1 + LPIPS + an adaptively weighted GAN term)
against a patch discriminator with the hinge loss.

Departures from the authors' released code (also in README):
- D returns logits; theirs ends in a sigmoid, which turns the hinge loss into a linear, saturating one.
- x̂ is not clamped in the L2 term: a clamp has no gradient exactly where the decoder overshoots.
- latents are the posterior mean (they sample), as the diffusion model's latents are encoded.
- the gradient penalty is off by default (theirs: γ = 10, `--gp-weight 10`).
- decoder and D both step on every batch, as in taming-transformers (theirs alternate between batches,
  D seeing the previous batch's x̂).
- w comes from gradients averaged over the ranks: the global batch's w, not one per GPU.

Determinism: sample order, crops and D's initialization depend only on --seed and the stream position, so
a run depends on the global batch, not on its split over GPUs, and --resume continues it bit for bit.
Safety (runs.py, as for train_wlf.py): a locked run folder; a step with a non-finite loss or gradient norm
makes no update, --max-bad-steps of them in a row stop the run; verified checkpoints that record the data and
the loss settings, which --resume must match.

Imports from other scripts, to keep one mechanism for each concern: train_wlf's SampleStream (the seeded
sample order); runs.py's process group (torchrun or a 1-rank group), run folder, checkpoints and argument
checks; metrics' image reader (and its resize, image suffixes and unreadable-file types), LPIPS and the reconstruction metrics.
"""
import argparse
import random
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

import metrics
import runs
import vae
from runs import number, positive_int, whole_number
from train_wlf import SampleStream


# ---------------------------------------------------------------------------------------------------------
# SC-VAE: the losses (Eq. 1, Eq. 4), the discriminator, the training loop


def scale_consistency_loss(teacher_feature: Tensor, student_feature: Tensor) -> Tensor:
    """Eq. 1: MSE between the F8 teacher's penultimate decoder feature (B, C, H, W) and the F16 student's
    (B, C, H/2, W/2) brought to H by nearest ×2 upsampling. Both are swish(norm_out(·)), before conv_out."""
    up = F.interpolate(student_feature, size=teacher_feature.shape[-2:], mode="nearest")
    return F.mse_loss(up, teacher_feature)


class Discriminator(nn.Module):
    """Patch discriminator: spectral-normalized 3×3 stride-2 convs (InstanceNorm after all but the first,
    LeakyReLU 0.2 after each), then a 1×1 conv to one logit per patch: (B, 3, H, W) -> (B, 1, H/2^n, W/2^n)."""

    def __init__(self, channels: tuple[int, ...] = (64, 128, 256, 512, 512, 512)):
        super().__init__()
        layers, c_in = [], 3
        for i, c in enumerate(channels):
            layers.append(nn.utils.parametrizations.spectral_norm(nn.Conv2d(c_in, c, 3, stride=2, padding=1)))
            if i > 0:
                layers.append(nn.InstanceNorm2d(c))
            layers.append(nn.LeakyReLU(0.2))
            c_in = c
        layers.append(nn.Conv2d(c_in, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def gradient_penalty(real_logits: Tensor, real: Tensor) -> Tensor:
    """mean over samples of (‖∇ₓ Σ D(x)‖₂ − 1)², with the graph kept for the second-order backward."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


def adaptive_weight(perceptual: Tensor, adversarial: Tensor, last_layer: Tensor, max_weight: float) -> Tensor:
    """w = ‖∇ perceptual‖ / max(‖∇ adversarial‖, 1e-8) w.r.t. the decoder's last weight, clamped to
    ≤ max_weight and detached: the GAN term gets the perceptual term's gradient scale at the output."""
    (g_p,) = torch.autograd.grad(perceptual, last_layer, retain_graph=True)
    (g_a,) = torch.autograd.grad(adversarial, last_layer, retain_graph=True)
    all_reduce_mean([g_p, g_a])  # the global batch's w: a per-rank w would make the run depend on the split
    return (g_p.norm() / g_a.norm().clamp_min(1e-8)).clamp(max=max_weight).detach()


class SCVAE(NamedTuple):
    teacher: vae.AutoEncoder  # F8, frozen
    student: vae.AutoEncoder  # F16: only its decoder trains
    disc: Discriminator
    lpips: metrics.LPIPS | None  # frozen; None with --lambda-lpips 0


def generator_losses(m: SCVAE, x: Tensor, args, adversarial: bool) -> dict[str, Tensor]:
    """All terms of L_S (Eq. 4) for the batch x in [−1, 1]; "total" is what the decoder minimizes:
    L2(x̂, x) + λ_sc·L_sc + λ_lpips·LPIPS(x̂, x) + λ_adv·w·(−mean D(x̂)). Also returns x̂ for D's step."""
    with torch.no_grad():
        z = m.student.encode(x)  # the frozen F16 encoder: the latent space of the diffusion model
        _, f_t = m.teacher.decode(m.teacher.encode(x), return_feature=True, partitions=1)
    # partitions=1: a 512² crop needs no tiling of the last stage, and one conv is the plainest to differentiate
    x_hat, f_s = m.student.decode(z, return_feature=True, partitions=1)
    out = {"x_hat": x_hat, "l2": F.mse_loss(x_hat, x), "sc": scale_consistency_loss(f_t, f_s),
           "lpips": m.lpips(x_hat, x).mean() if m.lpips else x.new_zeros(())}
    total = out["l2"] + args.lambda_sc * out["sc"] + args.lambda_lpips * out["lpips"]
    if adversarial:
        m.disc.requires_grad_(False)  # D is a fixed critic here; its own step comes next
        out["adv"] = -m.disc(x_hat).mean()
        m.disc.requires_grad_(True)
        last = m.student.decoder.conv_out.weight
        out["w"] = adaptive_weight(out["lpips"], out["adv"], last, args.max_adaptive_weight)
        total = total + args.lambda_adv * out["w"] * out["adv"]
    out["total"] = total
    return out


def discriminator_loss(m: SCVAE, x: Tensor, x_hat: Tensor, gp_weight: float) -> dict[str, Tensor]:
    """Hinge loss on real x and fake x̂ (+ γ·gradient penalty on the real images); "d_total" is minimized."""
    real = x.detach().requires_grad_(gp_weight > 0)
    logits = m.disc(torch.cat([real, x_hat.detach()]))  # one pass: InstanceNorm is per sample
    real_logits, fake_logits = logits.chunk(2)
    out = {"d": hinge_d_loss(real_logits, fake_logits),
           "d_real": real_logits.detach().mean(), "d_fake": fake_logits.detach().mean()}
    out["d_total"] = out["d"]
    if gp_weight > 0:
        out["gp"] = gradient_penalty(real_logits, real)
        out["d_total"] = out["d"] + gp_weight * out["gp"]
    return out


def train(args) -> None:
    if missing := [f"--{n}" for n in ("data", "out") if getattr(args, n) is None]:
        raise vae.UserError(f"training needs {' and '.join(missing)} (or --eval DIR to evaluate)")
    if args.lambda_adv and not args.lambda_lpips:
        raise vae.UserError("--lambda-adv needs --lambda-lpips > 0: the GAN term's adaptive weight is measured "
                            "against LPIPS' gradient")
    rank, world, device = runs.setup_distributed(args.device)
    run, root = Path(args.out), Path(args.data)
    runs.on_rank0(runs.open_run, run, files=(run / f"{args.export_name}.safetensors",),
                  folders=(run / args.export_name,))  # locked, writable, leftovers of killed runs removed
    runs.check_shared(run)  # every rank sees rank 0's run folder (a shared file system)
    names, fingerprint = runs.on_rank0(image_list, run, root)  # one listing: a node's own view cannot differ
    files = [root / name for name in names]
    # What a checkpoint records and a resume must match: the data (files, crops, order) and the loss.
    data = {**fingerprint, "crop": args.resolution, "seed": args.seed,
            "global_batch": args.batch_size * world}  # the stream is cut by the global batch (not so in train_wlf)
    loss_settings = {k: getattr(args, k) for k in LOSS_SETTINGS}
    checkpoint, meta = runs.on_rank0(runs.pick_checkpoint, run, args.resume)  # rank 0 verifies, all agree
    runs.require_same(checkpoint, meta, args, data=data, loss=loss_settings)
    m = load_models(args, device)
    if args.resolution % m.student.factor:
        raise vae.UserError(f"--resolution must be a multiple of {m.student.factor} (the F16 autoencoder's factor)")
    decoder = list(m.student.decoder.parameters())
    adamw = {"betas": (0.5, 0.9) if args.gan_betas else (0.9, 0.999), "weight_decay": args.weight_decay}
    opt_g = torch.optim.AdamW(decoder, lr=args.lr, **adamw)
    opt_d = torch.optim.AdamW(m.disc.parameters(), lr=args.disc_lr or args.lr, **adamw)
    ema = [p.detach().clone() for p in decoder] if args.ema > 0 else None
    trained = {"decoder": m.student.decoder, "disc": m.disc, "opt_g": opt_g, "opt_d": opt_d}  # what a checkpoint holds
    say = tqdm.write if rank == 0 else (lambda message: None)  # rank 0 speaks (above the progress bar)
    step, bad = 0, runs.BadSteps(args.max_bad_steps, run)
    if checkpoint is not None:
        restore(checkpoint, trained, ema)
        step, bad.skipped = meta["step"], meta["skipped"]
        say(f"resumed from {checkpoint} at step {step}")
    # Rank 0's decoder, D and EMA on every rank: replicas start equal whatever each node read or initialized
    for tensor in [*m.student.decoder.state_dict().values(), *m.disc.state_dict().values(), *(ema or [])]:
        if world > 1:
            dist.broadcast(tensor, src=0)
    # args.json; log.jsonl without the records after `step` (those steps run again)
    log_file = runs.open_log(run, step, {**vars(args), "world_size": world}) if rank == 0 else None
    b = args.batch_size  # step s, rank r: stream positions (s·world + r)·b + i, so only the global batch matters
    batches = [[(s * world + rank) * b + i for i in range(b)] for s in range(step, args.steps)]
    loader = torch.utils.data.DataLoader(CropStream(files, args.resolution, args.seed), batch_sampler=batches,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    bar = tqdm(total=args.steps, initial=step, desc="sc-vae", unit="step", dynamic_ncols=True,
               disable=rank != 0 or args.no_progress)
    tic, logged = time.perf_counter(), step
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    clip = args.max_grad_norm or float("inf")

    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        adversarial = step >= args.disc_start and args.lambda_adv > 0

        # The decoder's gradients (Eq. 4)
        with autocast:
            g = generator_losses(m, x, args, adversarial)
        g["total"].backward()
        average_gradients(m.student.decoder)
        g["grad_norm"] = nn.utils.clip_grad_norm_(decoder, clip)

        # D's, on the same batch and the x̂ above (detached: the decoder's update does not change them)
        d = {}
        if adversarial:
            with autocast:
                d = discriminator_loss(m, x, g["x_hat"], args.gp_weight)
            d["d_total"].backward()
            average_gradients(m.disc)
            d["d_grad_norm"] = nn.utils.clip_grad_norm_(m.disc.parameters(), clip)

        checked = {k: v for k, v in {**g, **d}.items() if k in ("total", "grad_norm", "d_total", "d_grad_norm")}
        if bad.ok(step + 1, say, **checked):  # NaN / inf: neither model steps, on every rank
            opt_g.step()
            if ema is not None:
                for e, p in zip(ema, decoder):
                    e.lerp_(p.detach(), 1 - args.ema)
            if adversarial:
                opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        if step % args.log_every == 0 or step == args.steps:  # the terms averaged over the ranks, and throughput
            terms = {k: v.detach().float() for k, v in sorted({**g, **d}.items()) if k != "x_hat"}
            values = torch.stack(list(terms.values()))
            all_reduce_mean([values])
            record = {"step": step, **dict(zip(terms, values.tolist())), "skipped_images": int(batch["skipped"].sum()),
                      "skipped_updates": bad.skipped,
                      "images_per_s": (step - logged) * args.batch_size * world / (time.perf_counter() - tic)}
            if device.type == "cuda":
                record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if rank == 0:
                runs.log_line(log_file, record)
            shown = " ".join(f"{k} {record[k]:.4g}" for k in ("total", "l2", "sc", "lpips", "adv", "w", "d", "gp")
                             if k in record)
            say(f"step {step} {shown} {record['images_per_s']:.2f} img/s")
            tic, logged = time.perf_counter(), step
        stopping = args.stop_after is not None and step >= args.stop_after
        # at the last step too, so that a longer run can --resume from it
        saving = stopping or args.checkpoint_every and (step % args.checkpoint_every == 0 or step == args.steps)
        if saving and not bad.streak:  # none amid skipped updates: they must not rotate the good ones out
            meta = {"step": step, "data": data, "loss": loss_settings, "skipped": bad.skipped}
            state = {"ema": ema, **{k: v.state_dict() for k, v in trained.items()}}  # decoder, D, both optimizers
            say(f"saved {runs.save_state(run, meta, state, args.keep_checkpoints)}")
            tic, logged = time.perf_counter(), step  # saving is not training time: a new throughput window
        if stopping and step < args.steps:
            say(f"stopped after step {step} (--stop-after); continue with the same command and --resume")
            break
    bar.close()
    if log_file:
        log_file.close()
    if step >= args.steps:
        export_f16(m, ema, run, args.export_name)
    dist.barrier()  # every rank is done before the process group is destroyed (gloo's teardown races otherwise)


def load_models(args, device: torch.device) -> SCVAE:
    try:  # the loaders' messages name the file and what is wrong with it
        teacher = vae.load_vae(args.vae, stride=1, device=device, dtype=torch.float32, config=args.config)
        student = vae.load_vae(args.vae, stride=2, device=device, dtype=torch.float32, config=args.config)
        # Without LPIPS (its VGG weights are a download) the objective is L2 + λ_sc·L_sc: the demo's, in demo/.
        lpips = metrics.load_lpips(args.lpips_vgg, args.lpips_heads, device=device) if args.lambda_lpips else None
    except (OSError, ValueError) as e:
        raise vae.UserError(str(e)) from None
    for frozen in (teacher, lpips, student.encoder):  # only the student's decoder trains
        if frozen is not None:
            frozen.requires_grad_(False).eval()
    torch.manual_seed(args.seed)  # D's initialization (and its spectral-norm vectors) are the same on every rank
    return SCVAE(teacher, student, Discriminator(tuple(args.disc_channels)).to(device), lpips)


# ---------------------------------------------------------------------------------------------------------
# Data: every image under a folder (recursively), random crops at native resolution, the sample stream


def list_images(folder: Path, flag: str = "--data") -> list[Path]:
    """Every image file under `folder`, recursively, sorted; vae.UserError (naming `flag`) if there is none."""
    if not folder.is_dir():
        raise vae.UserError(f"{flag} {folder}: no such directory")
    suffixes = metrics.IMAGE_SUFFIXES
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and not p.name.startswith("."))
    if not files:
        raise vae.UserError(f"{flag} {folder}: no images ({', '.join(suffixes)}) in it")
    return files


def image_list(run: Path, root: Path) -> tuple[list[str], dict]:
    """The images under `root` (names relative to it) and their fingerprint, listed by rank 0 alone (runs.on_rank0)
    and kept as images.json in the run folder: the list this start trained on, in stream order."""
    names = [p.relative_to(root).as_posix() for p in list_images(root)]
    vae.write_json(run / "images.json", names)
    return names, runs.files_fingerprint(root, [root / name for name in names])


class CropStream(torch.utils.data.Dataset):
    """Item p of the endless sample stream: a size×size crop of image stream[p], placed by (seed, p), at the image's
    own resolution (the decoder must learn the finest detail; only images smaller than the crop are resized, up,
    bicubic). An unreadable image is replaced by the next one in the list (deterministically) and counted."""

    def __init__(self, files: list[Path], size: int, seed: int):
        self.files, self.size, self.seed = files, size, seed
        self.stream = SampleStream(len(files), seed)

    def __getitem__(self, position: int) -> dict:
        index, rng = self.stream[position], random.Random(f"{self.seed}/{position}")
        for attempt in range(len(self.files)):
            path = self.files[(index + attempt) % len(self.files)]
            try:
                image = Image.fromarray(metrics.load_image(path))
            except metrics.UNREADABLE as e:
                print(f"skipped {path}: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
                continue
            if min(image.size) < self.size:
                image = metrics.resize_shorter_side(image, self.size, Image.Resampling.BICUBIC)
            left, top = rng.randint(0, image.width - self.size), rng.randint(0, image.height - self.size)
            crop = image.crop((left, top, left + self.size, top + self.size))
            return {"image": metrics.image_to_tensor(crop)[0], "skipped": attempt}
        raise RuntimeError("no image in --data can be read")


# ---------------------------------------------------------------------------------------------------------
# Data parallelism by hand: the decoder and D are small, and the gradient penalty's double backward and the
# adaptive weight's partial gradients are simpler without a DDP wrapper


def all_reduce_mean(tensors: list[Tensor]) -> None:
    """In place: each tensor becomes its mean over the ranks (one all-reduce of a flat buffer)."""
    if dist.is_initialized() and (world := dist.get_world_size()) > 1:
        flat = torch.cat([t.flatten() for t in tensors])
        dist.all_reduce(flat)
        for t, v in zip(tensors, (flat / world).split([t.numel() for t in tensors])):
            t.copy_(v.view_as(t))


def average_gradients(module: nn.Module) -> None:
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # every rank must contribute the same buffer layout
            p.grad = torch.zeros_like(p)
    all_reduce_mean([p.grad for p in params])


# ---------------------------------------------------------------------------------------------------------
# Checkpoints (with the EMA), the F16 export


LOSS_SETTINGS = ("lambda_sc", "lambda_lpips", "lambda_adv", "max_adaptive_weight", "disc_start", "gp_weight")


def restore(path: Path, trained: dict, ema: list[Tensor] | None) -> None:
    """Load the verified checkpoint `path` (runs.save_state's state.pt) into the models, optimizers and EMA."""
    state = runs.load_state(path)
    try:  # load_state_dict moves the tensors to the models' device
        for k, v in trained.items():
            v.load_state_dict(state[k])
    except (RuntimeError, KeyError, ValueError) as e:
        raise vae.UserError(f"cannot load {path} into these models (another --vae or --disc-channels than the "
                            f"run's?): {str(e).splitlines()[0]}") from None
    for e, v in zip(ema or [], state["ema"] or []):
        e.copy_(v)


def export_f16(m: SCVAE, ema: list[Tensor] | None, run: Path, name: str) -> None:
    """The student (pretrained encoder + EMA decoder) as an official-layout file and a diffusers vae/ folder, both
    with stride 2 in their config, both for vae.load_vae. Training is over, so the EMA may overwrite the weights."""
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(m.student.decoder.parameters(), ema):
                p.copy_(e)
    runs.check_finite(m.student.state_dict(), f"the export {run / name}")  # on every rank: an all-reduce

    def write() -> None:  # on rank 0 (runs.on_rank0: an OSError is one line naming the file, on every rank)
        for path in (run / f"{name}.safetensors", run / name):
            vae.save_vae(m.student, path)
        print(f"exported {run / name}.safetensors and {run / name}/ ({'EMA' if ema is not None else 'last'} decoder)")
    runs.on_rank0(write)


# ---------------------------------------------------------------------------------------------------------
# --eval: Tables 4 / 8 of the paper


@torch.no_grad()
def evaluate(args) -> None:
    """PSNR / SSIM / NMSE / LPIPS of F8, F16 before and F16 after on every image under --eval, as in Tables 4
    and 8: the shorter side resized to --eval-size (Lanczos), the centre square encoded (posterior mean), decoded
    (partitioned), rounded to 8 bits and compared with the input. Printed as a table; --json writes every row."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    root, n = Path(args.eval), args.eval_size
    files = list_images(root, "--eval")[: args.eval_limit]
    trained = args.trained or (Path(args.out) / f"{args.export_name}.safetensors" if args.out else None)
    if trained is not None and not Path(trained).exists():
        raise vae.UserError(f"--trained {trained}: not found (train first, or give the exported F16 autoencoder)")
    if args.json:
        vae.check_writable(Path(args.json), f"--json {args.json}")  # before the models and the images, not after
    try:
        models = {"F8": vae.load_vae(args.vae, stride=1, device=device, dtype=dtype, config=args.config),
                  "F16 before": vae.load_vae(args.vae, stride=2, device=device, dtype=dtype, config=args.config)}
        if trained is not None:
            models["F16 after"] = vae.load_vae(trained, device=device, dtype=dtype)
        lpips = metrics.load_lpips(args.lpips_vgg, args.lpips_heads, device=device)
    except (OSError, ValueError) as e:
        raise vae.UserError(str(e)) from None
    if trained is not None and models["F16 after"].params.stride != 2:
        raise vae.UserError(f"--trained {trained}: not an F16 autoencoder (stride 1 in its config/metadata)")
    if n % (factor := max(ae.factor for ae in models.values())):
        raise vae.UserError(f"--eval-size must be a multiple of {factor}")

    rows, skipped = {name: [] for name in models}, []
    for path in tqdm(files, desc="eval", unit="image", disable=args.no_progress, file=sys.stderr):
        try:
            image = Image.fromarray(metrics.load_image(path))
        except metrics.UNREADABLE as e:
            skipped.append({"file": str(path), "reason": f"{type(e).__name__}: {e}".splitlines()[0]})
            continue
        if min(image.size) != n:
            image = metrics.resize_shorter_side(image, n)
        left, top = (image.width - n) // 2, (image.height - n) // 2
        rgb = np.asarray(image.crop((left, top, left + n, top + n)))
        x = metrics.image_to_tensor(rgb).to(device, dtype)
        for name, ae in models.items():
            y = ae.decode(ae.encode(x)).float().clamp(-1, 1)
            rec = ((y[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
            rows[name].append({"file": path.relative_to(root).as_posix(), "psnr": metrics.psnr(rec, rgb),
                               "ssim": metrics.ssim(rec, rgb), "nmse": metrics.nmse(rec, rgb),
                               "lpips": metrics.lpips(rec, rgb, model=lpips)})
    if not rows["F8"]:
        raise vae.UserError(f"--eval {root}: no readable image ({skipped[0]['file']}: {skipped[0]['reason']})")
    summary = {name: {k: float(np.mean([r[k] for r in rs])) for k in ("psnr", "ssim", "nmse", "lpips")}
               for name, rs in rows.items()}

    print(f"{len(rows['F8'])} image(s) at {n}×{n} (shorter side resized, centre square)")
    print(f"{'autoencoder':<12} {'PSNR↑':>8} {'SSIM↑':>7} {'NMSE↓':>8} {'LPIPS↓':>7}")
    for name, v in summary.items():
        print(f"{name:<12} {v['psnr']:8.2f} {v['ssim']:7.4f} {v['nmse']:8.5f} {v['lpips']:7.4f}")
    for item in skipped:
        print(f"skipped {item['file']}: {item['reason']}")
    if args.json:
        settings = {"vae": str(args.vae), "trained": str(trained) if trained else None, "size": n,
                    "images": len(rows["F8"]), "precision": args.precision}
        vae.write_json(Path(args.json), {"settings": settings, "summary": summary, "images": rows, "skipped": skipped})
        print(f"wrote {args.json}")


# ---------------------------------------------------------------------------------------------------------
# CLI


def _channels(text: str) -> list[int]:  # positive_int's message names the bad width
    return [positive_int(c) for c in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    p = runs.Parser(description=__doc__[: __doc__.index("The models:")].rstrip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="the official F8 autoencoder (teacher, and the student's start): "
                   "Flux ae.safetensors, an SD3 checkpoint or a diffusers vae/ folder")
    p.add_argument("--config", choices=["flux", "sd3"], help="latent scale/shift (default: from the file)")
    p.add_argument("--data", help="training images, searched recursively (the authors: SA-1B)")
    p.add_argument("--out", help="run folder: checkpoints/, log.jsonl, args.json, vae-f16.safetensors, vae-f16/")
    p.add_argument("--steps", type=positive_int, default=20000, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=4, help="crops per GPU per step")
    p.add_argument("--resolution", type=positive_int, default=512, help="random square crop size (the paper: 512)")
    p.add_argument("--lr", type=number(0, above=True), default=1e-5, help="AdamW lr of the decoder (the paper: 1e-5)")
    p.add_argument("--disc-lr", type=number(0, above=True), help="discriminator learning rate (default: --lr)")
    p.add_argument("--weight-decay", type=number(0), default=1e-4, help="AdamW weight decay (the paper: 1e-4)")
    p.add_argument("--gan-betas", action="store_true", help="Adam betas (0.5, 0.9) instead of (0.9, 0.999)")
    p.add_argument("--max-grad-norm", type=number(0), default=1.0, help="gradient clipping of decoder and D (0: off)")
    p.add_argument("--lambda-sc", type=number(0), default=1.0, help="weight of the scale-consistency loss, Eq. 1")
    p.add_argument("--lambda-lpips", type=number(0), default=0.1, help="weight of LPIPS")
    p.add_argument("--lambda-adv", type=number(0), default=0.05, help="weight of the adaptive GAN loss (0: no GAN)")
    p.add_argument("--max-adaptive-weight", type=number(0, above=True), default=1e4, help="clamp of the adaptive w")
    p.add_argument("--disc-start", type=whole_number, default=0, help="step from which D trains and L_adv counts")
    p.add_argument("--disc-channels", type=_channels, default=[64, 128, 256, 512, 512, 512], help="widths of D's convs")
    p.add_argument("--gp-weight", type=number(0), default=0.0, help="gradient penalty γ on real images (theirs: 10)")
    p.add_argument("--ema", type=number(0, 1, below=True), default=0.9999, help="EMA decay of the export (0: off)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="compute dtype (bf16 autocast; weights and optimizer stay fp32). The paper: fp32")
    p.add_argument("--lpips-vgg", help="torchvision's vgg16-397923af.pth (default: the torch hub cache)")
    p.add_argument("--lpips-heads", help="LPIPS v0.1 vgg.pth (default: the torch hub cache, an installed lpips)")
    p.add_argument("--checkpoint-every", type=whole_number, default=1000, help="steps between checkpoints (0: none)")
    p.add_argument("--keep-checkpoints", type=positive_int, default=2)
    p.add_argument("--resume", nargs="?", const="latest", help="a checkpoint folder; alone: --out's newest good one")
    p.add_argument("--allow-data-change", action="store_true", help="--resume on other images, crops or seed")
    p.add_argument("--allow-loss-change", action="store_true", help="--resume with other loss weights")
    p.add_argument("--max-bad-steps", type=positive_int, default=3, help="stop after N non-finite steps in a row")
    p.add_argument("--stop-after", type=positive_int, help="save a checkpoint, exit after this step (job time limits)")
    p.add_argument("--export-name", default="vae-f16", help="name of the exported autoencoder under --out")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order, crops and D's initialization")
    p.add_argument("--workers", type=whole_number, default=4, help="image decoding processes per GPU")
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--device", help="default cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--eval", metavar="DIR", help="evaluate instead of training: PSNR / SSIM / NMSE / LPIPS of the "
                   "F8 autoencoder and the F16 one before and after SC-VAE training, on the images under DIR")
    p.add_argument("--trained", help="--eval: the trained F16 autoencoder (default: --out/vae-f16.safetensors)")
    p.add_argument("--eval-size", type=positive_int, default=2048, help="--eval: resolution (the paper: 2048 and 4096)")
    p.add_argument("--eval-limit", type=positive_int, help="--eval: only the first N images")
    p.add_argument("--json", help="--eval: also write the per-image results and the summary here")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    runs.run_command(evaluate if args.eval else train, args)


if __name__ == "__main__":
    main()
