"""Data-parallel training over processes started by ``torchrun`` (torch.distributed, DDP).

The global batch is the one a single process would draw; rank r trains on its r-th contiguous
slice of it, so the loss, the gradients (DDP averages the per-rank means of equal slices) and the
learning-rate schedule do not depend on the number of processes, and a checkpoint resumes under
any N that divides the batch. Rank 0 alone writes checkpoints and logs. NCCL on CUDA, gloo on CPU.
Every check that can fail runs before the first collective, on every rank, so bad input is an
error on each rank and never a hang.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch

from .errors import ConfigError

__all__ = ["DistInfo", "dist_info", "check_batch", "start", "stop", "broadcast_text",
           "mean_over_ranks"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def shard(self, global_batch: int) -> slice:
        """This rank's rows of the global batch."""
        per = global_batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


def dist_info() -> DistInfo:
    """Rank, world size and local rank from the environment torchrun sets (1 process without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ConfigError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"bad torchrun environment: RANK {rank}, WORLD_SIZE {world}")
    return DistInfo(rank, world, local)


def check_batch(global_batch: int, info: DistInfo) -> None:
    if global_batch % info.world:
        raise ConfigError(f"batch size {global_batch} is not divisible by the {info.world} processes. "
                          f"Note: the global batch is split evenly; use a batch size that is a "
                          f"multiple of --nproc_per_node")


def start(info: DistInfo, device: torch.device) -> torch.device:
    """Join the process group; returns this rank's device (cuda:LOCAL_RANK on GPUs)."""
    if not info.enabled:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {info.local_rank} has no GPU: "
                              f"{torch.cuda.device_count()} visible. Note: --nproc_per_node must "
                              f"not exceed the number of GPUs")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=info.rank, world_size=info.world)
    return device


def stop(info: DistInfo) -> None:
    """Leave the process group while the interpreter is whole.

    The DDP wrapper's reducer holds the group. A reference cycle can keep the wrapper alive (one
    that torch.optim's constructor leaves keeps the training function's frame, and the wrapper in
    it); it then lived until the cycle collector ran, and at the interpreter's exit gloo's teardown
    aborted a finished rank ("terminate called without an active exception", SIGABRT), now and
    then. The caller drops its wrapper first; this collects what a cycle still holds."""
    if info.enabled:
        import torch.distributed as dist

        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def broadcast_text(text: str | None, info: DistInfo, device: torch.device) -> str:
    """Rank 0's string on every rank, sent as UTF-8 bytes in a tensor (no pickling)."""
    if not info.enabled:
        return text
    import torch.distributed as dist

    data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8) if info.is_main else None
    size = torch.tensor([0 if data is None else data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, 0)
    buf = data.to(device) if info.is_main else torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(buf, 0)
    return buf.cpu().numpy().tobytes().decode()


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a scalar over the ranks (the loss of the global batch, for logging)."""
    if not info.enabled:
        return value
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world
