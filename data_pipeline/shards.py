"""Shard format: `shard_NNNNN.bin` (raw little-endian token ids, uint16 when the vocabulary fits,
else uint32) + `shard_NNNNN.idx.npy` (int64 [blocks, 3] = start, length, document id).

Both are memory-mapped by the loader: O(1) random access to any block, 2 bytes per token,
no per-block metadata to parse, and the bytes depend only on the input (reproducible builds).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

INDEX_COLUMNS = 3  # start, length, doc id


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ShardWriter:
    """Appends blocks in order; starts a new shard once the current one holds `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, vocab_size: int, shard_tokens: int) -> None:
        self.out_dir, self.dtype, self.shard_tokens = out_dir, token_dtype(vocab_size), shard_tokens
        self.records: list[dict] = []
        self._file = None
        self._index: list[np.ndarray] = []
        self._tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray, doc_ids: np.ndarray) -> None:
        """Write a run of blocks given as one flat token array plus per-block lengths and doc ids."""
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        first = 0
        while first < len(lengths):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._tokens
            # Blocks that fit in the current shard (at least one, so a block is never split).
            last = max(first + 1, int(np.searchsorted(offsets, offsets[first] + room, side="right")) - 1)
            last = min(last, len(lengths))
            lo, hi = offsets[first], offsets[last]
            self._file.write(np.ascontiguousarray(tokens[lo:hi], dtype=self.dtype).tobytes())
            starts = self._tokens + offsets[first:last] - lo
            self._index.append(np.stack([starts, lengths[first:last], doc_ids[first:last]], axis=1).astype(np.int64))
            self._tokens += int(hi - lo)
            first = last
            if self._tokens >= self.shard_tokens:
                self._close()

    def finish(self) -> list[dict]:
        if self._file is not None:
            self._close()
        return self.records

    def _open(self) -> None:
        self._name = f"shard_{len(self.records):05d}"
        self._file = open(self.out_dir / f"{self._name}.bin", "wb")
        self._index, self._tokens = [], 0

    def _close(self) -> None:
        self._file.close()
        self._file = None
        index = np.concatenate(self._index) if self._index else np.zeros((0, INDEX_COLUMNS), np.int64)
        bin_path, idx_path = self.out_dir / f"{self._name}.bin", self.out_dir / f"{self._name}.idx.npy"
        np.save(idx_path, index)
        self.records.append({
            "name": self._name, "blocks": int(len(index)), "tokens": int(self._tokens),
            "sha256": {bin_path.name: file_sha256(bin_path), idx_path.name: file_sha256(idx_path)},
        })


class ShardReader:
    """Random access to blocks across all shards of a manifest. Opens memmaps lazily per process,
    so the object pickles cheaply into DataLoader workers."""

    def __init__(self, shards_dir: str | Path, manifest: dict) -> None:
        self.shards_dir = Path(shards_dir)
        self.names = [s["name"] for s in manifest["shards"]]
        self.dtype = token_dtype(manifest["tokenizer"]["vocab_size"])
        counts = np.array([s["blocks"] for s in manifest["shards"]], dtype=np.int64)
        self.first_block = np.concatenate(([0], np.cumsum(counts)))
        self._pid, self._tokens, self._index = None, [], []

    def __len__(self) -> int:
        return int(self.first_block[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": None, "_tokens": [], "_index": []}

    def block(self, i: int) -> np.ndarray:
        if self._pid != os.getpid():
            self._open()
        shard = int(np.searchsorted(self.first_block, i, side="right")) - 1
        start, length, _ = self._index[shard][i - self.first_block[shard]]
        return np.asarray(self._tokens[shard][start:start + length], dtype=np.int64)

    def _open(self) -> None:
        self._tokens, self._index = [], []
        for name in self.names:
            self._tokens.append(np.memmap(self.shards_dir / f"{name}.bin", dtype=self.dtype, mode="r"))
            self._index.append(np.load(self.shards_dir / f"{name}.idx.npy", mmap_mode="r"))
        self._pid = os.getpid()
