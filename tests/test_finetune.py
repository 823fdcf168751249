"""Finetuning (AR and NAR) end to end on 2 CPU ranks, decoding, evaluation, data errors."""
import json
import subprocess
import sys

import numpy as np
import pytest

from finetune.data import DataFormatError, cmlm_mask, read_split
from janus.model import JanusBart

from e2e import REPO, launch_env, make_base_model, torchrun, write_copy_task


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return make_base_model(tmp_path_factory.mktemp("finetune_base"))


def finetune(base, task, save, mode, steps=40, extra=()):
    return torchrun("finetune/train.py", [
        "--task", "xsum", "--mode", mode, "--model.init_from", str(base), "--data.dir", str(task),
        "--run.save_dir", str(save), "--run.max_steps", str(steps), "--run.micro_batch_size", "16",
        "--run.log_every", "5", "--run.save_every", "20", "--run.eval_every", "20", "--optim.lr", "3e-3",
        "--optim.warmup_steps", "5", "--eval.samples", "16", "--eval.beam", "2", "--data.max_target_length", "16",
        *extra])


def losses(save):
    return [json.loads(line) for line in open(save / "metrics.jsonl")]


@pytest.mark.slow
@pytest.mark.parametrize("mode,stage", [("ar", 2), ("nar", 3)])
def test_finetune_decode_and_evaluate(base_model, tmp_path, mode, stage):
    task = write_copy_task(tmp_path / "task")
    save = tmp_path / "run"
    protocol = "official" if mode == "ar" else "modern"  # the default, and the alternative by flag
    finetune(base_model, task, save, mode, extra=("--run.deepspeed_config", f"ds_configs/zero{stage}_fp32_cpu.json",
                                                  *(() if protocol == "official" else ("--eval.protocol", protocol))))
    rows = losses(save)
    main = "loss/ar" if mode == "ar" else "loss/nar"
    assert rows[-1][main] < 0.7 * rows[0][main]
    if mode == "nar":
        assert rows[-1]["loss/length"] < rows[0]["loss/length"]
    evals = [json.loads(line) for line in open(save / "eval.jsonl")]
    assert [e["step"] for e in evals] == [20, 40]
    best = save / "best"
    scores = json.loads((best / "dev_scores.json").read_text())
    assert scores["score"] == max(e["score"] for e in evals)
    # Dev selection scores with the chosen protocol: the best predictions rescored by glge_eval agree.
    from finetune.glge_eval import score
    preds = (best / "dev_predictions.txt").read_text().splitlines()
    refs = (task / "dev.tgt").read_text().splitlines()[:len(preds)]
    assert scores["protocol"] == protocol
    assert scores["score"] == pytest.approx(score("xsum", preds, refs, protocol=protocol)["overall"])
    # The exported best model holds real (not ZeRO-partitioned, empty) weights.
    exported = JanusBart.from_bart(str(best))
    assert exported.model.shared.weight.shape[0] > 100 and exported.model.shared.weight.abs().sum() > 0
    hyp = tmp_path / "test.hyp"
    args = ["--model", str(best), "--src", str(task / "test.src"), "--out", str(hyp), "--mode", mode,
            "--max-len", "16", "--batch-size", "8"]
    if mode == "nar":
        args += ["--iterations", "2"]
    gen = subprocess.run([sys.executable, "-m", "finetune.generate", *args], cwd=REPO, env=launch_env(),
                         capture_output=True, text=True, check=True)
    assert json.loads(gen.stdout.strip().splitlines()[-1])["n"] == 16
    assert len(hyp.read_text().splitlines()) == 16
    ev = subprocess.run([sys.executable, "-m", "finetune.glge_eval", "--task", "xsum", "--hyp", str(hyp), "--ref",
                         str(task / "test.tgt")], cwd=REPO, env=launch_env(), capture_output=True, text=True, check=True)
    metrics = json.loads(ev.stdout)
    assert metrics["n"] == 16 and 0 <= metrics["rouge1"] <= 100 and "repetition" in metrics


def test_glge_reader_errors(tmp_path):
    (tmp_path / "train.src").write_text("a\nb\nc\n")
    (tmp_path / "train.tgt").write_text("a\nb\n")
    with pytest.raises(DataFormatError, match=r"train.src has 3 lines but .*train.tgt has 2"):
        read_split(str(tmp_path), "train")
    (tmp_path / "train.tgt").write_text("")
    with pytest.raises(DataFormatError, match="train.tgt: file is empty"):
        read_split(str(tmp_path), "train")
    (tmp_path / "train.tgt").write_bytes(b"x\n\xff\xfe\nz\n")
    with pytest.raises(DataFormatError, match=r"train.tgt:2: invalid UTF-8"):
        read_split(str(tmp_path), "train")
    (tmp_path / "train.tgt").write_text("x\n \nz\n")
    with pytest.raises(DataFormatError, match=r"train.tgt:2: empty line"):
        read_split(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="dev.src"):
        read_split(str(tmp_path), "dev")


def test_cmlm_mask_is_pure_uniform_and_inside_targets():
    lengths = np.array([5, 12, 30, 1] * 500)
    epochs, ids = np.zeros(2000, np.int64), np.arange(2000)
    m = cmlm_mask(lengths, 30, 7, epochs, ids)
    counts = m.sum(1)
    assert ((counts >= 1) & (counts <= lengths)).all()
    assert not (m & (np.arange(30) >= lengths[:, None])).any()
    # A sample's mask depends on (seed, epoch, id) only, not on its batch neighbours.
    again = cmlm_mask(lengths[::-1].copy(), 30, 7, epochs, ids[::-1].copy())[::-1]
    assert (again == m).all()
    assert not (cmlm_mask(lengths, 30, 7, epochs + 1, ids) == m).all()
    # n ~ U{1..N}: mean share of masked tokens (N + 1) / 2N.
    share = counts[lengths == 30] / 30
    assert abs(share.mean() - 31 / 60) < 0.03
