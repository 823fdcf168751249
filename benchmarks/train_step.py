"""Training-step cost of the JANUS objective vs plain HF BART: time, peak memory, FLOP/s, MFU.

Three variants get the same batch (source and target blocks of ``--seq`` tokens), dims,
threads and optimizer (AdamW); a step is forward + backward + optimizer step:

* ``bart``: HF ``BartForConditionalGeneration`` (teacher-forced cross-entropy);
* ``janus``: JanusBart with the objective's default chunked vocabulary losses;
* ``janus_unchunked``: the same model and objective with ``loss_chunk_rows=0`` (every logit
  row at once);
* ``janus_before``: unchunked losses on ``JanusBart(lean_activations=False)`` (HF's plain
  FFN, LayerNorm and dropout modules): the step as it was before either memory change.

Step time: the variants' steps are interleaved in one process so machine noise hits all
alike (median of ``--steps``; CUDA timings are bracketed by ``torch.cuda.synchronize``).
JANUS steps pass ``host_counts`` (as the data collators do), so they run sync-free.
Peak memory: each variant runs in a fresh subprocess: after a warm-up step (optimizer state
allocated) the peak is reset and one more step is measured: ``peak_mem_mb`` is the step's
peak over the memory held just before it (CPU: the process's peak resident set
``VmHWM`` after resetting it through ``/proc/self/clear_refs``, with glibc returning freed
blocks to the system; CUDA: ``torch.cuda.max_memory_allocated``). ``peak_mem_total_mb`` is
the absolute peak. FLOPs per step come from ``janus.flops`` (matmuls only, 3x forward);
``mfu`` = achieved FLOP/s / the best dense matmul rate measured on this machine in the same
dtype ("CPU MFU" on a CPU); on a known GPU ``mfu_vs_spec`` uses its datasheet peak.

    python -m benchmarks.train_step                     # bart-base dims, 2 x 512 (several minutes on 2 cores)
    python -m benchmarks.train_step --small             # smoke run, well under a minute
    python -m benchmarks.train_step --device cuda --dtype bfloat16                      # autocast
    python -m benchmarks.train_step --device cuda --dtype bfloat16 --precision cast     # as DeepSpeed bf16 runs it

Prints one JSON object per variant group and the summary on the last line;
``janus_over_bart`` (step time) and ``janus_over_before_memory`` (step peak memory against
the step before the chunked losses and lean activations) are the key figures.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from transformers import BartConfig, BartForConditionalGeneration

from data_pipeline.masking import span_mask
from janus.flops import bart_step_flops, fp32_matmul_kind, janus_step_flops, peak_tflops_for
from janus.model import JanusBart
from janus.objectives import ObjectiveConfig, chunk_rows_for

DIMS = {
    "small": dict(d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024, vocab_size=8192),
    "bart-base": dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                      decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, vocab_size=50265),
}
VARIANTS = ("bart", "janus", "janus_unchunked", "janus_before")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# fp16 steps multiply the loss by DeepSpeed's initial dynamic loss scale before backward.
FP16_LOSS_SCALE = 2.0 ** 16
# glibc: blocks above this size are mmap'ed and returned on free, so the resident set follows
# the live tensors (set for the memory-probe subprocesses only).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def make_batch(vocab: int, batch: int, seq: int, ratio: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab - 1, (batch, seq), generator=g)
    labels = torch.randint(4, vocab - 1, (batch, seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    # The decoder masking of pretraining (Poisson(3) spans covering `ratio` of each row).
    rng = np.random.default_rng(seed)
    decoder_mask = torch.from_numpy(np.stack([span_mask(rng, seq, ratio, lam=3.0) for _ in range(batch)]))
    return input_ids, attention_mask, labels, decoder_mask


def host_counts(labels: torch.Tensor, decoder_mask: torch.Tensor, pad_id: int) -> dict:
    """What the collators compute on the CPU: the counts that keep the loss path sync-free."""
    valid = labels.ne(pad_id)
    masked = decoder_mask.bool() & valid
    return {"n_tokens": int(valid.sum()), "n_masked": int(masked.sum()), "num_masked_max": int(masked.sum(1).max())}


class Setup:
    """Model(s), batch, optimizer(s) and a step function per variant."""

    def __init__(self, args, variants):
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        # "cast": the weights in the dtype, no autocast (DeepSpeed's bf16/fp16 modes);
        # "autocast": fp32 weights under autocast. fp32 is the same either way.
        self.cast = args.precision == "cast" and self.dtype != torch.float32
        if self.dtype == torch.float16 and not self.cast:
            raise SystemExit("--dtype float16 needs --precision cast (DeepSpeed's fp16 mode; fp16 autocast needs a "
                             "GradScaler, which no training path here uses)")
        self.config = BartConfig(max_position_embeddings=max(1024, args.seq + 2), **DIMS[args.dims])
        cpu_batch = make_batch(self.config.vocab_size, args.batch, args.seq, args.ratio)
        self.cpu_batch = cpu_batch
        self.counts = host_counts(cpu_batch[2], cpu_batch[3], self.config.pad_token_id)
        self.batch = [t.to(self.device) for t in cpu_batch]
        self.objective = ObjectiveConfig(preset=args.preset, **(
            {} if args.loss_chunk_rows is None else {"loss_chunk_rows": args.loss_chunk_rows}))
        self.unchunked = ObjectiveConfig(preset=args.preset, loss_chunk_rows=0)
        self.steps = {}
        torch.manual_seed(0)
        if "bart" in variants:
            hf = self._placed(BartForConditionalGeneration(self.config)).train()
            if args.gradient_checkpointing:
                hf.gradient_checkpointing_enable()
            self.steps["bart"] = self._step(hf, lambda x, am, y, dm: hf(input_ids=x, attention_mask=am, labels=y).loss)
        for lean in (True, False):
            janus_variants = [v for v in variants if v.startswith("janus") and (v != "janus_before") == lean]
            if not janus_variants:
                continue
            torch.manual_seed(0)
            janus = self._placed(JanusBart(self.config, lean_activations=lean)).train()
            janus.gradient_checkpointing = args.gradient_checkpointing
            opt = torch.optim.AdamW(janus.parameters(), lr=1e-5)
            for v in janus_variants:  # the lean model's variants share it and its optimizer
                objective = self.objective if v == "janus" else self.unchunked
                self.steps[v] = self._step(janus, lambda x, am, y, dm, o=objective, m=janus: m(
                    x, am, y, dm, objective=o, host_counts=self.counts).loss, opt)

    def _placed(self, model):
        return model.to(self.device, dtype=self.dtype if self.cast else None)

    def _step(self, model, loss_fn, opt=None):
        opt = opt if opt is not None else torch.optim.AdamW(model.parameters(), lr=1e-5)
        autocast = self.dtype != torch.float32 and not self.cast
        scale = FP16_LOSS_SCALE if self.dtype == torch.float16 else 1.0

        def step():
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
                loss = loss_fn(*self.batch)
            (loss * scale if scale != 1.0 else loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def flops(self, variant: str) -> float:
        B, S = self.cpu_batch[0].shape
        N = self.cpu_batch[2].shape[1]
        if variant == "bart":
            return bart_step_flops(self.config, B * S, B * N, batch_size=B)
        objective = self.objective if variant == "janus" else self.unchunked
        return janus_step_flops(self.config, patterns=objective.patterns(), batch_size=B, src_tokens=B * S, src_len=S,
                                tgt_len=N, **self.counts)


# ----------------------------------------------------------------------------- memory
def _proc_status(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def probe_memory(args) -> dict:
    """Runs in a fresh process: one warm-up step, then the peak of one measured step."""
    setup = Setup(args, [args.probe])
    step = setup.steps[args.probe]
    if setup.device.type == "cuda":
        step()
        setup.sync()
        torch.cuda.reset_peak_memory_stats(setup.device)
        before = torch.cuda.memory_allocated(setup.device)
        step()
        setup.sync()
        peak = torch.cuda.max_memory_allocated(setup.device)
        return {"peak_mem_mb": (peak - before) / 2**20, "peak_mem_total_mb": peak / 2**20,
                "mem_method": "cuda max_memory_allocated"}
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step()
    before = _proc_status("VmRSS")
    if before is not None and _reset_peak_rss():
        step()
        peak = _proc_status("VmHWM")
        return {"peak_mem_mb": peak - before, "peak_mem_total_mb": peak,
                "mem_method": "VmHWM after clear_refs, minus VmRSS before the step"}
    # No /proc peak reset: the warm-up step's peak over the resident set before it (includes
    # the optimizer state allocated by that first step).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mem_mb": peak - start_rss, "peak_mem_total_mb": peak,
            "mem_method": "ru_maxrss over the first step (includes optimizer state)"}


def measure_memory(args, argv: list[str]) -> dict:
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, "-m", "benchmarks.train_step", *argv, "--probe", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV},
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe {variant} failed:\n{proc.stderr[-4000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


# ----------------------------------------------------------------------------- matmul peak
def matmul_rate(device: torch.device, dtype: torch.dtype, rounds: int = 3) -> float:
    """Best FLOP/s of a few large dense matmuls (the machine's practical peak): square ones and the
    step's own shapes (1024 tokens x d 768 into the FFN width and into a vocabulary block), each
    timed ``rounds`` times and the fastest kept, so one noisy moment does not lower the peak."""
    shapes = ([(1024, 1024, 1024), (2048, 2048, 2048), (1024, 768, 3072), (1024, 768, 8192)]
              if device.type == "cpu" else [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 768, 3072)])
    reps = 3 if device.type == "cpu" else 20
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        torch.mm(a, b)
        for _ in range(rounds):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
    return best


# ----------------------------------------------------------------------------- main
def memory_summary(memory: dict) -> dict:
    j, u, b, o = (memory[v]["peak_mem_mb"] for v in ("janus", "janus_unchunked", "bart", "janus_before"))
    return {"chunked_over_unchunked_memory": j / u, "janus_over_before_memory": j / o, "janus_over_bart_memory": j / b}


def bench(args, argv: list[str]) -> dict:
    memory = measure_memory(args, argv) if not args.no_memory else {}
    if args.memory_only:
        return {"device": args.device, "dtype": args.dtype, "dims": args.dims, "batch": args.batch, "seq": args.seq,
                "gradient_checkpointing": args.gradient_checkpointing, "variants": memory, **memory_summary(memory)}
    setup = Setup(args, VARIANTS)
    device = setup.device
    rate = matmul_rate(device, setup.dtype)
    times = {v: [] for v in VARIANTS}
    for v in VARIANTS:  # warm-up (allocator, optimizer state)
        setup.steps[v]()
    setup.sync()
    for _ in range(args.steps):
        for v in VARIANTS:
            setup.sync()
            t = time.perf_counter()
            setup.steps[v]()
            setup.sync()
            times[v].append(time.perf_counter() - t)
    spec = None
    if device.type == "cuda":
        kind = {"bfloat16": "bf16", "float16": "fp16"}.get(args.dtype) or fp32_matmul_kind()
        tf = peak_tflops_for(torch.cuda.get_device_name(device), kind)
        spec = tf * 1e12 if tf else None
    tokens = args.batch * args.seq
    variants = {}
    for v in VARIANTS:
        step_s = sorted(times[v])[len(times[v]) // 2]
        flops = setup.flops(v)
        variants[v] = {"step_s": step_s, "step_times_s": times[v], "tokens_per_s": tokens / step_s, "flops_per_step": flops,
                       "flops_per_s": flops / step_s, "mfu": flops / step_s / rate,
                       **({"mfu_vs_spec": flops / step_s / spec} if spec else {}), **memory.get(v, {})}
    j, u, b = variants["janus"], variants["janus_unchunked"], variants["bart"]
    summary = {
        "device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "precision": args.precision, "threads": torch.get_num_threads(), "dims": args.dims, "batch": args.batch,
        "seq": args.seq, "preset": args.preset, "steps": args.steps,
        "gradient_checkpointing": args.gradient_checkpointing,
        "loss_chunk_rows": chunk_rows_for(setup.objective, device),
        "decoder_mask_ratio": setup.counts["n_masked"] / setup.counts["n_tokens"],
        "matmul_flops_per_s": rate, "spec_peak_flops_per_s": spec,
        "variants": variants,
        "janus_over_bart": j["step_s"] / b["step_s"],
        "janus_unchunked_over_bart": u["step_s"] / b["step_s"],
        "chunked_over_unchunked_time": j["step_s"] / u["step_s"],
        "janus_over_before_time": j["step_s"] / variants["janus_before"]["step_s"],
        "janus_before_over_bart": variants["janus_before"]["step_s"] / b["step_s"],
        "flops_janus_over_bart": j["flops_per_step"] / b["flops_per_step"],
    }
    if memory:
        summary.update(memory_summary(memory))
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", choices=list(DIMS), default="bart-base")
    p.add_argument("--small", action="store_true", help="smoke run: small dims, 1 x 64 tokens, 1 measured step "
                                                        "(explicit --batch/--seq/--steps still apply)")
    p.add_argument("--batch", type=int, default=None, help="samples per batch (default 2; --small: 1)")
    p.add_argument("--seq", type=int, default=None, help="source and target tokens per sample (default 512; --small: 64)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per variant, median reported (default 3; "
                                                            "--small: 1)")
    p.add_argument("--preset", default="janus")
    p.add_argument("--loss-chunk-rows", type=int, default=None,
                   help="logit rows per chunk of the 'janus' variant (default: the objective's default)")
    p.add_argument("--ratio", type=float, default=0.5, help="decoder mask ratio")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="compute dtype; how it is applied is --precision")
    p.add_argument("--precision", choices=["autocast", "cast"], default="autocast",
                   help="autocast: fp32 weights under autocast; cast: weights and activations in --dtype without "
                        "autocast, as DeepSpeed's bf16/fp16 modes run the model (fp16 also scales the loss by 2^16)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="activation checkpointing per layer in every variant (memory then shows the loss part)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory-probe subprocesses")
    p.add_argument("--memory-only", action="store_true", help="only the memory probes (no timing)")
    p.add_argument("--probe", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = dict(batch=1, seq=64, steps=1) if args.small else dict(batch=2, seq=512, steps=3)
    if args.small:
        args.dims = "small"
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        result = probe_memory(args)
        print(json.dumps(result), flush=True)
        return result
    child_argv = [a for a in argv if a not in ("--small", "--memory-only", "--no-memory")] + (
        ["--dims", args.dims, "--batch", str(args.batch), "--seq", str(args.seq)] if args.small else [])
    child_argv += ["--threads", str(args.threads)]
    summary = bench(args, child_argv)
    for v, r in summary["variants"].items():
        print(json.dumps({"variant": v, **r}), flush=True)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
