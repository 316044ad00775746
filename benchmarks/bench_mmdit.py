"""Forward-pass speed of mmdit.Flux (and MMDiT on a GPU): against diffusers on CPU, throughput / MFU on a GPU.

CPU (default): a mid-size Flux (hidden 512, 4 double + 8 single blocks, 4 heads × 128, RoPE axes
(16, 56, 56)), 1024 image + 128 text tokens, fp32, torch.no_grad. The same random weights go into
diffusers' FluxTransformer2DModel through our own diffusers table; both models see the same inputs,
are timed interleaved (median of several runs after a warm-up) and their outputs are compared.

    python benchmarks/bench_mmdit.py

GPU: the real flux-dev config with random bf16 weights (built on the meta device, materialized on the
GPU) at 4096² pixels through the 16× VAE of Diffusion-4K (256² latent -> 128² = 16384 image tokens)
plus 512 text tokens:

    python benchmarks/bench_mmdit.py --device cuda --config flux-dev --height 4096 --width 4096 \
        [--compile] [--sdpa cudnn|best] [--diffusers]
    python benchmarks/bench_mmdit.py --device cuda --config sd3.5-large --diffusers   # MM-DiT, 38 joint blocks

It prints seconds per forward (warm-up 1, median of 3), the first forward's time (with --compile: the
compile time), peak memory and MFU; --sdpa best times flash, cuDNN and efficient attention and keeps the
fastest; --diffusers times diffusers' FluxTransformer2DModel / SD3Transformer2DModel with the same weights
and inputs, under the same attention backend. Two FLOP counts are
printed: the convention of the issue, 2·params·tokens + 4·L²·C per block (≈ 6.0e14 here), and the FLOPs
the forward actually executes (each token meets only its own stream's weights in the double blocks and
the modulation linears run once per sample, so it is ≈ 4.2e14); MFU is given for both.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import mmdit  # noqa: E402


def flux_flops(p: mmdit.FluxParams, n_img: int, n_txt: int, batch: int = 1) -> tuple[float, float]:
    """(issue-convention FLOPs, executed FLOPs) of one Flux forward."""
    H, L = p.hidden_size, n_img + n_txt
    mlp = int(H * p.mlp_ratio)
    n_blocks = p.depth + p.depth_single_blocks
    attn = 4 * L * L * H * n_blocks  # QKᵀ and AV, 2·L²·H each
    n_params = sum(t.numel() for t in _meta_flux(p).parameters())
    convention = 2 * n_params * L + attn
    per_token = (p.depth * (3 * H * H + H * H + 2 * H * mlp)  # qkv, proj, mlp of the token's own stream
                 + p.depth_single_blocks * ((3 * H + mlp) * H + (H + mlp) * H))  # linear1, linear2
    executed = (2 * per_token * L + attn
                + 2 * n_img * (p.in_channels * H + H * p.out_channels) + 2 * n_txt * p.context_in_dim * H)
    return convention * batch, executed * batch


def _meta_flux(p):
    with torch.device("meta"):
        return mmdit.Flux(p)


def _timeit(fn, device, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def random_inputs(p: mmdit.FluxParams, h: int, w: int, n_txt: int, batch: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    img = torch.randn(batch, (h // 2) * (w // 2), p.in_channels, generator=g).to(device, dtype)
    txt = torch.randn(batch, n_txt, p.context_in_dim, generator=g).to(device, dtype)
    y = torch.randn(batch, p.vec_in_dim, generator=g).to(device, dtype)
    t = torch.full((batch,), 0.7, device=device)
    guidance = torch.full((batch,), 3.5, device=device) if p.guidance_embed else None
    return (img, mmdit.flux_img_ids(h, w, batch, device), txt, mmdit.flux_txt_ids(n_txt, batch, device), t, y,
            guidance)


def bench_cpu(args):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    p = mmdit.FluxParams(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=512, hidden_size=512,
                         num_heads=4, depth=4, depth_single_blocks=8, axes_dim=(16, 56, 56), guidance_embed=True)
    ours = mmdit.Flux(p).eval()
    with torch.no_grad():
        for name, t in ours.named_parameters():
            t.copy_(1 + 0.1 * torch.randn_like(t) if name.endswith("scale") else 0.02 * torch.randn_like(t))
    ref = FluxTransformer2DModel(**{k: v for k, v in mmdit.diffusers_config(p).items() if not k.startswith("_")})
    ref.load_state_dict(mmdit.to_diffusers(ours.state_dict(), "flux"), strict=True)
    ref.eval()

    side = int(round(args.img_tokens ** 0.5))  # token grid side; latent side = 2·side
    inputs = random_inputs(p, 2 * side, 2 * side, args.txt_tokens, 1, torch.device("cpu"), torch.float32)
    img, img_ids, txt, txt_ids, t, y, guidance = inputs

    def run_ours():
        return ours(*inputs)

    def run_ref():
        return ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                   img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=guidance, return_dict=False)[0]

    with torch.no_grad():
        err = ((run_ours() - run_ref()).norm() / run_ref().norm()).item()
        run_ours(), run_ref()  # warm-up
        t_ours, t_ref = [], []
        for _ in range(args.runs):  # interleaved, so load changes on a shared machine hit both alike
            t_ours += _timeit(run_ours, torch.device("cpu"), 0, 1)
            t_ref += _timeit(run_ref, torch.device("cpu"), 0, 1)
    mo, mr = statistics.median(t_ours), statistics.median(t_ref)
    print(f"CPU Flux hidden {p.hidden_size}, {p.depth}+{p.depth_single_blocks} blocks, {p.num_heads}×"
          f"{p.hidden_size // p.num_heads} heads, {side * side} image + {args.txt_tokens} text tokens, fp32, "
          f"{torch.get_num_threads()} threads, median of {args.runs}")
    print(f"  ours {mo * 1e3:.1f} ms, diffusers {mr * 1e3:.1f} ms, ratio ours/diffusers = {mo / mr:.3f}  "
          f"(relative output difference {err:.1e})")


def sd3_flops(p: mmdit.SD3Params, n_img: int, n_txt: int, batch: int = 1) -> tuple[float, float]:
    """(issue-convention FLOPs, executed FLOPs) of one MM-DiT forward: joint blocks as Flux's double blocks, the
    dual-attention layers' second attention over the image tokens, the pre-only last context block's missing
    projection and MLP."""
    H, L, mlp = p.hidden_size, n_img + n_txt, int(p.hidden_size * p.mlp_ratio)
    dual = len(p.x_block_self_attn_layers)
    attn = 4 * L * L * H * p.depth + 4 * n_img * n_img * H * dual
    with torch.device("meta"):
        n_params = sum(t.numel() for t in mmdit.MMDiT(p).parameters())
    stream = 4 * H * H + 2 * H * mlp  # qkv, proj, mlp of one token in its own stream
    executed = (2 * (stream * L * p.depth - (H * H + 2 * H * mlp) * n_txt + 4 * H * H * n_img * dual) + attn
                + 2 * n_img * 2 * p.in_channels * p.patch_size ** 2 * H + 2 * n_txt * p.context_in_dim * H)
    return (2 * n_params * L + attn) * batch, executed * batch


def random_weights(model: torch.nn.Module, device) -> torch.nn.Module:
    model = model.to(torch.bfloat16).to_empty(device=device).eval()  # bf16 storage only: no fp32 copy ever exists
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("scale", "ln_q.weight", "ln_k.weight")):
                t.fill_(1.0)
            elif name.endswith("bias"):
                t.zero_()
            else:
                t.normal_(0, 0.02)
    return model


BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def _sdpa(backend: str | None):
    """A fresh context that forces one scaled_dot_product_attention backend (None: PyTorch's own choice)."""
    from contextlib import nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return nullcontext() if backend is None else sdpa_kernel(getattr(SDPBackend, BACKENDS[backend]))


def _measure(fn, device, args, backend):
    """(first call in s: with --compile, the compile time; median s; all timed runs; output) under `backend`."""
    with torch.no_grad(), _sdpa(backend):
        first = _timeit(fn, device, 0, 1)[0]
        out = fn()
        times = _timeit(fn, device, args.warmup, args.runs)
    return first, statistics.median(times), times, out


def bench_gpu(args):
    device = torch.device(args.device)
    p = mmdit.CONFIGS[args.config]
    flux = isinstance(p, mmdit.FluxParams)
    lat_h, lat_w = args.height // args.vae_stride, args.width // args.vae_stride
    n_txt = args.txt_tokens
    with torch.device("meta"):
        model = mmdit.Flux(p) if flux else mmdit.MMDiT(p)
    model = random_weights(model, device)
    n_params = sum(t.numel() for t in model.parameters())
    if flux:
        n_img = (lat_h // 2) * (lat_w // 2)
        inputs = random_inputs(p, lat_h, lat_w, n_txt, args.batch, device, torch.bfloat16)
        img, img_ids, txt, txt_ids, t, y, guidance = inputs
        ref_kwargs = dict(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                          img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=guidance, return_dict=False)
        convention, executed = flux_flops(p, n_img, n_txt, args.batch)
    else:  # x (B, 16, h, w), σ·1000, pooled CLIP-L ‖ CLIP-G, T5 states
        n_img = (lat_h // p.patch_size) * (lat_w // p.patch_size)
        g = torch.Generator(device="cpu").manual_seed(0)
        x, y, context = (torch.randn(args.batch, *shape, generator=g).to(device, torch.bfloat16) for shape in
                         ((p.in_channels, lat_h, lat_w), (p.adm_in_channels,), (n_txt, p.context_in_dim)))
        inputs = (x, torch.full((args.batch,), 700.0, device=device), y, context)
        ref_kwargs = dict(hidden_states=inputs[0], timestep=inputs[1], pooled_projections=inputs[2],
                          encoder_hidden_states=inputs[3], return_dict=False)
        convention, executed = sd3_flops(p, n_img, n_txt, args.batch)
    if args.compile:  # regional compilation: one compiled graph per block type, reused by every block
        for block in model.blocks():
            block.compile()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results = {}
    for backend in list(BACKENDS) if args.sdpa == "best" else [None if args.sdpa == "auto" else args.sdpa]:
        try:
            results[backend] = _measure(lambda: model(*inputs), device, args, backend)
        except RuntimeError as e:  # a backend this card, dtype or head size does not support
            print(f"  sdpa {backend}: not available ({str(e).splitlines()[0][:100]})")
    if not results:
        raise SystemExit("no attention backend ran")
    backend = min(results, key=lambda b: results[b][1])
    first, sec, times, out = results[backend]
    assert torch.isfinite(out).all(), "non-finite output"
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    peak = args.peak_tflops * 1e12
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.config} on {card}: {n_params / 1e9:.3f} B params, bf16, "
          f"{args.height}×{args.width} px / VAE {args.vae_stride}× -> {n_img} image + {n_txt} text tokens, "
          f"batch {args.batch}, compile={args.compile}, sdpa={args.sdpa}")
    first_call = "compile + first forward" if args.compile else "first forward"
    for b, (f, s, _, _) in results.items():
        fastest = " (fastest)" if len(results) > 1 and b == backend else ""
        print(f"  sdpa {b or 'auto'}: {s:.4f} s per forward, {first_call} {f:.1f} s{fastest}")
    print(f"  {sec:.4f} s per forward (median of {args.runs}: {', '.join(f'{x:.4f}' for x in times)})")
    print(f"  peak memory {peak_mem / 2**30:.2f} GiB")
    print(f"  FLOPs per forward: issue convention (2·params·tokens + 4·L²·C per block) {convention:.3e}; "
          f"executed {executed:.3e}")
    print(f"  MFU against {args.peak_tflops:.0f} TFLOP/s (bf16 dense peak, H100 SXM by default): "
          f"{convention / sec / peak:.1%} by the issue convention, {executed / sec / peak:.1%} by executed FLOPs")

    if args.diffusers:  # the same weights and inputs through diffusers, eager, under the fastest backend
        try:
            import diffusers
            from diffusers.utils import logging as diffusers_logging
            diffusers_logging.set_verbosity_error()  # its note on casting with .to(): nothing here needs fp32
        except ImportError:
            raise SystemExit("--diffusers: diffusers is not installed here (pip install -r requirements-test.txt)")
        config = mmdit.diffusers_config(p)
        with torch.device("meta"):
            ref = getattr(diffusers, config["_class_name"])(**{k: v for k, v in config.items() if k[0] != "_"})
        ref = ref.to(torch.bfloat16).to_empty(device=device).eval()
        ref.load_state_dict(mmdit.to_diffusers(model.state_dict(), "flux" if flux else "sd3"), strict=True)
        _, ref_sec, _, ref_out = _measure(lambda: ref(**ref_kwargs)[0], device, args, backend)
        err = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
        print(f"  diffusers (eager) {ref_sec:.4f} s per forward: ratio ours/diffusers = {sec / ref_sec:.3f} "
              f"(relative output difference {err:.1e}, bf16)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (compare with diffusers) or cuda (throughput and MFU)")
    ap.add_argument("--config", default="flux-dev", choices=list(mmdit.CONFIGS), help="GPU mode: Flux or SD3")
    ap.add_argument("--height", type=int, default=4096, help="GPU mode: image height in pixels")
    ap.add_argument("--width", type=int, default=4096, help="GPU mode: image width in pixels")
    ap.add_argument("--vae-stride", type=int, default=16, help="GPU mode: pixels per latent (16: Diffusion-4K F16 VAE)")
    ap.add_argument("--txt-tokens", type=int, default=None, help="text tokens (CPU 128, GPU 512)")
    ap.add_argument("--img-tokens", type=int, default=1024, help="CPU mode: image tokens (a square number)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="GPU mode: torch.compile each block (regional)")
    ap.add_argument("--diffusers", action="store_true", help="GPU mode: also time diffusers' Flux, same weights")
    ap.add_argument("--sdpa", default="auto", choices=["auto", "best", *BACKENDS],
                    help="GPU mode: force one scaled_dot_product_attention backend; best: time each, keep the fastest")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU bf16 dense peak for MFU (H100 SXM: 989)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=None, help="timed runs (CPU 7, GPU 3)")
    args = ap.parse_args()
    gpu = args.device != "cpu"
    args.txt_tokens = args.txt_tokens or (512 if gpu else 128)
    args.runs = args.runs or (3 if gpu else 7)
    if gpu:
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: no CUDA device is available")
        bench_gpu(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
