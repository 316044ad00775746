"""Streamed block offload: run a transformer whose blocks live in CPU memory, with only k + 1 of them on the GPU.

A 4096² Flux step spends ~0.8 s of compute over 57 blocks, ~14 ms per block, while copying one bf16 double
block (340M parameters, 0.68 GB) over PCIe 4/5 takes ~27/~14 ms. So if block i + k is copied on a side stream
while block i computes, the copies hide behind the compute wherever a block copies faster than it computes
(bf16 over PCIe 5, fp8 over PCIe 4), and the transformer costs the GPU k + 1 blocks of memory instead of all
of them (22 GiB for flux-dev in bf16). The small parts (embedders, final layer) stay on
the device.

    with stream_blocks(model, model.blocks(), "cuda", ahead=1):
        out = model(...)          # any number of forwards; the blocks must run in list order

Mechanism, per block i, in a forward pre-hook: blocks outside the window i..i+k (cyclic, so the first blocks of
the next forward load during the last ones of this) go back to their CPU tensors; every block of the window
that is not resident gets a free slot and its copy is queued on the copy stream; the compute stream waits for
block i's copy. A slot is one flat byte buffer the size of the largest block, so a block of any dtype (bf16,
fp8 weights, fp32 scales: every parameter AND buffer is copied) is a set of views into it, device memory is
exactly k + 1 slots whatever the allocator does, and a copy into a slot waits for the compute that last read
it (an event), never for the host. On CUDA the CPU tensors are pinned once (page-locked memory is what lets a
copy run asynchronously); on the CPU the same code runs without streams or pinning, so it can be tested.
For inference only: autograd would need the blocks again in backward.
"""
from collections import deque
from contextlib import contextmanager

import torch
import torch.nn as nn

ALIGN = 256  # bytes: every tensor of a slot starts at this alignment (CUDA kernels and CPU SIMD both assume ≥ 64)


def _tensors(module: nn.Module):
    """(owner module, attribute name, tensor) of every parameter and buffer under `module`."""
    for owner in module.modules():
        for name, t in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]:
            if t is not None:
                yield owner, name, t


def _point(owner: nn.Module, name: str, t: torch.Tensor):
    """Make owner.name use the storage of `t` (a Parameter keeps its identity: optimizers and ties see it)."""
    current = getattr(owner, name)
    if isinstance(current, nn.Parameter):
        current.data = t
    else:
        setattr(owner, name, t)


class BlockStreamer:
    """The state of one stream_blocks: which block sits in which slot; `resident` maps block index -> slot."""

    def __init__(self, blocks, device, ahead: int):
        self.device, self.cuda = torch.device(device), torch.device(device).type == "cuda"
        self.entries = [list(_tensors(b)) for b in blocks]
        self.home = [[t.data for _, _, t in entries] for entries in self.entries]
        if any(t.device.type != "cpu" for ts in self.home for t in ts):
            raise ValueError("stream_blocks: the blocks must be on the CPU (load the model there)")
        if self.cuda:  # pinned once: pin_memory of a pinned tensor returns it, so a second call costs nothing
            self.home = [[t.pin_memory() for t in ts] for ts in self.home]
            for entries, ts in zip(self.entries, self.home):
                for (owner, name, _), t in zip(entries, ts):
                    _point(owner, name, t)
        self.offsets, size = [], 0
        for ts in self.home:
            offsets, end = [], 0
            for t in ts:
                offsets.append(end)
                end += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
            self.offsets.append(offsets)
            size = max(size, end)
        self.window = min(ahead + 1, len(blocks))
        self.slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(self.window)]
        self.free = deque(range(self.window))
        self.resident: dict[int, int] = {}
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # the slots' memory may be in use
            self.ready = [torch.cuda.Event() for _ in self.slots]
            self.released = [torch.cuda.Event() for _ in self.slots]

    def views(self, i: int, slot: int) -> list[torch.Tensor]:
        return [self.slots[slot][o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                for o, t in zip(self.offsets[i], self.home[i])]

    def issue(self, i: int):
        """Queue the copy of block i into a free slot and point its tensors there."""
        slot = self.free.popleft()
        views = self.views(i, slot)
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.released[slot])  # the compute that last read this slot is done
                for view, t in zip(views, self.home[i]):
                    view.copy_(t, non_blocking=True)
                self.ready[slot].record(self.copy_stream)
        else:
            for view, t in zip(views, self.home[i]):
                view.copy_(t)
        for (owner, name, _), view in zip(self.entries[i], views):
            _point(owner, name, view)
        self.resident[i] = slot

    def release(self, i: int):
        """Point block i back to its CPU tensors; its slot is free once the compute queued so far has run."""
        slot = self.resident.pop(i)
        for (owner, name, _), t in zip(self.entries[i], self.home[i]):
            _point(owner, name, t)
        if self.cuda:
            self.released[slot].record(torch.cuda.current_stream(self.device))
        self.free.append(slot)

    def before(self, i: int):
        """Forward pre-hook of block i: the window i..i+k resident (or on its way), block i's copy done."""
        window = [(i + j) % len(self.entries) for j in range(self.window)]
        for b in [b for b in self.resident if b not in window]:
            self.release(b)
        for b in window:
            if b not in self.resident:
                self.issue(b)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[self.resident[i]])

    def close(self):
        if self.cuda:  # no copy may still write into a slot that the allocator gets back
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            torch.cuda.current_stream(self.device).synchronize()
        for b in list(self.resident):
            self.release(b)


@contextmanager
def stream_blocks(model: nn.Module, blocks, device, ahead: int = 1):
    """Inside the block, `model` runs on `device` with `blocks` (its transformer blocks in execution order, on
    the CPU) streamed in `ahead` blocks ahead of the one computing; every other parameter and buffer of `model`
    is moved to `device` for the block. Afterwards all is where it was (the blocks' CPU tensors pinned on CUDA).
    Yields the BlockStreamer (its `resident` dict tells which blocks are on the device)."""
    if ahead < 0:
        raise ValueError(f"ahead must be at least 0, got {ahead}")
    blocks = list(blocks)
    in_blocks = {id(t) for b in blocks for _, _, t in _tensors(b)}
    rest = [(owner, name, t.data) for owner, name, t in _tensors(model) if id(t) not in in_blocks]
    streamer = BlockStreamer(blocks, device, ahead)
    hooks = [b.register_forward_pre_hook(lambda module, args, i=i: streamer.before(i)) for i, b in enumerate(blocks)]
    try:
        for owner, name, t in rest:
            _point(owner, name, t.to(device))
        yield streamer
    finally:
        for hook in hooks:
            hook.remove()
        streamer.close()
        for owner, name, t in rest:
            _point(owner, name, t)
