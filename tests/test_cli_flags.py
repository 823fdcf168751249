"""Every option of the non-training command-line tools reaches what it controls (the training entry
points are covered field by field in tests/test_flags.py)."""
import ast
import dataclasses
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLI_MODULES = ["data_pipeline/build.py", "data_pipeline/stats.py", "data_pipeline/verify.py", "finetune/generate.py",
               "finetune/glge_eval.py", "finetune/make_demo_task.py", "pretrain/export.py",
               "pretrain/convert_checkpoint.py", "benchmarks/train_step.py", "benchmarks/decode_latency.py",
               "benchmarks/data_throughput.py", "benchmarks/ablation.py", "demo.py"]


def _options(tree: ast.AST) -> list[tuple[str, int]]:
    """(dest, line) of every ``*.add_argument(...)`` with a flag or positional name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            dest = next((k.value.value for k in node.keywords if k.arg == "dest" and isinstance(k.value, ast.Constant)),
                        None)
            if dest is None and names:
                longs = [n for n in names if n.startswith("--")]
                dest = (longs[0] if longs else names[0]).lstrip("-").replace("-", "_")
            if dest and dest not in ("help", "config", "local_rank"):
                found.append((dest, node.lineno))
    return found


@pytest.mark.parametrize("module", CLI_MODULES)
def test_every_option_is_read(module):
    """A flag that is parsed but never read is a flag that does nothing."""
    source = (REPO / module).read_text()
    tree = ast.parse(source)
    read = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id in ("args", "a", "opts", "ns")}
    reads_all = "vars(args)" in source or "**vars(" in source
    if "getattr(args," in source:  # read by name: getattr(args, name) over a tuple of names
        read |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                 and source.count(f'"{n.value}"') + source.count(f"'{n.value}'") > 0}
    unread = [f"{module}:{line}: --{dest}" for dest, line in _options(tree) if dest not in read and not reads_all]
    assert not unread, f"options parsed but never read: {unread}"


def test_stats_flags_reach_the_masking_config(monkeypatch, tmp_path):
    import data_pipeline.stats as stats
    from data_pipeline.masking import MaskingConfig

    seen = {}
    monkeypatch.setattr(stats, "measure", lambda shards, cfg, *a: seen.setdefault("cfg", cfg) and {})
    values = {"preset": "reference", "encoder_ratio": 0.21, "encoder_lambda": 2.5, "decoder_ratio": 0.37,
              "decoder_lambda": 1.5, "random_token_prob": 0.05, "permute_sentences": False, "whole_word": False}
    assert set(values) == {f.name for f in dataclasses.fields(MaskingConfig)}  # a new field needs a case here
    for name, value in values.items():
        seen.clear()
        stats.main([str(tmp_path), f"--{name.replace('_', '-')}", str(value).lower()])
        assert getattr(seen["cfg"], name) == value, name


def test_build_flags_reach_the_build_config(monkeypatch, tmp_path):
    import data_pipeline.build as build

    seen = {}

    def fake_build(cfg):
        seen["cfg"] = cfg
        return {"shards": [], "totals": {"blocks": 0, "tokens": 0, "documents": 0}}

    monkeypatch.setattr(build, "build", fake_build)
    cases = {  # BuildConfig field -> (flags, expected value)
        "out": (["--out", str(tmp_path / "o")], tmp_path / "o"),
        "sources": (["--source", "a.jsonl", "--source", "b.txt"], ["a.jsonl", "b.txt"]),
        "tokenizer": (["--tokenizer", str(tmp_path / "t")], tmp_path / "t"),
        "vocab_size": (["--vocab-size", "777"], 777), "block_size": (["--block-size", "65"], 65),
        "shard_tokens": (["--shard-tokens", "999"], 999), "workers": (["--workers", "3"], 3),
        "seed": (["--seed", "5"], 5), "strict": (["--strict"], True), "text_field": (["--text-field", "body"], "body"),
        "cache_dir": (["--cache-dir", str(tmp_path / "c")], tmp_path / "c"), "overwrite": (["--overwrite"], True),
        "progress": (["--no-progress"], False),
    }
    internal = {"chunk_chars"}  # a tuning constant, not an option
    assert set(cases) | internal == {f.name for f in dataclasses.fields(build.BuildConfig)}
    for name, (flags, want) in cases.items():
        base = [] if name == "out" else ["--out", str(tmp_path / "o")]
        base += [] if name == "sources" else ["--source", "x.jsonl"]
        build.main([*base, *flags])
        assert getattr(seen["cfg"], name) == want, name
    build.main(["--out", str(tmp_path / "o"), "--demo"])
    assert seen["cfg"].sources == list(build.DEMO_SOURCES)
