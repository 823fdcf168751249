"""The shared training loop's GPU-facing behaviour, on CPU: overflow skips, ZeRO stage 0, DeepSpeed-
built optimizers, fp32 exports, signals, the process-group timeout, gradient checkpointing
under ZeRO-3, the GPU run configs and the CPU variant of the GPU check."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from janus.trainer import OptimConfig, RunConfig, lr_lambda, resolve_ds_config  # noqa: E402

from e2e import REPO, build_shards, launch_env, make_base_model, read_metrics, torchrun, write_copy_task  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("trainer_shards"))


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return make_base_model(tmp_path_factory.mktemp("trainer_base"))


def pretrain_in_process(shards, save, *extra):
    import pretrain.train as entry

    return entry.main(["--config", "pretrain/configs/tiny_cpu.json", "--data.shards_dir", str(shards),
                       "--run.save_dir", str(save), "--run.log_every", "1", "--run.tensorboard", "false", *extra])


@pytest.mark.parametrize("ds_config", ["zero0_fp32_cpu", "zero2_bf16", "zero1_fp32_cpu"])
def test_overflow_step_is_skipped_counted_and_the_schedule_stays_in_step(shards, tmp_path, ds_config):
    """An optimizer step with infinite gradients (what an fp16/bf16 overflow is) is skipped by
    DeepSpeed -- also without ZeRO, where DeepSpeed itself would apply it -- counted in
    ``skipped_steps``, its losses are not logged, and the step counter follows the LR schedule."""
    save = tmp_path / "run"
    summary = pretrain_in_process(shards, save, "--run.deepspeed_config", f"ds_configs/{ds_config}.json",
                                  "--run.max_steps", "5", "--run.save_every", "5", "--run.faults.inf_grad_at_steps",
                                  "[3]", "--optim.warmup_steps", "4")
    assert summary["finished"] and summary["steps"] == 5 and summary["skipped_steps"] == 1
    rows = read_metrics(save)
    assert sorted(rows) == [1, 2, 3, 4, 5]
    factor = lr_lambda(OptimConfig(lr=1e-3, warmup_steps=4), 5)
    for step, row in rows.items():
        assert row["lr"] == pytest.approx(1e-3 * factor(step)), step  # scheduler position == applied steps
        assert row["skipped_steps"] == (0 if step < 3 else 1)
        assert row["grad_norm"] == row["grad_norm"] and row["grad_norm"] < 1e3  # never the overflow's
        assert row["loss/total"] < 1.05 * rows[1]["loss/total"]  # the skipped micro-batch is not added in
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows.values())


def test_nested_auto_and_bad_stage_are_rejected(tmp_path):
    for body, match in (({"zero_optimization": {"stage": "auto"}}, r"zero_optimization\.stage"),
                        ({"zero_optimization": {"stage": 4}}, "stage must be 0, 1, 2 or 3"),
                        ({"optimizer": {"params": {"lr": "auto"}}}, r"optimizer\.params\.lr"),
                        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "both enabled")):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(body))
        with pytest.raises(ValueError, match=match):
            resolve_ds_config(RunConfig(deepspeed_config=str(path), micro_batch_size=2), OptimConfig(), 1)


def test_deepspeed_built_optimizer_gets_decay_and_no_decay_groups(tmp_path):
    """With an "optimizer" section (the offload configs), biases and LayerNorm weights must not decay."""
    from transformers import BartConfig

    from janus.distributed import init_distributed
    from janus.model import JanusBart
    from janus.trainer import build_engine

    init_distributed()
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0,
                                "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}}}))
    optim = OptimConfig(lr=1e-4, weight_decay=0.01)
    ds = resolve_ds_config(RunConfig(deepspeed_config=str(path), micro_batch_size=2), optim, 1)
    model = JanusBart(BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                 encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                 decoder_ffn_dim=32, max_position_embeddings=32))
    engine, _ = build_engine(model, ds, optim, 10)
    groups = engine.optimizer.optimizer.param_groups if hasattr(engine.optimizer, "optimizer") else \
        engine.optimizer.param_groups
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.01]
    n_no_decay = sum(p.numel() for p in model.parameters() if p.ndim < 2)
    assert n_no_decay > 0
    by_decay = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in groups}
    assert by_decay[0.0] >= n_no_decay  # (ZeRO may flatten a group into one partition tensor)


def test_bf16_finetune_exports_fp32_master_weights(base_model, tmp_path):
    """best/ comes from the optimizer's fp32 master weights, not the bf16 module copy: after some
    updates at a small lr many exported values are not representable in bf16."""
    import finetune.train as entry
    from janus.model import JanusBart

    task = write_copy_task(tmp_path / "task", n_train=32, n_dev=4)
    entry.main(["--task", "xsum", "--mode", "ar", "--model.init_from", str(base_model), "--data.dir", str(task),
                "--run.save_dir", str(tmp_path / "run"), "--run.max_steps", "3", "--run.micro_batch_size", "4",
                "--run.deepspeed_config", "ds_configs/zero2_bf16.json", "--run.eval_every", "3",
                "--eval.samples", "4", "--eval.beam", "1", "--data.max_target_length", "8", "--optim.lr", "1e-4",
                "--optim.warmup_steps", "1", "--run.tensorboard", "false"])
    w = JanusBart.from_bart(str(tmp_path / "run" / "best")).model.encoder.layers[0].fc1.weight.detach()
    assert w.dtype == torch.float32
    share_exact_in_bf16 = (w == w.bfloat16().float()).float().mean().item()
    assert share_exact_in_bf16 < 0.5, share_exact_in_bf16


def test_stop_signal_saves_before_a_due_evaluation(base_model, tmp_path):
    """SIGUSR1 during a step whose evaluation is due: save and stop, no evaluation (Slurm allows ~120 s)."""
    import finetune.train as entry

    task = write_copy_task(tmp_path / "task", n_train=32, n_dev=4)
    save = tmp_path / "run"
    summary = entry.main(["--task", "xsum", "--mode", "ar", "--model.init_from", str(base_model), "--data.dir",
                          str(task), "--run.save_dir", str(save), "--run.max_steps", "6", "--run.micro_batch_size",
                          "4", "--run.eval_every", "2", "--run.save_every", "100", "--eval.samples", "4",
                          "--eval.beam", "1", "--data.max_target_length", "8", "--run.faults.signal_at_step", "4",
                          "--run.tensorboard", "false"])
    assert summary["steps"] == 4 and not summary["finished"]
    assert (save / "checkpoints" / "step_00000004" / "COMPLETE").exists()
    evals = [json.loads(line)["step"] for line in open(save / "eval.jsonl")]
    assert evals == [2]  # the evaluation due at step 4 did not run


def test_process_group_timeout_reaches_the_process_group(monkeypatch, shards):
    import deepspeed

    import janus.distributed as jd
    import pretrain.train as entry

    seen = {}
    monkeypatch.setattr(jd.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.update(kw))
    monkeypatch.setattr(jd.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(jd.dist, "get_world_size", lambda: 1)
    jd.init_distributed(timeout_minutes=7)
    assert seen["timeout"].total_seconds() == 7 * 60
    calls = []

    def fake_init(minutes):
        calls.append(minutes)
        raise SystemExit(0)

    monkeypatch.setattr(entry, "init_distributed", fake_init)
    with pytest.raises(SystemExit):
        entry.main(["--config", "pretrain/configs/tiny_cpu.json", "--data.shards_dir", str(shards),
                    "--run.dist_timeout_minutes", "90"])
    assert calls == [90.0]


@pytest.mark.slow
def test_gradient_checkpointing_under_zero3_gives_the_same_losses(shards, tmp_path):
    runs = {}
    for name, flag in (("plain", "false"), ("ckpt", "true")):
        save = tmp_path / name
        torchrun("pretrain/train.py", ["--config", "pretrain/configs/tiny_cpu.json", "--data.shards_dir", str(shards),
                                       "--run.save_dir", str(save), "--run.deepspeed_config",
                                       "ds_configs/zero3_fp32_cpu.json", "--run.max_steps", "4", "--run.log_every", "1",
                                       "--model.dropout", "0.0", "--model.gradient_checkpointing", flag])
        runs[name] = read_metrics(save)
    for step in range(1, 5):
        for key in ("loss/total", "loss/ar", "loss/nar", "loss/aux", "grad_norm"):
            assert runs["ckpt"][step][key] == pytest.approx(runs["plain"][step][key], rel=1e-5), (step, key)


@pytest.mark.parametrize("name,world,micro,accum", [
    ("bart_base_a100_80gb_1node", 8, 32, 4), ("bart_base_a100_80gb_4node", 32, 32, 1),
    ("bart_base_a100_40gb_1node", 8, 16, 8), ("bart_base_a100_40gb_4node", 32, 16, 2)])
def test_gpu_run_configs_resolve_to_the_papers_global_batch(name, world, micro, accum):
    from janus.config import _build
    from pretrain.train import PretrainConfig

    values = json.loads((REPO / "pretrain" / "configs" / f"{name}.json").read_text())
    values.pop("_comment", None)
    values["data"]["shards_dir"] = "unused"
    cfg = _build(PretrainConfig, values, name)
    ds = resolve_ds_config(cfg.run, cfg.optim, world)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (micro, accum)
    assert ds["train_batch_size"] == 1024 and ds["bf16"]["enabled"]
    assert cfg.model.init_from and cfg.epochs == 2


@pytest.mark.slow
def test_gpu_check_runs_on_cpu(tmp_path):
    """The GPU check script itself cannot rot: its CPU variant runs every part."""
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, "tests/gpu/check.py", "--device", "cpu", "--steps", "8", "--out", str(out)],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] and set(summary["parts"]) == {
        "pretrain_zero2_bf16", "pretrain_zero3_bf16", "finetune_nar", "finetune_ar", "generate", "train_step_bf16",
        "decode_latency"}
    zero3 = summary["parts"]["pretrain_zero3_bf16"]
    assert zero3["loss_last"] < zero3["loss_first"]
    # The production configuration, not a shortcut: chunked losses, ZeRO-3 partitioning everything,
    # weights in bf16 without autocast in the step benchmark.
    assert zero3["chunked_losses"] and zero3["zero_stage"] == 3 and zero3["precision"] == "bf16"
    assert "accumulated in float32 and reduced in float32" in zero3["precision_line"]  # as the engine resolved it
    step = summary["parts"]["train_step_bf16"]
    assert (step["dtype"], step["precision"]) == ("bfloat16", "cast")
    assert json.loads(out.read_text())["ok"]


def test_gpu_check_without_cuda_says_so_and_exits_0():
    proc = subprocess.run([sys.executable, "tests/gpu/check.py"], cwd=REPO, env=dict(launch_env(), CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout
