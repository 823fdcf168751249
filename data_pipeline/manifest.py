"""manifest.json: what a shards folder contains and how it was made."""
from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST_FILE = "manifest.json"
FORMAT = "bart-janus-blocks/1"


def read_manifest(shards_dir: str | Path) -> dict:
    """Load and sanity-check `shards_dir/manifest.json` (written last by the build, so a crashed build has none)."""
    path = Path(shards_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; not a shards folder, or its build did not finish")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid manifest JSON: {err.msg}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, this code reads {FORMAT!r}")
    return manifest


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Atomic write (tmp + rename) so readers never see half a manifest."""
    tmp = out_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / MANIFEST_FILE)
