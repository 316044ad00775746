"""Text-to-image at full size with RANDOM weights: seconds per step and peak GPU memory of sample.py's pipeline.

    python benchmarks/bench_sample.py --model flux-dev --size 4096 --steps 2            # all on the GPU
    python benchmarks/bench_sample.py --model flux-dev --size 4096 --steps 2 --offload  # one component at a time

Real-size components (the flux-dev transformer, T5-XXL, CLIP-L, the F16 autoencoder) are built on the meta
device and filled with random bf16 weights, so no download is needed; the timings are those of real weights
(the same shapes and kernels), the image is noise.
"""
import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import mmdit  # noqa: E402
import sample  # noqa: E402
import text_encoders as te  # noqa: E402
import vae as vae_lib  # noqa: E402


def materialize(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """Random weights: N(0, 0.02) matrices, unit norm scales, zero biases."""
    module = module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02)
            elif name.endswith(("scale", "norm.weight", "norm1.weight", "norm2.weight", "layer_norm.weight")):
                p.fill_(1)
            else:
                p.zero_()
        for name, b in module.named_buffers():
            if b.is_floating_point():
                b.normal_(0, 0.02)
    return module.to(dtype).eval()


def build(model: str, device, dtype) -> sample.Pipeline:
    with torch.device("meta"):
        transformer = mmdit.Flux(mmdit.CONFIGS[model])
        ae = vae_lib.AutoEncoder(dataclasses.replace(vae_lib.VAE_CONFIGS["flux"], stride=2))  # F16
        clip = te.CLIPText(te.CLIP_CONFIGS["clip-l"])
        t5 = te.T5Encoder(te.T5_CONFIGS["t5-xxl"])
    for m in (transformer, ae, clip, t5):
        materialize(m, device, dtype)
    tiny = sample.tiny_pipeline(device="cpu")  # borrow its tokenizers: ids stay inside the real vocabularies
    tiny.conditioner.t5_tokenizer.max_length = 512 if model == "flux-dev" else 256
    cond = te.FluxConditioner(clip, t5, tiny.conditioner.clip_tokenizer, tiny.conditioner.t5_tokenizer)
    return sample.Pipeline(model, "flux", transformer, ae, cond)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux-dev", choices=("flux-dev", "flux-schnell"))
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--offload", action="store_true")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    pipe = build(a.model, "cpu" if a.offload else a.device, dtype)
    print(f"built random {a.model} pipeline in {time.perf_counter() - t0:.1f} s", flush=True)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    images, stats = sample.generate(pipe, "a lighthouse at dawn", width=a.size, height=a.size, steps=a.steps,
                                    guidance=3.5, seed=0, partitions=a.partitions, device=a.device,
                                    offload=a.offload, progress=False)
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"{a.model} {a.size}x{a.size} F16 steps={a.steps} offload={a.offload}: "
          f"{stats['seconds_per_step']:.2f} s/step, generate() {total:.1f} s, peak GPU memory {peak:.1f} GiB, "
          f"image {tuple(images.shape)}")


if __name__ == "__main__":
    main()
