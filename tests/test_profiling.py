"""--run.profile_steps and --run.memory_snapshot: traces with the named ranges, clear messages."""
import json

import pytest

from janus.profiling import parse_steps
from janus.trainer import RunConfig

from e2e import torchrun
from test_data_helpers import build_tiny, make_docs, write_jsonl

RANGES = ("data wait", "stream building", "encoder", "decoder", "vocabulary losses", "backward", "optimizer step",
          "logging")


def test_profile_steps_are_parsed_and_checked():
    assert parse_steps("") is None and parse_steps("3") == (3, 3) and parse_steps(" 2 - 5 ") == (2, 5)
    for bad in ("5-2", "0-3", "a-b", "2-"):
        with pytest.raises(ValueError, match="run.profile_steps must be 'A-B'"):
            RunConfig(profile_steps=bad)


@pytest.mark.slow
def test_profiled_steps_write_traces_with_the_named_ranges(tmp_path):
    shards = tmp_path / "shards"
    build_tiny(shards, [str(write_jsonl(tmp_path / "docs.jsonl", make_docs(60)))], shard_tokens=2000)
    run = tmp_path / "run"
    proc = torchrun("pretrain/train.py", ["--config", "pretrain/configs/tiny_cpu.json", "--data.shards_dir", str(shards),
                                          "--run.save_dir", str(run), "--run.max_steps", "3", "--run.log_every", "1",
                                          "--run.profile_steps", "2-3", "--run.memory_snapshot", "2"], nproc=1)
    assert "memory snapshots need CUDA (this run is on cpu)" in proc.stderr  # a clear message, and the run goes on
    chrome = run / "profile" / "rank0.chrome_trace.json"
    plugin = list((run / "profile").glob("rank0.*.pt.trace.json"))  # the TensorBoard profiler plugin's file
    assert len(plugin) == 1 and plugin[0].read_bytes() == chrome.read_bytes()
    trace = json.loads(chrome.read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = [e.get("name") for e in events]
    for name in RANGES:
        assert name in names, name
    assert names.count("optimizer step") == 2  # steps 2 and 3 only
    assert not (run / "memory").exists()
