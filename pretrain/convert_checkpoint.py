"""Convert a checkpoint to DeepSpeed's universal format by hand (what an elastic resume does itself).

    python -m pretrain.convert_checkpoint --save_dir runs/bart-janus            # the newest complete one
    python -m pretrain.convert_checkpoint --save_dir runs/bart-janus --tag step_00010000

Writes ``<save_dir>/checkpoints/universal/<tag>/`` (marked complete only when finished; the
original is not modified). A later ``--run.resume auto`` at another world size reuses it instead
of converting again. The last line printed is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from janus import checkpoint, elastic


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save_dir", "--save-dir", required=True, help="the run's --run.save_dir")
    p.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    p.add_argument("--workers", type=int, default=4, help="parallel extraction processes")
    args = p.parse_args(argv)
    root = os.path.join(args.save_dir, "checkpoints")
    tags = checkpoint.complete_tags(root)
    tag = args.tag or (tags[-1] if tags else None)
    if tag is None:
        p.error(f"{root}: no complete checkpoint")
    if tag not in tags:
        p.error(f"{os.path.join(root, tag)} is not a complete checkpoint; complete: {', '.join(tags) or 'none'}")
    problems = checkpoint.verify_tag(root, tag)
    if problems:
        p.error(f"checkpoint {os.path.join(root, tag)} is damaged:\n  " + "\n  ".join(problems))
    result = elastic.convert(root, tag, workers=args.workers)
    summary = {"tag": tag, "universal": result["path"], "seconds": round(result["seconds"], 2),
               "reused": result["reused"], "world_size": checkpoint.read_marker(root, tag).get("world_size")}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
