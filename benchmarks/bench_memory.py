"""Memory and speed of sample.py's modes, in one run: end-to-end s/step and peak GPU memory of text-to-image at
4096² with the F16 autoencoder, RANDOM weights of the real sizes (flux-dev: transformer, T5-XXL, CLIP-L).

    python benchmarks/bench_memory.py                                   # the README table, on the GPU
    python benchmarks/bench_memory.py --device cpu --config tiny        # the same code path on the CPU, tiny

Rows: all on the GPU (bf16); --offload (components visit the GPU one at a time); --offload blocks (the
transformer's blocks streamed, offload.py); --offload blocks with fp8 weights; all on the GPU with fp8 weights.
fp8 storage comes from the loaders' `weight_dtype` (mmdit.load_transformer, text_encoders.load_t5): the random
weights are saved to --tmp and loaded back through it, as a real checkpoint would be; a build whose loaders have
no `weight_dtype` prints "fp8: not available in this build" and skips those rows. Each row reports its s/step
over --steps steps (the first included, as sample.py reports it; with --repeat the median) and its ratio to the all-on-GPU bf16 row; the
fp8 images are compared with the bf16 ones of the same seed (relative error, PSNR over the [−1, 1] range).
"""
import argparse
import inspect
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import mmdit  # noqa: E402
import sample  # noqa: E402
import text_encoders as te  # noqa: E402
from bench_sample import build  # noqa: E402


def pipeline(config: str, device, dtype) -> sample.Pipeline:
    """flux-dev / flux-schnell at real size; "mid" (a 0.5 B Flux, 4 + 8 blocks of width 1024) and "tiny" for
    the CPU: tiny_pipeline's encoders and autoencoder, with that transformer for "mid"."""
    if config in ("flux-dev", "flux-schnell"):
        return build(config, device, dtype)
    pipe = sample.tiny_pipeline(device=device, dtype=dtype)
    if config == "mid":
        pipe.transformer = mmdit.Flux(mmdit.FluxParams(vec_in_dim=32, context_in_dim=32, hidden_size=1024,
                                                       num_heads=8, depth=4, depth_single_blocks=8,
                                                       axes_dim=(32, 48, 48))).to(device, dtype).eval()
    return pipe


def fp8_pipeline(pipe: sample.Pipeline, folder: Path, dtype) -> sample.Pipeline | None:
    """The same pipeline with the transformer's and T5's large Linear weights stored in float8_e4m3fn, through
    the loaders' `weight_dtype` (the fp8 entry point); None where this build's loaders have no such argument."""
    loaders = (mmdit.load_transformer, te.load_t5)
    if not all("weight_dtype" in inspect.signature(f).parameters for f in loaders):
        return None
    mmdit.save_transformer(pipe.transformer, folder / "transformer.safetensors")
    t5 = pipe.conditioner.t5
    save_file({k: v.contiguous() for k, v in t5.state_dict().items()}, str(folder / "t5.safetensors"))
    fp8 = torch.float8_e4m3fn
    transformer = mmdit.load_transformer(str(folder / "transformer.safetensors"), device="cpu", dtype=dtype,
                                         weight_dtype=fp8)
    t5 = te.load_t5(folder / "t5.safetensors", device="cpu", dtype=dtype, weight_dtype=fp8)
    c = pipe.conditioner
    conditioner = te.FluxConditioner(c.clip, t5, c.clip_tokenizer, c.t5_tokenizer)
    return sample.Pipeline(pipe.model, pipe.family, transformer, pipe.ae, conditioner)


def place(pipe: sample.Pipeline, device):
    for module in (pipe.transformer, pipe.ae, *pipe.conditioner.encoders):
        module.to(device)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run(pipe, a, offload, device):
    """One generate() of the mode: images, s/step, peak GPU GiB (None on the CPU)."""
    place(pipe, "cpu" if offload else device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    images, stats = sample.generate(pipe, "a lighthouse at dawn", width=a.size, height=a.size, steps=a.steps,
                                    guidance=3.5, seed=0, partitions=a.partitions, device=device, offload=offload,
                                    progress=False)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    place(pipe, "cpu")  # the next row starts from an empty GPU
    return images, stats["seconds_per_step"], peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="flux-dev", choices=("flux-dev", "flux-schnell", "mid", "tiny"))
    p.add_argument("--size", type=int, help="pixels per side (default 4096; 512 for mid and tiny)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tmp", help="folder for the fp8 round trip's files (default: a temporary folder)")
    p.add_argument("--repeat", type=int, default=1, help="runs of every mode, round robin; the median s/step")
    p.add_argument("--skip", nargs="*", default=[], help="rows to leave out: gpu components blocks blocks-fp8 gpu-fp8")
    a = p.parse_args(argv)
    a.size = a.size or (4096 if a.config.startswith("flux") else 512)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{a.config} {a.size}² F16, {a.steps} steps, {dtype}, {card}, torch {torch.__version__}", flush=True)

    t0 = time.perf_counter()
    pipe = pipeline(a.config, device, dtype)
    print(f"built random {a.config} pipeline in {time.perf_counter() - t0:.1f} s", flush=True)
    images = {}
    where = "all on GPU" if device.type == "cuda" else "all on the CPU"
    modes = [("gpu", where, pipe, None),
             ("components", "--offload (components)", pipe, "components"),
             ("blocks", "--offload blocks", pipe, "blocks")]
    with tempfile.TemporaryDirectory(dir=a.tmp) as folder:
        fp8 = None if {"blocks-fp8", "gpu-fp8"} <= set(a.skip) else fp8_pipeline(pipe, Path(folder), dtype)
    if fp8 is None:
        print("fp8: not available in this build" if "weight_dtype" not in
              inspect.signature(mmdit.load_transformer).parameters else "fp8: rows skipped", flush=True)
    else:
        modes += [("blocks-fp8", "--offload blocks --weight-dtype fp8", fp8, "blocks"),
                  ("gpu-fp8", f"{where}, fp8 weights", fp8, None)]
    modes = [m for m in modes if m[0] not in a.skip]
    if not modes:
        raise SystemExit("--skip leaves no rows")
    seconds, peaks = {key: [] for key, *_ in modes}, {}
    run(modes[0][2], argparse.Namespace(**{**vars(a), "steps": 1}), modes[0][3], device)  # warm-up: lazy inits
    for _ in range(a.repeat):  # round robin: a load that comes and goes hits every mode alike
        for key, label, which, offload in modes:
            images[key], s, peak = run(which, a, offload, device)
            seconds[key].append(s)
            peaks[key] = peak if peak is None else max(peak, peaks.get(key) or 0)
            print(f"{label}: {s:.3f} s/step" + (f", peak {peak:.2f} GiB" if peak is not None else ""), flush=True)
    rows = [(key, label, statistics.median(seconds[key]), peaks[key]) for key, label, *_ in modes]

    base = next((s for k, _, s, _ in rows if k == "gpu"), None)
    print("\n| mode | s/step | × all on GPU (CPU) | peak GPU memory |\n| --- | --- | --- | --- |")
    for key, label, median, peak in rows:
        ratio = f"{median / base:.2f}" if base else "—"
        print(f"| {label} | {median:.3f} | {ratio} | {f'{peak:.2f} GiB' if peak is not None else 'n/a (CPU)'} |")
    for key in ("blocks", "components"):  # the same computation as all on the device: bitwise on the CPU
        if key in images and "gpu" in images:
            print(f"{key} vs all on device: max |Δ| {(images[key] - images['gpu']).abs().max().item():.3g}")
    if "gpu-fp8" in images and "gpu" in images:
        x, y = images["gpu-fp8"].double(), images["gpu"].double()
        rel = ((x - y).abs().max() / y.abs().max()).item()
        psnr = 10 * torch.log10(4 / ((x - y) ** 2).mean()).item()  # peak-to-peak 2 for images in [−1, 1]
        print(f"fp8 vs bf16 image, same seed: relative error {rel:.3g}, PSNR {psnr:.1f} dB")


if __name__ == "__main__":
    main()
