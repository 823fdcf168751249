"""The embedded demo corpus: the Wikipedia dump excerpt and the Lee news stories shipped in the
PyPI wheel of gensim 4.4.0. The wheel is fetched with pip into a cache and read as a zip file;
gensim is never installed and no text is stored in this repository."""
from __future__ import annotations

import bz2
import io
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

from .records import DataError, Document, Skips
from .wiki import wiki_articles

GENSIM = "gensim==4.4.0"
MEMBERS = {
    "wiki": "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "news": "gensim/test/test_data/lee_background.cor",
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("BART_JANUS_CACHE", Path.home() / ".cache" / "bart-janus"))


def gensim_wheel(cache_dir: Path) -> Path:
    """The cached wheel, downloaded on first use (`pip download`, no install, no dependencies)."""
    wheels = sorted(cache_dir.glob("gensim-4.4.0-*.whl"))
    if not wheels:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", GENSIM, "--no-deps", "--only-binary", ":all:", "-d", str(cache_dir), "-q"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(cache_dir.glob("gensim-4.4.0-*.whl"))
        if result.returncode != 0 or not wheels:
            raise DataError(f"could not fetch the demo corpus ({' '.join(cmd)}):\n{result.stderr.strip()}")
    return wheels[0]


def demo_documents(part: str, cache_dir: Path, skips: Skips) -> Iterator[Document]:
    if part not in MEMBERS:
        raise DataError(f"unknown demo source demo:{part} (choose from {', '.join('demo:' + p for p in MEMBERS)})")
    wheel = gensim_wheel(cache_dir)
    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read(MEMBERS[part])
    name = f"gensim-4.4.0:{Path(MEMBERS[part]).name}"
    if part == "wiki":
        yield from wiki_articles(io.BytesIO(bz2.decompress(raw)), name, skips)
        return
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if line.strip():
            yield Document(line.strip(), f"{name}:{lineno}")
        else:
            skips.skip("empty", f"{name}:{lineno}", "blank line")
