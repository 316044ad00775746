"""FP8 weights (fp8.py) against bf16 ones: output error, weight memory and, on a GPU, speed.

The same random transformer (weights N(0, 0.02), norm scales 1, biases 0, as benchmarks/bench_mmdit.py draws
them; seed 0) runs once with its block Linear weights in bf16 and once stored in float8_e4m3fn with a per-tensor
scale, on the same inputs; the fp8 model's output is compared with the bf16 model's: relative error
‖Δ‖/‖ref‖, max |Δ| / max |ref|, and PSNR = 10·log10(max|ref|² / MSE). Compute dtype: bf16 on a GPU, fp32 on
the CPU (where bf16 matmuls are slow); either way both models compute alike and differ in the weights' rounding.

    python benchmarks/bench_fp8.py                                   # CPU: bench_mmdit's mid-size Flux, 1024²
    python benchmarks/bench_fp8.py --device cuda --config flux-dev   # real size, 4096² through the F16 VAE
        [--scaled-mm]                                                # also time the fp8 matmul (torch._scaled_mm)

It also prints the bytes of the weights of --config's transformer and of T5-XXL, bf16 vs fp8 (counted on the
meta device: nothing is allocated) and, on a GPU, seconds per forward and peak memory of each variant.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fp8  # noqa: E402
import mmdit  # noqa: E402
import text_encoders as te  # noqa: E402
from bench_mmdit import random_inputs, random_weights  # noqa: E402

MID_SIZE = mmdit.FluxParams(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=512, hidden_size=512,
                            num_heads=4, depth=4, depth_single_blocks=8, axes_dim=(16, 56, 56), guidance_embed=True)


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Relative errors and PSNR (peak: max |ref|) of `out` against `ref`."""
    out, ref = out.double(), ref.double()
    mse = (out - ref).pow(2).mean().item()
    peak = ref.abs().max().item()
    return {"rel_norm": ((out - ref).norm() / ref.norm()).item(),
            "rel_max": ((out - ref).abs().max() / peak).item(),
            "psnr_db": 10 * torch.log10(torch.tensor(peak**2 / mse)).item() if mse > 0 else float("inf")}


def weight_bytes(build, blocks, weight_dtype=None) -> int:
    """Bytes of the parameters of build() in bf16, the Linears of blocks(model) stored in weight_dtype (None: bf16),
    counted on the meta device."""
    with torch.device("meta"):
        model = build().to(torch.bfloat16)
    if weight_dtype is not None:
        fp8.convert(model, blocks(model), weight_dtype)
    return sum(t.nbytes for t in model.state_dict().values())


def timed(fn, runs: int) -> float:
    """Mean seconds per call over `runs` calls, after a warm-up (torch.utils.benchmark syncs CUDA around them)."""
    from torch.utils.benchmark import Timer

    return Timer("fn()", globals={"fn": fn}).timeit(runs).mean


def fp8_vs_bf16(p: mmdit.FluxParams, device, lat_h: int, lat_w: int, n_txt: int, dtype, runs: int = 1,
                scaled_mm: bool = False) -> dict:
    """{variant: {"seconds", "peak_gib"} and, but for the reference, compare(variant, reference)}: the bf16
    weights (the reference; computed in `dtype`, to which bf16 widens exactly), the same weights quantized to
    float8_e4m3fn and upcast per layer, and with scaled_mm the fp8 matmul (activations quantized too)."""
    device = torch.device(device)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = random_weights(mmdit.Flux(p), device).to(dtype)
    x = random_inputs(p, lat_h, lat_w, n_txt, 1, device, dtype)
    results = {}

    def run(name):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            out = model(*x).float()
            seconds = timed(lambda: model(*x), runs) if runs else float("nan")
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        results[name] = {"seconds": seconds, "peak_gib": peak}
        return out

    ref = run("bf16 weights")
    fp8.convert(model, model.blocks(), torch.float8_e4m3fn)  # in place: the bf16 block weights are freed
    out = run("fp8 weights")
    results["fp8 weights"] |= compare(out, ref)
    if scaled_mm:
        fp8.use_scaled_mm(model)
        out = run("fp8 matmul")
        results["fp8 matmul"] |= compare(out, ref)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", help="a Flux entry of mmdit.CONFIGS (default: flux-dev on a GPU, a mid-size Flux "
                                     "of hidden 512, 4 + 8 blocks, on the CPU)")
    ap.add_argument("--height", type=int, help="pixels (default 4096 on a GPU, 1024 on the CPU)")
    ap.add_argument("--width", type=int, help="pixels (default 4096 on a GPU, 1024 on the CPU)")
    ap.add_argument("--vae-stride", type=int, default=16, help="the autoencoder's downsampling (16: F16)")
    ap.add_argument("--txt-tokens", type=int, help="default 512 on a GPU, 128 on the CPU")
    ap.add_argument("--runs", type=int, help="timed forwards per variant (default 3 on a GPU, 0 on the CPU)")
    ap.add_argument("--scaled-mm", action="store_true", help="also the fp8 matmul path (GPUs with fp8 tensor cores)")
    a = ap.parse_args()
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    p = mmdit.CONFIGS[a.config or "flux-dev"] if a.config or gpu else MID_SIZE
    if not isinstance(p, mmdit.FluxParams):
        raise SystemExit(f"--config must be a Flux config ({', '.join(k for k in mmdit.CONFIGS if 'flux' in k)})")
    height, width = a.height or (4096 if gpu else 1024), a.width or (4096 if gpu else 1024)
    n_txt, runs = a.txt_tokens or (512 if gpu else 128), a.runs if a.runs is not None else (3 if gpu else 0)
    dtype = torch.bfloat16 if gpu else torch.float32
    lat_h, lat_w = height // a.vae_stride, width // a.vae_stride
    config = a.config or "flux-dev"
    for what, build, blocks in ((f"{config} transformer", lambda: mmdit.Flux(mmdit.CONFIGS[config]), mmdit.Flux.blocks),
                                ("T5-XXL encoder", lambda: te.T5Encoder(te.T5_CONFIGS["t5-xxl"]),
                                 lambda t5: t5.encoder.block)):
        bf16, fp8_bytes = weight_bytes(build, blocks), weight_bytes(build, blocks, torch.float8_e4m3fn)
        print(f"{what} weights: bf16 {bf16 / 2**30:.2f} GiB, fp8 blocks {fp8_bytes / 2**30:.2f} GiB "
              f"({fp8_bytes / bf16:.1%})")
    name = a.config or ("flux-dev" if gpu else "mid-size Flux (hidden 512, 4 + 8 blocks)")
    print(f"{name} on {torch.cuda.get_device_name(device) if gpu else 'CPU'}, {height}×{width} px / VAE "
          f"{a.vae_stride}× -> {(lat_h // 2) * (lat_w // 2)} image + {n_txt} text tokens, compute {dtype}, "
          f"{torch.get_num_threads()} threads")
    for variant, r in fp8_vs_bf16(p, device, lat_h, lat_w, n_txt, dtype, runs, a.scaled_mm).items():
        error = (f"rel. error {r['rel_norm']:.2e} (norm), {r['rel_max']:.2e} (max), PSNR {r['psnr_db']:.1f} dB"
                 if "psnr_db" in r else "reference")
        speed = f", {r['seconds']:.4f} s/forward" if runs else ""
        speed += f", peak {r['peak_gib']:.2f} GiB" if gpu else ""
        print(f"  {variant}: {error}{speed}")


if __name__ == "__main__":
    main()
