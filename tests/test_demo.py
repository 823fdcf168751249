import json
import subprocess
import sys

import pytest

from e2e import REPO, launch_env


@pytest.mark.slow
def test_demo_runs_the_pipeline_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "demo.py", "--out", str(out), "--pretrain-steps", "12", "--finetune-steps",
                           "6", "--iterations", "0,2", "--latency-samples", "2"], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["pretrain_steps"] == 12
    for k in ("loss/ar", "loss/nar", "loss/aux", "loss/total"):
        assert summary["pretrain_last"][k] < summary["pretrain_first"][k], k
    assert (out / "bart-janus" / "config.json").exists() and (out / "bart-janus" / "janus_config.json").exists()
    assert (out / "pretrain" / "tensorboard").is_dir()
    systems = [r["system"] for r in summary["results"]]
    assert systems == ["AR beam 5", "NAR T=0", "NAR T=2"]
    for r in summary["results"]:
        assert 0 <= r["rouge1"] <= 100 and r["ms_per_sample"] > 0
    assert (out / "iterations.png").stat().st_size > 10_000
    assert "| AR beam 5 |" in (out / "results.md").read_text()
