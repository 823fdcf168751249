"""Build end to end: jsonl, HF dataset folders, txt, weights, reproducibility, tokenizer, CLIs."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, BartTokenizerFast

from data_pipeline.loader import read_manifest
from data_pipeline.shards import ShardReader

from test_data_helpers import build_tiny, make_docs, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def _documents_from_shards(out: Path) -> dict[int, list[int]]:
    """doc id -> its content tokens, re-joined from its blocks (in block order)."""
    manifest = read_manifest(out)
    reader = ShardReader(out, manifest)
    docs: dict[int, list[int]] = {}
    for shard in manifest["shards"]:
        index = np.load(out / f"{shard['name']}.idx.npy")
        tokens = np.fromfile(out / f"{shard['name']}.bin", dtype=reader.dtype)
        for start, length, doc in index:
            block = tokens[start:start + length]
            assert block[0] == manifest["tokenizer"]["bos_id"] and block[-1] == manifest["tokenizer"]["eos_id"]
            assert length <= manifest["config"]["block_size"]
            docs.setdefault(int(doc), []).extend(block[1:-1].tolist())
    return docs


def _decoded(out: Path) -> list[str]:
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    docs = _documents_from_shards(out)
    return [tok.decode(docs[i]) for i in sorted(docs)]


def test_jsonl_round_trip_and_manifest(tmp_path):
    docs = make_docs(60, seed=1) + [" ".join(make_docs(15, seed=2))]  # the last one spans many blocks
    manifest = build_tiny(tmp_path / "out", [str(write_jsonl(tmp_path / "a.jsonl", docs))])
    assert _decoded(tmp_path / "out") == docs  # nothing lost, nothing reordered, overlong doc split not dropped
    counts = manifest["sources"][0]["documents"]
    assert counts["read"] == counts["kept"] == counts["emitted"] == len(docs) and counts["skipped"] == {}
    assert counts["split_into_blocks"] >= 1
    tok = manifest["tokenizer"]
    assert (tok["bos_id"], tok["pad_id"], tok["eos_id"], tok["unk_id"], tok["mask_id"]) == (0, 1, 2, 3, tok["vocab_size"] - 1)
    assert manifest["totals"]["tokens"] == sum(s["tokens"] for s in manifest["shards"])


def test_tokenizer_folder_loads_with_bart_layout_and_mask_lstrip(tmp_path):
    manifest = build_tiny(tmp_path / "out", [str(write_jsonl(tmp_path / "a.jsonl", make_docs(40)))])
    for cls in (AutoTokenizer, BartTokenizerFast):
        tok = cls.from_pretrained(str(tmp_path / "out" / "tokenizer"))
        assert len(tok) == manifest["tokenizer"]["vocab_size"] and tok.mask_token_id == manifest["tokenizer"]["mask_id"]
        with_mask = tok("the city <mask> was new").input_ids
        without = tok("the city was new").input_ids
        # lstrip=True: the space before <mask> belongs to the mask, so only the mask is inserted.
        assert with_mask.count(tok.mask_token_id) == 1
        with_mask.remove(tok.mask_token_id)
        assert with_mask == without


def test_special_token_text_inside_documents_stays_text(tmp_path):
    docs = make_docs(30) + ["A literal <mask> and </s> and <pad> in an article."]
    build_tiny(tmp_path / "out", [str(write_jsonl(tmp_path / "a.jsonl", docs))])
    content = _documents_from_shards(tmp_path / "out")[len(docs) - 1]
    assert not set(content) & {0, 1, 2, 3, 399}
    assert _decoded(tmp_path / "out")[-1] == docs[-1]


def test_rebuild_is_byte_identical_whatever_the_worker_count(tmp_path):
    source = str(write_jsonl(tmp_path / "a.jsonl", make_docs(80)))
    build_tiny(tmp_path / "one", [source], workers=1, shard_tokens=1500)
    build_tiny(tmp_path / "two", [source], workers=2, shard_tokens=1500, chunk_chars=500)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".bin"]) > 1
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f


def test_existing_build_needs_overwrite(tmp_path):
    source = str(write_jsonl(tmp_path / "a.jsonl", make_docs(20)))
    build_tiny(tmp_path / "out", [source], shard_tokens=300)
    with pytest.raises(ValueError, match="overwrite"):
        build_tiny(tmp_path / "out", [source])
    manifest = build_tiny(tmp_path / "out", [source], overwrite=True)  # one big shard replaces many small ones
    names = sorted(p.name for p in (tmp_path / "out").glob("shard_*.bin"))
    assert names == ["shard_00000.bin"] == [s["name"] + ".bin" for s in manifest["shards"]]


@pytest.mark.parametrize("as_dict", [False, True])
def test_hf_dataset_saved_to_disk(tmp_path, as_dict):
    import datasets

    docs = make_docs(50, seed=3)
    data = datasets.Dataset.from_dict({"body": docs, "title": [f"t{i}" for i in range(len(docs))]})
    (datasets.DatasetDict({"train": data}) if as_dict else data).save_to_disk(str(tmp_path / "hf"))
    manifest = build_tiny(tmp_path / "out", [f"{tmp_path / 'hf'}@text_field=body,split=train"])
    assert manifest["sources"][0]["documents"]["kept"] == len(docs)
    assert _decoded(tmp_path / "out") == docs


def test_hf_dataset_by_name_from_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = make_docs(30, seed=4)
    (tmp_path / "raw").mkdir()
    write_jsonl(tmp_path / "raw" / "part.jsonl", docs)
    build_tiny(tmp_path / "out", [f"hf:{tmp_path / 'raw'}"])
    assert _decoded(tmp_path / "out") == docs


def test_txt_sources_and_weights_mix(tmp_path):
    paragraphs = make_docs(10, seed=5)
    (tmp_path / "books.txt").write_text("\n\n".join(p.replace("! ", "!\n") for p in paragraphs) + "\n")
    lines = make_docs(20, seed=6)
    (tmp_path / "news.txt").write_text("\n".join(lines) + "\n")
    manifest = build_tiny(tmp_path / "out", [f"{tmp_path / 'books.txt'}@weight=2", f"{tmp_path / 'news.txt'}@doc_sep=line,weight=0.5"])
    books, news = manifest["sources"]
    assert books["documents"]["kept"] == 10 and books["documents"]["emitted"] == 20
    assert news["documents"]["kept"] == 20 and 0 < news["documents"]["emitted"] < 20
    decoded = _decoded(tmp_path / "out")
    expected_books = [p.replace("! ", "!\n") for p in paragraphs for _ in range(2)]
    assert decoded[:20] == expected_books
    assert set(decoded[20:]) < set(lines) and len(decoded) == 20 + news["documents"]["emitted"]


def test_local_tokenizer_folder_is_reused(tmp_path):
    source = str(write_jsonl(tmp_path / "a.jsonl", make_docs(30)))
    first = build_tiny(tmp_path / "first", [source])
    second = build_tiny(tmp_path / "second", [source], tokenizer=tmp_path / "first" / "tokenizer")
    assert second["tokenizer"] == first["tokenizer"]
    assert [s["sha256"] for s in second["shards"]] == [s["sha256"] for s in first["shards"]]
    again = build_tiny(tmp_path / "first", [source], tokenizer=tmp_path / "first" / "tokenizer", overwrite=True)
    assert again["fingerprint"] == first["fingerprint"]  # a tokenizer inside the build being replaced still works


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_build_and_stats(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", make_docs(80))
    assert "--demo" in _run("data_pipeline.build", "--help").stdout
    built = _run("data_pipeline.build", "--out", str(tmp_path / "out"), "--source", str(source), "--vocab-size", "400",
                 "--block-size", "128", "--workers", "2")
    assert built.returncode == 0, built.stderr
    stats = _run("data_pipeline.stats", str(tmp_path / "out"), "--samples", "200")
    assert stats.returncode == 0, stats.stderr
    result = json.loads(stats.stdout.strip().splitlines()[-1])
    assert result["counts"]["samples"] == min(200, read_manifest(tmp_path / "out")["totals"]["blocks"])
    assert abs(result["encoder_mask_ratio"] - 0.3) < 0.03 and abs(result["decoder_mask_ratio"] - 0.5) < 0.03
    assert result["encoder_mean_span_length"] > 1 and result["decoder_mean_span_length"] > 1


def test_parquet_and_arrow_files(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    first, second = make_docs(20, seed=7), make_docs(20, seed=8)
    datasets.Dataset.from_dict({"text": first}).to_parquet(str(tmp_path / "part.parquet"))
    datasets.Dataset.from_dict({"text": second}).save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    build_tiny(tmp_path / "out", [str(tmp_path / "part.parquet"), str(arrow)])
    assert _decoded(tmp_path / "out") == first + second
