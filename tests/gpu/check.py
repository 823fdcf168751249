"""One command that proves an install works on a GPU machine (``make gpu-check``).

    python tests/gpu/check.py                  # CUDA if present; otherwise says so and exits 0
    python tests/gpu/check.py --device cpu     # the same parts on CPU (the test suite runs this)

Every part runs the configuration a real run runs, not a shortcut around it: the chunked
vocabulary losses (the small test vocabulary is below the size where they switch on by default,
so they are switched on explicitly, in several chunks per micro-batch), ZeRO-3 with a parameter
persistence threshold of 0 (every parameter partitioned and gathered, as bart-base's matrices
are), the weights in bf16/fp16 without autocast as DeepSpeed runs them, fp16 with dynamic loss
scaling where the device supports it, and a stop signal that must end in a checkpoint.

Parts (each pass/fail, timed, with its numbers):
  pretrain_zero2_bf16      --steps steps, killed at half way and resumed: the resumed run continues
                           from the checkpoint and its loss falls; tokens/s, TFLOP/s, MFU, memory
  pretrain_zero3_bf16      the same with ZeRO-3 (persistence threshold 0), stopped at half way by
                           a stop signal (SIGUSR1, the trainer's save-and-stop path) instead
  pretrain_zero2_fp16      (CUDA only: DeepSpeed's CPU accelerator has no fp16) dynamic loss
                           scaling from 2^16, killed and resumed; skipped steps reported
  finetune_nar, finetune_ar  dev evaluation (mask-predict / beam search) + best export
  generate                 finetune.generate of the AR model on the device
  train_step               the step benchmark with the weights in bf16 (DeepSpeed's bf16 mode;
                           on CUDA also fp16 with a 2^16 loss scale, and bf16 autocast)
  decode_latency           the decoding benchmark (bart-base dims on CUDA)
On CUDA with 2+ GPUs the training parts run 2 ranks over NCCL. The last printed line is one
JSON summary; the exit code is 1 if any part failed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
# The chunked vocabulary losses, in several chunks per micro-batch (the tiny test vocabulary is
# below the size where they switch on by default).
CHUNKED = ["--objective.loss_chunk_min_vocab", "0", "--objective.loss_chunk_rows", "128"]


def env_for(device: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    if device == "cpu":
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    return env


def run(cmd: list[str], device: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env_for(device), capture_output=True, text=True, timeout=timeout)


def torchrun(script: str, args: list[str], nproc: int, device: str, timeout: int) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                script, *args], device, timeout)


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def metrics(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(save_dir / "metrics.jsonl")]


class Check:
    def __init__(self, device: str, nproc: int, steps: int, timeout: int):
        self.device, self.nproc, self.steps, self.timeout = device, nproc, steps, timeout
        self.parts: dict[str, dict] = {}

    def part(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            info = fn() or {}
            info["ok"] = True
        except Exception as e:  # a failed part is reported, the others still run
            info = {"ok": False, "error": f"{type(e).__name__}: {e}"[-3000:]}
        info["seconds"] = round(time.perf_counter() - t0, 1)
        self.parts[name] = info
        print(f"[gpu-check] {name}: {'ok' if info['ok'] else 'FAILED'} ({info['seconds']} s)", flush=True)
        if not info["ok"]:
            print(info["error"], flush=True)

    def expect_ok(self, proc: subprocess.CompletedProcess, what: str) -> None:
        if proc.returncode != 0:
            raise RuntimeError(f"{what} exited {proc.returncode}:\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}")

    # ------------------------------------------------------------------------------- parts
    def ds_config(self, work: Path, name: str) -> str:
        """ds_configs/<name>.json as a real run uses it; ZeRO-3 with a persistence threshold of 0, so
        the tiny model's parameters are partitioned and gathered like bart-base's matrices."""
        ds = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
        if ds["zero_optimization"]["stage"] == 3:
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        path = work / f"{name}.json"
        path.write_text(json.dumps(ds))
        return str(path)

    def pretrain(self, shards: Path, work: Path, config: str, stop: str) -> dict:
        """Pretraining with ``config``, interrupted at half way by ``stop`` ("kill": a hard exit
        after the step; "signal": SIGUSR1 during the step, which must save and exit 0), then resumed."""
        save = work / f"pretrain_{config}"
        half = self.steps // 2
        args = ["--config", "pretrain/configs/tiny_cpu.json", "--data.shards_dir", str(shards),
                "--run.save_dir", str(save), "--run.deepspeed_config", self.ds_config(work, config),
                "--run.max_steps", str(self.steps), "--run.save_every", str(self.steps), "--run.log_every", "2",
                "--optim.lr", "2e-3", "--optim.warmup_steps", "2", "--run.micro_batch_size", "8", *CHUNKED]
        if stop == "kill":
            args[args.index("--run.save_every") + 1] = str(half)
            first = torchrun("pretrain/train.py", args + ["--run.faults.crash_at_step", str(half)], self.nproc,
                             self.device, self.timeout)
            if first.returncode == 0:
                raise RuntimeError("the run meant to be killed half way finished")
        else:
            first = torchrun("pretrain/train.py", args + ["--run.faults.signal_at_step", str(half)], self.nproc,
                             self.device, self.timeout)
            self.expect_ok(first, "the run stopped by a signal")
            if not any(int(d.name.split("_")[-1]) == half for d in (save / "checkpoints").glob("step_*") if d.is_dir()):
                raise RuntimeError(f"the stop signal at step {half} left no checkpoint:\n{first.stdout[-1500:]}")
        resumed = torchrun("pretrain/train.py", args, self.nproc, self.device, self.timeout)
        self.expect_ok(resumed, "resumed pretraining")
        if f"at step {half}" not in resumed.stdout:
            raise RuntimeError(f"did not resume at step {half}:\n{resumed.stdout[-1500:]}")
        rows = metrics(save)
        first, last = rows[0], rows[-1]
        if not last["loss/total"] < first["loss/total"]:
            raise RuntimeError(f"loss did not fall: {first['loss/total']} -> {last['loss/total']}")
        if not all(math.isfinite(r["loss/total"]) for r in rows):
            raise RuntimeError("a logged loss is not finite")
        used = self.production_settings(save)
        used["precision_line"] = next((ln for ln in resumed.stdout.splitlines() if ln.startswith("precision:")), None)
        if used["precision"] == "bf16" and "accumulated in float32 and reduced in float32" not in (
                used["precision_line"] or ""):
            raise RuntimeError(f"bf16 gradients are not accumulated and reduced in fp32: {used['precision_line']}")
        info = {"loss_first": first["loss/total"], "loss_last": last["loss/total"], "steps": last["step"],
                "tokens_per_s": last["throughput/tokens_per_s"], "skipped_steps": last["skipped_steps"],
                "tflops_per_device": last.get("throughput/tflops_per_device"), **used}
        for key in ("throughput/mfu", "memory/peak_allocated_gb"):
            if key in last:
                info[key.split("/")[1]] = last[key]
        return info

    @staticmethod
    def production_settings(save: Path) -> dict:
        """What the run resolved (its config.json and DeepSpeed config): the chunked losses must
        have been on for its vocabulary, ZeRO-3 must partition everything."""
        from janus.objectives import ObjectiveConfig, use_chunked

        cfg = json.loads((save / "config.json").read_text())
        vocab = json.loads((Path(cfg["data"]["shards_dir"]) / "manifest.json").read_text())["tokenizer"]["vocab_size"]
        chunked = use_chunked(ObjectiveConfig(**cfg["objective"]), vocab)
        ds = json.loads(Path(cfg["run"]["deepspeed_config"]).read_text())
        zero = ds["zero_optimization"]
        if not chunked:
            raise RuntimeError("the chunked vocabulary losses were off")
        if zero["stage"] == 3 and zero.get("stage3_param_persistence_threshold", 1) != 0:
            raise RuntimeError("ZeRO-3 kept parameters persistent (nothing partitioned)")
        return {"chunked_losses": chunked, "zero_stage": zero["stage"],
                "precision": "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get(
                    "enabled") else "fp32"}

    def finetune(self, base: Path, task: Path, work: Path, mode: str) -> dict:
        save = work / f"finetune_{mode}"
        steps = max(4, self.steps // 2)
        proc = torchrun("finetune/train.py", [
            "--task", "xsum", "--mode", mode, "--model.init_from", str(base), "--data.dir", str(task),
            "--run.save_dir", str(save), "--run.max_steps", str(steps), "--run.micro_batch_size", "8",
            "--run.log_every", "2", "--run.save_every", str(steps), "--run.eval_every", str(steps),
            "--run.deepspeed_config", "ds_configs/zero2_bf16.json", "--optim.lr", "3e-3", "--optim.warmup_steps",
            "2", "--eval.samples", "8", "--eval.beam", "2", "--eval.iterations", "1",
            "--data.max_target_length", "16", *CHUNKED], self.nproc, self.device, self.timeout)
        self.expect_ok(proc, f"{mode} finetuning")
        scores = json.loads((save / "best" / "dev_scores.json").read_text())
        rows = metrics(save)
        return {"dev_score": scores["score"], "tokens_per_s": rows[-1]["throughput/tokens_per_s"],
                "best_dir": str(save / "best")}

    def generate(self, best: str, task: Path, work: Path) -> dict:
        out = work / "test.hyp"
        proc = run([sys.executable, "-m", "finetune.generate", "--model", best, "--src", str(task / "test.src"),
                    "--out", str(out), "--mode", "ar", "--max-len", "16", "--batch-size", "8",
                    "--device", self.device], self.device, self.timeout)
        self.expect_ok(proc, "finetune.generate")
        summary = last_json(proc.stdout)
        lines = out.read_text().splitlines()
        if len(lines) != summary["n"]:
            raise RuntimeError(f"{len(lines)} output lines for {summary['n']} sources")
        return {k: summary[k] for k in summary if k in ("n", "seconds", "ms_per_sample", "device")}

    def benchmark(self, module: str, args: list[str]) -> dict:
        proc = run([sys.executable, "-m", module, *args, "--device", self.device], self.device, self.timeout)
        self.expect_ok(proc, module)
        return last_json(proc.stdout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--steps", type=int, default=40, help="pretraining steps per run (killed at half way)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per launched command")
    p.add_argument("--workdir", help="keep artifacts here (default: a temporary folder)")
    p.add_argument("--out", help="also write the JSON summary to this file")
    args = p.parse_args(argv)

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "none"
    if device == "none" or (device == "cuda" and not torch.cuda.is_available()):
        print("[gpu-check] no CUDA device here: nothing to check (use --device cpu for the CPU variant)")
        print(json.dumps({"device": None, "ok": True, "skipped": "no CUDA device"}))
        return 0
    nproc = min(2, torch.cuda.device_count()) if device == "cuda" else 1
    check = Check(device, nproc, args.steps, args.timeout)
    from e2e import build_shards, make_base_model, write_copy_task

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        (work / "data").mkdir(exist_ok=True)
        shards = build_shards(work / "data")
        base = make_base_model(work / "base_model")
        task = write_copy_task(work / "task", n_train=256, n_dev=8)
        check.part("pretrain_zero2_bf16", lambda: check.pretrain(shards, work, "zero2_bf16", "kill"))
        check.part("pretrain_zero3_bf16", lambda: check.pretrain(shards, work, "zero3_bf16", "signal"))
        if device == "cuda":  # DeepSpeed's CPU accelerator has no fp16
            check.part("pretrain_zero2_fp16", lambda: check.pretrain(shards, work, "zero2_fp16", "kill"))
        for mode in ("nar", "ar"):
            check.part(f"finetune_{mode}", lambda mode=mode: check.finetune(base, task, work, mode))
        best = check.parts.get("finetune_ar", {}).get("best_dir")
        check.part("generate", lambda: check.generate(best, task, work) if best else
                   (_ for _ in ()).throw(RuntimeError("no AR model to decode (finetune_ar failed)")))
        if device == "cuda":
            step = ["--dims", "bart-base", "--batch", "2", "--seq", "512", "--steps", "3"]
            step_runs = {"bf16": ["--dtype", "bfloat16", "--precision", "cast"],
                         "fp16": ["--dtype", "float16", "--precision", "cast"],
                         "bf16_autocast": ["--dtype", "bfloat16", "--precision", "autocast"]}
            lat_args = ["--dims", "bart-base", "--samples", "3", "--iterations", "0,1,4,10"]
        else:
            step = ["--dims", "small", "--batch", "1", "--seq", "32", "--steps", "1"]
            step_runs = {"bf16": ["--dtype", "bfloat16", "--precision", "cast"]}
            lat_args = ["--dims", "small", "--source-len", "24", "--target-len", "6", "--samples", "1",
                        "--iterations", "0,1", "--dtypes", "float32"]
        for name, extra in step_runs.items():
            check.part(f"train_step_{name}", lambda extra=extra: check.benchmark("benchmarks.train_step", step + extra))
        check.part("decode_latency", lambda: check.benchmark("benchmarks.decode_latency", lat_args))

    summary = {"device": device, "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
               "ranks": nproc, "ok": all(p["ok"] for p in check.parts.values()), "parts": check.parts}
    text = json.dumps(summary)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    print(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
