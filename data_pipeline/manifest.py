"""manifest.json: what a shards folder contains and how it was made."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .records import DataError

MANIFEST_FILE = "manifest.json"
TOKEN_CLASSES_FILE = "token_classes.npy"  # uint8 class per token id (word start / sentence end)
FORMAT = "bart-janus-blocks/1"


REBUILD_HINT = ("rebuild the folder with python -m data_pipeline.build (or restore it from a good copy); "
                "python -m data_pipeline.verify {dir} lists every problem")


def read_manifest(shards_dir: str | Path, check_files: bool = True) -> dict:
    """Load and sanity-check `shards_dir/manifest.json` (written last by the build, so a crashed build has none).
    With `check_files` (cheap: a stat and a .npy header per file) every file the manifest lists must be
    there with the size it implies, so a missing or truncated shard fails here, before any training set-up."""
    path = Path(shards_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; not a shards folder, or its build did not finish")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid manifest JSON: {err.msg}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, this code reads {FORMAT!r}")
    if check_files:
        raise_problems(shards_dir, presence_problems(shards_dir, manifest))
    return manifest


def presence_problems(shards_dir: str | Path, manifest: dict) -> list[str]:
    from .shards import file_problems

    shards_dir = Path(shards_dir)
    problems = file_problems(shards_dir, manifest)
    for extra in (shards_dir / TOKEN_CLASSES_FILE, shards_dir / "tokenizer" / "tokenizer.json"):
        if not extra.is_file():
            problems.append(f"{extra}: missing")
    return problems


def raise_problems(shards_dir: str | Path, problems: list[str]) -> None:
    """One DataError naming every problem (at most 10 lines) and the fix."""
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(f"{shards_dir}: the shards do not match manifest.json:\n  " + "\n  ".join(problems[:10]) + more
                        + "\n" + REBUILD_HINT.format(dir=shards_dir))


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Atomic write (tmp + rename) so readers never see half a manifest."""
    tmp = out_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / MANIFEST_FILE)
