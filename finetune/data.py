"""GLGE-format data (``{train,dev,test}.{src,tgt}``, one sample per line) for finetuning.

Tokenised once into flat int32 arrays + offsets; batches are built in DataLoader workers by
``PairBatches`` as a pure function of the batch key (epoch, example ids), so finetuning
resumes exactly like pretraining (``data_pipeline.loader.ResumableLoader``). NAR mode adds
the CMLM decoder mask of mask-predict: a uniform number of masked target tokens in 1..N,
at uniformly random positions, from a counter-based hash of (seed, epoch, example id): a
pure, vectorised function of the sample.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from data_pipeline.collate import pad_batch

TASK_MAX_TARGET = {"xsum": 64, "squadqg": 64, "personachat": 32, "cnndm": 140, "gigaword": 32, "msnews": 64,
                   "msqg": 64, "coqa": 32}


class DataFormatError(ValueError):
    pass


def read_lines(path: str) -> list[str]:
    """Lines of a UTF-8 file; clear errors naming file and line for anything unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise DataFormatError(f"{path}: file is empty")
    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out = []
    for i, line in enumerate(lines, 1):
        try:
            out.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise DataFormatError(f"{path}:{i}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
    return out


def read_pair(src_path: str, tgt_path: str, forbid_empty: bool) -> tuple[list[str], list[str]]:
    """Two line-aligned files (source, target); mismatched line counts and (when
    ``forbid_empty``) empty lines are errors naming the file and line."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataFormatError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}")
    for path, lines in ((src_path, src), (tgt_path, tgt)):
        empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
        if empty and forbid_empty:
            raise DataFormatError(f"{path}:{empty[0]}: empty line ({len(empty)} in all); every line must hold text")
    return src, tgt


def read_split(data_dir: str, split: str) -> tuple[list[str], list[str]]:
    """GLGE layout ``{split}.src`` / ``{split}.tgt``; an empty line is an error in every split (an empty
    dev reference would silently score as a failure; an empty source has nothing to condition on)."""
    return read_pair(os.path.join(data_dir, f"{split}.src"), os.path.join(data_dir, f"{split}.tgt"),
                     forbid_empty=True)


@dataclass
class Tokenized:
    """Ragged token arrays: sample i is ``ids[offsets[i]:offsets[i + 1]]``."""

    ids: np.ndarray
    offsets: np.ndarray
    truncated: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]


def tokenize(tokenizer, lines: list[str], max_len: int, desc: str, chunk: int = 4096) -> Tokenized:
    """``<s> text </s>`` ids, cut to ``max_len`` keeping ``</s>``; truncations are counted."""
    pieces, truncated = [], 0
    eos = tokenizer.eos_token_id
    for start in tqdm(range(0, len(lines), chunk), desc=desc, unit="chunk", disable=len(lines) <= chunk):
        for ids in tokenizer(lines[start:start + chunk], add_special_tokens=True)["input_ids"]:
            if len(ids) > max_len:
                truncated += 1
                ids = ids[:max_len - 1] + [eos]
            pieces.append(np.asarray(ids, dtype=np.int32))
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in pieces])
    return Tokenized(np.concatenate(pieces), offsets, truncated)


def fingerprint(*paths: str, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a counter-based hash, so noise is vectorised and per-sample pure."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_uniform(seed: int, epochs: np.ndarray, ids: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) numbers that depend only on (seed, epoch, example id, slot)."""
    with np.errstate(over="ignore"):
        x = _mix64(np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15))
        x = _mix64(x ^ epochs.astype(np.uint64)[:, None])
        x = _mix64(x ^ ids.astype(np.uint64)[:, None])
        x = _mix64(x ^ (slots.astype(np.uint64)[None, :] + np.uint64(1)))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def cmlm_mask(lengths: np.ndarray, width: int, seed: int, epochs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mask-predict training masks [B, width]: per sample n ~ U{1..N}, n random positions."""
    u = hash_uniform(seed, epochs, ids, np.arange(width + 1))
    counts = np.floor(u[:, -1] * lengths).astype(np.int64) + 1
    scores = np.where(np.arange(width) < lengths[:, None], u[:, :-1], np.inf)
    rank = scores.argsort(1).argsort(1)
    return rank < counts[:, None]


def poisson_span_mask(lengths: np.ndarray, width: int, seed: int, epochs: np.ndarray, ids: np.ndarray,
                      mean_span: float = 2.0) -> np.ndarray:
    """Span masks [B, width] (JANUS paper §3.2): per sample a ratio r ~ U(0, 1], n = max(1, round(r N))
    masked tokens in spans of length max(1, Poisson(mean_span)) (the last span cut to fit n), placed at
    uniformly random non-overlapping spots. Vectorised, a pure function of (seed, epoch, id): the spans
    and the N - n unmasked tokens form "units" that are put in a random order and laid out left to right."""
    B = len(lengths)
    u = hash_uniform(seed, epochs, ids, np.arange(2 * width + 1))
    counts = np.clip(np.rint((1.0 - u[:, -1]) * lengths), 1, np.maximum(lengths, 1)).astype(np.int64)
    counts = np.minimum(counts, lengths)
    # Span lengths by inverse CDF of Poisson(mean_span), at least 1; cut where their sum reaches n.
    k = np.arange(4 * int(mean_span) + 24)
    pmf = np.exp(-mean_span + k * np.log(mean_span) - np.cumsum(np.log(np.maximum(k, 1))))
    spans = np.maximum(np.searchsorted(np.cumsum(pmf), u[:, :width]), 1)
    start = np.cumsum(spans, 1) - spans
    spans = np.clip(counts[:, None] - start, 0, spans)  # [B, width]: 0 for spans past n
    # Units: `width` span slots then `width` single unmasked tokens (the first N - n of them real).
    unit_len = np.concatenate([spans, (np.arange(width) < (lengths - counts)[:, None]).astype(np.int64)], 1)
    unit_mask = np.concatenate([np.ones((B, width), bool), np.zeros((B, width), bool)], 1)
    shuffle = np.concatenate([u[:, width:2 * width], hash_uniform(seed + 1, epochs, ids, np.arange(width))], 1)
    key = np.where(unit_len > 0, shuffle, np.inf)
    order = key.argsort(1, kind="stable")
    unit_len, unit_mask = np.take_along_axis(unit_len, order, 1), np.take_along_axis(unit_mask, order, 1)
    flat = np.repeat(unit_mask.ravel(), unit_len.ravel())  # row-major: row b holds exactly lengths[b] flags
    out = np.zeros((B, width), bool)
    out[np.arange(width) < lengths[:, None]] = flat
    return out


DECODER_MASKERS = {"cmlm": cmlm_mask, "span": poisson_span_mask}


class PairBatches(Dataset):
    """Map-style dataset: key = int64 [2, B] of (epoch, example id) -> a padded batch.
    With ``nar`` the batch has a decoder mask from ``masker`` (a name in ``DECODER_MASKERS``)
    and length targets for the length head."""

    def __init__(self, src: Tokenized, tgt: Tokenized, pad_id: int, seed: int, nar: bool, max_target: int,
                 masker: str = "cmlm"):
        if masker not in DECODER_MASKERS:
            raise ValueError(f"unknown decoder masking {masker!r}; choose from {sorted(DECODER_MASKERS)}")
        self.src, self.tgt, self.pad_id, self.seed, self.nar, self.max_target = src, tgt, pad_id, seed, nar, max_target
        self.masker = masker

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, key: np.ndarray) -> dict[str, torch.Tensor]:
        epochs, ids = key
        source, source_valid = pad_batch([self.src.get(i) for i in ids], self.pad_id, np.int64)
        target, target_valid = pad_batch([self.tgt.get(i) for i in ids], self.pad_id, np.int64)
        lengths = target_valid.sum(1)
        batch = {"input_ids": torch.from_numpy(source), "attention_mask": torch.from_numpy(source_valid.astype(np.int64)),
                 "labels": torch.from_numpy(target)}
        if self.nar:
            mask = DECODER_MASKERS[self.masker](lengths, target.shape[1], self.seed, epochs, ids)
            batch["decoder_mask"] = torch.from_numpy(mask)
            batch["length_targets"] = torch.from_numpy(np.minimum(lengths, self.max_target))
        else:
            batch["decoder_mask"] = torch.zeros(target.shape, dtype=torch.bool)
        return batch
