"""Small GLGE-format tasks from the embedded demo corpus.

``--kind xsum`` (default): the demo Wikipedia articles and news stories are cut into runs of
up to 8 sentences; each run with at least three sentences becomes one sample: its first
sentence is the summary (``.tgt``), the rest the article (``.src``).

``--kind lead``: every pair of consecutive sentences is a source and its first sentence (4-20
words) the target. A small model learns it in minutes, to a high score, while the output
length must still be predicted: a testbed where decoding options (length
candidates, pruning, iterations, dtype) show real quality differences.

``--kind lead-short``: ``lead`` restricted to short first sentences (4-12 words), the source cut
to 30 words. Short positions make the copy quick to discover: the tiny demo model learns it in a
few hundred steps on 2 CPU cores (``make demo`` uses it).

Written as ``{train,dev,test}.{src,tgt}``, deterministic.

    python -m finetune.make_demo_task --out runs/demo/task
    python -m finetune.make_demo_task --out runs/lead --kind lead
    python -m finetune.make_demo_task --out runs/demo/lead-short --kind lead-short
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from data_pipeline.demo import default_cache_dir, demo_documents
from data_pipeline.sources import Skips

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def samples(cache_dir: Path, kind: str = "xsum", max_source_words: int = 200) -> list[tuple[str, str]]:
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}: choose from {KINDS}")
    if kind == "lead-short":
        return [(" ".join(s.split()[:30]), t) for s, t in samples(cache_dir, "lead", max_source_words)
                if len(t.split()) <= 12]
    out = []
    skips = Skips(verbose=False)
    for part in ("wiki", "news"):
        for doc in demo_documents(part, cache_dir, skips):
            sentences = [s.strip() for s in SENTENCE_END.split(" ".join(doc.text.split())) if s.strip()]
            step, size, rest, most = (8, 8, slice(1, None), 40) if kind == "xsum" else (1, 2, slice(0, None), 20)
            for start in range(0, len(sentences), step):
                run = sentences[start:start + size]
                if len(run) < min(size, 3) or not 4 <= len(run[0].split()) <= most:
                    continue
                source = " ".join(" ".join(run[rest]).split()[:max_source_words])
                out.append((source, run[0]))
    return out


KINDS = ("xsum", "lead", "lead-short")


def write_task(out_dir: str, cache_dir: Path | None = None, dev: int = 60, test: int = 60, kind: str = "xsum") -> dict:
    pairs = samples(cache_dir or default_cache_dir(), kind)
    # Interleave so that dev/test hold both wiki and news samples.
    order = sorted(range(len(pairs)), key=lambda i: (i * 7919) % len(pairs))
    pairs = [pairs[i] for i in order]
    splits = {"dev": pairs[:dev], "test": pairs[dev:dev + test], "train": pairs[dev + test:]}
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in splits.items():
        for col, ext in ((0, "src"), (1, "tgt")):
            with open(os.path.join(out_dir, f"{name}.{ext}"), "w") as f:
                f.write("\n".join(r[col] for r in rows) + "\n")
    return {name: len(rows) for name, rows in splits.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--cache-dir", type=Path, default=None, help="where the gensim wheel is cached")
    p.add_argument("--kind", choices=KINDS, default="xsum",
                   help="xsum: lead sentence of the rest; lead: copy the lead; lead-short: copy a short lead")
    p.add_argument("--dev", type=int, default=60, help="dev samples")
    p.add_argument("--test", type=int, default=60, help="test samples")
    args = p.parse_args(argv)
    counts = write_task(args.out, args.cache_dir, args.dev, args.test, args.kind)
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()
