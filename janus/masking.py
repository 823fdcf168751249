"""A simple, fully vectorised decoder span sampler for tests, benchmarks and finetuning.

Production pretraining masks come from ``data_pipeline.masking`` (Poisson spans, pure
function of (seed, epoch, index)); this one is for places that just need a decoder mask
with an exact ratio: it masks exactly ``round(ratio * N_b)`` target tokens per sample, in
spans of ``round(mean_span)`` tokens with a random alignment (the last span may be cut).
"""
from __future__ import annotations

import torch


def span_mask(valid: torch.Tensor, ratio: float | torch.Tensor, mean_span: float = 3.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool mask [B, N] with exactly round(ratio * valid.sum(1)) True positions inside ``valid``.

    ``ratio`` may be a float or a per-sample tensor [B] (e.g. uniform ratios for CMLM).
    """
    B, N = valid.shape
    span = max(1, round(mean_span))
    lengths = valid.sum(1)
    ratio = torch.as_tensor(ratio, dtype=torch.float32).expand(B)
    count = torch.round(ratio * lengths).long().clamp(max=lengths)
    offset = torch.randint(0, span, (B, 1), generator=generator)
    block = (torch.arange(N).expand(B, N) + offset) // span
    key = torch.rand(B, N // span + 2, generator=generator).gather(1, block)
    key = key + torch.arange(N) * (1e-3 / max(N, 1))  # left-to-right inside a block
    key = key.masked_fill(~valid, float("inf"))
    rank = key.argsort(1).argsort(1)
    return rank < count[:, None]
