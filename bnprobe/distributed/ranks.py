"""Who am I in a process group, and the one pickled collective bnprobe still uses rarely.

Uses ``torch.distributed`` only; imports nothing of bnprobe.
"""

from __future__ import annotations

from typing import Any

import torch


def is_distributed() -> bool:
    """True inside an initialized ``torch.distributed`` process group of more than one process."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def global_rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


def gather_to_rank_zero(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0; None on the other ranks.

    A collective: every rank of the default group must call it. Without a process group of more
    than one process it returns ``[obj]``.
    """
    if not is_distributed():
        return [obj]
    rank = torch.distributed.get_rank()
    out: list[Any] | None = [None] * torch.distributed.get_world_size() if rank == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def collective_device() -> torch.device:
    """Where this group's collectives want their tensors (NCCL: the current CUDA device)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
