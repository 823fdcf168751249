"""Score a GLGE output file: python -m finetune.glge_eval --task T --hyp FILE --ref FILE [--src FILE]

--protocol official (default): the numbers GLGE's official evaluation script (the ProphetNet
repository's GLGE_baselines/script/eval.py, used by the GLGE leaderboard, BANG, ProphetNet and the
JANUS paper) gives for these outputs: the raw, detokenised model outputs are put into the GLGE
baselines' form (BERT-uncased basic tokens) and scored against the untokenized release files
(<glge>/<version>/<task>_data/org_data/<split>.tgt) with the official post-processing and scorers
(ROUGE-1.5.5, coco-caption, NLTK 3.5's BLEU). Definitions: janus/glge_official.py.
--protocol modern: metrics re-derived from the papers' descriptions with today's packages
(rouge-score, current NLTK) on the outputs as given; not comparable with published GLGE numbers.
--dedup-consecutive: BANG's NAR post-processing (consecutive duplicate tokens removed before
scoring); label numbers computed with it as such.

Prints one JSON object: task, protocol, n, the task's metrics (GLGE's 0..100 scale), overall
(mean of the task's metrics, as on the GLGE leaderboard), repetition (token repetition ratio of
the outputs, %), and for nmt the sacreBLEU signature. Details: docs/metrics.md.
"""
from __future__ import annotations

import argparse
import json
import sys

from janus.glge_official import dedup_consecutive, evaluate_official
from janus.metrics import QG_TASKS, TASKS, MetricUnavailable, evaluate

PROTOCOLS = ("official", "modern")


def score(task: str, hyps: list[str], refs: list[str], srcs: list[str] | None = None, *,
          protocol: str = "official", dedup: bool = False, meteor: bool = True) -> dict:
    """The task's scores in ``protocol`` (official | modern); ``dedup``: BANG's NAR post-processing."""
    if protocol == "official":
        return evaluate_official(task, hyps, refs, srcs, meteor=meteor, dedup=dedup)
    if protocol != "modern":
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    result = evaluate(task, [dedup_consecutive(h) for h in hyps] if dedup else hyps, refs, srcs, meteor=meteor)
    return result | {"dedup": True} if dedup else result


def read_lines(path: str) -> list[str]:
    """One sample per line; a final newline ends the last line rather than adding an empty one.
    Empty lines are kept (an empty hypothesis scores 0); invalid UTF-8 is an error naming file and line."""
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    if raw[-1] == b"":
        raw.pop()
    lines = []
    for lineno, line in enumerate(raw, 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
    return lines


def read_aligned(files: dict[str, str | None]) -> dict[str, list[str] | None]:
    """Read every given file (role -> path) and insist on equal line counts."""
    data = {role: None if path is None else read_lines(path) for role, path in files.items()}
    counts = {role: (files[role], len(lines)) for role, lines in data.items() if lines is not None}
    if len({n for _, n in counts.values()}) > 1:
        detail = "; ".join(f"--{role} {path}: {n} lines" for role, (path, n) in counts.items())
        raise ValueError(f"line counts differ ({detail})")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.glge_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--hyp", required=True, help="system outputs, one per line")
    parser.add_argument("--ref", required=True, help="references, one per line (the GLGE .tgt file)")
    parser.add_argument("--src", help="sources, one per line (the GLGE .src file); required for "
                                      f"{'/'.join(QG_TASKS)}, whose items are grouped by source")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="official",
                        help="official: GLGE's official script's numbers (default); modern: re-derived metrics")
    parser.add_argument("--dedup-consecutive", action="store_true",
                        help="remove consecutive duplicate tokens first (BANG's NAR post-processing)")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (a JVM run); OVERALL is then null")
    args = parser.parse_args(argv)
    if args.task in QG_TASKS and args.src is None:
        parser.error(f"--task {args.task} needs --src: references are grouped by source")
    try:
        data = read_aligned({"hyp": args.hyp, "ref": args.ref, "src": args.src})
        result = score(args.task, data["hyp"], data["ref"], data["src"], protocol=args.protocol,
                       dedup=args.dedup_consecutive, meteor=not args.no_meteor)
    except (OSError, ValueError, MetricUnavailable) as e:
        parser.error(str(e))
    if "note" in result:
        print(f"warning: {result['note']}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
