"""Padding a list of variable-length samples into batch tensors with one scatter per field."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pad_batch(seqs: Sequence[np.ndarray], pad_value: int | bool, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """([B, max_len] array with seqs[b] then pad_value in row b, bool mask of real positions).
    Filled by one boolean scatter of the concatenation: row-major order matches concatenation order."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    valid = np.arange(lengths.max()) < lengths[:, None]
    out = np.full(valid.shape, pad_value, dtype=dtype)
    out[valid] = np.concatenate(seqs)
    return out, valid


def collate(input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray], decoder_masks: Sequence[np.ndarray],
            pad_id: int) -> dict[str, torch.Tensor]:
    """Batch dict for JanusBart.forward: input_ids/attention_mask [B,S], labels/decoder_mask [B,N]."""
    source, source_valid = pad_batch(input_ids, pad_id, np.int64)
    target, _ = pad_batch(labels, pad_id, np.int64)
    decoder_mask, _ = pad_batch(decoder_masks, False, np.bool_)
    return {
        "input_ids": torch.from_numpy(source),
        "attention_mask": torch.from_numpy(source_valid.astype(np.int64)),
        "labels": torch.from_numpy(target),
        "decoder_mask": torch.from_numpy(decoder_mask),
    }
