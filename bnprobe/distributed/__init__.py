"""Several processes (DDP): what crosses between ranks, with ``torch.distributed`` only.

- :mod:`~bnprobe.distributed.gather`: :class:`RankGather`, one collective per ``batch`` gathered
  steps (a step or a block of steps added at a time) that
  brings every rank's train rows to rank 0, and says why when a rank could not build them (no
  rank ever skips a collective, so a failure never hangs the others);
- :mod:`~bnprobe.distributed.divergence`: :func:`rank_divergence`, how far the running statistics
  of the ranks are apart;
- :mod:`~bnprobe.distributed.pooling`: :func:`pool_moments_across_ranks`, exact pooled moments
  for :func:`bnprobe.recalibrate`;
- :mod:`~bnprobe.distributed.ranks`: who am I, and the rare pickled gather.

May import the tap (snapshots), the store's :class:`~bnprobe.store.Rows` and the maths; no
Lightning, no sinks.
"""

from bnprobe.distributed.divergence import RunningMoments, rank_divergence, running_moments
from bnprobe.distributed.gather import Layout, RankGather, capacity
from bnprobe.distributed.pooling import pool_moments_across_ranks
from bnprobe.distributed.ranks import gather_to_rank_zero, global_rank, is_distributed

__all__ = [
    "Layout",
    "RankGather",
    "RunningMoments",
    "capacity",
    "gather_to_rank_zero",
    "global_rank",
    "is_distributed",
    "pool_moments_across_ranks",
    "rank_divergence",
    "running_moments",
]
