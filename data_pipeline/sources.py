"""Document sources: local jsonl/txt/parquet/arrow files or folders, HF datasets saved with
`save_to_disk` or cached by name, and the embedded gensim demo texts.

Every document carries `where` ("file:line" or "path[row i]") so bad input is reported precisely.
Bad units are either a `DataError` (strict mode) or a counted skip with examples in the manifest.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .records import DataError, Document, Skips  # noqa: F401  (DataError/Skips re-exported for callers)

FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".arrow")
HF_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


@dataclass(frozen=True)
class SourceSpec:
    """`LOCATION[@key=value,...]`; keys: weight, text_field, split, config, doc_sep (txt: blank|line).
    LOCATION: a file, a folder, `hf:NAME` (datasets.load_dataset, local cache), `demo:wiki`, `demo:news`."""

    location: str
    weight: float = 1.0  # copies of each document per epoch; fractional part = a seeded random subset
    text_field: str = "text"
    split: str = "train"
    config: str | None = None
    doc_sep: str = "blank"  # txt files: documents separated by blank lines, or one per line

    @classmethod
    def parse(cls, spec: str, text_field: str = "text") -> "SourceSpec":
        location, _, options = spec.partition("@")
        kwargs: dict = {"text_field": text_field}
        for item in filter(None, options.split(",")):
            key, eq, value = item.partition("=")
            if not eq or key not in ("weight", "text_field", "split", "config", "doc_sep"):
                raise DataError(f"source {spec!r}: bad option {item!r} (keys: weight, text_field, split, config, doc_sep)")
            kwargs[key] = float(value) if key == "weight" else value
        made = cls(location=location, **kwargs)
        if made.weight < 0 or made.doc_sep not in ("blank", "line"):
            raise DataError(f"source {spec!r}: weight must be >= 0 and doc_sep blank|line")
        return made


def check_source(spec: SourceSpec) -> None:
    """Fail now, naming the source, on what iterating it would only discover later: a local path
    that does not exist, an unsupported file type, a folder with nothing to read, an unknown demo
    part. (An `hf:` name can only be resolved by loading it.) Cheap: no file is opened."""
    if spec.location.startswith("demo:"):
        from .demo import MEMBERS
        part = spec.location.removeprefix("demo:")
        if part not in MEMBERS:
            raise DataError(f"unknown demo source demo:{part} (choose from {', '.join('demo:' + p for p in MEMBERS)})")
        return
    if spec.location.startswith("hf:"):
        return
    path = Path(spec.location)
    if not path.exists():
        raise DataError(f"source not found: {path}")
    if path.is_dir():
        if any((path / marker).is_file() for marker in HF_DISK_MARKERS):
            return
        if not any(p.is_file() and p.suffix in FILE_SUFFIXES for p in path.rglob("*")):
            raise DataError(f"{path}: folder holds no {'/'.join(FILE_SUFFIXES)} files and is not a saved HF dataset")
    elif path.suffix not in FILE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type (use {', '.join(FILE_SUFFIXES)}, a folder, or hf:NAME)")


def iter_documents(spec: SourceSpec, skips: Skips, cache_dir: Path) -> Iterator[Document]:
    if spec.location.startswith("demo:"):
        from .demo import demo_documents
        yield from demo_documents(spec.location.removeprefix("demo:"), cache_dir, skips)
    elif spec.location.startswith("hf:"):
        import datasets
        name = spec.location.removeprefix("hf:")
        yield from _dataset_rows(datasets.load_dataset(name, spec.config, split=spec.split), name, spec.text_field, skips)
    else:
        path = Path(spec.location)
        if not path.exists():
            raise DataError(f"source not found: {path}")
        if path.is_dir():
            yield from _folder(path, spec, skips)
        else:
            yield from _file(path, spec, skips)


def _folder(path: Path, spec: SourceSpec, skips: Skips) -> Iterator[Document]:
    if any((path / marker).is_file() for marker in HF_DISK_MARKERS):
        import datasets
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if spec.split not in data:
                raise DataError(f"{path}: no split {spec.split!r} (has {sorted(data)}); set @split=...")
            data = data[spec.split]
        yield from _dataset_rows(data, str(path), spec.text_field, skips)
        return
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
    if not files:
        raise DataError(f"{path}: folder holds no {'/'.join(FILE_SUFFIXES)} files and is not a saved HF dataset")
    for file in files:
        yield from _file(file, spec, skips)


def _file(path: Path, spec: SourceSpec, skips: Skips) -> Iterator[Document]:
    if path.suffix in (".jsonl", ".json"):
        yield from _jsonl(path, spec.text_field, skips)
    elif path.suffix == ".txt":
        yield from _text(path, spec.doc_sep, skips)
    elif path.suffix in (".parquet", ".arrow"):
        import datasets
        data = datasets.Dataset.from_parquet(str(path)) if path.suffix == ".parquet" else datasets.Dataset.from_file(str(path))
        yield from _dataset_rows(data, str(path), spec.text_field, skips)
    else:
        raise DataError(f"{path}: unsupported file type (use {', '.join(FILE_SUFFIXES)}, a folder, or hf:NAME)")


def _lines(path: Path, skips: Skips) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line that is valid UTF-8; invalid lines are counted skips
    (for sources where a line is a unit: jsonl, one document per line)."""
    for lineno, text, error in _decoded_lines(path):
        if text is None:
            skips.skip("invalid_utf8", f"{path}:{lineno}", error)
        else:
            yield lineno, text


def _decoded_lines(path: Path) -> Iterator[tuple[int, str | None, str]]:
    """(line number, text or None when the line is not valid UTF-8, what is wrong)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8"), ""
            except UnicodeDecodeError as err:
                yield lineno, None, f"byte {err.start}"


def _jsonl(path: Path, text_field: str, skips: Skips) -> Iterator[Document]:
    for lineno, line in _lines(path, skips):
        where = f"{path}:{lineno}"
        if not line.strip():
            skips.skip("empty", where, "blank line")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            skips.skip("malformed_json", where, err.msg)
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            skips.skip("missing_text_field", where, f"no string field {text_field!r}")
        elif not text.strip():
            skips.skip("empty", where)
        else:
            yield Document(text.strip(), where)


def _text(path: Path, doc_sep: str, skips: Skips) -> Iterator[Document]:
    if doc_sep == "line":
        for lineno, line in _lines(path, skips):
            if line.strip():
                yield Document(line.strip(), f"{path}:{lineno}")
            else:
                skips.skip("empty", f"{path}:{lineno}", "blank line")
        return
    # The unit is the paragraph (document): one with an undecodable line is skipped whole, so the
    # counts add up (read = kept + skipped) and no document is trained on with a line cut out of it.
    paragraph, first, bad = [], 0, ""

    def finish() -> Iterator[Document]:
        if bad:
            skips.skip("invalid_utf8", f"{path}:{first}", bad)
        elif paragraph:
            yield Document("\n".join(paragraph).strip(), f"{path}:{first}")

    for lineno, line, error in _decoded_lines(path):
        if line is None or line.strip():
            first = first or lineno
            if line is None:
                bad = bad or f"line {lineno}, byte {error.removeprefix('byte ')}"
            else:
                paragraph.append(line.rstrip("\r\n"))
        elif first:
            yield from finish()
            paragraph, first, bad = [], 0, ""
    if first:
        yield from finish()


def _dataset_rows(data, name: str, text_field: str, skips: Skips) -> Iterator[Document]:
    if text_field not in data.column_names:
        raise DataError(f"{name}: no column {text_field!r} (columns: {data.column_names}); set @text_field=...")
    data = data.select_columns([text_field])  # do not read the other columns (titles, urls, ...)
    for start in range(0, len(data), 1000):
        for offset, text in enumerate(data[start:start + 1000][text_field]):
            where = f"{name}[row {start + offset}]"
            if not isinstance(text, str):
                skips.skip("missing_text_field", where, f"{text_field!r} is {type(text).__name__}")
            elif not text.strip():
                skips.skip("empty", where)
            else:
                yield Document(text.strip(), where)
