"""Is a shards folder exactly what its manifest says? `python -m data_pipeline.verify SHARDS_DIR`

What is checked when (and why: data_pipeline/README.md, "Verification"):

- every start, `read_manifest` (a stat and a .npy header per file): every shard's `.bin` and
  `.idx.npy`, `token_classes.npy` and `tokenizer/tokenizer.json` are there; each `.bin` holds exactly
  `tokens x itemsize` bytes; each index is int64 `[blocks, 3]` with nothing appended.
- every start, the loader (`check_on_open`): index consistency (blocks back to back from 0, lengths
  2..block_size, summing to the shard's tokens, document ids non-decreasing), and the sha256 of the
  tokenizer files and `token_classes.npy` (small) against the manifest: a changed tokenizer folder is
  refused before any training.
- first use per node (`check_on_open` with `verify="once"`, the default; `"always"`: every start;
  `"size"`: never): `content_problems` -- the sha256 of every shard file against the manifest, every token
  id < vocab size, `<s>`/`</s>` at every block edge. This reads every byte once (8 GB for the paper's
  corpus), so a successful check leaves a stamp in a node-local cache keyed by each file's path, size,
  mtime and inode and the manifest's fingerprint; the next start on that node (every rank) finds it. Any
  change to a file invalidates it. Ranks of a node take a file lock, so one hashes and the rest wait.
- this CLI: all of the above, always, every problem listed; exit 1 when there is any (and a stamp when
  there is none).
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .manifest import MANIFEST_FILE, REBUILD_HINT, presence_problems, raise_problems, read_manifest
from .shards import file_sha256, index_problems, shard_files, token_dtype
from .tokenizer import tokenizer_problems
from .vocab import TOKEN_CLASSES_FILE

__all__ = ["MODES", "check_on_open", "content_problems", "verify", "stamp_dir", "file_sha256", "main"]

MODES = ("once", "always", "size")
READ_CHUNK = 1 << 24  # bytes hashed (and scanned for the max id) at a time


def stamp_dir(cache_dir: str | Path | None = None) -> Path:
    """Where first-use stamps go: `cache_dir`, else $BART_JANUS_VERIFY_CACHE, else a per-user folder in
    the node-local temp dir (a stamp must vouch only for what this node read)."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("BART_JANUS_VERIFY_CACHE"):
        return Path(os.environ["BART_JANUS_VERIFY_CACHE"])
    return Path(tempfile.gettempdir()) / f"bart-janus-verified-{os.getuid()}"


def _intact_shards(manifest: dict, problems: list[str]) -> dict:
    """The manifest restricted to shards none of `problems` names (the deeper checks need intact files)."""
    named = {r["name"] for r in manifest["shards"] for p in problems if f"/{r['name']}." in p}
    return {**manifest, "shards": [r for r in manifest["shards"] if r["name"] not in named]}


def cheap_problems(shards_dir: str | Path, manifest: dict) -> list[str]:
    """Every-start checks: presence and sizes, index consistency, tokenizer and token classes hashes."""
    shards_dir = Path(shards_dir)
    problems = presence_problems(shards_dir, manifest)
    problems += index_problems(shards_dir, _intact_shards(manifest, problems))
    problems += tokenizer_problems(shards_dir / "tokenizer", manifest["tokenizer"], manifest.get("tokenizer_files"))
    classes = shards_dir / TOKEN_CLASSES_FILE
    expected = manifest.get("token_classes_sha256")
    if expected and classes.is_file() and (sha := file_sha256(classes)) != expected:
        problems.append(f"{classes}: sha256 {sha[:12]}... differs from the manifest's {expected[:12]}...")
    return list(dict.fromkeys(problems))


def content_problems(shards_dir: str | Path, manifest: dict, progress: bool = False) -> list[str]:
    """The full read: sha256 of every shard file vs the manifest, token ids < vocab size, <s>/</s> at
    every block edge. One pass over each token file (hash and max per chunk)."""
    shards_dir = Path(shards_dir)
    tok = manifest["tokenizer"]
    vocab, bos, eos = tok["vocab_size"], tok["bos_id"], tok["eos_id"]
    dtype = token_dtype(vocab)
    total = sum(p.stat().st_size for r in manifest["shards"] for p in shard_files(shards_dir, r) if p.is_file())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify shards", disable=not progress, file=sys.stderr)
    problems = []
    for record in manifest["shards"]:
        bin_path, idx_path = shard_files(shards_dir, record)
        expected = record.get("sha256", {})
        digest, top = hashlib.sha256(), -1
        with open(bin_path, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                digest.update(chunk)
                usable = len(chunk) - len(chunk) % dtype.itemsize
                if usable:
                    top = max(top, int(np.frombuffer(chunk[:usable], dtype=dtype).max()))
                bar.update(len(chunk))
        if bin_path.name in expected and digest.hexdigest() != expected[bin_path.name]:
            problems.append(f"{bin_path}: sha256 {digest.hexdigest()[:12]}... differs from the manifest's "
                            f"{expected[bin_path.name][:12]}... (the tokens were changed after the build)")
        if top >= vocab:
            ids = np.memmap(bin_path, dtype=dtype, mode="r")
            where = int(np.flatnonzero(ids >= vocab)[0])
            problems.append(f"{bin_path}: token id {int(ids[where])} >= vocab size {vocab} at token {where} "
                            "(ids must index the tokenizer's vocabulary)")
        if idx_path.name in expected and (sha := file_sha256(idx_path)) != expected[idx_path.name]:
            problems.append(f"{idx_path}: sha256 {sha[:12]}... differs from the manifest's {expected[idx_path.name][:12]}...")
        bar.update(idx_path.stat().st_size)
        problems += _edge_problems(bin_path, idx_path, dtype, bos, eos)
    bar.close()
    return problems


def _edge_problems(bin_path: Path, idx_path: Path, dtype: np.dtype, bos: int, eos: int) -> list[str]:
    ids = np.memmap(bin_path, dtype=dtype, mode="r") if bin_path.stat().st_size else np.zeros(0, dtype)
    index = np.load(idx_path, mmap_mode="r")
    for lo in range(0, len(index), 1 << 20):
        chunk = np.asarray(index[lo:lo + (1 << 20)])
        starts, ends = chunk[:, 0], chunk[:, 0] + chunk[:, 1] - 1
        if len(ids) == 0 or ends.max(initial=0) >= len(ids) or starts.min(initial=0) < 0:
            return [f"{idx_path}: blocks reach past the end of {bin_path.name}"]
        if len(bad := np.flatnonzero(ids[starts] != bos)):
            return [f"{idx_path}: block {lo + int(bad[0])} does not start with <s> (index and tokens disagree)"]
        if len(bad := np.flatnonzero(ids[ends] != eos)):
            return [f"{idx_path}: block {lo + int(bad[0])} does not end with </s> (index and tokens disagree)"]
    return []


def verify(shards_dir: str | Path, progress: bool = False) -> list[str]:
    """Every problem of a shards folder (empty: it is intact). The CLI's check."""
    shards_dir = Path(shards_dir)
    try:
        manifest = read_manifest(shards_dir, check_files=False)
    except (OSError, ValueError) as err:
        return [str(err)]
    problems = cheap_problems(shards_dir, manifest)
    blocks = sum(r["blocks"] for r in manifest["shards"])
    tokens = sum(r["tokens"] for r in manifest["shards"])
    totals = manifest.get("totals", {})
    if totals and (totals.get("blocks"), totals.get("tokens")) != (blocks, tokens):
        problems.append(f"{shards_dir / MANIFEST_FILE}: totals say {totals.get('blocks')} blocks / {totals.get('tokens')} "
                        f"tokens, the shard records {blocks} / {tokens}")
    return problems + content_problems(shards_dir, _intact_shards(manifest, problems), progress)


def _stamp_key(shards_dir: Path, manifest: dict) -> str:
    paths = [shards_dir / MANIFEST_FILE, shards_dir / TOKEN_CLASSES_FILE]
    paths += [p for r in manifest["shards"] for p in shard_files(shards_dir, r)]
    items = []
    for path in paths:
        st = path.stat()
        items.append([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
    return hashlib.sha256(json.dumps([manifest.get("fingerprint"), items]).encode()).hexdigest()


@contextmanager
def _locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_stamp(stamp: Path, shards_dir: Path) -> None:
    tmp = stamp.with_name(f"{stamp.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"shards_dir": str(shards_dir.resolve()), "host": socket.gethostname(),
                               "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    os.replace(tmp, stamp)


def check_on_open(shards_dir: str | Path, manifest: dict, mode: str = "once", cache_dir: str | Path | None = None,
                  progress: bool = False) -> None:
    """What the loader runs before training (see the module docstring). Raises DataError naming every
    damaged file and the fix."""
    if mode not in MODES:
        raise ValueError(f"data.verify must be one of {', '.join(MODES)}, got {mode!r}")
    shards_dir = Path(shards_dir)
    raise_problems(shards_dir, cheap_problems(shards_dir, manifest))
    if mode == "size":
        return
    folder = stamp_dir(cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        writable = os.access(folder, os.W_OK)
    except OSError:
        writable = False
    if not writable:  # still verify, only without remembering it
        print(f"warning: verification stamp folder {folder} is not writable: the shards are checksummed on "
              "every start (set $BART_JANUS_VERIFY_CACHE or data.verify_cache_dir)", file=sys.stderr)
        raise_problems(shards_dir, content_problems(shards_dir, manifest, progress))
        return
    key = _stamp_key(shards_dir, manifest)
    stamp = folder / f"{key}.ok"
    if mode == "once" and stamp.is_file():
        return
    with _locked(folder / f"{key}.lock"):  # the node's other ranks wait here for the one hashing
        if mode == "once" and stamp.is_file():
            return
        raise_problems(shards_dir, content_problems(shards_dir, manifest, progress))
        _write_stamp(stamp, shards_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.verify", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check a shards folder against its manifest: files and sizes, block index, tokenizer and token "
                    "classes, sha256 of every shard file, token ids < vocab size, <s>/</s> at block edges. "
                    "Prints every problem (file: what) and exits 1 when there is any; on success also leaves the "
                    "first-use stamp, so training on this node skips the checksum pass.")
    parser.add_argument("shards_dir", type=Path)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--cache-dir", type=Path, help="stamp folder (default $BART_JANUS_VERIFY_CACHE or a temp folder)")
    args = parser.parse_args(argv)
    problems = verify(args.shards_dir, progress=not args.no_progress)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(problems)} problem(s); " + REBUILD_HINT.format(dir=args.shards_dir).split(";")[0], file=sys.stderr)
        return 1
    manifest = read_manifest(args.shards_dir)
    try:
        folder = stamp_dir(args.cache_dir)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_stamp(folder / f"{_stamp_key(args.shards_dir, manifest)}.ok", args.shards_dir)
    except OSError:
        pass
    print(f"OK: {args.shards_dir}: {len(manifest['shards'])} shard(s), {manifest['totals']['blocks']} blocks, "
          f"{manifest['totals']['tokens']} tokens; sizes, index, tokenizer, sha256 and token ids checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
