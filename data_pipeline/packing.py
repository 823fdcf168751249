"""Document-aware packing: a block is `<s> tokens </s>` from ONE document (fairseq's complete_doc,
as BART); a document longer than a block is split greedily at sentence ends, hard-cut only when a
single sentence exceeds the block."""
from __future__ import annotations

import numpy as np


def pack_document(ids: np.ndarray, block_size: int, sentence_end: np.ndarray, bos_id: int, eos_id: int) -> list[np.ndarray]:
    capacity = block_size - 2
    if len(ids) <= capacity:
        return [np.concatenate(([bos_id], ids, [eos_id]))]
    is_end = sentence_end[ids]
    cuts = np.flatnonzero(is_end[:-1] & ~is_end[1:]) + 1  # after a run of sentence-end tokens
    blocks, start = [], 0
    while len(ids) - start > capacity:
        # Last sentence cut that keeps the block within capacity, else a hard cut.
        i = int(np.searchsorted(cuts, start + capacity, side="right")) - 1
        stop = int(cuts[i]) if i >= 0 and cuts[i] > start else start + capacity
        blocks.append(np.concatenate(([bos_id], ids[start:stop], [eos_id])))
        start = stop
    blocks.append(np.concatenate(([bos_id], ids[start:], [eos_id])))
    return blocks
