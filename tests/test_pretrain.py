"""End-to-end pretraining on 2 CPU ranks (gloo) under ZeRO 1, 2 and 3."""
import json

import pytest
import torch
from transformers import BartForConditionalGeneration

from janus.trainer import OptimConfig, RunConfig, resolve_ds_config
from pretrain.train import ModelConfig, build_model

from e2e import build_shards, read_metrics, torchrun

CONFIG = "pretrain/configs/tiny_cpu.json"
LOSS_KEYS = ("loss/ar", "loss/nar", "loss/aux", "loss/kl_ar_aux", "loss/kl_aux_ar", "loss/kl_nar_aux",
             "loss/kl_aux_nar", "loss/total")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("pretrain_data"))


def pretrain(shards, save_dir, stage, *extra, check=True, precision="fp32_cpu"):
    args = ["--config", CONFIG, "--data.shards_dir", str(shards), "--run.save_dir", str(save_dir),
            "--run.deepspeed_config", f"ds_configs/zero{stage}_{precision}.json", "--run.max_steps", "8",
            "--run.save_every", "4", "--run.log_every", "1", "--optim.lr", "2e-3", "--optim.warmup_steps", "2",
            *extra]
    return torchrun("pretrain/train.py", args, check=check)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_losses_fall_and_kill_resume_is_exact(shards, tmp_path, stage):
    full = tmp_path / "full"
    pretrain(shards, full, stage)
    killed = tmp_path / "killed"
    proc = pretrain(shards, killed, stage, "--run.faults.crash_at_step", "6", check=False)
    assert proc.returncode != 0
    resumed = pretrain(shards, killed, stage)
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    a, b = read_metrics(full), read_metrics(killed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        for key in LOSS_KEYS:
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-6, abs=1e-7), (step, key)
    assert a[8]["loss/total"] < 0.95 * a[1]["loss/total"]
    for key in ("loss/ar", "loss/nar", "loss/aux"):
        assert a[8][key] < a[1][key], key
    # Export loads into transformers and holds the trained weights.
    from pretrain.export import export

    out = tmp_path / "hf"
    export(str(full), str(out))
    hf = BartForConditionalGeneration.from_pretrained(out)
    assert hf.lm_head.weight.data_ptr() == hf.model.shared.weight.data_ptr()
    if stage < 3:  # ZeRO-1/2 keep full module weights in the model-states file: an independent source
        states = torch.load(full / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt",
                            map_location="cpu", weights_only=False)["module"]
        hf_state = hf.state_dict()
        for k, v in states.items():
            if k.startswith("model.") or k == "final_logits_bias":
                assert torch.equal(hf_state[k], v.float()), k
    else:
        trained = read_metrics(full)[8]["loss/total"]
        assert trained == trained  # finite


@pytest.mark.slow
def test_interrupted_save_is_survived_and_tensorboard_has_scalars(shards, tmp_path):
    run = tmp_path / "run"
    proc = pretrain(shards, run, 2, "--run.save_every", "2", "--run.faults.crash_in_save_at_step", "4", check=False)
    assert proc.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "step_00000002" / "COMPLETE").exists()
    assert (ckpts / "step_00000004").exists() and not (ckpts / "step_00000004" / "COMPLETE").exists()
    resumed = pretrain(shards, run, 2, "--run.save_every", "2", "--run.keep_last", "2")
    assert "at step 2" in resumed.stdout
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000006", "step_00000008"]
    assert (ckpts / "latest").read_text() == "step_00000008"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {*LOSS_KEYS, "lr", "grad_norm", "loss_scale", "throughput/tokens_per_s", "throughput/samples_per_s",
                "throughput/data_wait_share", "mask/decoder_ratio", "mask/encoder_ratio"}
    assert expected <= tags, expected - tags
    ratios = [e.value for e in acc.Scalars("mask/decoder_ratio")]
    assert all(0.3 < r < 0.7 for r in ratios), ratios
    assert max(e.step for e in acc.Scalars("loss/total")) == 8


@pytest.mark.slow
def test_epochs_set_the_steps_and_a_world_size_change_resumes_elastically(shards, tmp_path):
    run = tmp_path / "run"
    blocks = json.loads((shards / "manifest.json").read_text())["totals"]["blocks"]
    epochs = 12 / blocks  # 12 samples = 1.5 global batches of 2 x 4 -> 2 steps
    first = pretrain(shards, run, 2, "--epochs", str(epochs), "--run.max_steps", "999", "--run.save_every", "2")
    assert "= 2 steps" in first.stdout and sorted(read_metrics(run)) == [1, 2]
    proc = pretrain(shards, run, 2, "--run.max_steps", "4", check=False)
    assert proc.returncode == 0  # same world size resumes
    proc = torchrun("pretrain/train.py", ["--config", CONFIG, "--data.shards_dir", str(shards), "--run.save_dir",
                                          str(run), "--run.max_steps", "6"], nproc=1, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # 2 ranks x micro 4 x accum 1 on 1 rank: the global batch of 8 is kept with accumulation 2.
    assert "written by 2" in proc.stdout and "global batch kept at 8 = micro 4 x accum 2 x 1 ranks" in proc.stdout
    assert sorted(read_metrics(run)) == [1, 2, 3, 4, 5, 6]


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="batch size mismatch"):
        resolve_ds_config(RunConfig(deepspeed_config="ds_configs/zero2_fp32_cpu.json", micro_batch_size=4,
                                    grad_accum=2, global_batch_size=10), OptimConfig(), world_size=1)
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ValueError, match="micro_batch_size=4 but .* has train_micro_batch_size_per_gpu=8"):
        resolve_ds_config(RunConfig(deepspeed_config=str(bad), micro_batch_size=4), OptimConfig(), world_size=2)
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto"}))
    with pytest.raises(ValueError, match="auto"):
        resolve_ds_config(RunConfig(deepspeed_config=str(bad)), OptimConfig(), world_size=2)
    bad.write_text('{"zero_optimization": {"stage": 2},\n "oops"}')
    with pytest.raises(ValueError, match=r"ds.json:2: invalid JSON"):
        resolve_ds_config(RunConfig(deepspeed_config=str(bad)), OptimConfig(), world_size=2)
    tokenizer = {"vocab_size": 500, "pad_id": 1, "eos_id": 2, "bos_id": 0, "mask_id": 499}
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        build_model(ModelConfig(bart={"vocab_size": 600, "d_model": 16, "encoder_layers": 1, "decoder_layers": 1,
                                      "encoder_attention_heads": 2, "decoder_attention_heads": 2}), tokenizer)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        build_model(ModelConfig(init_from=str(tmp_path / "missing")), tokenizer)


@pytest.mark.slow
def test_sigusr1_saves_and_stops_cleanly(shards, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from e2e import REPO, launch_env

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "pretrain/train.py",
           "--config", CONFIG, "--data.shards_dir", str(shards), "--run.save_dir", str(run),
           "--run.max_steps", "100000", "--run.save_every", "100000", "--run.log_every", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (run / "metrics.jsonl").exists() or len(
                (run / "metrics.jsonl").read_text().splitlines()) < 2:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        for pid in workers:
            os.kill(int(pid), signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "received: checkpoint saved at step" in stdout
    step = int(stdout.split("checkpoint saved at step ")[1].split(",")[0])
    assert (run / "checkpoints" / f"step_{step:08d}" / "COMPLETE").exists()
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["finished"] is False and summary["steps"] == step


@pytest.mark.slow
def test_deepspeed_launcher_nonfinite_guard_and_checkpoint_averaging(shards, tmp_path):
    import subprocess
    import sys

    from e2e import REPO, launch_env

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "pretrain/train.py",
           "--config", CONFIG, "--data.shards_dir", str(shards), "--run.save_dir", str(run), "--run.max_steps", "4",
           "--run.save_every", "2", "--run.log_every", "1", "--run.faults.nan_at_steps", "[2, 3]", "--run.keep_last", "0"]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    assert proc.stdout.count("non-finite loss, batch skipped") == 2
    rows = read_metrics(run)
    assert rows[4]["nonfinite_skipped"] == 2 and all(r["loss/total"] == r["loss/total"] for r in rows.values())
    # A poisoned step is skipped and retried with the next batch: 6 batches for 4 steps.
    state = torch.load(run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    assert state["loader"]["consumed_samples"] == (4 + 2) * 2 * 4
    # Averaging the last 2 checkpoints = the mean of their weights.
    from pretrain.export import export

    export(str(run), str(tmp_path / "avg"), average=2)
    avg = BartForConditionalGeneration.from_pretrained(tmp_path / "avg").state_dict()
    a, b = (torch.load(run / "checkpoints" / t / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)["module"] for t in ("step_00000002", "step_00000004"))
    for k in ("model.shared.weight", "model.decoder.layers.1.fc2.weight", "model.encoder.layers.0.self_attn.q_proj.bias"):
        torch.testing.assert_close(avg[k], (a[k].double() + b[k].double()).div(2).float())
    with pytest.raises(ValueError, match="only 2 complete checkpoints"):
        export(str(run), str(tmp_path / "avg3"), average=3)
    # Too many non-finite losses stop the run with a clear error.
    proc = torchrun("pretrain/train.py", ["--config", CONFIG, "--data.shards_dir", str(shards), "--run.save_dir",
                                          str(tmp_path / "bad"), "--run.max_steps", "6", "--run.max_nonfinite", "2",
                                          "--run.faults.nan_at_steps", "[1, 2, 3]"], check=False)
    assert proc.returncode != 0 and "non-finite losses/skipped steps: stopping" in proc.stderr + proc.stdout


def test_missing_shards_is_a_clear_error(tmp_path):
    from pretrain.train import main

    with pytest.raises(FileNotFoundError, match="no manifest"):
        main(["--data.shards_dir", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit):
        main([])  # --data.shards_dir is required


@pytest.mark.slow
def test_bf16_config_trains_and_exports(shards, tmp_path):
    """The GPU configs' bf16 path (DeepSpeed bf16 + fp32 log-softmax/KL) runs on CPU too."""
    from pretrain.export import export

    run = tmp_path / "run"
    pretrain(shards, run, 2, "--run.max_steps", "6", "--run.save_every", "6", precision="bf16")
    rows = read_metrics(run)
    assert all(rows[s]["loss/total"] == rows[s]["loss/total"] for s in rows)
    assert rows[6]["loss/total"] < rows[1]["loss/total"]
    export(str(run), str(tmp_path / "hf"))
    hf = BartForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert hf.model.shared.weight.dtype == torch.float32  # consolidated from the fp32 master weights
