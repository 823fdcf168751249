"""The one DeepSpeed training loop shared by pretraining and finetuning.

An entry point builds a model, a resumable batch iterator and a ``loss_fn``; ``train``
does the rest, top to bottom: DeepSpeed config validation, engine set-up, resume, the
step loop with gradient accumulation and non-finite guards, TensorBoard/console/JSONL
logging, and checkpoints that count only when complete.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from janus import checkpoint
from janus.distributed import device, is_rank0, print0
from janus.steps import accum_for, full_precision_copy


@dataclass
class OptimConfig:
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01
    schedule: str = field(default="polynomial", metadata={"help": "polynomial | inverse_sqrt | constant"})
    warmup_steps: int = 1000
    end_lr: float = field(default=0.0, metadata={"help": "final lr of the polynomial decay"})
    power: float = 1.0

    def __post_init__(self):
        if self.schedule not in ("polynomial", "inverse_sqrt", "constant"):
            raise ValueError(f"optim.schedule must be polynomial, inverse_sqrt or constant, got {self.schedule!r}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("optim.lr must be > 0 and optim.warmup_steps >= 0")


@dataclass
class FaultInjectionConfig:
    """Test hooks that simulate failures (kills, interrupted saves, NaN losses); never set them in real runs."""
    crash_at_step: int = field(default=0, metadata={"help": "testing: hard exit after this step (simulated kill)"})
    crash_in_save_at_step: int = field(default=0, metadata={"help": "testing: die in the middle of this save"})
    nan_at_steps: list[int] = field(default_factory=list, metadata={"help": "testing: poison the loss at these steps"})
    inf_grad_at_steps: list[int] = field(default_factory=list, metadata={
        "help": "testing: finite loss but infinite gradients at these steps (an fp16/bf16 overflow)"})
    signal_at_step: int = field(default=0, metadata={"help": "testing: send SIGUSR1 to this process during this step"})
    crash_in_conversion: bool = field(default=False, metadata={
        "help": "testing: die inside an elastic-resume conversion, before it counts"})


@dataclass
class RunConfig:
    deepspeed_config: str = field(default="ds_configs/zero2_fp32_cpu.json", metadata={"help": "DeepSpeed JSON"})
    micro_batch_size: int | None = field(default=None, metadata={"help": "per rank; must agree with the DS config"})
    grad_accum: int | None = field(default=None, metadata={"help": "must agree with the DS config"})
    global_batch_size: int | None = field(default=None, metadata={
        "help": "micro x accum x world: checked, or, without grad_accum, it sets the accumulation for any world size"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps in total"})
    save_dir: str = "runs/pretrain"
    save_every: int = 500
    keep_last: int = field(default=3, metadata={"help": "complete checkpoints kept (0 = all)"})
    resume: str = field(default="auto", metadata={"help": "auto (latest complete in save_dir) | none | a tag"})
    log_every: int = 10
    eval_every: int = field(default=0, metadata={"help": "steps between evaluations (0 = only at the end)"})
    tensorboard: bool = True
    seed: int = 1234
    max_nonfinite: int = field(default=20, metadata={
        "help": "stop after this many skips in total: micro-batches with a non-finite loss, optimizer steps "
                "DeepSpeed skipped on overflow (fp16 loss-scale search included) or with a non-finite grad norm"})
    dist_timeout_minutes: float = field(default=60.0, metadata={
        "help": "process-group timeout: the longest any rank may wait for the others (rank-0 scoring, export, "
                "checkpoint pruning on a network file system)"})
    peak_tflops: float | None = field(default=None, metadata={
        "help": "peak dense TFLOP/s of one device for throughput/mfu (default: from the GPU model and precision)"})
    faults: FaultInjectionConfig = field(default_factory=lambda: FaultInjectionConfig())


def peak_tflops_for_device(dev: torch.device, prec: str) -> float | None:
    """Dense peak TFLOP/s of this GPU at this precision (fp32 runs use TF32 matmuls), if known."""
    if dev.type != "cuda":
        return None
    from janus.flops import peak_tflops_for

    return peak_tflops_for(torch.cuda.get_device_name(dev), "tf32" if prec == "fp32" else prec)


def lr_lambda(optim: OptimConfig, max_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        if optim.schedule == "inverse_sqrt":
            return math.sqrt(max(optim.warmup_steps, 1) / (step + 1))
        span = max(max_steps - optim.warmup_steps, 1)
        remaining = max(0.0, 1.0 - (step - optim.warmup_steps) / span)
        end = optim.end_lr / optim.lr
        return end + (1.0 - end) * remaining ** optim.power
    return factor


def _auto_keys(node, prefix: str = "") -> list[str]:
    """Dotted paths of every "auto" value, at any depth (DeepSpeed's raw initialize leaves them
    unresolved: a nested ``"stage": "auto"`` would silently mean stage 0)."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _auto_keys(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == "auto" else []


def precision(ds_config: dict) -> str:
    """bf16 | fp16 | fp32 (the dtype the model computes in)."""
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp16" if ds_config.get("fp16", {}).get("enabled") else "fp32"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay; biases and LayerNorm weights (1-D) do not."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_ds_config(run: RunConfig, optim: OptimConfig, world_size: int) -> dict:
    """Load the DeepSpeed JSON and check it agrees with the run config (clear errors otherwise)."""
    try:
        with open(run.deepspeed_config) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"DeepSpeed config {run.deepspeed_config} not found (see ds_configs/)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{run.deepspeed_config}:{e.lineno}: invalid JSON: {e.msg}") from None
    autos = _auto_keys(ds)
    if autos:
        raise ValueError(f"{run.deepspeed_config}: 'auto' values are not resolved here; set concrete values for {autos}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{run.deepspeed_config}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise ValueError(f"{run.deepspeed_config}: fp16 and bf16 are both enabled; choose one")

    def agree(name: str, ours, key: str):
        theirs = ds.get(key)
        if ours is not None and theirs is not None and ours != theirs:
            raise ValueError(f"batch size mismatch: {name}={ours} but {run.deepspeed_config} has {key}={theirs}")
        return ours if ours is not None else theirs

    micro = agree("micro_batch_size", run.micro_batch_size, "train_micro_batch_size_per_gpu")
    accum = agree("grad_accum", run.grad_accum, "gradient_accumulation_steps")
    if micro is None:
        raise ValueError("set run.micro_batch_size or train_micro_batch_size_per_gpu in the DeepSpeed config")
    wanted = run.global_batch_size if run.global_batch_size is not None else ds.get("train_batch_size")
    if accum is None and wanted is not None:  # the global batch is the anchor: accumulation fits the world size
        accum = accum_for(wanted, micro, world_size)
    accum = accum or 1
    global_batch = micro * accum * world_size
    for name, value in (("global_batch_size", run.global_batch_size), ("train_batch_size", ds.get("train_batch_size"))):
        if value is not None and value != global_batch:
            raise ValueError(f"batch size mismatch: {name}={value} but micro {micro} x accum {accum} x world "
                             f"{world_size} = {global_batch}")
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum, train_batch_size=global_batch)
    ds.setdefault("gradient_clipping", 1.0)
    if "optimizer" in ds:  # DeepSpeed builds it (e.g. for offload): its values must be ours
        params = ds["optimizer"].get("params", {})
        ours = {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}
        for k, v in ours.items():
            if k in params and (list(params[k]) if isinstance(params[k], (list, tuple)) else params[k]) != v:
                raise ValueError(f"{run.deepspeed_config}: optimizer.params.{k}={params[k]} disagrees with optim.{k}={v}")
        ds["optimizer"]["params"] = {**params, **ours}
    return ds


class _Tracker:
    """Rank-0 TensorBoard + console + metrics.jsonl."""

    def __init__(self, run: RunConfig):
        self.writer = None
        self.jsonl = None
        self.save_dir = run.save_dir
        if is_rank0():
            os.makedirs(run.save_dir, exist_ok=True)
            self.jsonl = open(os.path.join(run.save_dir, "metrics.jsonl"), "a")
            if run.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(run.save_dir, "tensorboard"))

    def log(self, step: int, scalars: dict[str, float], max_steps: int) -> None:
        if not is_rank0():
            return
        for k, v in scalars.items():
            if self.writer is not None:
                self.writer.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        losses = "  ".join(f"{k[5:]} {v:.3f}" for k, v in scalars.items() if k.startswith("loss/"))
        print0(f"step {step}/{max_steps}  {losses}  lr {scalars['lr']:.2e}  gnorm {scalars['grad_norm']:.2f}  "
               f"{scalars['throughput/tokens_per_s']:.0f} tok/s  data {100 * scalars['throughput/data_wait_share']:.0f}%")

    def log_eval(self, step: int, results: dict[str, float]) -> None:
        if not is_rank0():
            return
        for k, v in results.items():
            if self.writer is not None and isinstance(v, (int, float)):
                self.writer.add_scalar(f"eval/{k}", v, step)
        with open(os.path.join(self.save_dir, "eval.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **results}) + "\n")
        print0(f"eval at step {step}: " + "  ".join(f"{k} {v:.3f}" for k, v in results.items()
                                                   if isinstance(v, (int, float))))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def build_engine(model: torch.nn.Module, ds_config: dict, optim: OptimConfig, max_steps: int):
    """(DeepSpeed engine, LR scheduler). The same decay / no-decay groups whether torch builds
    the optimizer or DeepSpeed does (the offload configs name one in the DeepSpeed JSON)."""
    import deepspeed

    groups = param_groups(model, optim.weight_decay)
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    schedule = lr_lambda(optim, max_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, model_parameters=None if optimizer is not None else groups,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return engine, scheduler


class _InfiniteGrad(torch.autograd.Function):
    """Fault injection: identity forward, infinite backward (what an fp16 overflow looks like)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@contextlib.contextmanager
def _stage0_overflow_guard(engine, out: dict):
    """Without ZeRO, DeepSpeed neither computes a grad norm nor checks fp32 gradients for
    overflow, so an infinite gradient would be applied. Around the boundary ``engine.step()``:
    compute the norm (one sync per optimizer step, on this path only) into ``out["norm"]`` and,
    when it is not finite, make the optimizer step a no-op and flag it as an overflow, so
    DeepSpeed skips it exactly like an fp16 overflow (no update, no LR-schedule step,
    ``was_step_applied()`` False)."""
    opt = engine.optimizer
    params = [p for p in engine.module.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
    out["norm"] = norm
    opt.overflow = not bool(torch.isfinite(norm))
    if opt.overflow:
        for p in params:
            p.grad.zero_()
        opt.step = lambda *args, **kwargs: None  # instance attribute shadows the class's step
    try:
        yield
    finally:
        opt.__dict__.pop("step", None)
        opt.overflow = False


def train(run: RunConfig, optim: OptimConfig, model: torch.nn.Module, loader, loss_fn: Callable,
          model_meta: dict, config_dump: dict, evaluate: Callable[[torch.nn.Module, int], dict] | None = None) -> dict:
    """Run the loop. ``loader`` iterates batches (dicts of tensors) forever and has
    ``state_dict``/``load_state_dict``; ``loss_fn(engine, batch) -> (loss, {name: scalar tensor})``.
    ``evaluate(module, step) -> {name: float}`` (collective: every rank calls it) runs every
    ``run.eval_every`` steps and at the end; its numbers go to TensorBoard under ``eval/``.
    Returns a summary dict (also written to ``<save_dir>/train_summary.json``)."""
    # SIGUSR1 (Slurm's --signal=USR1@T before walltime) or SIGTERM: save at the next step
    # boundary and exit cleanly, so a requeued job resumes from there.
    stop_signal = {"received": 0}

    def request_stop(signum, frame):
        stop_signal["received"] = signum

    previous_handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGUSR1, signal.SIGTERM)}

    world, rank = dist.get_world_size(), dist.get_rank()
    ds_config = resolve_ds_config(run, optim, world)
    accum = ds_config["gradient_accumulation_steps"]
    torch.manual_seed(run.seed + rank)
    engine, scheduler = build_engine(model, ds_config, optim, run.max_steps)
    dev = device()
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    peak = run.peak_tflops or peak_tflops_for_device(dev, precision(ds_config))

    root = os.path.join(run.save_dir, "checkpoints")
    step, nonfinite = 0, 0
    # Rank 0 chooses (broadcast), every rank verifies; damaged checkpoints fall back loudly (resume_info).
    tag, client, resume_info = checkpoint.resume(engine, root, run.resume, world, seed=run.seed,
                                                 fail_conversion=run.faults.crash_in_conversion)
    accum = engine.gradient_accumulation_steps()  # an elastic resume keeps the saved global batch
    if tag:
        step, nonfinite = client["step"], client.get("nonfinite", 0)
        loader.load_state_dict(client["loader"])
        print0(f"resumed from {os.path.join(root, tag)} at step {step}")
    if is_rank0():
        os.makedirs(run.save_dir, exist_ok=True)
        with open(os.path.join(run.save_dir, "config.json"), "w") as f:
            json.dump(config_dump, f, indent=2, default=str)

    tracker = _Tracker(run)
    batches: Iterable = iter(loader)
    host_counts = getattr(loss_fn, "host_counts", None)
    flops_of = getattr(loss_fn, "flops", None)
    sums: dict[str, torch.Tensor] = {}  # device scalars, read back once per log step
    host_sums: dict[str, float] = {}  # host counts (tokens, samples, FLOPs): never on the device
    poisoned: dict[int, bool] = {}
    overflowed: dict[int, bool] = {}
    stage0: dict = {}
    step_times: list[float] = []
    window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0
    skipped_steps, grad_norm, stop, run_tokens = client.get("skipped_steps", 0) if tag else 0, None, 0, 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    engine.train()
    while step < run.max_steps:
        step_start, done, stop, step_sums = time.perf_counter(), 0, 0, {}
        while done < accum:
            t = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - t
            host = host_counts(batch) if host_counts is not None else {}
            batch = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss, scalars = loss_fn(engine, batch, host) if host_counts is not None else loss_fn(engine, batch)
            if step + 1 in run.faults.nan_at_steps and done == 0 and not poisoned.get(step + 1):
                poisoned[step + 1] = True  # once per listed step: the retry with the next batch is clean
                loss = loss * float("nan")
            if step + 1 in run.faults.inf_grad_at_steps and done == 0 and not overflowed.get(step + 1):
                overflowed[step + 1] = True  # once per listed step, like nan_at_steps
                loss = _InfiniteGrad.apply(loss)
            if run.faults.signal_at_step == step + 1 and done == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
            # One fused reduction per micro-batch: [loss not finite, stop signal] (MAX over ranks), so
            # every rank skips the same micro-batch and stops at the same step. It runs before
            # backward on purpose: a non-finite loss must never reach the gradients.
            flags = torch.stack([(~torch.isfinite(loss.detach())).to(torch.float32),
                                 torch.full((), float(stop_signal["received"]), device=loss.device)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad, stop = flags.tolist()
            stop = int(stop)
            if bad:
                nonfinite += 1
                print0(f"step {step + 1}: non-finite loss, batch skipped ({nonfinite}/{run.max_nonfinite})")
                if nonfinite >= run.max_nonfinite:
                    raise RuntimeError(f"{nonfinite} non-finite losses/skipped steps: stopping (run.max_nonfinite)")
                continue
            engine.backward(loss)
            if zero_stage == 0 and done == accum - 1:
                with _stage0_overflow_guard(engine, stage0):
                    engine.step()
            else:
                engine.step()
            done += 1
            for k, v in scalars.items():
                step_sums[k] = step_sums[k] + v.detach().float() if k in step_sums else v.detach().float()
            host["flops"] = flops_of(host) if flops_of is not None else 0.0
            for k, v in host.items():
                host_sums[k] = host_sums.get(k, 0.0) + float(v)
            run_tokens += host.get("n_tokens", 0) + host.get("n_src", 0)
        if not engine.was_step_applied():
            # DeepSpeed skipped the update (fp16/bf16 overflow): the LR schedule did not move, so neither
            # does our step counter; the grad norm of a skipped step is not logged.
            skipped_steps += 1
            nonfinite += 1
            print0(f"step {step + 1}: optimizer step skipped on overflow ({skipped_steps} so far; "
                   f"{nonfinite}/{run.max_nonfinite})")
            if nonfinite >= run.max_nonfinite:
                raise RuntimeError(f"{nonfinite} non-finite losses/skipped steps: stopping (run.max_nonfinite)")
            if not stop:
                continue
        else:
            step += 1
            window_steps += 1
            for k, v in step_sums.items():  # the losses of a skipped step are not logged
                sums[k] = sums[k] + v if k in sums else v
            step_times.append(time.perf_counter() - step_start)
            norm = stage0["norm"] if zero_stage == 0 else engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
            if not math.isfinite(grad_norm):
                nonfinite += 1
                print0(f"step {step}: non-finite grad norm ({nonfinite}/{run.max_nonfinite})")
                if nonfinite >= run.max_nonfinite:
                    raise RuntimeError(f"{nonfinite} non-finite losses/skipped steps: stopping (run.max_nonfinite)")
        if window_steps and (step % run.log_every == 0 or step == run.max_steps or stop):
            names = sorted(sums)
            host_names = sorted(host_sums)
            packed = torch.cat([torch.stack([sums[k] for k in names]).to(dev),
                                torch.tensor([host_sums[k] for k in host_names], dtype=torch.float32, device=dev)])
            dist.all_reduce(packed)
            values = packed.tolist()
            totals, host_totals = dict(zip(names, values[:len(names)])), dict(zip(host_names, values[len(names):]))
            elapsed = time.perf_counter() - window_start
            denom = world * accum * window_steps
            out = {f"loss/{k}": v / denom for k, v in totals.items()}
            n_tok = host_totals.get("n_tokens", 0.0)
            tflops = host_totals.get("flops", 0.0) / world / elapsed / 1e12
            out.update({
                "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm if grad_norm is not None else float("nan"),
                "loss_scale": float(getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer, "loss_scale", 1.0)) or 1.0),
                "throughput/tokens_per_s": n_tok / elapsed,
                "throughput/samples_per_s": host_totals.get("n_samples", 0.0) / elapsed,
                "throughput/data_wait_share": data_wait / elapsed, "nonfinite_skipped": nonfinite,
                "skipped_steps": skipped_steps,
            })
            if tflops:
                out["throughput/tflops_per_device"] = tflops
                if peak:
                    out["throughput/mfu"] = tflops / peak
            if n_tok and "n_masked" in host_totals:
                out["mask/decoder_ratio"] = host_totals["n_masked"] / n_tok
            if host_totals.get("n_src") and "n_src_masked" in host_totals:
                out["mask/encoder_ratio"] = host_totals["n_src_masked"] / host_totals["n_src"]
            if dev.type == "cuda":
                out["memory/peak_allocated_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
                out["memory/peak_reserved_gb"] = torch.cuda.max_memory_reserved(dev) / 2**30
                torch.cuda.reset_peak_memory_stats(dev)
            tracker.log(step, out, run.max_steps)
            sums, host_sums, window_start, data_wait, window_steps = {}, {}, time.perf_counter(), 0.0, 0
        # A stop signal saves first and skips a due evaluation: Slurm gives ~120 s after USR1.
        if evaluate is not None and not stop and ((run.eval_every and step % run.eval_every == 0)
                                                  or step == run.max_steps):
            engine.eval()
            results = evaluate(full_precision_copy(engine.module, dev), step)
            engine.train()
            tracker.log_eval(step, results)
        if step % run.save_every == 0 or step == run.max_steps or stop:
            client = {"step": step, "nonfinite": nonfinite, "skipped_steps": skipped_steps,
                      "loader": loader.state_dict(), "summary": {
                          "world_size": world, "global_batch": engine.train_batch_size(),
                          "micro_batch": engine.train_micro_batch_size_per_gpu(), "grad_accum": accum}}
            checkpoint.save(engine, root, step, client, model_meta, run.keep_last,
                            fail_midway=run.faults.crash_in_save_at_step == step)
        if run.faults.crash_at_step == step:
            os._exit(17)  # test hook: a kill right after this step
        if stop:
            print0(f"signal {stop} received: checkpoint saved at step {step}, stopping")
            break
    tracker.close()
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)
    median_step = sorted(step_times)[len(step_times) // 2] if step_times else float("nan")
    tokens = torch.tensor([float(run_tokens)], device=dev)
    dist.all_reduce(tokens)
    summary = {"steps": step, "finished": step >= run.max_steps, "nonfinite_skipped": nonfinite,
               "skipped_steps": skipped_steps, "resume_fallbacks": resume_info["fallbacks"],
               "resumed_from": tag, "median_step_seconds": median_step, "steps_this_run": len(step_times),
               "tokens_per_step": tokens.item() / len(step_times) if step_times else None,
               "checkpoint": checkpoint.latest_complete(root), "save_dir": run.save_dir, "run": asdict(run)}
    if is_rank0():
        with open(os.path.join(run.save_dir, "train_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
