import json
import subprocess
import sys

import pytest

from e2e import REPO, launch_env


@pytest.mark.slow
def test_demo_runs_the_pipeline_end_to_end(tmp_path):
    """The whole demo with tiny budgets: shards, 2-rank pretraining, export, AR and JANUS
    finetuning, every decoder, the table, the plot and the printed examples."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "demo.py", "--out", str(out), "--pretrain-steps", "12", "--finetune-steps",
                           "6", "--iterations", "0,2", "--latency-samples", "2", "--eval-samples", "8",
                           "--test-samples", "12"], cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["pretrain_steps"] == 12
    for k in ("loss/ar", "loss/nar", "loss/aux", "loss/total"):
        assert summary["pretrain_last"][k] < summary["pretrain_first"][k], k
    assert (out / "bart-janus" / "config.json").exists() and (out / "bart-janus" / "janus_config.json").exists()
    assert (out / "pretrain" / "tensorboard").is_dir()
    assert (out / "lead-ar" / "best").is_dir() and (out / "lead-janus" / "best" / "janus_config.json").exists()
    test_src = (out / "lead-short" / "test.src").read_text().splitlines()
    test_tgt = (out / "lead-short" / "test.tgt").read_text().splitlines()
    assert all(s.startswith(t) for s, t in zip(test_src, test_tgt))  # the task: copy the first sentence

    systems = [r["system"] for r in summary["results"]]
    assert systems == ["AR beam 5", "NAR T=0", "NAR T=2", "speculative"]
    assert [r["model"] for r in summary["results"]] == ["ar", "janus", "janus", "janus"]
    for r in summary["results"]:
        assert 0 <= r["rouge1"] <= 100 and 0 <= r["rougeL"] <= 100 and r["ms_per_sample"] > 0
    # Speculative decoding is lossless: the same output as the JANUS model's greedy AR decoding.
    assert summary["speculative"]["sources"] == 12
    assert summary["speculative"]["identical_to_greedy"] == 12
    assert (out / "iterations.png").stat().st_size > 10_000
    md = (out / "results.md").read_text()
    assert "| AR beam 5 | ar |" in md and "| speculative | janus |" in md

    # Three test examples, each printed with its source, reference and every decoder's output.
    examples = summary["examples"]
    assert len(examples) == 3
    printed = proc.stdout[proc.stdout.index("3 test examples, with every decoder's output:"):]
    for n, ex in enumerate(examples):
        assert list(ex) == ["source", "reference", *systems]
        assert ex["source"] == test_src[n] and ex["reference"] == test_tgt[n]
        block = printed[printed.index(f"example {n + 1}\n"):]
        for key, value in ex.items():
            assert f"  {key + ':':<12} {value}".rstrip() in block, (key, value)
    for name in systems:
        hyps = (out / f"test.{name.replace(' ', '_').replace('=', '')}.hyp").read_text().splitlines()
        assert len(hyps) == 12 and [hyps[n] for n in range(3)] == [ex[name] for ex in examples]
