"""GLCM score speed: metrics.glcm_patch_scores against the reference recipe (scikit-image
`graycomatrix` + `shannon_entropy`, one 64×64 patch at a time), on the same images in one run.

The test images are realistic 2048² / 4096² photographs: a mosaic of scikit-image's bundled photos
(astronaut, coffee, chelsea, rocket, retina), each resized to 1024² with Lanczos, plus mild Gaussian
noise (σ = 2 gray values) as a camera or a decoder leaves it. Both sides get the same 64-level map
(OpenCV-exact grayscale // 4); the gray conversion is timed separately.

    python benchmarks/bench_metrics.py                   # CPU, both sizes
    python benchmarks/bench_metrics.py --device cuda     # ours on the GPU (the reference is CPU-only)
    python benchmarks/bench_metrics.py --sizes 2048 --entropy haralick --threads 1

With --fid: throughput of FID's InceptionV3 features instead (metrics.FIDInceptionV3, fp32, random weights:
the speed does not depend on them) on batches of random uint8 images, for both resizes:

    python benchmarks/bench_metrics.py --fid                          # 1024² images, batch 8, CPU
    python benchmarks/bench_metrics.py --fid --sizes 4096 --device cuda
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np
import torch
from PIL import Image

import metrics


def photo_mosaic(size: int, seed: int = 0) -> np.ndarray:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.retina()]
    tile = 1024
    out = np.empty((size, size, 3), dtype=np.uint8)
    k = 0
    for i in range(0, size, tile):
        for j in range(0, size, tile):
            im = Image.fromarray(photos[k % len(photos)]).resize((tile, tile), Image.LANCZOS)
            out[i : i + tile, j : j + tile] = np.asarray(im)[: size - i, : size - j]
            k += 1
    noise = np.random.default_rng(seed).normal(0, 2, out.shape)
    return np.clip(out + noise, 0, 255).round().astype(np.uint8)


def reference_patch_scores(levels: np.ndarray, entropy: str) -> np.ndarray:
    from skimage.feature import graycomatrix, graycoprops
    from skimage.measure import shannon_entropy

    angles = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    P = metrics.GLCM_PATCH
    ph, pw = levels.shape[0] // P, levels.shape[1] // P
    out = np.empty((ph, pw))
    for i in range(ph):
        for j in range(pw):
            glcm = graycomatrix(levels[i * P : (i + 1) * P, j * P : (j + 1) * P], [1, 2, 3, 4], angles,
                                levels=64, symmetric=False, normed=True)
            if entropy == "distinct":
                out[i, j] = shannon_entropy(glcm)
            else:
                out[i, j] = graycoprops(glcm, "entropy").mean() / math.log(2)
    return out


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def bench_fid(args, device):
    model = metrics.FIDInceptionV3().requires_grad_(False).eval().to(device)
    for size in args.sizes:
        images = torch.randint(0, 256, (args.fid_batch, 3, size, size), dtype=torch.uint8, device=device)
        for resize in metrics.FID_RESIZES:
            model.resize = resize
            model(images[:1])  # warm-up
            best = min(timed(lambda: model(images), device)[1] for _ in range(args.repeats))
            print(f"FID features, {size}² uint8, batch {args.fid_batch}, resize={resize}: "
                  f"{args.fid_batch / best:.2f} images/s ({best / args.fid_batch * 1e3:.0f} ms/image)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--entropy", choices=metrics.GLCM_ENTROPIES, default="distinct")
    ap.add_argument("--repeats", type=int, default=3, help="ours: best of this many runs (after one warm-up)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    ap.add_argument("--fid", action="store_true", help="FID InceptionV3 throughput instead (sizes default 1024)")
    ap.add_argument("--fid-batch", type=int, default=8, help="with --fid: images per batch")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    if args.fid:
        if args.sizes == ap.get_default("sizes"):
            args.sizes = [1024]
        with torch.no_grad():
            return bench_fid(args, device)
    print(f"entropy={args.entropy}; reference: scikit-image graycomatrix + "
          f"{'shannon_entropy' if args.entropy == 'distinct' else 'graycoprops(entropy)'} per patch, one run")
    for size in args.sizes:
        rgb = photo_mosaic(size)
        rgb_t = torch.from_numpy(rgb).to(device)
        levels, t_gray = timed(lambda: metrics.rgb_to_gray(rgb_t) >> 2, device)
        metrics.glcm_patch_scores(levels[:256, :256], entropy=args.entropy)  # warm-up (builds the plan)
        best = math.inf
        for _ in range(args.repeats):
            ours, t = timed(lambda: metrics.glcm_patch_scores(levels, entropy=args.entropy), device)
            best = min(best, t)
        ref_levels = levels.cpu().numpy()
        t = time.perf_counter()
        ref = reference_patch_scores(ref_levels, args.entropy)
        t_ref = time.perf_counter() - t
        ours = ours.cpu().numpy()
        n = ours.size
        print(f"{size}²: {n} patches | reference {t_ref:7.2f} s ({t_ref / n * 1e3:.3f} ms/patch) | "
              f"ours {best:7.3f} s ({best / n * 1e6:.0f} µs/patch) + gray {t_gray * 1e3:.0f} ms | "
              f"speed-up {t_ref / best:5.1f}× | max |Δ| per patch {np.abs(ours - ref).max():.1e}, "
              f"image score {ours.mean():.6f} vs {ref.mean():.6f} (|Δ| {abs(ours.mean() - ref.mean()):.1e})")


if __name__ == "__main__":
    main()
