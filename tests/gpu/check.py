"""One command that proves an install works on a GPU machine (``make gpu-check``).

    python tests/gpu/check.py                  # CUDA if present; otherwise says so and exits 0
    python tests/gpu/check.py --device cpu     # the same parts on CPU (the test suite runs this)

Parts (each pass/fail, timed, with its numbers):
  pretrain_zero2_bf16, pretrain_zero3_bf16   small model, --steps steps, killed at half way and
                                             resumed: the resumed run continues from the checkpoint
                                             and its loss falls; tokens/s, TFLOP/s, MFU, peak memory
  finetune_nar, finetune_ar                  dev evaluation (mask-predict / beam search) + best export
  generate                                   finetune.generate of the AR model on the device
  train_step, decode_latency                 the benchmarks on the device (bart-base dims on CUDA)
On CUDA with 2+ GPUs the training parts run 2 ranks over NCCL. The last printed line is one
JSON summary; the exit code is 1 if any part failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))


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
    def pretrain(self, shards: Path, work: Path, stage: int) -> dict:
        save = work / f"pretrain_zero{stage}"
        half = self.steps // 2
        args = ["--config", "pretrain/configs/tiny_cpu.json", "--data.shards_dir", str(shards),
                "--run.save_dir", str(save), "--run.deepspeed_config", f"ds_configs/zero{stage}_bf16.json",
                "--run.max_steps", str(self.steps), "--run.save_every", str(half), "--run.log_every", "2",
                "--optim.lr", "2e-3", "--optim.warmup_steps", "2", "--run.micro_batch_size", "8"]
        killed = torchrun("pretrain/train.py", args + ["--run.faults.crash_at_step", str(half)], self.nproc,
                          self.device, self.timeout)
        if killed.returncode == 0:
            raise RuntimeError("the run meant to be killed half way finished")
        resumed = torchrun("pretrain/train.py", args, self.nproc, self.device, self.timeout)
        self.expect_ok(resumed, "resumed pretraining")
        if f"at step {half}" not in resumed.stdout:
            raise RuntimeError(f"did not resume at step {half}:\n{resumed.stdout[-1500:]}")
        rows = metrics(save)
        first, last = rows[0], rows[-1]
        if not last["loss/total"] < first["loss/total"]:
            raise RuntimeError(f"loss did not fall: {first['loss/total']} -> {last['loss/total']}")
        info = {"loss_first": first["loss/total"], "loss_last": last["loss/total"], "steps": last["step"],
                "tokens_per_s": last["throughput/tokens_per_s"], "skipped_steps": last["skipped_steps"],
                "tflops_per_device": last.get("throughput/tflops_per_device")}
        for key in ("throughput/mfu", "memory/peak_allocated_gb"):
            if key in last:
                info[key.split("/")[1]] = last[key]
        return info

    def finetune(self, base: Path, task: Path, work: Path, mode: str) -> dict:
        save = work / f"finetune_{mode}"
        steps = max(4, self.steps // 2)
        proc = torchrun("finetune/train.py", [
            "--task", "xsum", "--mode", mode, "--model.init_from", str(base), "--data.dir", str(task),
            "--run.save_dir", str(save), "--run.max_steps", str(steps), "--run.micro_batch_size", "8",
            "--run.log_every", "2", "--run.save_every", str(steps), "--run.eval_every", str(steps),
            "--run.deepspeed_config", "ds_configs/zero2_bf16.json", "--optim.lr", "3e-3", "--optim.warmup_steps",
            "2", "--eval.samples", "8", "--eval.beam", "2", "--eval.iterations", "1",
            "--data.max_target_length", "16"], self.nproc, self.device, self.timeout)
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
        for stage in (2, 3):
            check.part(f"pretrain_zero{stage}_bf16", lambda stage=stage: check.pretrain(shards, work, stage))
        for mode in ("nar", "ar"):
            check.part(f"finetune_{mode}", lambda mode=mode: check.finetune(base, task, work, mode))
        best = check.parts.get("finetune_ar", {}).get("best_dir")
        check.part("generate", lambda: check.generate(best, task, work) if best else
                   (_ for _ in ()).throw(RuntimeError("no AR model to decode (finetune_ar failed)")))
        if device == "cuda":
            step_args = ["--dims", "bart-base", "--batch", "2", "--seq", "512", "--steps", "3", "--dtype", "bfloat16"]
            lat_args = ["--dims", "bart-base", "--samples", "3", "--iterations", "0,1,4,10"]
        else:
            step_args = ["--dims", "small", "--batch", "1", "--seq", "32", "--steps", "1"]
            lat_args = ["--dims", "small", "--source-len", "24", "--target-len", "6", "--samples", "1",
                        "--iterations", "0,1", "--dtypes", "float32"]
        check.part("train_step", lambda: check.benchmark("benchmarks.train_step", step_args))
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
