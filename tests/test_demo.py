import subprocess
import sys

import pytest

from e2e import REPO, launch_env


@pytest.mark.slow
def test_demo_runs_the_pipeline_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "demo.py", "--out", str(out), "--pretrain-steps", "12"], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 12
    for k in ("loss/ar", "loss/nar", "loss/aux", "loss/total"):
        assert summary["last"][k] < summary["first"][k], k
    assert (out / "bart-janus" / "config.json").exists() and (out / "bart-janus" / "janus_config.json").exists()
    assert (out / "pretrain" / "tensorboard").is_dir()
