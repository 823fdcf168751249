"""The GPU step path, checked on CPU: mistakes that only crash (or hang) on CUDA + NCCL fail here.

Every entry point runs in this process with ``strict_device`` armed around the training loop
(batches from the loader, stream/mask building, ``JanusBart.forward``, objectives, the loss
function, the logging reduction, checkpoints, dev-set decoding with beam search and
mask-predict, the best-model export): a tensor factory without ``device=`` in project code
fails with its file and line. The hot path of one micro-batch (loss function: streams,
forward, losses) must also make no host sync.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from e2e import build_shards, make_base_model, write_copy_task  # noqa: E402
from guards import DeviceError, HostSyncError, no_host_sync, strict_device  # noqa: E402


def guarded_train(monkeypatch, module):
    """Arm ``strict_device`` around ``module.train`` (the shared loop as the entry point calls it)."""
    real = module.train

    def train(*args, **kwargs):
        with strict_device():
            return real(*args, **kwargs)

    monkeypatch.setattr(module, "train", train)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("gpu_path_shards"))


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return make_base_model(tmp_path_factory.mktemp("gpu_path_base"))


def test_guard_catches_a_cpu_tensor_made_on_the_step_path():
    """The guard itself: the bug that crashed every GPU run at its first log step
    (``torch.tensor(float(...))`` in a loss function) is reported with its file and line."""
    from janus import steps

    code = "def bad(batch):\n    return torch.tensor(float(batch.shape[0]))\n"
    namespace = {"torch": torch}
    exec(compile(code, steps.__file__, "exec"), namespace)  # as if written in janus/steps.py
    with strict_device(), pytest.raises(DeviceError, match=r"janus/steps.py:2: torch.tensor"):
        namespace["bad"](torch.zeros(3, device="cpu"))
    with strict_device():  # the same call with a device passes
        torch.tensor(1.0, device="cpu")


def test_pretrain_step_path_names_every_device(shards, tmp_path, monkeypatch):
    import pretrain.train as entry

    guarded_train(monkeypatch, entry)
    summary = entry.main(["--config", "pretrain/configs/tiny_cpu.json", "--data.shards_dir", str(shards),
                          "--run.save_dir", str(tmp_path / "run"), "--run.max_steps", "3", "--run.log_every", "1",
                          "--run.save_every", "2", "--run.tensorboard", "false", "--run.peak_tflops", "0.002"])
    assert summary["finished"] and summary["steps"] == 3
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["throughput/tflops_per_device"] > 0 and r["skipped_steps"] == 0 for r in rows)
    # --run.peak_tflops reaches MFU (on a GPU the peak comes from the device model and precision).
    assert all(r["throughput/mfu"] == pytest.approx(r["throughput/tflops_per_device"] / 0.002) for r in rows)


@pytest.mark.parametrize("mode", ["ar", "nar"])
def test_finetune_step_path_and_dev_decoding_name_every_device(base_model, tmp_path, monkeypatch, capsys, mode):
    import finetune.train as entry

    guarded_train(monkeypatch, entry)
    task = write_copy_task(tmp_path / "task", n_train=32, n_dev=4)
    summary = entry.main(["--task", "xsum", "--mode", mode, "--model.init_from", str(base_model),
                          "--data.dir", str(task), "--run.save_dir", str(tmp_path / "run"), "--run.max_steps", "2",
                          "--run.micro_batch_size", "4", "--run.log_every", "1", "--run.eval_every", "2",
                          "--eval.samples", "4", "--eval.beam", "2", "--eval.iterations", "1",
                          "--data.max_target_length", "8", "--run.tensorboard", "false"])
    assert summary["finished"]
    assert (tmp_path / "run" / "best" / "dev_scores.json").exists()
    out = capsys.readouterr().out
    # The default --data.max_source_length 512 is more than this model's 128 positions: cut at start-up,
    # not an IndexError at the first long batch; the budget line tells max_steps from epochs.
    assert "sources are cut to 128 tokens" in out and "steps (--run.max_steps; " in out


def test_nmt_step_path_names_every_device(tmp_path, monkeypatch):
    """Training, validation every step (decoding the fp32 evaluation copy) and test decoding."""
    import finetune.nmt as entry

    from test_nmt import write_parallel  # the NMT tests' tiny parallel corpus

    guarded_train(monkeypatch, entry)
    data = write_parallel(tmp_path / "data")
    res = entry.main(["--data.dir", str(data), "--model.arch", "tiny", "--data.vocab_size", "300",
                      "--run.save_dir", str(tmp_path / "run"), "--run.max_steps", "2", "--run.micro_batch_size", "4",
                      "--run.save_every", "1", "--run.log_every", "1", "--eval.average", "2", "--eval.samples", "4",
                      "--eval.iterations", "1", "--eval.beam", "2", "--run.tensorboard", "false",
                      "--optim.warmup_steps", "1", "--run.eval_every", "1", "--eval.valid_samples", "4"])
    assert res["finished"] and set(res["bleu"]) == {"ar_beam2", "nar_T1"}


@pytest.mark.parametrize("preset", ["paper", "cmlm", "ar"])
def test_loss_step_makes_no_host_sync(shards, preset):
    """One micro-batch of the hot path (streams, forward, every loss term) with the host counts
    the loop passes: nothing waits for the device."""
    from transformers import BartConfig

    from data_pipeline.loader import DataConfig, build_pretrain_loader
    from janus.model import JanusBart
    from janus.objectives import ObjectiveConfig
    from janus.steps import JanusLoss

    loader = build_pretrain_loader(DataConfig(shards_dir=str(shards)), rank=0, world_size=1, micro_batch_size=3)
    batch = next(iter(loader))
    tok = loader.manifest["tokenizer"]
    model = JanusBart(BartConfig(vocab_size=tok["vocab_size"], d_model=32, encoder_layers=1, decoder_layers=1,
                                 encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                 decoder_ffn_dim=64, max_position_embeddings=160), mask_token_id=tok["mask_id"])
    loss_fn = JanusLoss(ObjectiveConfig(preset=preset), pad_id=tok["pad_id"], model_config=model.config)
    host = loss_fn.host_counts(batch)
    with no_host_sync():
        loss, scalars = loss_fn(model, batch, host)
    assert torch.isfinite(loss) and "total" in scalars
    with pytest.raises(HostSyncError):  # the guard is live: an .item() is caught
        with no_host_sync():
            loss.item()


def test_loader_pins_memory_and_uses_workers_on_a_gpu(monkeypatch, shards):
    from data_pipeline.loader import DataConfig, build_pretrain_loader

    cpu = build_pretrain_loader(DataConfig(shards_dir=str(shards)), rank=0, world_size=1, micro_batch_size=2)
    assert (cpu.num_workers, cpu.pin_memory) == (0, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = build_pretrain_loader(DataConfig(shards_dir=str(shards)), rank=0, world_size=1, micro_batch_size=2)
    assert gpu.num_workers == 2 and gpu.pin_memory
    explicit = build_pretrain_loader(DataConfig(shards_dir=str(shards), num_workers=0), rank=0, world_size=1,
                                     micro_batch_size=2)
    assert explicit.num_workers == 0


def test_multitask_nat_micro_batch_makes_no_host_sync_or_host_copy():
    """Multi-Task NAT's loss (lambda_t changes every step) fills its lambda on the device: the guard
    refuses torch.tensor(<python value>, device=...) from project code (a pageable host-to-device
    copy on a GPU), and the whole micro-batch passes it."""
    import os

    from janus.multitask_nat import MultiTaskNAT

    from conftest import tiny_bart_config
    from guards import REPO

    model = MultiTaskNAT(tiny_bart_config(decoder_start_token_id=2, dropout=0.0), length_classes=16)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(4, 63, (3, 7), generator=g), torch.randint(4, 63, (3, 6), generator=g)
    y[0, 4:] = 1
    dm = (torch.rand(3, 6, generator=g) < 0.5) & y.ne(1)
    dm[:, 1] = True
    counts = {"n_tokens": int(y.ne(1).sum()), "n_masked": int(dm.sum()), "num_masked_max": int(dm.sum(1).max())}
    with no_host_sync():
        out = model(x, torch.ones_like(x), y, dm, length_targets=torch.tensor([4, 6, 6]), lam=0.3, host_counts=counts)
        out.loss.backward()
    assert float(out.losses["lambda"]) == pytest.approx(0.3)
    project_line = compile("torch.tensor(0.3, device='cpu')", os.path.join(REPO, "janus", "any.py"), "exec")
    with pytest.raises(HostSyncError, match="host-to-device"):
        with no_host_sync():
            exec(project_line, {"torch": torch})
