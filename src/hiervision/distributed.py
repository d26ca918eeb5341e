"""Where a process runs: the device and precision choice every entry point shares (:func:`select_device`,
:func:`autocast_dtype`), and data-parallel training through the engine PyTorch users already run:
``torchrun`` + DDP.

``torchrun --nproc-per-node N -m hiervision train ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
(and the rendezvous address); :func:`setup` reads them and joins the process group (NCCL on CUDA,
gloo on CPU). Without them everything here is a no-op for one process, so the same code path trains
on a laptop, one GPU, several GPUs or several machines. Evaluation is sharded with
:func:`shard_indices` (rank ``r`` takes samples ``r, r+W, ...``) and put back in dataset order by
:func:`gather_rows`, so every image counts exactly once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from hiervision.config import ConfigError

__all__ = ["DistEnv", "any_flag", "autocast_dtype", "barrier", "gather_rows", "interleave", "max_over_ranks",
           "select_device", "setup", "shard_indices"]


def select_device(name: str = "auto", where: str = "train.device") -> torch.device:
    """``auto``: CUDA where a device is visible, else the CPU. A name that is no device, or a CUDA device this
    machine does not have, is one line naming ``where`` (the config key or the flag)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{where}={name!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}={name!r} but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{where}={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"{where}={name!r}: hiervision runs on cpu or cuda")
    return device


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 where the hardware computes it natively (recent CPUs, Ampere+ GPUs), else fp32."""
    if setting == "none":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        return torch.float16
    if setting != "auto":
        raise ConfigError(f"train.amp must be auto, bf16, fp16 or none, got {setting!r}")
    if device.type == "cuda":  # native bf16 from Ampere (sm 8.0) on; emulated bf16 (V100, T4) is slow: fp16 there
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return torch.bfloat16 if _cpu_has_bf16() else None


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(key: str, default: int) -> int:
    try:
        return int(os.environ.get(key, default))
    except ValueError:
        raise ValueError(f"environment variable {key}={os.environ[key]!r} is not an integer") from None


def setup(device: torch.device) -> DistEnv:
    """Join the torchrun job this process belongs to (once per process), and pick this rank's device.

    ``device`` is the configured device type; under torchrun each rank takes ``cuda:LOCAL_RANK``.
    """
    world, local = _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if world <= 1:
        return DistEnv(0, 1, 0, device)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != world:
        raise ValueError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
    return DistEnv(dist.get_rank(), world, local, device)


def shard_indices(n: int, env: DistEnv) -> torch.Tensor:
    """This rank's disjoint share of ``n`` samples (all of them for one process)."""
    return torch.arange(env.rank, n, env.world_size)


def _comm_device(env: DistEnv) -> torch.device:
    return env.device if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(t: torch.Tensor, n: int, env: DistEnv) -> torch.Tensor:
    """Inverse of :func:`shard_indices`: every rank's rows, interleaved back into the order of the ``n`` samples.

    Rank ``r`` holds rows ``r, r+W, ...``; shards differ in length by at most one, so each is padded
    to the longest, gathered, and the padding (which falls after position ``n``) is cut off.
    """
    if not env.enabled:
        return t
    longest = -(-n // env.world_size)
    dev = _comm_device(env)
    wire = torch.uint8 if t.dtype == torch.bool else t.dtype  # not every backend sends bool
    padded = torch.zeros((longest, *t.shape[1:]), dtype=wire, device=dev)
    padded[: len(t)] = t.to(dev, wire)
    parts = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(parts, padded)
    return interleave(parts, n).to(t.device, t.dtype)


def interleave(parts: list[torch.Tensor], n: int) -> torch.Tensor:
    """Rank ``r``'s rows (``r, r+W, ...``, each part padded to one length) back into the order of ``n`` samples."""
    return torch.stack(parts, 1).reshape(len(parts) * len(parts[0]), *parts[0].shape[1:])[:n]


def any_flag(flag: bool, env: DistEnv) -> bool:
    """True on every rank when it is true on any (all ranks must stop at the same step)."""
    if not env.enabled:
        return flag
    t = torch.tensor([int(flag)], device=_comm_device(env))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(value: float, env: DistEnv) -> float:
    """The largest of every rank's ``value`` (e.g. the worst loss, so all ranks take the same decision)."""
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device(env))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier(env: DistEnv) -> None:
    """Wait for every rank (a no-op in a single process), e.g. until rank 0 has written a checkpoint."""
    if env.enabled:
        dist.barrier()
