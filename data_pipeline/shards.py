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

from .sources import DataError

INDEX_COLUMNS = 3  # start, length, doc id
INDEX_CHUNK = 1 << 20  # index rows checked at a time (bounded memory for any shard size)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shard_files(shards_dir: Path, record: dict) -> tuple[Path, Path]:
    return Path(shards_dir) / f"{record['name']}.bin", Path(shards_dir) / f"{record['name']}.idx.npy"


def file_problems(shards_dir: str | Path, manifest: dict) -> list[str]:
    """Cheap checks (a stat and a .npy header per file), for every start: each shard's token file and
    index exist and have exactly the sizes the manifest implies. Problems read "PATH: what"."""
    shards_dir = Path(shards_dir)
    itemsize = token_dtype(manifest["tokenizer"]["vocab_size"]).itemsize
    problems = []
    for record in manifest["shards"]:
        bin_path, idx_path = shard_files(shards_dir, record)
        if not bin_path.is_file():
            problems.append(f"{bin_path}: missing")
        elif (size := bin_path.stat().st_size) != record["tokens"] * itemsize:
            problems.append(f"{bin_path}: {size} bytes, the manifest says {record['tokens']} tokens = "
                            f"{record['tokens'] * itemsize} bytes (truncated or overwritten)")
        if not idx_path.is_file():
            problems.append(f"{idx_path}: missing")
            continue
        try:
            index = np.load(idx_path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as err:
            problems.append(f"{idx_path}: unreadable block index ({err}; truncated or overwritten)")
            continue
        if index.dtype != np.int64 or index.shape != (record["blocks"], INDEX_COLUMNS):
            problems.append(f"{idx_path}: {index.dtype} {list(index.shape)}, the manifest says int64 "
                            f"[{record['blocks']}, {INDEX_COLUMNS}]")
        elif (size := idx_path.stat().st_size) != index.offset + index.nbytes:
            problems.append(f"{idx_path}: {size} bytes, expected {index.offset + index.nbytes} (extra bytes appended)")
    return problems


def index_problems(shards_dir: str | Path, manifest: dict) -> list[str]:
    """Every block index agrees with its shard: blocks lie back to back from offset 0, each 2..block_size
    tokens long, together exactly the shard's token count; document ids never decrease. O(blocks),
    vectorised, in bounded chunks. Assumes file_problems() found nothing."""
    block_size = manifest["config"]["block_size"]
    problems = []
    for record in manifest["shards"]:
        _, idx_path = shard_files(Path(shards_dir), record)
        index = np.load(idx_path, mmap_mode="r")
        expected_start, last_doc = 0, -1
        for lo in range(0, len(index), INDEX_CHUNK):
            chunk = np.asarray(index[lo:lo + INDEX_CHUNK])
            starts, lengths, docs = chunk[:, 0], chunk[:, 1], chunk[:, 2]
            wanted = expected_start + np.concatenate(([0], np.cumsum(lengths[:-1])))
            bad_length = np.flatnonzero((lengths < 2) | (lengths > block_size))
            bad_start = np.flatnonzero(starts != wanted)
            bad_doc = np.flatnonzero(np.diff(np.concatenate(([last_doc], docs))) < 0)
            if len(bad_length):
                i = int(bad_length[0])
                problems.append(f"{idx_path}: row {lo + i}: length {lengths[i]} outside 2..{block_size}")
            elif len(bad_start):
                i = int(bad_start[0])
                problems.append(f"{idx_path}: row {lo + i}: start {starts[i]}, expected {wanted[i]} "
                                "(blocks must lie back to back)")
            elif len(bad_doc):
                problems.append(f"{idx_path}: row {lo + int(bad_doc[0])}: document id decreases")
            if len(bad_length) or len(bad_start) or len(bad_doc):
                break
            expected_start = int(wanted[-1] + lengths[-1]) if len(chunk) else expected_start
            last_doc = int(docs[-1]) if len(chunk) else last_doc
        else:
            if expected_start != record["tokens"]:
                problems.append(f"{idx_path}: blocks cover {expected_start} tokens, the shard holds {record['tokens']}")
    return problems


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
        self.vocab_size = manifest["tokenizer"]["vocab_size"]
        self.dtype = token_dtype(self.vocab_size)
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
        local = i - self.first_block[shard]
        start, length, _ = self._index[shard][local]
        block = np.asarray(self._tokens[shard][start:start + length], dtype=np.int64)
        # One max over <= block_size ids: a damaged shard read without checksums (verify="size") still
        # fails naming the shard instead of an IndexError deep in the masking.
        if len(block) != length or (length and block.max() >= self.vocab_size):
            problem = (f"token id {block.max()} >= vocab size {self.vocab_size}" if len(block) == length
                       else f"{len(block)} of its {length} tokens present")
            raise DataError(f"{self.shards_dir / self.names[shard]}.bin block {local}: {problem}: the shard is damaged; "
                            f"python -m data_pipeline.verify {self.shards_dir} checks every shard")
        return block

    def _open(self) -> None:
        self._tokens, self._index = [], []
        for name in self.names:
            self._tokens.append(np.memmap(self.shards_dir / f"{name}.bin", dtype=self.dtype, mode="r"))
            self._index.append(np.load(self.shards_dir / f"{name}.idx.npy", mmap_mode="r"))
        self._pid = os.getpid()
