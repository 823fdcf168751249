"""finetune.glge_suite: the paper's GLGE tables end to end on a tiny model and tiny GLGE-format data,
resuming, and its input errors."""
import json
import random
import subprocess
import sys

import pytest

from e2e import REPO, WORDS, launch_env, make_base_model

TASKS = ("xsum", "squadqg", "personachat")


def write_glge(root, n_train=48, n_eval=4, seed=0):
    """<root>/easy/<task>_data/org_data/{train,dev,test}.{src,tgt}: the target is the source's first
    words, cased and with a final period, like untokenized GLGE references."""
    rng = random.Random(seed)
    for task in TASKS:
        d = root / "easy" / f"{task}_data" / "org_data"
        d.mkdir(parents=True)
        for split, n in (("train", n_train), ("dev", n_eval), ("test", n_eval)):
            src = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 10))) for _ in range(n)]
            (d / f"{split}.src").write_text("\n".join(src) + "\n")
            (d / f"{split}.tgt").write_text("\n".join(" ".join(s.split()[:3]).capitalize() + "." for s in src) + "\n")
    return root


def suite(*args, check=True):
    cmd = [sys.executable, "-m", "finetune.glge_suite", *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


SHRINK = ("--max-steps", 3, "--iterations", "0,1", "--no-meteor", "--latency-samples", 2, "--micro-batch-size", 8,
          "--dev-samples", 2, "--max-source-length", 32, "--threads", 1)


@pytest.mark.slow
def test_suite_end_to_end_and_resume(tmp_path):
    model = make_base_model(tmp_path / "model") / "."
    glge, out = write_glge(tmp_path / "glge"), tmp_path / "out"
    suite("--model", model, "--glge", glge, "--out", out, "--modes", "ar", *SHRINK)
    tables = json.loads((out / "tables.json").read_text())
    assert list(tables) == list(TASKS)
    assert [t["title"][:7] for t in tables.values()] == ["Table 2", "Table 4", "Table 5"]
    xsum = tables["xsum"]["rows"][0]
    assert xsum["system"] == "AR beam 5" and xsum["protocol"] == "official" and xsum["speedup"] == 1.0
    assert {"rouge1", "rouge2", "rougeL", "overall", "ms_per_sample"} <= set(xsum)
    assert tables["squadqg"]["rows"][0]["meteor"] is None  # --no-meteor
    assert {"bleu1", "bleu2", "distinct1", "distinct2"} <= set(tables["personachat"]["rows"][0])
    md = (out / "tables.md").read_text()
    assert "| system | model | ROUGE-1 | ROUGE-2 | ROUGE-L | OVERALL |" in md and "Table 5: PersonaChat" in md
    ar_results = (out / "xsum" / "ar" / "results.json").stat().st_mtime_ns

    # Second call: xsum/ar is reused, xsum/janus is finetuned and decoded with every decoder.
    proc = suite("--model", model, "--glge", glge, "--out", out, "--tasks", "xsum", "--modes", "ar,janus", *SHRINK)
    assert "xsum/ar: done before" in proc.stderr and "xsum/ar: finetuning" not in proc.stderr
    assert (out / "xsum" / "ar" / "results.json").stat().st_mtime_ns == ar_results
    rows = json.loads((out / "tables.json").read_text())["xsum"]["rows"]
    assert [(r["system"], r["model"]) for r in rows] == [
        ("AR beam 5", "ar"), ("AR beam 5", "janus"), ("NAR T=0", "janus"), ("NAR T=1", "janus"),
        ("speculative", "janus")]
    assert all(r["speedup"] > 0 for r in rows) and rows[0]["speedup"] == 1.0
    hyps = (out / "xsum" / "janus" / "test.speculative.hyp").read_text().splitlines()
    assert len(hyps) == 4


def test_suite_input_errors(tmp_path):
    glge = write_glge(tmp_path / "glge", n_train=2, n_eval=1)
    (glge / "easy" / "squadqg_data" / "org_data" / "dev.src").unlink()
    model = tmp_path / "model"
    model.mkdir()
    proc = suite("--model", model, "--glge", glge, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "no config.json" in proc.stderr
    (model / "config.json").write_text("{}")
    proc = suite("--model", model, "--glge", glge, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "squadqg_data/org_data/dev.src" in proc.stderr
    proc = suite("--model", model, "--glge", glge, "--out", tmp_path / "out", "--tasks", "xsum,cnn", check=False)
    assert proc.returncode == 2 and "xsum,cnn" in proc.stderr
    help_text = suite("--help").stdout
    assert "Table 2" in help_text and "--max-steps" in help_text and "official" in help_text


def test_slurm_array_script_maps_index_to_task():
    import os
    import shutil

    script = REPO / "slurm" / "glge_suite.sh"
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", str(script)], capture_output=True).returncode == 0
    env = {**os.environ, "MODEL": "m", "GLGE": "g", "OUT": "o", "DRY_RUN": "1", "SLURM_GPUS_ON_NODE": "4"}
    for index, task in enumerate(TASKS):
        proc = subprocess.run(["bash", str(script), "--modes", "ar"], env={**env, "SLURM_ARRAY_TASK_ID": str(index)},
                              capture_output=True, text=True)
        assert proc.returncode == 0 and f"--tasks {task} --nproc 4 --modes ar" in proc.stdout
    bad = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": "3"}, capture_output=True, text=True)
    assert bad.returncode == 2 and "array index 3" in bad.stderr
    missing = subprocess.run(["bash", str(script)], env={k: v for k, v in env.items() if k != "GLGE"},
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "GLGE" in missing.stderr
