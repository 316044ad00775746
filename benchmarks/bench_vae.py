"""Peak memory (and time) of an F16 decode: the partitioned last stage with n = 1, 2, 4, against the
unpartitioned decoder, and against the peer — diffusers' AutoencoderKL blocks followed by the
unpartitioned F16 last stage (norm_out, swish, nearest ×2, conv_out on the whole map).

Flux config, random weights (real size, default init), batch 1, torch.no_grad.
  CPU : every case runs in a fresh subprocess; peak = VmHWM − VmRSS just before the decode (the
        high-water mark is reset through /proc/self/clear_refs; ru_maxrss delta where that fails).
  CUDA: torch.cuda.max_memory_allocated() − memory_allocated() before the decode, after a warm-up.

    python benchmarks/bench_vae.py                       # 2048², CPU, fp32
    python benchmarks/bench_vae.py --size 4096 --partitions 2 4 --no-plain --no-peer
    python benchmarks/bench_vae.py --device cuda --dtype bfloat16 --size 2048 4096
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vae  # noqa: E402

DEFAULT_STRIPS = 1 << 16


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _peer_decode(d, z):
    """diffusers blocks, then the unpartitioned F16 last stage on the whole map."""
    dec = d.decoder
    h = dec.mid_block(dec.conv_in(z / 0.3611 + 0.1159))
    for up_block in dec.up_blocks:
        h = up_block(h)
    h = F.silu(dec.conv_norm_out(h))
    h = F.interpolate(h, scale_factor=2, mode="nearest")
    return dec.conv_out(h)


def _build(case: str, dtype, device):
    params = vae.VAE_CONFIGS["flux"]
    if case == "peer":
        from diffusers import AutoencoderKL

        cfg = {k: v for k, v in vae.diffusers_config(params).items() if k not in ("_class_name", "stride")}
        model = AutoencoderKL(**cfg).to(device=device, dtype=dtype).eval()
        return lambda z: _peer_decode(model, z)
    return vae.AutoEncoder(replace(params, stride=2)).to(device=device, dtype=dtype).eval()


def _run_case(case: str, n: int, strip_pixels, size: int, dtype, device, repeats: int) -> dict:
    torch.manual_seed(0)
    model = _build(case, dtype, device)
    z = torch.randn(1, 16, size // 16, size // 16, device=device, dtype=dtype)
    if case == "peer":
        decode = model
    else:
        model.decoder.strip_pixels = strip_pixels
        decode = lambda z: model.decode(z, partitions=n)  # noqa: E731
    with torch.no_grad():
        if device == "cuda":
            decode(z)  # warm-up (kernels, allocator)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            for _ in range(repeats):
                out = decode(z)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - t0) / repeats
            peak = torch.cuda.max_memory_allocated() - base
            method = "cuda.max_memory_allocated"
        else:
            exact = _reset_hwm()
            base_kb = _status_kb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t0 = time.perf_counter()
            out = decode(z)
            seconds = time.perf_counter() - t0
            peak_kb = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = (peak_kb - base_kb) * 1024
            method = "VmHWM-VmRSS" if exact else "ru_maxrss delta"
    assert out.shape == (1, 3, size, size), out.shape
    return {"case": case, "n": n, "strip_pixels": strip_pixels, "size": size, "peak_bytes": peak,
            "seconds": seconds, "method": method, "finite": bool(torch.isfinite(out).all())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, nargs="+", default=[2048], help="image sides (multiples of 16)")
    ap.add_argument("--partitions", type=int, nargs="+", default=[1, 2, 4], help="n of the n×n grid")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--strip-pixels", type=int, default=DEFAULT_STRIPS,
                    help="Decoder.strip_pixels for the partitioned cases (0: off)")
    ap.add_argument("--no-plain", action="store_true", help="skip n=1 with strips off (the plain decoder)")
    ap.add_argument("--no-peer", action="store_true", help="skip the diffusers peer")
    ap.add_argument("--repeats", type=int, default=3, help="timed decodes per case on CUDA")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.worker:  # one case in this fresh process
        case, n, strips, size = json.loads(args.worker)
        print(json.dumps(_run_case(case, n, strips, size, dtype, args.device, args.repeats)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    if any(s % 16 for s in args.size):
        sys.exit("--size: image sides must be multiples of 16 (F16 latents)")
    strips = args.strip_pixels or None
    for size in args.size:
        cases = [("vae", n, strips) for n in args.partitions]
        if not args.no_plain:
            cases.append(("vae", 1, None))
        if not args.no_peer:
            cases.append(("peer", 1, None))
        print(f"F16 decode {size}² ({size // 16}² latents), flux config, random weights, {args.dtype}, "
              f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        results = []
        for case, n, sp in cases:
            if args.device == "cuda":
                r = _run_case(case, n, sp, size, dtype, "cuda", args.repeats)
                torch.cuda.empty_cache()
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps([case, n, sp, size]),
                       "--dtype", args.dtype, "--device", "cpu"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"  {case} n={n}: failed: {proc.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            label = "diffusers + unpartitioned" if case == "peer" else (
                f"n={n}" + (", strips off (plain)" if sp is None else f", strips {sp} px"))
            print(f"  {label:34s} peak {r['peak_bytes'] / 2**20:9.0f} MiB   {r['seconds']:8.2f} s   "
                  f"[{r['method']}{'' if r['finite'] else ', non-finite output'}]", flush=True)
        ref = next((r for r in results if r["case"] == "vae" and r["n"] == 1 and r["strip_pixels"] == strips), None)
        peer = next((r for r in results if r["case"] == "peer"), None)
        for r in results:
            if r["case"] == "vae" and r["n"] > 1:
                parts = []
                if ref:
                    parts.append(f"{r['peak_bytes'] / ref['peak_bytes']:.2f}× the n=1 peak")
                if peer:
                    parts.append(f"{r['peak_bytes'] / peer['peak_bytes']:.2f}× the peer's peak, "
                                 f"{r['seconds'] / peer['seconds']:.2f}× its time")
                print(f"  n={r['n']}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
