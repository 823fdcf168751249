"""Build pretraining shards: sources -> tokenizer -> parallel tokenisation -> packing -> shards + manifest."""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import re
import shutil
import socket
import sys
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .demo import default_cache_dir
from .manifest import FORMAT, MANIFEST_FILE, write_manifest
from .packing import pack_document
from .shards import ShardWriter, file_sha256
from .sources import DataError, Skips, SourceSpec, check_source, iter_documents
from .tokenizer import MIN_VOCAB, file_hashes, load_tokenizer, raw_tokenizer, save_tokenizer, token_classes, train_bpe
from .vocab import SENTENCE_END, TOKEN_CLASSES_FILE

DEMO_SOURCES = ("demo:wiki", "demo:news@doc_sep=line")


@dataclass
class BuildConfig:
    out: Path
    sources: list[str]  # SourceSpec strings, see `--source`
    tokenizer: Path | None = None  # local BART tokenizer folder; None: train one on the sources
    vocab_size: int = 8000  # for a trained tokenizer
    block_size: int = 512
    shard_tokens: int = 1 << 28  # 256M tokens = 512 MB as uint16
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    chunk_chars: int = 1 << 18  # text per task sent to a worker (small enough to spread one big source)
    seed: int = 0  # only for fractional source weights
    strict: bool = False
    text_field: str = "text"
    cache_dir: Path = field(default_factory=default_cache_dir)
    overwrite: bool = False
    progress: bool = True


def build(cfg: BuildConfig) -> dict:
    """Run the whole build; returns the manifest (also written to OUT/manifest.json, last).

    Everything that can be checked up front is (options, every source, the tokenizer, the output
    folder) before anything is written. The build then happens in a temporary sibling of OUT and is
    swapped in only when complete, so a failed, interrupted or killed build never harms a previous one."""
    out = Path(os.path.realpath(cfg.out))  # through a symlink: build beside and replace its target, keep the link
    _remove_dead_staging(out)  # first: may put back a previous build a killed swap left aside
    specs = _validate(cfg)
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None
    staging = out.parent / f"{_STAGING_PREFIX.format(name=out.name)}{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _build_into(staging, cfg, specs, tok)
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _validate(cfg: BuildConfig) -> list[SourceSpec]:
    checks = [(cfg.block_size >= 8, f"block_size must be >= 8, got {cfg.block_size}"),
              (cfg.shard_tokens >= 1, f"shard_tokens must be >= 1, got {cfg.shard_tokens}"),
              (cfg.chunk_chars >= 1, f"chunk_chars must be >= 1, got {cfg.chunk_chars}"),
              (bool(cfg.text_field), "text_field must not be empty")]
    if cfg.tokenizer is None:
        checks.append((cfg.vocab_size >= MIN_VOCAB, f"vocab_size must be >= {MIN_VOCAB} (bytes + specials + <mask>), "
                                                     f"got {cfg.vocab_size}"))
    for ok, message in checks:
        if not ok:
            raise DataError(message)
    specs = [SourceSpec.parse(s, cfg.text_field) for s in cfg.sources]
    if not specs:
        raise DataError("no sources: give --source ... or --demo")
    for spec in specs:
        check_source(spec)
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).is_dir():
        raise DataError(f"--tokenizer {cfg.tokenizer}: no such folder (a local BART tokenizer folder, e.g. bart-base)")
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder")
    if out.is_dir():
        if (out / MANIFEST_FILE).exists() and not cfg.overwrite:
            raise DataError(f"{out} already holds a build (manifest.json); pass --overwrite to replace it")
        foreign = sorted(p.name for p in out.iterdir() if not _is_build_output(p.name))
        if foreign:
            raise DataError(f"--out {out} holds things a build does not write ({', '.join(foreign[:5])}"
                            f"{', ...' if len(foreign) > 5 else ''}); a build replaces the whole folder, so it will not "
                            "touch one with other data: choose a new or empty folder, or move them out")
    return specs


_STAGING_PREFIX = ".{name}.build-"  # + host-pid: where a build is written before it is swapped in
_BUILD_OUTPUT = re.compile(r"^(manifest\.json(\.tmp)?|token_classes\.npy|tokenizer|shard_\d+\.(bin|idx\.npy))$")


def _is_build_output(name: str) -> bool:
    return bool(_BUILD_OUTPUT.match(name))


def _remove_dead_staging(out: Path) -> None:
    """Leftovers of builds on this host whose process is gone (killed), never a live build's: staging
    folders are removed; a previous build set aside by the two-rename swap is put back when `out` is
    missing (killed between the renames), else removed."""
    if not out.parent.is_dir():
        return
    for kind in (".build-", ".old-"):
        prefix = _STAGING_PREFIX.format(name=out.name).replace(".build-", kind) + socket.gethostname() + "-"
        for path in sorted(out.parent.glob(prefix.replace("[", "[[]") + "*")):
            pid = path.name[len(prefix):]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == ".old-" and not out.exists() and (path / MANIFEST_FILE).is_file():
                os.rename(path, out)
                print(f"restored the previous build {out} (an interrupted build had set it aside)", file=sys.stderr)
            else:
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_in(staging: Path, out: Path) -> None:
    """Put the finished build at `out`. An existing build is exchanged atomically (renameat2
    RENAME_EXCHANGE on Linux; elsewhere two renames, the old build kept aside until the new one is
    in place) and removed only afterwards."""
    if not out.exists():
        os.rename(staging, out)
        return
    late = sorted(p.name for p in out.iterdir() if not _is_build_output(p.name))
    for name in late:  # appeared during the build (e.g. a download cache): carried over, never deleted
        os.rename(out / name, staging / name)
    if not _exchange(staging, out):
        aside = staging.with_name(staging.name.replace(".build-", ".old-"))
        os.rename(out, aside)
        os.rename(staging, out)
        staging = aside
    shutil.rmtree(staging, ignore_errors=True)  # now the previous build


def _exchange(a: Path, b: Path) -> bool:
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _build_into(out: Path, cfg: BuildConfig, specs: list[SourceSpec], tok) -> dict:
    if tok is None:
        quiet = Skips(strict=cfg.strict, verbose=False)  # the tokenising pass below reports skips
        tok = train_bpe((d.text for s in specs for d in iter_documents(s, quiet, cfg.cache_dir)), cfg.vocab_size)
    tokenizer_dir = out / "tokenizer"
    tokenizer_record = save_tokenizer(tok, tokenizer_dir)
    classes = token_classes(tok)
    np.save(out / TOKEN_CLASSES_FILE, classes)

    writer = ShardWriter(out, tokenizer_record["vocab_size"], cfg.shard_tokens)
    reports = [_new_report(raw, spec) for raw, spec in zip(cfg.sources, specs)]
    skips = [Skips(strict=cfg.strict) for _ in specs]
    chunks = _chunks(specs, skips, reports, cfg)
    init_args = (tokenizer_dir, (classes & SENTENCE_END) > 0, cfg.block_size, tokenizer_record["bos_id"], tokenizer_record["eos_id"])
    bar = tqdm(desc="tokenize", unit="doc", disable=not cfg.progress, file=sys.stderr)
    with _worker_map(cfg.workers, init_args) as map_fn:
        for source_index, n_docs, tokens, lengths, doc_ids, n_split in map_fn(_encode_chunk, chunks):
            writer.add(tokens, lengths, doc_ids)
            report = reports[source_index]
            report["blocks"] += len(lengths)
            report["tokens"] += int(lengths.sum())
            report["documents"]["split_into_blocks"] += n_split
            bar.update(n_docs)
    bar.close()
    shard_records = writer.finish()

    for report, skip in zip(reports, skips):
        report["documents"]["skipped"] = dict(sorted(skip.counts.items()))
        report["documents"]["read"] = report["documents"]["kept"] + sum(skip.counts.values())
        report["skip_examples"] = skip.examples
    totals = _totals(reports)
    if totals["blocks"] == 0:  # fail now, not at the first training step
        per_source = "; ".join(f"{r['spec']}: {r['documents']['read']} read, {r['documents']['kept']} kept, "
                               f"{r['documents']['emitted']} emitted, skipped {r['documents']['skipped'] or 'none'}"
                               for r in reports)
        raise DataError(f"no blocks: the sources yield no documents to train on ({per_source}). Check the paths, "
                        "@text_field=, @doc_sep=, weights and the skip examples printed above")
    manifest = {
        "format": FORMAT,
        "config": {"block_size": cfg.block_size, "shard_tokens": cfg.shard_tokens, "seed": cfg.seed, "strict": cfg.strict,
                   "tokenizer": str(cfg.tokenizer) if cfg.tokenizer else f"trained byte-level BPE, vocab_size={cfg.vocab_size}"},
        "tokenizer": tokenizer_record,
        "tokenizer_files": file_hashes(tokenizer_dir),
        "token_classes_sha256": file_sha256(out / TOKEN_CLASSES_FILE),
        "sources": reports,
        "totals": totals,
        "shards": shard_records,
    }
    manifest["fingerprint"] = hashlib.sha256(repr((tokenizer_record, manifest["token_classes_sha256"], shard_records)).encode()).hexdigest()
    write_manifest(out, manifest)
    return manifest


def _new_report(raw: str, spec: SourceSpec) -> dict:
    return {"spec": raw, "location": spec.location, "weight": spec.weight, "blocks": 0, "tokens": 0,
            "documents": {"read": 0, "kept": 0, "emitted": 0, "split_into_blocks": 0, "skipped": {}}}


def _chunks(specs: list[SourceSpec], skips: list[Skips], reports: list[dict], cfg: BuildConfig) -> Iterator[tuple]:
    """Tasks (source index, [(first doc id, copies, text), ...]); copies applies the source weight."""
    next_doc = 0
    for index, spec in enumerate(specs):
        whole, frac = int(spec.weight), spec.weight - int(spec.weight)
        rng = np.random.default_rng([cfg.seed, index, 1])  # seeded: fractional weights pick the same subset every run
        chunk, chars = [], 0
        for doc in iter_documents(spec, skips[index], cfg.cache_dir):
            copies = whole + int(frac > 0 and rng.random() < frac)
            reports[index]["documents"]["kept"] += 1
            reports[index]["documents"]["emitted"] += copies
            if copies:
                chunk.append((next_doc, copies, doc.text))
                next_doc += copies
                chars += len(doc.text)
            if chars >= cfg.chunk_chars:
                yield index, chunk
                chunk, chars = [], 0
        if chunk:
            yield index, chunk


def _totals(reports: list[dict]) -> dict:
    docs = Counter()
    skipped = Counter()
    for report in reports:
        docs.update({k: v for k, v in report["documents"].items() if k != "skipped"})
        skipped.update(report["documents"]["skipped"])
    return {"documents": {**dict(sorted(docs.items())), "skipped": dict(sorted(skipped.items()))},
            "blocks": sum(r["blocks"] for r in reports), "tokens": sum(r["tokens"] for r in reports)}


_WORKER: dict = {}


def _init_worker(tokenizer_dir: Path, sentence_end: np.ndarray, block_size: int, bos_id: int, eos_id: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the worker processes
    _WORKER.update(tok=raw_tokenizer(tokenizer_dir), sentence_end=sentence_end, block_size=block_size, bos=bos_id, eos=eos_id)


def _encode_chunk(task: tuple) -> tuple:
    source_index, docs = task
    encodings = _WORKER["tok"].encode_batch([text for _, _, text in docs], add_special_tokens=False)
    blocks, doc_ids, n_split = [], [], 0
    for (first_id, copies, _), enc in zip(docs, encodings):
        pieces = pack_document(np.asarray(enc.ids, dtype=np.int64), _WORKER["block_size"], _WORKER["sentence_end"],
                               _WORKER["bos"], _WORKER["eos"])
        n_split += copies * (len(pieces) > 1)
        for copy in range(copies):
            blocks.extend(pieces)
            doc_ids.extend([first_id + copy] * len(pieces))
    lengths = np.fromiter(map(len, blocks), dtype=np.int64, count=len(blocks))
    return source_index, len(docs), np.concatenate(blocks), lengths, np.asarray(doc_ids, dtype=np.int64), n_split


class _worker_map:
    """Ordered map over a process pool (ordered, so shards do not depend on scheduling), or inline.
    At most a few tasks per worker are in flight: Pool.imap would read the whole corpus ahead."""

    def __init__(self, workers: int, init_args: tuple) -> None:
        self.workers, self.init_args, self.pool = workers, init_args, None

    def __enter__(self):
        if self.workers <= 1:
            _init_worker(*self.init_args)
            return map
        self.pool = Pool(self.workers, initializer=_init_worker, initargs=self.init_args)
        return self._bounded_imap

    def _bounded_imap(self, fn, tasks) -> Iterator:
        pending = deque()
        for task in tasks:
            pending.append(self.pool.apply_async(fn, (task,)))
            if len(pending) >= 4 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate() if exc[0] else self.pool.close()
            self.pool.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.build", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build BART-JANUS pretraining shards: read sources, tokenize in worker processes, pack documents "
                    "into <s>..</s> blocks, write memory-mapped shards + manifest.json + tokenizer/. Masking is not "
                    "baked in: it is applied per sample by the loader. Same inputs -> byte-identical output.",
        epilog="""source SPEC: LOCATION[@key=value,...]
  LOCATION  file (.jsonl/.json lines, .txt, .parquet, .arrow), folder of such files,
            folder written by datasets' save_to_disk, hf:NAME (datasets.load_dataset from the
            local cache; set HF_DATASETS_OFFLINE=1 on machines without hub access),
            demo:wiki / demo:news (texts inside the gensim 4.4.0 wheel)
  keys      weight=W     copies of each document per epoch (default 1; 0.5 = a seeded half)
            text_field=F field/column holding the text (default: --text-field)
            split=S, config=C   for HF datasets (default split: train)
            doc_sep=blank|line  .txt files: blank-line-separated documents (default) or one per line

examples:
  python -m data_pipeline.build --demo --out runs/demo_shards
  python -m data_pipeline.build --out /data/shards --tokenizer /models/bart-base \\
      --source /data/wikipedia_saved@weight=1 --source /data/bookcorpus/@doc_sep=line,weight=1""")
    parser.add_argument("--out", type=Path, required=True, help="output folder (shards, manifest.json, tokenizer/)")
    parser.add_argument("--source", action="append", default=[], metavar="SPEC", help="a source (repeatable), see below")
    parser.add_argument("--demo", action="store_true", help="add the embedded demo corpus: " + ", ".join(DEMO_SOURCES))
    parser.add_argument("--tokenizer", type=Path, help="local BART byte-level BPE tokenizer folder (e.g. bart-base; BART's special "
                                                       "ids required); default: train one on the sources (an extra read pass)")
    parser.add_argument("--vocab-size", type=int, default=8000, help="vocabulary of a trained tokenizer (default 8000)")
    parser.add_argument("--block-size", type=int, default=512, help="tokens per block incl. <s> and </s> (default 512)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 28, help="start a new shard after this many tokens")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizer processes (<=1: inline)")
    parser.add_argument("--text-field", default="text", help="default text field/column for jsonl and datasets")
    parser.add_argument("--seed", type=int, default=0, help="seed for fractional source weights")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad input instead of counting skips")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="where the demo wheel is cached (default $BART_JANUS_CACHE or ~/.cache/bart-janus)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing build in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    sources = args.source + (list(DEMO_SOURCES) if args.demo else [])
    cfg = BuildConfig(out=args.out, sources=sources, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                      block_size=args.block_size, shard_tokens=args.shard_tokens, workers=args.workers, seed=args.seed,
                      strict=args.strict, text_field=args.text_field, cache_dir=args.cache_dir,
                      overwrite=args.overwrite, progress=not args.no_progress)
    try:
        manifest = build(cfg)
    except (DataError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    totals = manifest["totals"]
    print(f"wrote {len(manifest['shards'])} shard(s), {totals['blocks']} blocks, {totals['tokens']} tokens to {cfg.out}; "
          f"documents {totals['documents']}", file=sys.stderr)


if __name__ == "__main__":
    main()
