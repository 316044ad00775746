"""Weight-only fp8: the large Linear weights stored in 8 bits, upcast to the compute dtype layer by layer.

A float8_e4m3fn number has 4 exponent and 3 mantissa bits (largest 448), a float8_e5m2 one 5 and 2 (largest 57344):
half the bytes of bf16. A weight matrix W is stored as Q = round(W / s) in fp8 with one fp32 scale per tensor,
s = amax|W| / max(fp8), which maps the tensor's largest weight onto the format's largest number; each weight then
carries a relative rounding error of at most 2^-4 (e4m3; 2^-3 for e5m2) down to the subnormals at 2^-6·s (e4m3),
below which the error is at most 2^-10·s in absolute terms. Each layer computes

    y = x (s·Q)ᵀ + b,      s·Q formed in the compute dtype of x, once per call,

so activations never pass through fp8 (weight-only) and the one change from the bf16 model is the rounding of its
weights; the fp8 copy is what sits in memory (flux-dev's transformer: 11.2 GiB instead of 22.2 GiB in bf16).

Which layers: every nn.Linear inside the repeated blocks (Flux's double- and single-stream blocks, SD3's joint
blocks, T5's encoder blocks): 99.4% of flux-dev's transformer parameters and 97% of T5-XXL's encoder. The
embedders (img_in, txt_in, time/vector/guidance MLPs, SD3's x/context/t/y embedders), the final layers, every norm,
T5's token embedding and relative-attention bias stay in the compute dtype: too few weights to matter for memory,
and they meet the raw inputs and produce the output, where no later layer averages their rounding errors away.

Files as distributed, both in the official key layout: plain casts (every tensor cast to fp8, e.g.
flux1-dev-fp8 / t5xxl_fp8_e4m3fn: scale 1) and ComfyUI's "scaled fp8" files (flux1-dev-fp8-scaled,
t5xxl_fp8_e4m3fn_scaled): `<layer>.weight` in fp8 beside a 0-dim fp32 `<layer>.scale_weight`, the dequantized
weight being weight.float() * scale_weight; a `scaled_fp8` marker tensor under the model's prefix whose dtype
names the fp8 format, and optional 0-dim `<layer>.scale_input` activation scales for ComfyUI's fp8 matmul. The
marker and the input scales are read and dropped (the fp8 matmul here measures its activation scale per call).
An fp8-stored model's state_dict() is such a scaled-fp8 file: save_transformer writes one the loaders read back.
mmdit.py and text_encoders.py import this file (it imports nothing of the project): their loaders call store().

Engineering: `torch._scaled_mm` multiplies fp8 by fp8 on GPUs with fp8 tensor cores, the activations then
quantized per call (W8A8, no longer weight-only); `use_scaled_mm(model)` turns it on. It is off by default: it adds
the activations' rounding, and whether it is faster on a given GPU is measured by benchmarks/bench_fp8.py.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

FLOAT8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))
SCALE = "scale_weight"  # ComfyUI's name for the per-layer weight scale
DROPPED = ("scaled_fp8", "scale_input")  # ComfyUI's marker and its fp8-matmul input scales (module docstring)


def is_fp8(dtype) -> bool:
    return dtype in FLOAT8


def dropped(key: str) -> bool:
    """ComfyUI's marker and input scales: never read, as converters write the marker with torch.empty (any bits)."""
    return key.rsplit(".", 1)[-1] in DROPPED


def read_dtype(key: str, t: torch.Tensor, dtype):
    """The dtype the loaders read a tensor in: fp8 weights and their fp32 scales as stored (store() decides)."""
    return None if is_fp8(t.dtype) or key.endswith(SCALE) else dtype


def beside_weight(key: str, keys) -> bool:
    """A key store() consumes beyond the model's own: a marker, an input scale, or a weight's scale."""
    return dropped(key) or key.endswith("." + SCALE) and key[:-len(SCALE)] + "weight" in keys


def scale_keys(names: dict) -> dict:
    """{our scale key: the file's} for a {our key: the file's} map of weights: where a scaled-fp8 file's scales lie."""
    return {k.removesuffix("weight") + SCALE: f.removesuffix("weight") + SCALE for k, f in names.items()
            if k.endswith(".weight")}


def marker(sd: dict) -> dict:
    """{"scaled_fp8": an empty tensor of the weights' fp8 dtype} for a state dict holding fp8 weights, else {}:
    ComfyUI reads `scale_weight` only when the marker is there (it writes torch.tensor([], dtype=fp8) itself)."""
    found = [t.dtype for k, t in sd.items() if is_fp8(t.dtype) and k.endswith(".weight")]
    return {"scaled_fp8": torch.tensor([], dtype=found[0])} if found else {}


def quantize(w: torch.Tensor, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (Q, s) with w ≈ s·Q, Q in `dtype` (default float8_e4m3fn), s = amax|w| / max(dtype), a 0-dim fp32 tensor.
    s is rounded to a bf16 number: Fp8Linear multiplies by s in the compute dtype (as ComfyUI does), which then
    holds it exactly in bf16 and fp16 alike; the clamp keeps the at most 2^-9 larger quotients off fp8's NaN."""
    dtype = dtype or torch.float8_e4m3fn
    fmax = torch.finfo(dtype).max
    amax = w.abs().amax().float()
    scale = torch.where(amax > 0, amax / fmax, 1.0).to(torch.bfloat16).float()
    return (w.float() / scale).clamp(-fmax, fmax).to(dtype), scale


class Fp8Linear(nn.Module):
    """nn.Linear with the weight stored in `weight.dtype` (fp8, or any narrower float) times a 0-dim fp32
    `scale_weight`; forward upcasts it to `compute_dtype`, which x must have, as nn.Linear requires its own dtype."""
    scaled_mm = False  # use_scaled_mm()

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_dtype, compute_dtype):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=weight_dtype), requires_grad=False)
        self.scale_weight = nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaled_mm and is_fp8(self.weight.dtype) and not (self.in_features % 16 or self.out_features % 16):
            return scaled_mm_linear(x, self.weight, self.scale_weight, self.bias)  # cuBLAS: multiples of 16 only
        return F.linear(x, self.weight.to(self.compute_dtype) * self.scale_weight.to(self.compute_dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={self.weight.dtype}, compute={self.compute_dtype}")


def store(model: nn.Module, sd: dict, blocks, weight_dtype=None, dtype_of=lambda key: None) -> dict:
    """The state dict to assign (load_state_dict(assign=True)) to `model`, whose block Linears this swaps for
    Fp8Linear where their weights are to be stored narrower than the compute dtype. `sd`: the model's tensors as
    read, fp8 ones as stored, with a scaled-fp8 file's scales and marker; `blocks`: the modules whose Linears may be
    swapped. weight_dtype: None keeps the fp8 weights of a file in fp8; an fp8 dtype stores every block Linear in it
    (re-quantizing other fp8 formats); another dtype stores them in it, swapped where the compute dtype differs.
    dtype_of(key): a tensor's compute dtype; None: as read, and for fp8 that of the file's other tensors (bf16
    if all are fp8). Every other tensor is dequantized and cast to it. A scale without its weight stays in `sd`,
    for the caller's key check to name."""
    sd = {k: t for k, t in sd.items() if not dropped(k)}
    scales = {k[:-len(SCALE)]: sd.pop(k) for k in list(sd) if beside_weight(k, sd)}  # "layer.": its scale

    wide = next((t.dtype for k, t in sd.items() if not is_fp8(t.dtype) and not k.endswith(SCALE)), torch.bfloat16)

    def compute(key, t):
        return dtype_of(key) or (wide if is_fp8(t.dtype) else t.dtype)

    def dequantized(prefix, t):  # upcast first: fp8 × a 0-dim fp32 tensor stays fp8 in torch's type promotion
        return t.float() * scales.pop(prefix) if prefix in scales else t

    names = {id(m): name for name, m in model.named_modules()}
    kept = set()
    for block in blocks:
        for sub, linear in list(block.named_modules()):
            if not isinstance(linear, nn.Linear):
                continue
            name = f"{names[id(block)]}.{sub}"
            w = sd.get(name + ".weight")
            if w is None:
                continue  # a file without it: the caller's key check names it
            dtype = compute(name + ".weight", w)
            target = weight_dtype or (w.dtype if is_fp8(w.dtype) else dtype)
            if target == dtype:
                continue  # a plain Linear: dequantized below
            if w.dtype == target:
                scale = scales.pop(name + ".", torch.ones((), device=w.device))
            elif is_fp8(target):
                w, scale = quantize(dequantized(name + ".", w), target)
            else:
                w, scale = dequantized(name + ".", w).to(target), torch.ones((), device=w.device)
            owner, _, attr = name.rpartition(".")
            with torch.device("meta"):
                setattr(model.get_submodule(owner), attr,
                        Fp8Linear(linear.in_features, linear.out_features, linear.bias is not None, target, dtype))
            sd[name + ".weight"], sd[name + "." + SCALE] = w, scale.float()
            kept.add(name + ".weight")
    for k, t in sd.items():
        prefix = k.removesuffix("weight") if k.endswith(".weight") else None
        if k not in kept and (prefix in scales or is_fp8(t.dtype)):
            sd[k] = dequantized(prefix, t).to(compute(k, t))
    return sd


def convert(model: nn.Module, blocks, weight_dtype) -> nn.Module:
    """A built model's block Linears stored in weight_dtype, in place (e.g. the random tiny pipeline)."""
    model.load_state_dict(store(model, model.state_dict(), blocks, weight_dtype), strict=True, assign=True)
    return model


# ----------------------------------------------------------------------------------------------------------
# The fp8 matmul (W8A8): torch._scaled_mm
def scaled_mm_linear(x: torch.Tensor, w: torch.Tensor, scale_w: torch.Tensor, bias: torch.Tensor | None):
    """y = (s_x·Q_x)(s_w·Q_w)ᵀ + b with x quantized per call to float8_e4m3fn by its own amax, accumulated in
    fp32 and written in x's dtype. cuBLAS needs both matrix dimensions of w to be multiples of 16."""
    N, K = w.shape
    x2 = x.reshape(-1, K)
    qx, scale_x = quantize(x2, torch.float8_e4m3fn)
    out_bias = bias if x.dtype in (torch.bfloat16, torch.float16) else None  # cuBLAS adds a bias in 16 bits only
    y = torch._scaled_mm(qx, w.t(), scale_a=scale_x, scale_b=scale_w.float(), bias=out_bias, out_dtype=x.dtype)
    y = y if out_bias is not None or bias is None else y + bias
    return y.reshape(*x.shape[:-1], N)


def use_scaled_mm(model: nn.Module, on: bool = True) -> nn.Module:
    """Every fp8 Fp8Linear of `model` multiplies in fp8 (torch._scaled_mm) instead of upcasting its weight."""
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            m.scaled_mm = on
    return model
