"""Decode a list of sources across all ranks and give every rank the outputs in order.

Shared by finetuning's dev evaluation and NMT's validation/test decoding. Every rank decodes
the slice ``rank::world`` with its own plain model copy (no DeepSpeed hooks, so ranks may run
different numbers of forwards), then the pieces are exchanged once.
"""
from __future__ import annotations

import time

import torch.distributed as dist

from finetune.generate import decode_lines


def decode_gathered(model, tokenizer, sources: list[str], **decode_kwargs) -> tuple[list[str], float]:
    """(hypotheses for all ``sources`` in order, the slowest rank's decoding seconds). Collective."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    share = list(range(rank, len(sources), world))
    t0 = time.perf_counter()
    hyps = decode_lines(model, tokenizer, [sources[i] for i in share], **decode_kwargs)
    seconds = time.perf_counter() - t0
    if world == 1:
        return hyps, seconds
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (list(zip(share, hyps)), seconds))
    ordered = dict(pair for part, _ in gathered for pair in part)
    return [ordered[i] for i in range(len(sources))], max(s for _, s in gathered)
