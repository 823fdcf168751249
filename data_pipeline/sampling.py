"""Sample order: the stream is the concatenation of one permutation of all blocks per (seed, epoch).

Global step s covers stream positions [c, c + world_size * micro_batch_size), c = consumed
samples; rank r takes the r-th contiguous micro-batch of it. The only state is c, so resuming
with another world size continues at the same stream position, nothing repeated or skipped.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def epoch_permutation(seed: int, epoch: int, num_blocks: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_blocks)


class StreamOrder:
    """Maps stream positions to (epoch, block id); keeps only the newest epoch's permutation."""

    def __init__(self, seed: int, num_blocks: int) -> None:
        self.seed, self.num_blocks = seed, num_blocks
        self._epoch, self._perm = -1, np.empty(0, np.int64)

    def at(self, positions: np.ndarray) -> np.ndarray:
        """int64 [2, len(positions)]: epochs, block ids."""
        epochs = positions // self.num_blocks
        block_ids = np.empty_like(positions)
        for epoch in np.unique(epochs):  # at most two when a batch straddles an epoch boundary
            here = epochs == epoch
            block_ids[here] = self._permutation(int(epoch))[positions[here] % self.num_blocks]
        return np.stack([epochs, block_ids])

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, epoch_permutation(self.seed, epoch, self.num_blocks)
        return self._perm


def rank_batches(order: StreamOrder, consumed: int, rank: int, world_size: int, micro_batch_size: int) -> Iterator[np.ndarray]:
    """This rank's batch keys ([2, micro_batch_size] epochs/block ids) from global position `consumed`, forever."""
    step_start = consumed
    while True:
        first = step_start + rank * micro_batch_size
        yield order.at(np.arange(first, first + micro_batch_size))
        step_start += world_size * micro_batch_size
