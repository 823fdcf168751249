"""Score a GLGE output file: python -m finetune.glge_eval --task T --hyp FILE --ref FILE [--src FILE]

Prints one JSON object: task, n, the task's metrics (GLGE's 0..100 scale), overall (mean
of the task's metrics, as on the GLGE leaderboard), repetition (token repetition ratio,
%), and for nmt the sacreBLEU signature. Metric definitions: janus/metrics.py.
"""
from __future__ import annotations

import argparse
import json
import sys

from janus.metrics import QG_TASKS, TASKS, evaluate


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
    args = parser.parse_args(argv)
    if args.task in QG_TASKS and args.src is None:
        parser.error(f"--task {args.task} needs --src: references are grouped by source")
    try:
        data = read_aligned({"hyp": args.hyp, "ref": args.ref, "src": args.src})
        result = evaluate(args.task, data["hyp"], data["ref"], data["src"])
    except (OSError, ValueError) as e:
        parser.error(str(e))
    if "note" in result:
        print(f"warning: {result['note']}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
