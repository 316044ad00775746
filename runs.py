"""Engineering that keeps a 20,000-step run safe: the run folder of train_wlf.py and train_vae.py.

A long run dies of things its training loop never sees: a kill in the middle of a save, a second job started on
the same folder, a byte that changes on the disk, a `cp -r step-N step-N-backup` beside the checkpoints, data
edited between two jobs, a learning rate that turns the loss into NaN at step 12,000. For both scripts:

- One run per folder: `lock` holds --out/run.lock (pid, host, process start); a second run is refused with the
  holder's name; the lock of a process that is gone (on this host) is taken over.
- A checkpoint counts only when whole: it is written as checkpoints/.step-N.tmp/, then meta.json, listing the
  size and sha256 of every other file, is written LAST, then the folder is renamed to step-N. Only the exact
  name step-NNNNNNNN counts (a copy beside it is never read nor deleted). `verify` reads every byte back;
  `--resume` takes the newest checkpoint that verifies and names the ones it skipped; rotation deletes
  meta.json first, so a half-deleted folder never looks complete.
- Nothing non-finite is saved or exported (`check_finite`); a non-finite loss or gradient norm skips the
  update, and a streak of them stops the run before anything is written over (`BadSteps`).
- The data a checkpoint was trained on, and its loss settings, are recorded; `--resume` refuses others
  unless told (`require_same`).
- Leftovers of killed processes (temp files, temp folders, half-deleted checkpoints) are removed at the
  start; log.jsonl is cut back to the step the run continues from.

Data: `smallest` gives every rank the same batch size; `ReadAhead` reads the next batches in a thread.

Several ranks: rank 0 decides (the lock, which checkpoint, whether it verifies) and broadcasts (`on_rank0`);
every skip decision is all-reduced (`agree`), so the ranks of an FSDP run never take different paths. On a
cluster: every rank must see the run folder (`check_shared`); a torchrun restart continues the newest checkpoint
(`pick_checkpoint`); an error of any type on rank 0 reaches the others (`on_rank0`); `srun` without torchrun,
and one GPU for several ranks, are refused.
Imports vae for UserError, atomic_write, check_writable, pick_device, fsync and write_json: one writer (and one
check of an output path, one of a device) for every script of the project.
"""
import argparse
import collections
import datetime
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import vae

LOCK = "run.lock"
MARKER = "meta.json"  # the completeness marker of a checkpoint, written last
STEP = re.compile(r"step-(\d{8})")  # the only checkpoint name that counts (fullmatch)
# Leftovers of a killed writer: vae.atomic_write's .NAME.PID-RAND.tmp (with mmdit's .UUID.tmp inside it, when
# an export was killed while mmdit.save_transformer wrote), and the temporary folder of a checkpoint.
TEMP = re.compile(r"\..+\.\d+-[0-9a-f]{8}\.tmp(\.[0-9a-f]{32}\.tmp)?|\.step-\d{8}\.tmp")


# ===== Ranks: the process group, and their agreement ===========================================================

def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a 1-rank group, so the same code
    (FSDP2 included) runs as a plain `python train_wlf.py train ...` (or train_vae.py). `srun python ...` alone
    is refused: its N tasks would be N independent 1-rank runs writing into one folder."""
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")) or 1)
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and tasks > 1:
        raise vae.UserError(f"started {tasks} times by srun without torchrun: run one torchrun per node, see README")
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun then shares its rendezvous store with the ranks, keyed alike in every attempt: the restarted
        # ranks read the addresses of the group that died and fail to connect, or hang (seen with gloo and NCCL)
        raise vae.UserError(f"torchrun --max-restarts {restarts}: start torchrun with "
                            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment, or a restart cannot connect; "
                            "see README")
    device = vae.pick_device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    # A group's timeout is fixed when it is made, and this group also carries the checkpoint phases, where the
    # other ranks wait while rank 0 hashes a 12B-parameter run's ~150 GB: so 30 minutes. It is reached only by a
    # rank that hangs: an error on rank 0 reaches the others through on_rank0, and torchrun's agent stops the
    # whole group as soon as one worker process exits.
    timeout = datetime.timedelta(minutes=30)
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def on_rank0(fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0 alone; its result or its error is broadcast, so that no rank waits in a
    collective for one that has failed. A vae.UserError, or an OSError such as a full disk (named by its file),
    becomes the same one-line vae.UserError on every rank; any other exception is raised again on rank 0 (with its
    traceback) and is "rank 0 failed: ..." in one line on the others."""
    payload, failure = [None], None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            payload = [("ok", fn(*args, **kwargs))]
        except vae.UserError as e:
            payload = [("error", str(e))]
        except OSError as e:
            payload = [("error", file_error(e))]
        except Exception as e:  # a bug, an unexpected type from a library: the others must not wait for it
            payload, failure = [("failed", f"rank 0 failed: {type(e).__name__}: {e}".splitlines()[0])], e
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    if failure is not None:
        raise failure
    kind, value = payload[0]
    if kind != "ok":
        raise vae.UserError(value)
    return value


def check_shared(run: Path) -> None:
    """Every rank sees rank 0's --out: rank 0 writes a token file there, every rank reads it back (a folder on a
    node's local disk, under the same name on each node, fails here and not at the first resume). vae.UserError
    on every rank, naming the ranks and hosts that cannot see it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return

    def write() -> str:
        token = f"{os.getpid()}-{os.urandom(4).hex()}"
        (run / f".shared.{token}.tmp").write_text(token)  # a fresh name: no client has a cached lookup of it
        return token
    token = on_rank0(write)
    path, seen = run / f".shared.{token}.tmp", False  # each rank's own --out; a leftover matches TEMP
    for wait in (0.0, 0.5, 1.0):  # a network file system may show a new file to other clients a moment later
        time.sleep(wait)
        try:
            seen = path.read_text() == token
        except OSError:
            pass
        if seen:
            break
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (seen, socket.gethostname()))
    on_rank0(path.unlink, missing_ok=True)
    if blind := [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]:
        raise vae.UserError(f"--out {run}: not visible to {', '.join(blind)}; the run folder must be on storage "
                            "that every node sees (a shared file system), see README")


def file_error(e: OSError) -> str:
    """An OSError in one line that names its file: "PATH: No space left on device"."""
    return f"{e.filename}: {e.strerror}" if e.filename else f"{type(e).__name__}: {e}"


def agree(flag: bool) -> bool:
    """True on every rank if it is True on any (an all-reduce of one number)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# ===== Finite numbers ==========================================================================================

def first_nonfinite(state, name: str = "") -> str | None:
    """The name of the first floating-point tensor holding NaN or inf in a nested dict / list of tensors (a state
    dict, an optimizer state); None if all are finite. Sharded tensors are checked in their local part."""
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        if isinstance(state, torch.Tensor) and state.is_floating_point():
            local = state.to_local() if hasattr(state, "to_local") else state  # a DTensor: no collective
            return None if bool(torch.isfinite(local).all()) else name
        return None
    for key, value in items:
        if (found := first_nonfinite(value, f"{name}.{key}" if name else str(key))) is not None:
            return found
    return None


def check_finite(state, what: str) -> None:
    """vae.UserError (the same on every rank) if any tensor of `state` is not finite: `what` is refused."""
    found = first_nonfinite(state)
    if agree(found is not None):
        where = f" ({found})" if found else " (on another rank)"
        raise vae.UserError(f"{what}: the state holds NaN or inf{where}; refused, nothing was written")


class BadSteps:
    """A step whose loss or gradient norm is not finite makes no update (the caller skips optimizer.step and
    zeroes the gradients, and saves no checkpoint while `streak` > 0, so none of the checkpoints from before
    is rotated out); after `limit` such steps in a row the run stops with one line. The decision is
    all-reduced: every rank skips the same steps."""

    def __init__(self, limit: int, run: Path):
        self.limit, self.run, self.streak, self.skipped = limit, run, 0, 0

    def ok(self, step: int, say, **values: torch.Tensor) -> bool:
        if not agree(not all(bool(torch.isfinite(v).all()) for v in values.values())):
            self.streak = 0
            return True
        self.streak, self.skipped = self.streak + 1, self.skipped + 1
        shown = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in values.items())
        say(f"step {step}: {shown} (this rank): update skipped, {self.streak} in a row")
        if self.streak >= self.limit:
            newest = (list_checkpoints(self.run) or [None])[-1]
            kept = f"the newest checkpoint, {newest}, is untouched" if newest else "no checkpoint was saved yet"
            raise vae.UserError(f"step {step}: loss or gradient norm not finite in {self.streak} steps in a row "
                                f"(--max-bad-steps {self.limit}); stopped, {kept}; lower --lr or check the data")
        return False


# ===== The run folder: lock, leftovers, writable targets =======================================================

_held: list[Path] = []  # lock files of this process, released by `unlock_all`
_sigterm = [None]  # the SIGTERM handler before `lock` installed its own


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, Linux): tells a recycled pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


def _elastic() -> tuple[str | None, int]:
    """This torchrun job's run id (None when not given: torchrun's default "none" names no job) and restart count."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return (None if run_id in (None, "", "none") else run_id), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def _alive(holder: dict) -> bool:
    """Whether the lock's holder may still run. An earlier attempt of this same torchrun job (its run id, fewer
    restarts) is gone, on any host: torchrun stops every worker before it restarts the group, and rank 0 may come
    back on another node. Another holder on another host cannot be asked: alive."""
    run_id, restarts = _elastic()
    if run_id is not None and holder.get("run_id") == run_id and holder.get("restarts", 0) < restarts:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    if Path("/proc/self/stat").exists():
        start = _process_start(holder["pid"])
        return start is not None and start == holder.get("start", start)
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def lock(folder: Path) -> None:
    """Create `folder` if needed and hold folder/run.lock until `unlock_all` (the scripts' main calls it, on any
    exit; SIGTERM, a job scheduler's stop, exits through it too). Creating the lock file proves the folder is
    writable, before any model is loaded. A lock whose holder is gone (same host, no such process) is taken
    over; two runs that take over the same stale lock in the same instant are not guarded against."""
    if folder.exists() and not folder.is_dir():
        raise vae.UserError(f"--out {folder}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise vae.UserError(f"--out {folder}: cannot create the folder ({e.strerror or e})") from None
    path = folder / LOCK
    run_id, restarts = _elastic()
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()), "run_id": run_id,
          "restarts": restarts}
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                raise vae.UserError(f"--out {folder}: {path} exists but cannot be read; delete it if no run "
                                    "uses this folder") from None
            if attempt == 0 and not _alive(holder):
                print(f"{path}: taking over the lock of pid {holder['pid']} (no longer running)", flush=True)
                path.unlink(missing_ok=True)
                continue
            raise vae.UserError(f"--out {folder} is in use by pid {holder['pid']} on {holder['host']} ({path}); "
                                f"use another --out, or delete the lock file if that process is gone") from None
        except OSError as e:
            raise vae.UserError(f"--out {folder}: cannot write there ({e.strerror or e})") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _held.append(path)
        if not _sigterm[0] and threading.current_thread() is threading.main_thread():
            _sigterm[0] = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        return


def unlock_all() -> None:
    """Release the locks this process holds (only if still its own) and restore the SIGTERM handler."""
    while _held:
        path = _held.pop()
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass
    if _sigterm[0]:
        signal.signal(signal.SIGTERM, _sigterm[0])
        _sigterm[0] = None


def open_run(run: Path, files: tuple[Path, ...] = (), folders: tuple[Path, ...] = ()) -> None:
    """The start of a command that writes `run` (rank 0, before any model is loaded): lock it, check that the
    exports written at its end (`files`, `folders`) can be written, remove what killed processes left."""
    lock(run)
    for path in files:
        vae.check_writable(path, f"export {path}")
    for path in folders:
        if path.exists() and not path.is_dir():
            raise vae.UserError(f"export {path}: is a file, not a folder")
    clean_leftovers(run, run / "checkpoints", *{path.parent for path in files} - {run}, *folders)


def clean_leftovers(*folders: Path) -> None:
    """Remove what killed writers left in these folders: temp files and folders (TEMP), and checkpoint folders
    without meta.json (a deletion that was interrupted). Call it holding the lock: no other writer is alive."""
    for folder in folders:
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            incomplete = p.is_dir() and STEP.fullmatch(p.name) and not (p / MARKER).exists()
            if TEMP.fullmatch(p.name) or incomplete:
                print(f"removed {p} (left by a process that was killed)", flush=True)
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def open_log(run: Path, step: int, args: dict):
    """Write `args` to args.json; return log.jsonl cut back to the records of steps ≤ `step` (those after it are
    trained again; a line cut by a kill goes too), opened for appending."""
    vae.write_json(run / "args.json", args)
    path = run / "log.jsonl"
    if path.exists():
        keep = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                pass
        vae.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(keep), encoding="utf-8"))
    return open(path, "a", encoding="utf-8")


def log_line(file, record: dict) -> None:
    """One strict-JSON line (NaN and inf, a skipped step's loss, become null) and a flush."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    file.write(json.dumps(clean) + "\n")
    file.flush()


# ===== Checkpoints: a folder, meta.json (sizes and sha256 of the rest) written last, renamed when whole ==========

def list_checkpoints(run: Path) -> list[Path]:
    """checkpoints/step-NNNNNNNN folders with a meta.json, oldest first (not verified: see `verify`)."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if STEP.fullmatch(p.name) and (p / MARKER).is_file())  # 8 digits: by step


def step_of(path: Path) -> int:
    return int(STEP.fullmatch(path.name).group(1))


def begin_checkpoint(run: Path, step: int) -> Path:
    """An empty checkpoints/.step-N.tmp folder for the writers (rank 0 makes it; all ranks write into it)."""
    tmp = run / "checkpoints" / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _checksum(path: Path) -> dict:
    with open(path, "rb") as f:
        return {"bytes": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def checksums(folder: Path, names: list[str]) -> dict:
    """{name: {"bytes", "sha256"}}; files are hashed in parallel threads (hashlib releases the GIL): a 12 B-parameter
    run's checkpoint (~150 GB) is read at the disk's speed, not one core's."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, max(len(names), 1))) as pool:
        return dict(zip(names, pool.map(lambda name: _checksum(folder / name), names)))


def seal_checkpoint(tmp: Path, meta: dict, keep: int) -> Path:
    """Finish a checkpoint the writers left in `tmp` (fsynced): meta.json with the size and sha256 of every file,
    written last; the folder fsynced and renamed to step-N (replacing a folder of that name: a resumed run
    redoes its steps); then all but the newest `keep` checkpoints up to this step are deleted (newer ones, of a
    run this one was resumed from before, are left alone)."""
    names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    for name in names:
        vae.fsync(tmp / name)
    vae.write_json(tmp / MARKER, {**meta, "files": checksums(tmp, names)})
    vae.fsync(tmp)
    final = tmp.parent / tmp.name[1 : -len(".tmp")]
    if final.exists():
        remove_checkpoint(final)
    os.replace(tmp, final)
    vae.fsync(final.parent)
    older = [p for p in list_checkpoints(tmp.parent.parent) if step_of(p) <= step_of(final)]
    for old in older[:-keep]:
        remove_checkpoint(old)
    return final


def save_state(run: Path, meta: dict, state: dict, keep: int) -> Path:
    """A checkpoint of one file, state.pt (torch.save of `state`), for ranks that all hold the same state (data
    parallelism by hand): every rank checks it is finite (an all-reduce), rank 0 writes and seals it."""
    check_finite(state, f"the checkpoint of step {meta['step']}")

    def write() -> Path:
        tmp = begin_checkpoint(run, meta["step"])
        torch.save(state, tmp / "state.pt")
        return seal_checkpoint(tmp, meta, keep)
    return on_rank0(write)


def load_state(folder: Path) -> dict:
    try:
        return torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise vae.UserError(f"{folder / 'state.pt'}: unreadable ({str(e).splitlines()[0]})") from None


def remove_checkpoint(folder: Path) -> None:
    """meta.json first (made durable), then the rest: a deletion cut short leaves a folder that does not count."""
    (folder / MARKER).unlink(missing_ok=True)
    vae.fsync(folder)
    shutil.rmtree(folder)


def verify(folder: Path) -> dict:
    """The checkpoint's meta.json after checking every file it lists: present, of its size, of its sha256.
    vae.UserError naming the folder and the first fault otherwise."""
    if not folder.is_dir():
        raise vae.UserError(f"{folder}: no such checkpoint folder")
    try:
        meta = json.loads((folder / MARKER).read_text())
        files, sizes = meta["files"], {name: want["bytes"] for name, want in meta["files"].items()}
    except FileNotFoundError:
        raise vae.UserError(f"{folder}: no {MARKER}, not a complete checkpoint") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise vae.UserError(f"{folder / MARKER}: unreadable ({type(e).__name__}: {e})") from None
    check_sizes(folder, sizes, MARKER)
    for name, got in checksums(folder, list(files)).items():
        if got["sha256"] != files[name]["sha256"]:
            raise vae.UserError(f"{folder}: {name} does not match its sha256 in {MARKER} (changed on disk)")
    return meta


def check_sizes(folder: Path, sizes: dict[str, int | None], source: str) -> None:
    """vae.UserError naming the first of these files that is missing or not of the size `source` recorded
    (None: any size) — a truncated file fails here, before hours of work."""
    for name, want in sizes.items():
        size = (folder / name).stat().st_size if (folder / name).is_file() else None
        if size is None or size != (want or size):
            found = "missing" if size is None else f"{size} bytes, {source} says {want} (truncated?)"
            raise vae.UserError(f"{folder}: {name} {found}")


def pick_checkpoint(run: Path, resume: str | None) -> tuple[Path | None, dict | None]:
    """(checkpoint, its meta) to continue from, verified. --resume PATH: that one, or a one-line error;
    --resume alone ("latest"): the newest of the run that verifies, naming each one skipped and why (none yet:
    start); no --resume: none, and a run folder that already holds checkpoints is refused (it would be trained
    over, as it would be if none of them verified). A restart by torchrun (--max-restarts) after a rank died
    continues its own newest checkpoint, as --resume alone; none yet: as the first start was told.
    Rank 0 alone lists and verifies (call it through on_rank0): no rank decides from its own view of the disk."""
    if dist.is_initialized() and dist.get_rank() != 0:
        raise RuntimeError("pick_checkpoint runs on rank 0 alone (runs.on_rank0), which broadcasts its choice")
    found = list_checkpoints(run)
    if (restart := int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)) and found:
        print(f"restart {restart} by torchrun: continuing from the newest checkpoint that verifies", flush=True)
        resume = "latest"
    if resume is None:
        if found:
            raise vae.UserError(f"{run} already holds checkpoints (newest {found[-1].name}): continue it with "
                                "--resume, or start in another --out")
        return None, None
    if resume != "latest":
        try:
            return Path(resume), verify(Path(resume))
        except vae.UserError as e:
            raise vae.UserError(f"--resume {e}") from None
    for path in reversed(found):
        try:
            meta = verify(path)
        except vae.UserError as e:
            print(f"--resume: skipped {e}", flush=True)
            continue
        return path, meta
    if found:  # starting over would train over them: the user decides
        raise vae.UserError(f"--resume: none of the {len(found)} checkpoints under {run / 'checkpoints'} verifies "
                            "(see above); move them away to start from the start")
    print(f"--resume: no checkpoint under {run / 'checkpoints'} yet; starting from the start", flush=True)
    return None, None


# ===== What a run was trained on ==============================================================================

def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise vae.UserError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def digest(obj) -> str:
    """sha256 of a JSON-able value, written canonically."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_stats(path: Path) -> list:
    """[size, mtime_ns] of a file; [None, None] if it cannot be read (a missing file is part of the data too)."""
    try:
        st = path.stat()
    except OSError:
        return [None, None]
    return [st.st_size, st.st_mtime_ns]


def files_fingerprint(root: Path, files: list[Path]) -> dict:
    """A list of data files as a checkpoint records it: names under `root` and sizes (so a copy of the folder
    elsewhere, with new times, is the same data), their count and total size."""
    entries = [[p.relative_to(root).as_posix(), file_stats(p)[0]] for p in files]
    return {"files": digest(entries)[:16], "count": len(files), "bytes": sum(size or 0 for _, size in entries)}


def tree_fingerprint(path: Path) -> str:
    """digest of (relative name, size, mtime_ns) of a file or of every file under a folder: weights and tokenizers."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return digest([[p.relative_to(path).as_posix() if path.is_dir() else p.name, *file_stats(p)] for p in files])


def differences(then: dict, now: dict) -> list[str]:
    """"key: value then, value now" for every key whose value differs."""
    keys = sorted(k for k in {*then, *now} if then.get(k) != now.get(k))
    return [f"{k}: {then.get(k)!r} then, {now.get(k)!r} now" for k in keys]


def changed_rows(old: list[list], new: list[list], fields: tuple[str, ...], names: list[str]) -> str:
    """How two tables of rows differ, in a few words: the count, then the first three rows (names[i]: the fields
    that differ) — enough for the user to see which lines an edit touched."""
    changed = [f"{name}: {', '.join(f for f, a, b in zip(fields, then, now) if a != b)}"
               for name, then, now in zip(names, old, new) if then != now]
    if len(old) != len(new):
        changed.append(f"{len(old)} rows then, {len(new)} now")
    return f"{len(changed)} change(s) ({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''})"


WHAT = {"data": "data", "loss": "loss settings"}


def require_same(checkpoint: Path | None, meta: dict | None, args, **now: dict) -> None:
    """Refuse to continue `checkpoint` with other data or loss settings than its meta.json records (keyword
    `data` / `loss`), in one line naming each difference, unless --allow-data-change / --allow-loss-change.
    No checkpoint (None): nothing to compare."""
    for key, value in now.items() if checkpoint is not None else ():
        if changed := differences(meta.get(key) or {}, value):
            flag = f"--allow-{key}-change"
            if not getattr(args, flag[2:].replace("-", "_")):
                raise vae.UserError(f"--resume {checkpoint}: other {WHAT[key]} than it was trained with "
                                    f"({'; '.join(changed)}); pass {flag} to continue with them")
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"{flag}: continuing {checkpoint} with other {WHAT[key]} ({'; '.join(changed)})", flush=True)


# ===== Command line ===========================================================================================

class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: ...`, exit status 2, as every other error of the scripts."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def whole_number(text: str, low: int = 0) -> int:
    """argparse type: an integer ≥ `low` (a negative warm-up would make the learning rate negative)."""
    if not text.strip().isdigit() or int(text) < low:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least {low}, got {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    return whole_number(text, 1)


def number(low: float = -math.inf, high: float = math.inf, *, above: bool = False, below: bool = False):
    """argparse type: a finite float in [low, high] (`above`: > low; `below`: < high); NaN and inf are refused,
    so that a run cannot start with a value it can only turn into NaN."""
    bounds = [f"{'>' if above else '≥'} {low:g}"] if low > -math.inf else []
    bounds += [f"{'<' if below else '≤'} {high:g}"] if high < math.inf else []
    shown = " " + " and ".join(bounds) if bounds else ""

    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            x = math.nan
        if not math.isfinite(x) or x < low or x > high or (above and x == low) or (below and x == high):
            raise argparse.ArgumentTypeError(f"must be a finite number{shown}, got {text!r}")
        return x
    return parse


def run_command(command, args) -> None:
    """command(args); a vae.UserError, or an OSError (a file that cannot be read or written: full disk, permissions),
    ends the process with one line naming it and status 2. The run lock and the process group (torchrun's or the
    1-rank one) are released either way."""
    try:
        command(args)
    except vae.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {file_error(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        unlock_all()
        if dist.is_initialized():
            dist.destroy_process_group()


# ===== Several nodes: hybrid sharding (HSDP) ===================================================================


def check_shard_group(world: int, shard_group: int | None) -> int:
    """The ranks one copy of the state is sharded over: --shard-group N (typically one node's GPUs), by default
    all of them. The world must be whole groups of N, each a full replica."""
    group = shard_group or world
    if world % group:
        raise vae.UserError(f"--shard-group {group} does not divide the world size {world}: every rank must be in "
                            f"one of world / N groups of N ranks")
    return group


def shard_mesh(device: torch.device, world: int, shard_group: int | None):
    """The DeviceMesh for FSDP2's fully_shard. One group: 1-D, the state is split over every rank (FSDP). Several
    groups: 2-D (replicate × shard); parameters, gradients and optimizer state are split within a group of N ranks
    and replicated across the world / N groups (HSDP). Gradients are then reduce-scattered within the group (the
    fast links of one node) and all-reduced across groups, over 1/N of the bytes (the slower network)."""
    group = check_shard_group(world, shard_group)
    if group == world:
        return init_device_mesh(device.type, (world,))
    return init_device_mesh(device.type, (world // group, group), mesh_dim_names=("replicate", "shard"))


# ===== Data: ranks that cut the same batches, and reading ahead ================================================

def smallest(value: int) -> int:
    """The smallest of every rank's `value` (an all-reduce of one number): a batch size that fits on every GPU."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return min(values)


class ReadAhead:
    """fn(key) for each key of `keys` in order, computed up to `depth` keys ahead by a background thread, so that
    reading the next batches overlaps the step on this one. `next()` returns them in order; an error of fn is
    raised there. `waited` sums the seconds `next()` spent blocked: the step time lost to the data. The thread
    idles (blocked, not polling) when nothing is asked, and ends with the object, or at `close`."""

    def __init__(self, fn, keys, depth: int = 2):
        self.fn, self.keys, self.waited = fn, iter(keys), 0.0
        self.pool = ThreadPoolExecutor(max_workers=1)  # one reader: the keys are read in their order
        self.pending = collections.deque()
        for _ in range(depth):
            self._submit()

    def _submit(self) -> None:
        for key in itertools.islice(self.keys, 1):
            self.pending.append(self.pool.submit(self.fn, key))

    def next(self):
        tic = time.perf_counter()
        value = self.pending.popleft().result()
        self.waited += time.perf_counter() - tic
        self._submit()
        return value

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)
