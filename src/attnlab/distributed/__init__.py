"""Context parallelism: one sequence split across the ranks of a ``torch.distributed`` group.

``context_parallel_attention(q, k, v, mechanism=..., group=..., strategy="auto")`` takes this rank's
shard ``[B, H, n, D]`` and returns its shard of the op's output on the whole sequence, with gradients
that cross ranks. Strategies: ring (softmax), state (the linear family), halo (local windows), ulysses
(any op). ``shard_sequence`` / ``gather_sequence`` move between the whole sequence and the shards.
See ``docs/distributed.md``.
"""

from attnlab.distributed.api import STRATEGIES, context_parallel_attention, serving_strategies, strategy_bytes
from attnlab.distributed.comm import Traffic, traffic
from attnlab.distributed.sharding import LAYOUTS, gather_sequence, shard_positions, shard_sequence

__all__ = [
    "LAYOUTS",
    "STRATEGIES",
    "Traffic",
    "context_parallel_attention",
    "gather_sequence",
    "serving_strategies",
    "shard_positions",
    "shard_sequence",
    "strategy_bytes",
    "traffic",
]
