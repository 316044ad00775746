"""Pre-train the demo's F8 autoencoder from scratch: the one stage the paper has no recipe for.

The paper starts from the official Flux autoencoder; the demo has none of its size, so this script trains a
small one with the same architecture (vae.AutoEncoder, 16 latent channels) as a KL-regularized autoencoder:

    L = ‖D(z) − x‖² + β·KL(q(z|x) ‖ N(0, I)),   z = mean + std·ε ~ q(z|x),

on the training images and on the same images at half size (the scale the F16 encoder looks at, see PARAMS).

Afterwards the latents of the training images set the autoencoder's shift and scale (mean and 1/std of the
posterior means), so the diffusion model sees latents of unit variance, as Flux's 0.1159 / 0.3611 do. The
F16 step (stride-2 first conv, decoder fine-tuned with the scale-consistency loss) is then the paper's,
through train_vae.py.

    python demo/train_ae.py --data data/ --out ae-f8.safetensors
"""
import argparse
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import metrics  # noqa: E402
import vae  # noqa: E402

# 16 latent channels as Flux's; widths 16-32-64-64 (Flux: 128-256-512-512), one ResNet block per level (Flux: 2),
# 4 GroupNorm groups (Flux: 32). A group of 4 channels keeps Flux's channels per group: a flat region normalizes to
# a 4-vector of mean 0 and variance 1, which still tells colours apart; with 2 channels per group only its sign
# would survive, and flat colour is most of this data set.
#
# Each step trains on the images and on the same images at half size (2×2 average pooled). The F16 encoder of the
# next stage is this one with a stride-2 first convolution: it looks at the image at half resolution, where the
# shapes are half as large; trained on full-size images only, it would meet those sizes first there.
PARAMS = vae.AutoEncoderParams(3, 16, 3, (1, 2, 4, 4), 1, 16, scale_factor=1.0, shift_factor=0.0, groups=4)


def load_images(folder: Path) -> torch.Tensor:
    rows, _ = metrics.read_metadata(folder / "metadata.jsonl")
    images = [metrics.load_image(folder / r["file_name"]) for r in rows]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8


def crops(images: torch.Tensor, batch: int, size: int, rng: random.Random) -> torch.Tensor:
    H, W = images.shape[-2:]
    out = []
    for _ in range(batch):
        i, y, x = rng.randrange(len(images)), rng.randrange(H - size + 1), rng.randrange(W - size + 1)
        out.append(images[i, :, y:y + size, x:x + size])
    return torch.stack(out).float() / 127.5 - 1


def train(images, steps: int, batch: int, size: int, lr: float, beta: float, seed: int, log_every: int,
          init: Path | None = None):
    torch.manual_seed(seed)
    rng, ae = random.Random(seed), vae.AutoEncoder(PARAMS)
    with torch.no_grad():  # log-variance starts at −8 (std 0.02): sampled latents carry the image from step 1
        ae.encoder.conv_out.bias[PARAMS.z_channels:] = -8.0
    warmup = 1
    if init:  # a warm restart: the weights of an earlier run, the learning-rate schedule anew, warmed up over 50
        ae.load_state_dict(vae.load_vae(init).state_dict())  # steps (a fresh Adam's first steps are lr-sized)
        warmup = 50
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=1e-4)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x = crops(images, batch, size, rng)
        rec, kl = 0.0, 0.0
        for image in (x, F.avg_pool2d(x, 2)):  # the images, and the same images at half size (see PARAMS)
            mean, logvar = ae.encoder(image).chunk(2, dim=1)
            logvar = logvar.clamp(-30.0, 20.0)
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
            rec = rec + F.mse_loss(ae.decoder(z), image) / 2
            kl = kl + 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean() / 2
        for group in opt.param_groups:  # cosine decay to 10%, after a warm-up when restarting
            group["lr"] = lr * min(1.0, step / warmup) * (0.55 + 0.45 * np.cos(np.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        (rec + beta * kl).backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step} mse {rec.item():.5f} kl {kl.item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return ae.eval()


@torch.no_grad()
def latent_statistics(ae: vae.AutoEncoder, images: torch.Tensor, count: int = 512) -> tuple[float, float]:
    """(mean, std) of the posterior means over the first `count` whole images."""
    z = torch.cat([ae.encoder(images[i:i + 32].float() / 127.5 - 1).chunk(2, dim=1)[0]
                   for i in range(0, min(count, len(images)), 32)])
    return z.mean().item(), z.std().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train the demo's F8 autoencoder from scratch.")
    p.add_argument("--data", required=True, help="the images + metadata.jsonl of demo/shapes.py make")
    p.add_argument("--out", required=True, help="the .safetensors file to write (official layout)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--crop", type=int, default=128, help="random square crops (a multiple of 8); the default: whole "
                   "images, as GroupNorm's statistics of a crop are not those of the image it is cut from")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--beta", type=float, default=1e-4, help="KL weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="start from this autoencoder (written by an earlier run) instead of random weights")
    p.add_argument("--log-every", type=int, default=100)
    a = p.parse_args(argv)
    try:
        if a.steps < 1 or a.batch_size < 1 or a.crop < 8 or a.crop % 8:
            raise vae.UserError("--steps and --batch-size must be ≥ 1, --crop a positive multiple of 8")
        vae.check_writable(Path(a.out), f"--out {a.out}")
        images = load_images(Path(a.data))
        if min(images.shape[-2:]) < a.crop:
            raise vae.UserError(f"--crop {a.crop} is larger than the images ({tuple(images.shape[-2:])})")
    except (vae.UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ae = train(images, a.steps, a.batch_size, a.crop, a.lr, a.beta, a.seed, a.log_every, a.init and Path(a.init))
    mean, std = latent_statistics(ae, images)
    ae.params = replace(ae.params, shift_factor=mean, scale_factor=1 / std)
    vae.save_vae(ae, Path(a.out))
    print(f"wrote {a.out}: latent shift {mean:.4f}, scale {1 / std:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
