"""Elastic resume: a checkpoint written at one world size continues at another (CPU, gloo),
with the same sample stream, the same global batch and the optimizer state intact."""
import json
import shutil

import pytest
import torch

from e2e import build_shards, read_metrics, torchrun

LOSSES = ("loss/total", "loss/ar", "loss/nar", "loss/aux")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("elastic_shards"))


def pretrain(shards, save, nproc, stage, *extra, check=True, dropout="0.0"):
    # The global batch (8) is the anchor: gradient accumulation follows the world size.
    return torchrun("pretrain/train.py", [
        "--config", "pretrain/configs/tiny_cpu.json", "--data.shards_dir", str(shards), "--run.save_dir", str(save),
        "--run.deepspeed_config", f"ds_configs/zero{stage}_fp32_cpu.json", "--run.max_steps", "8",
        "--run.save_every", "4", "--run.log_every", "1", "--run.grad_accum", "null", "--run.global_batch_size", "8",
        "--model.dropout", dropout, "--optim.lr", "2e-3", "--optim.warmup_steps", "2", "--run.tensorboard", "false",
        *extra], nproc=nproc, check=check)


def kill_and_resume(shards, save, before, after, stage, **kw):
    proc = pretrain(shards, save, before, stage, "--run.faults.crash_at_step", "4", check=False, **kw)
    assert proc.returncode != 0
    return pretrain(shards, save, after, stage, **kw)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The runs several tests compare against, made once per module: ``reference(kind, ...)``
    with kind "full" (uninterrupted, ``before`` ranks) or "moved" (killed at step 4 on ``before``
    ranks, resumed on ``after``). Tests read them and copy before changing anything."""
    made = {}

    def get(kind, before, stage, after=None):
        key = (kind, before, stage, after)
        if key not in made:
            save = tmp_path_factory.mktemp("-".join(map(str, key)))
            made[key] = (save, pretrain(shards, save, before, stage) if kind == "full"
                         else kill_and_resume(shards, save, before, after, stage))
        return made[key]
    return get


def summary(save):
    return json.loads((save / "train_summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("stage,before,after", [
    (1, 2, 1), (2, 2, 1), (2, 1, 2), (3, 2, 1)])
def test_resume_at_another_world_size_continues_the_same_run(reference, tmp_path, stage, before, after):
    full, _ = reference("full", before, stage)
    moved, resumed = reference("moved", before, stage, after)
    assert f"written by {before})" in resumed.stdout and "global batch kept at 8" in resumed.stdout
    a, b = read_metrics(full), read_metrics(moved)
    assert sorted(b) == list(range(1, 9))
    for step in range(5, 9):  # same samples, same global batch, fp32: only the reduction order differs
        for key in LOSSES:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4), (step, key)
        assert b[step]["lr"] == pytest.approx(a[step]["lr"], rel=1e-9)
    s = summary(moved)
    assert s["steps"] == 8 and s["resumed_from"] == "step_00000004"
    converted = moved / "checkpoints" / "universal" / "step_00000004"
    assert (converted / "COMPLETE").exists()
    # Tied embeddings survive the conversion: the export checks shared == encoder/decoder embeddings == lm_head.
    from transformers import BartForConditionalGeneration

    from pretrain.export import export

    out = tmp_path / "hf"
    export(str(moved), str(out))
    hf = BartForConditionalGeneration.from_pretrained(out)
    assert hf.lm_head.weight.data_ptr() == hf.model.shared.weight.data_ptr()
    assert torch.equal(hf.model.encoder.embed_tokens.weight, hf.model.shared.weight)


@pytest.mark.slow
def test_a_restarted_optimizer_would_be_caught(shards, reference, tmp_path):
    """The comparison above can fail: the same elastic resume with Adam's moments zeroed in the
    converted checkpoint (an optimizer restart) moves the losses far beyond the 1e-4 tolerance."""
    full, _ = reference("full", 2, 2)
    moved, _ = reference("moved", 2, 2, 1)
    restarted = tmp_path / "restarted"
    (restarted / "checkpoints").mkdir(parents=True)
    shutil.copytree(moved / "checkpoints" / "step_00000004", restarted / "checkpoints" / "step_00000004")
    shutil.copytree(moved / "checkpoints" / "universal", restarted / "checkpoints" / "universal",
                    ignore=shutil.ignore_patterns("step_00000008*"))
    zero = restarted / "checkpoints" / "universal" / "step_00000004" / "zero"
    n = 0
    for f in list(zero.glob("*/exp_avg.pt")) + list(zero.glob("*/exp_avg_sq.pt")):
        state = torch.load(f, weights_only=False)
        state["param"] = torch.zeros_like(state["param"])
        torch.save(state, f)
        n += 1
    assert n > 10
    pretrain(shards, restarted, 1, 2)
    a, c = read_metrics(full), read_metrics(restarted)
    worst = max(abs(c[s]["loss/total"] - a[s]["loss/total"]) / a[s]["loss/total"] for s in range(6, 9))
    assert worst > 1e-3, worst


@pytest.mark.slow
def test_dropout_on_the_loss_curve_stays_continuous(shards, tmp_path):
    full = tmp_path / "full"
    pretrain(shards, full, 2, 2, dropout="0.1")
    moved = tmp_path / "moved"
    kill_and_resume(shards, moved, 2, 1, 2, dropout="0.1")
    a, b = read_metrics(full), read_metrics(moved)
    first = a[1]["loss/total"]
    for step in range(5, 9):  # no jump back toward the initial loss
        assert abs(b[step]["loss/total"] - a[step]["loss/total"]) < 0.25 * abs(first - a[8]["loss/total"]) + 0.02
        assert b[step]["loss/total"] < first


@pytest.mark.slow
def test_a_conversion_killed_midway_is_redone_and_the_original_stays_usable(shards, tmp_path):
    from janus.checkpoint import verify_tag

    save = tmp_path / "run"
    proc = pretrain(shards, save, 2, 2, "--run.faults.crash_at_step", "4", check=False)
    assert proc.returncode != 0
    killed = pretrain(shards, save, 1, 2, "--run.faults.crash_in_conversion", "true", check=False)
    assert killed.returncode != 0
    root = save / "checkpoints"
    assert not (root / "universal" / "step_00000004" / "COMPLETE").exists()
    assert [p.name for p in (root / "universal").iterdir() if ".partial-" in p.name]
    assert verify_tag(str(root), "step_00000004") == []  # the original is untouched
    resumed = pretrain(shards, save, 1, 2)
    assert "conversion took" in resumed.stdout
    assert not [p.name for p in (root / "universal").iterdir() if ".partial-" in p.name]
    assert summary(save)["steps"] == 8


def test_a_global_batch_that_cannot_fit_is_refused_with_the_arithmetic():
    from janus.steps import accum_for

    assert accum_for(1024, 16, 8) == 8 and accum_for(1024, 16, 32) == 2
    with pytest.raises(ValueError, match=r"global batch 8 is not a multiple of micro-batch 4 x 3 ranks = 12"):
        accum_for(8, 4, 3)


@pytest.mark.slow
def test_convert_checkpoint_cli_converts_once_and_is_reused(shards, tmp_path):
    import subprocess
    import sys

    from e2e import REPO, launch_env

    save = tmp_path / "run"
    pretrain(shards, save, 2, 2, "--run.max_steps", "4")
    cmd = [sys.executable, "-m", "pretrain.convert_checkpoint", "--save_dir", str(save)]
    first = json.loads(subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1])
    assert first["tag"] == "step_00000004" and not first["reused"] and first["world_size"] == 2
    again = json.loads(subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1])
    assert again["reused"]
    bad = subprocess.run([*cmd, "--tag", "step_00000099"], cwd=REPO, env=launch_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "complete: step_00000004" in bad.stderr
    resumed = pretrain(shards, save, 1, 2)
    assert "conversion reused" in resumed.stdout


def test_a_step_counter_shared_between_groups_is_unshared():
    """DeepSpeed's ZeRO-3 universal loader puts one ``step`` tensor into every group's state; AdamW then
    advances it once per group and optimizer step, so the groups' bias corrections would drift apart."""
    from types import SimpleNamespace

    from janus.elastic import _unshare_step_counters

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=1e-3)
    step = torch.tensor(4.0)
    for p in (a, b):
        opt.state[p].update(step=step, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    engine = SimpleNamespace(optimizer=SimpleNamespace(optimizer=opt))
    assert _unshare_step_counters(engine) == 1 and _unshare_step_counters(engine) == 0
    (a.sum() + b.sum()).backward()
    opt.step()
    assert [float(opt.state[p]["step"]) for p in (a, b)] == [5.0, 5.0]
