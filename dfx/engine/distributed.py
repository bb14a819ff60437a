"""Processes and devices: single process, torchrun (DDP), or SLURM-launched ranks.

torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; under SLURM
(``srun``) without torchrun the same values are derived from ``SLURM_*`` variables. Backend: NCCL
on CUDA, gloo on CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dfx.errors import UsageError
from dfx.files import write_text_atomic


# Set by `launch` for its ranks: the folder where a failing rank leaves its error for the launcher.
ERROR_DIR = "DFX_ERROR_DIR"


def record_failure(message: str, exit_code: int) -> bool:
    """Under ``dfx train --nproc-per-node``, leave this rank's error for the launcher (True); else False."""
    folder = os.environ.get(ERROR_DIR)
    if not folder:
        return False
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "error": message, "exit_code": exit_code, "time": time.time()}
    write_text_atomic(Path(folder) / f"rank-{rank}.json", json.dumps(record))
    return True


def first_failure(folder: str | Path) -> dict | None:
    """The earliest error any rank recorded: the cause (later ones are other ranks losing it)."""
    records = []
    for path in Path(folder).glob("rank-*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return min(records, key=lambda r: r["time"]) if records else None


@dataclass
class Context:
    """This process's place in the run: its rank, the number of processes and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a torch.device, with a clear error when absent."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {device}: no CUDA GPU is available on this machine (torch.cuda.is_available() is False); "
                "use --device cpu or --device auto"
            )
        if device == "cuda":
            device = f"cuda:{local_rank}"
    elif device != "cpu":
        raise UsageError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    return torch.device(device)


def _slurm_env() -> None:
    """Fill torch.distributed variables from SLURM's when launched by srun without torchrun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    os.environ.setdefault("MASTER_PORT", "29500")


def setup(device: str = "auto") -> Context:
    """Start the process group when launched with several ranks; pick this rank's device."""
    _slurm_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Context(rank, world_size, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj, ctx: Context) -> list:
    """Every rank's ``obj``, in rank order (a one-element list when not distributed)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, ctx: Context):
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(values: dict[str, float], ctx: Context) -> dict[str, float]:
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return {k: float(v) / ctx.world_size for k, v in zip(keys, t.tolist())}


def launch(nproc: int, argv: list[str]) -> tuple[int, dict | None]:
    """Re-run ``dfx <argv>`` under torchrun with ``nproc`` processes on this node.

    Returns torchrun's exit code and, when a rank failed, the first failure
    (``{"rank", "error", "exit_code"}``): what the user should see.
    """
    # --standalone: a local rendezvous on a free port, so parallel jobs on one machine do not collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "dfx", *argv]
    with tempfile.TemporaryDirectory(prefix="dfx-ranks-") as folder:
        torchrun = subprocess.Popen(cmd, env={**os.environ, ERROR_DIR: folder})
        try:
            code = torchrun.wait()
        except KeyboardInterrupt:  # SIGINT/SIGTERM here: let torchrun stop its ranks cleanly, then report
            torchrun.send_signal(signal.SIGTERM)
            code = torchrun.wait()
        return code, first_failure(folder) if code else None
