"""WLF training: the --dry-run memory plan against the measured peak, train_wlf's step throughput and MFU, and
the transformer's forward + backward (activation checkpointing, bf16) against diffusers' on the same weights.

The model is Flux-dev at full width with fewer blocks (default 2 double + 4 single, 1.8 B parameters), random
weights, trained for a few steps at 4096² with F16 latents (16384 image + 512 text tokens) on random shards by
`train_wlf.main(["train", ...])` itself, as one rank (FSDP2 on a 1-GPU mesh, fp32 master weights, bf16 compute).

    python benchmarks/bench_train_wlf.py --device cuda                        # the numbers for the README
    python benchmarks/bench_train_wlf.py --device cuda --resolution 2048 --batch-size 4
    python benchmarks/bench_train_wlf.py                                      # CPU smoke run, tiny sizes

Printed: measured peak allocated (torch.cuda.max_memory_allocated) / the plan's allocator total (the plan
without its assumed fragmentation and CUDA-context lines); images/s, tokens/s and MFU of the train step;
the ratio of diffusers' FluxTransformer2DModel forward + backward time and peak memory to ours.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch
from safetensors.torch import save_file

import mmdit
import train_wlf


def fake_shards(folder: Path, samples: int, latent: int, text: int, params) -> None:
    """Random latents / T5 states / pooled vectors in the precompute format (the values do not matter)."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors = {"latents": torch.randn(samples, 16, latent, latent, generator=g).bfloat16(),
               "context": torch.randn(samples, text, params.context_in_dim, generator=g).bfloat16(),
               "pooled": torch.randn(samples, params.vec_in_dim, generator=g).bfloat16(),
               "row": torch.arange(samples)}
    save_file(tensors, folder / "shard-00000.safetensors")
    manifest = {"format": train_wlf.SHARD_FORMAT, "version": 1, "model": "flux-dev", "family": "flux",
                "complete": True, "shards": [{"file": "shard-00000.safetensors", "count": samples}],
                "num_samples": samples, "latent_shape": [16, latent, latent], "context_shape": [text, params.context_in_dim],
                "pooled_dim": params.vec_in_dim, "skipped": []}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def time_fwd_bwd(run, device, repeats: int) -> tuple[float, float]:
    """Median seconds of run() and its peak allocated GiB (CUDA), after one warm-up call."""
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--depth", type=int, help="double blocks (default 2 on cuda, 1 on cpu)")
    ap.add_argument("--single", type=int, help="single blocks (default 4 on cuda, 1 on cpu)")
    ap.add_argument("--resolution", type=int, help="image side, F16 latents (default 4096 on cuda, 256 on cpu)")
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--skip-peer", action="store_true", help="do not run diffusers")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    res = args.resolution or (4096 if cuda else 256)
    base = mmdit.CONFIGS["flux-dev"] if cuda else mmdit.FluxParams(hidden_size=256, num_heads=2, context_in_dim=256,
                                                                      vec_in_dim=64, axes_dim=(16, 56, 56))
    params = replace(base, depth=args.depth or (2 if cuda else 1), depth_single_blocks=args.single or (4 if cuda else 1))
    latent, text = res // 16, args.text_tokens if cuda else 32
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_wlf_"))

    torch.manual_seed(0)
    with torch.device(device):
        model = mmdit.Flux(params).to(torch.bfloat16)  # random init on the device: fast even at 1.8 B
    n = sum(p.numel() for p in model.parameters())
    mmdit.save_transformer(model.cpu(), str(tmp / "flux.safetensors"))
    del model
    fake_shards(tmp / "shards", args.batch_size * (args.steps + 1), latent, text, params)
    print(f"Flux-dev width, {params.depth} double + {params.depth_single_blocks} single blocks ({n / 1e9:.2f} B "
          f"parameters), {res}² F16 -> {(latent // 2) ** 2} image + {text} text tokens, batch {args.batch_size}, "
          f"{torch.cuda.get_device_name(device) if cuda else 'CPU'}")

    # 1. train_wlf itself: one rank, FSDP2 mixed precision, activation checkpointing, AdamW.
    train_wlf.main(["train", "--shards", str(tmp / "shards"), "--transformer", str(tmp / "flux.safetensors"),
                    "--out", str(tmp / "run"), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                    "--log-every", "1", "--checkpoint-every", "0", "--device", str(device), "--no-progress",
                    "--precision", "bf16" if cuda else "fp32"])
    log = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
    steady = log[1:] or log  # the first step includes lazy initialisation
    images = sorted(r["images_per_s"] for r in steady)[len(steady) // 2]
    tokens = sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2]
    print(f"train step: {images:.3f} images/s, {tokens:,.0f} tokens/s"
          + (f", MFU {sorted(r['mfu'] for r in steady)[len(steady) // 2]:.1%}" if "mfu" in steady[0] else ""))

    plan = train_wlf.memory_plan(params, latent_hw=(latent, latent), text_tokens=text, batch=args.batch_size,
                                 world_size=1, gpu_gib=80, precision="bf16" if cuda else "fp32")
    print(train_wlf.format_plan(plan))
    if cuda:
        measured = max(r["peak_memory_gib"] for r in log)
        planned = plan["allocated"] / 2**30
        print(f"peak allocated: measured {measured:.2f} GiB, plan {planned:.2f} GiB (without the assumed "
              f"fragmentation / context lines) -> measured / plan = {measured / planned:.3f}")

    # 2. forward + backward of the transformer alone, bf16 weights, checkpointing on: ours vs diffusers.
    dtype = torch.bfloat16 if cuda else torch.float32
    ours = mmdit.load_transformer(str(tmp / "flux.safetensors"), device=device, dtype=dtype).train()
    ours.gradient_checkpointing = True
    B, L = args.batch_size, (latent // 2) ** 2
    g = torch.Generator(device="cpu").manual_seed(1)
    img = torch.randn(B, L, 64, generator=g).to(device, dtype)
    txt = torch.randn(B, text, params.context_in_dim, generator=g).to(device, dtype)
    y = torch.randn(B, params.vec_in_dim, generator=g).to(device, dtype)
    t = torch.rand(B, generator=g).to(device)
    guidance = torch.full((B,), 3.5, device=device)
    img_ids, txt_ids = mmdit.flux_img_ids(latent, latent, B, device), mmdit.flux_txt_ids(text, B, device)

    def ours_step():
        out = ours(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=t, y=y, guidance=guidance)
        out.float().square().mean().backward()
        ours.zero_grad(set_to_none=True)

    ours_time, ours_peak = time_fwd_bwd(ours_step, device, 3)
    print(f"ours forward + backward: {ours_time * 1e3:.1f} ms, peak {ours_peak:.2f} GiB")
    if args.skip_peer:
        return
    del ours
    from diffusers import FluxTransformer2DModel

    mmdit.save_transformer(mmdit.load_transformer(str(tmp / "flux.safetensors")), str(tmp / "diffusers"),
                           layout="diffusers")
    peer = FluxTransformer2DModel.from_pretrained(str(tmp / "diffusers"), torch_dtype=dtype).to(device).train()
    peer.enable_gradient_checkpointing()

    def peer_step():
        out = peer(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=img_ids[0],
                   txt_ids=txt_ids[0], guidance=guidance, return_dict=False)[0]
        out.float().square().mean().backward()
        peer.zero_grad(set_to_none=True)

    peer_time, peer_peak = time_fwd_bwd(peer_step, device, 3)
    print(f"diffusers forward + backward: {peer_time * 1e3:.1f} ms, peak {peer_peak:.2f} GiB")
    print(f"ratio diffusers / ours: time {peer_time / ours_time:.2f}x, peak memory {peer_peak / ours_peak:.2f}x")


if __name__ == "__main__":
    main()
