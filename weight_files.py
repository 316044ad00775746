"""Reading the official weight files safely: the one helper set of the three model files' loaders.

safetensors' own errors ("header too small", "incomplete metadata, file not fully covered") and json's
(JSONDecodeError gives the line, not the file) name no file; a cast to the compute dtype would hide integer
tensors; NaN / inf weights would surface only as black images. And a crash mid-write must not leave a
half-written file where a checkpoint or an export was (atomic_write). vae.py, mmdit.py and text_encoders.py
import these helpers and nothing else of the project but fp8.py (the fp8 weights of the last two).
"""
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


def open_weights(path: Path, device="cpu"):
    """safe_open(path), ValueError naming the file if it is empty, cut short or not safetensors."""
    try:
        return safe_open(path, framework="pt", device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def read_json(path: Path) -> dict:
    """A JSON object, or ValueError naming the file."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # ValueError: also bytes that are not UTF-8
        raise ValueError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a JSON object")
    return obj


def checked_weight(t: torch.Tensor, where, key: str, **to) -> torch.Tensor:
    """t.to(**to), if it can be a weight; ValueError naming `where` and `key` otherwise. The sum screens at memory
    speed (NaN and inf always reach it); a non-finite sum, which may be an fp16 overflow, pays for the exact test."""
    if not t.is_floating_point():
        raise ValueError(f"{where}: {key} is {t.dtype}, not a floating-point weight")
    t = t.to(**to)
    screen = t.sum(dtype=torch.float32 if t.element_size() == 1 else None)  # CPUs have no fp8 sum
    if not screen.isfinite() and not t.float().isfinite().all():
        raise ValueError(f"{where}: {key} holds NaN or inf (as {t.dtype})")
    return t


def atomic_write(path: Path, write) -> None:
    """write(tmp_path), then rename onto `path`: readers and crashes never see a half-written file. The data and
    the rename are fsynced (without it a power loss can leave the new name on empty blocks). The file gets the
    permissions of any file the user creates (umask), whatever the writer gave it (safetensors: 0600). The temp
    name carries the writer's pid, so that a later run can tell a dead process's leftovers (runs.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")  # unique beside the target
    try:
        write(tmp)
        os.umask(mask := os.umask(0o022))  # reading the umask sets it: put it back
        os.chmod(tmp, 0o666 & ~mask)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:  # after the rename there is nothing left; after a failure, whatever the writer left
        Path(tmp).unlink(missing_ok=True)


def fsync(path) -> None:
    """Flush a file's (or a folder's: its entries) data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
