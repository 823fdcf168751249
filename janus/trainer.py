"""The one DeepSpeed training loop shared by pretraining and finetuning.

An entry point builds a model, a resumable batch iterator and a ``loss_fn``; ``train``
does the rest, top to bottom: DeepSpeed config validation, engine set-up, resume, the
step loop with gradient accumulation and non-finite guards, TensorBoard/console/JSONL
logging, and checkpoints that count only when complete; around it the operations of a long
run: stop signals that save (``janus.stop``), the step watchdog (``janus.watchdog``), the
loss-spike guard (``janus.spikes``), profiler traces and memory snapshots (``janus.profiling``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from janus import checkpoint, stop
from janus.distributed import broadcast_object, device, is_rank0, print0
from janus.profiling import MemorySnapshot, StepProfiler, parse_steps
from janus.spikes import SpikeGuard
from janus.steps import accum_for, full_precision_copy
from janus.watchdog import StepWatchdog


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
    spike_at_steps: list[int] = field(default_factory=list, metadata={
        "help": "testing: multiply rank 0's loss by 100 at these steps (a loss spike)"})
    hang_at_step: int = field(default=0, metadata={"help": "testing: rank faults.hang_rank stops responding in this step"})
    hang_rank: int = field(default=0, metadata={"help": "testing: the rank that hangs (faults.hang_at_step)"})
    step_sleep_seconds: float = field(default=0.0, metadata={"help": "testing: sleep this long in every step (slow steps)"})
    save_sleep_seconds: float = field(default=0.0, metadata={
        "help": "testing: every checkpoint save takes this much longer (a large model's save)"})


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
    hang_timeout_minutes: float = field(default=10.0, metadata={
        "help": "step watchdog: when a training step has not finished in this many minutes, every rank writes the "
                "Python stacks of all its threads to <save_dir>/hangs/<run start>/rank<R>.txt (and NCCL's flight "
                "recorder where enabled) and the job exits with code 75 to be requeued; start-up, evaluation and "
                "saving are bounded by dist_timeout_minutes instead (0 = off)"})
    spike_guard: bool = field(default=False, metadata={
        "help": "skip, on every rank and before backward, a micro-batch whose loss exceeds the mean of the last "
                "spike_window accepted ones by more than spike_sigma standard deviations; counted as spike_skipped "
                "and in the max_nonfinite total"})
    spike_sigma: float = field(default=6.0, metadata={"help": "loss-spike guard: standard deviations above the mean"})
    spike_window: int = field(default=128, metadata={
        "help": "loss-spike guard: accepted micro-batch losses in the window; nothing is skipped before it is full"})
    profile_steps: str = field(default="", metadata={
        "help": "'A-B': torch.profiler traces of steps A..B on every rank in <save_dir>/profile (TensorBoard plugin "
                "format and a Chrome trace; kernels, shapes and memory on CUDA)"})
    memory_snapshot: int | None = field(default=None, metadata={
        "help": "CUDA: record the allocator's history and dump a snapshot to <save_dir>/memory after step N, and "
                "on an out-of-memory error (0: on OOM only; none: off)"})
    peak_tflops: float | None = field(default=None, metadata={
        "help": "peak dense TFLOP/s of one device for throughput/mfu (default: from the GPU model and precision)"})
    faults: FaultInjectionConfig = field(default_factory=lambda: FaultInjectionConfig())

    def __post_init__(self):
        parse_steps(self.profile_steps)  # a clear error now, not at step A
        if self.hang_timeout_minutes < 0:
            raise ValueError(f"run.hang_timeout_minutes must be >= 0 (0 = off), got {self.hang_timeout_minutes}")
        if self.spike_sigma <= 0 or self.spike_window < 2:
            raise ValueError(f"run.spike_sigma must be > 0 and run.spike_window >= 2, got {self.spike_sigma} and "
                             f"{self.spike_window}")
        if self.memory_snapshot is not None and self.memory_snapshot < 0:
            raise ValueError(f"run.memory_snapshot must be a step >= 1, 0 (on OOM only) or none, got {self.memory_snapshot}")


def peak_tflops_for_device(dev: torch.device, prec: str) -> float | None:
    """Dense peak TFLOP/s of this GPU at this precision, if known (fp32 runs: the TF32 peak only
    while TF32 matmuls are allowed, else plain fp32's)."""
    if dev.type != "cuda":
        return None
    from janus.flops import fp32_matmul_kind, peak_tflops_for

    return peak_tflops_for(torch.cuda.get_device_name(dev), fp32_matmul_kind() if prec == "fp32" else prec)


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
    print0(precision_summary(engine))
    return engine, scheduler


def precision_summary(engine) -> str:
    """What the engine computes, accumulates and reduces gradients in, as it resolved the config."""
    def name(dtype) -> str:
        return str(dtype).replace("torch.", "")

    model_dtype, accum_dtype = engine.get_data_types()
    text = (f"precision: weights {name(model_dtype)} (no autocast), gradients accumulated in {name(accum_dtype)} and "
            f"reduced in {name(engine.communication_data_type)}, ZeRO stage {engine.zero_optimization_stage()}")
    return text + (", dynamic loss scale" if engine.fp16_enabled() and engine.dynamic_loss_scale() else "")


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


def _hang(rank: int, step: int) -> None:
    """Fault injection: this rank stops responding (the step watchdog must end the job)."""
    print(f"rank {rank}: test hook: hanging in step {step} at {time.time():.3f}", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


class _Loop:
    """The training loop in phases: set-up (``__init__``: engine, resume, guards), one optimizer step
    (``train_step`` / ``micro_batch``), the work after a step (``after_step``: log, evaluate, save,
    stop) and the summary (``finish``)."""

    def __init__(self, run: RunConfig, optim: OptimConfig, model: torch.nn.Module, loader, loss_fn: Callable,
                 model_meta: dict, config_dump: dict, evaluate: Callable | None):
        self.run, self.loader, self.loss_fn, self.model_meta, self.evaluate = run, loader, loss_fn, model_meta, evaluate
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        ds_config = resolve_ds_config(run, optim, self.world)
        torch.manual_seed(run.seed + self.rank)
        self.engine, self.scheduler = build_engine(model, ds_config, optim, run.max_steps)
        self.dev = device()
        self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.peak = run.peak_tflops or peak_tflops_for_device(self.dev, precision(ds_config))
        self.root = os.path.join(run.save_dir, "checkpoints")
        # Rank 0 chooses (broadcast), every rank verifies; damaged checkpoints fall back loudly (resume_info).
        self.tag, client, self.resume_info = checkpoint.resume(self.engine, self.root, run.resume, self.world,
                                                               seed=run.seed, fail_conversion=run.faults.crash_in_conversion)
        self.accum = self.engine.gradient_accumulation_steps()  # an elastic resume keeps the saved global batch
        self.step, self.nonfinite = client.get("step", 0), client.get("nonfinite", 0)
        self.skipped_steps, self.spike_skipped = client.get("skipped_steps", 0), client.get("spike_skipped", 0)
        if self.tag:
            loader.load_state_dict(client["loader"])
            print0(f"resumed from {os.path.join(self.root, self.tag)} at step {self.step}")
        self.spikes = SpikeGuard(run.spike_sigma, run.spike_window, client.get("spike_window")) if run.spike_guard else None
        if is_rank0():
            os.makedirs(run.save_dir, exist_ok=True)
            with open(os.path.join(run.save_dir, "config.json"), "w") as f:
                json.dump(config_dump, f, indent=2, default=str)
        self.tracker = _Tracker(run)
        self.host_counts = getattr(loss_fn, "host_counts", None)
        self.flops_of = getattr(loss_fn, "flops", None)
        self.sums: dict[str, torch.Tensor] = {}  # device scalars, read back once per log step
        self.host_sums: dict[str, float] = {}  # host counts (tokens, samples, FLOPs): never on the device
        self.fired: set[tuple[str, int]] = set()  # fault hooks that already fired (once per listed step)
        self.stage0: dict = {}
        self.step_times: list[float] = []
        self.window_start, self.data_wait, self.window_steps = time.perf_counter(), 0.0, 0
        self.grad_norm, self.run_tokens = None, 0
        run_tag = broadcast_object(time.strftime("%Y%m%d-%H%M%S"))  # one hangs/ folder per run, the same on every rank
        self.watchdog = (StepWatchdog(run.hang_timeout_minutes * 60, run.save_dir, run_tag, self.rank, self.world)
                         if run.hang_timeout_minutes > 0 else None)
        self.profiler = StepProfiler(parse_steps(run.profile_steps), run.save_dir, self.rank, self.engine.module, self.dev)
        self.memory = MemorySnapshot(run.memory_snapshot, run.save_dir, self.rank, self.dev)

    # ------------------------------------------------------------------ the loop
    def loop(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        self.engine.train()
        batches: Iterable = iter(self.loader)
        started = False
        while self.step < self.run.max_steps:
            if self.watchdog is not None and started:  # the first step includes start-up (workers, NCCL set-up)
                self.watchdog.arm(self.step + 1)
            started = True
            self.profiler.begin(self.step + 1)
            applied, stop_signal = self.train_step(batches)
            if (applied or stop_signal) and self.after_step(stop_signal):
                break

    def train_step(self, batches) -> tuple[bool, int]:
        """One optimizer step: ``accum`` accepted micro-batches. Returns (applied, stop signal)."""
        step_start, done, stop_signal, step_sums = time.perf_counter(), 0, 0, {}
        while done < self.accum:
            accepted, stop_signal, scalars, host = self.micro_batch(batches, done)
            if not accepted:
                continue
            done += 1
            for k, v in scalars.items():
                step_sums[k] = step_sums[k] + v.detach().float() if k in step_sums else v.detach().float()
            host["flops"] = self.flops_of(host) if self.flops_of is not None else 0.0
            for k, v in host.items():
                self.host_sums[k] = self.host_sums.get(k, 0.0) + float(v)
            self.run_tokens += host.get("n_tokens", 0) + host.get("n_src", 0)
        if not self.engine.was_step_applied():
            # DeepSpeed skipped the update (fp16/bf16 overflow): the LR schedule did not move, so neither
            # does our step counter; the grad norm of a skipped step is not logged.
            self.skipped_steps += 1
            self._count_skip(f"step {self.step + 1}: optimizer step skipped on overflow ({self.skipped_steps} so far")
            return False, stop_signal
        self.step += 1
        self.window_steps += 1
        for k, v in step_sums.items():  # the losses of a skipped step are not logged
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.step_times.append(time.perf_counter() - step_start)
        norm = self.stage0["norm"] if self.zero_stage == 0 else self.engine.get_global_grad_norm()
        self.grad_norm = float(norm) if norm is not None else float("nan")
        if not math.isfinite(self.grad_norm):
            self._count_skip(f"step {self.step}: non-finite grad norm (")
        return True, stop_signal

    def micro_batch(self, batches, done: int):
        """Forward one micro-batch, agree with the other ranks, then backward + DeepSpeed step unless it is
        skipped. Returns (accepted, stop signal, loss scalars, host counts)."""
        with self.profiler.range("data wait"):
            t = time.perf_counter()
            batch = next(batches)
            self.data_wait += time.perf_counter() - t
        host = self.host_counts(batch) if self.host_counts is not None else {}
        batch = {k: v.to(self.dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss, scalars = self.loss_fn(self.engine, batch, host) if self.host_counts is not None else self.loss_fn(self.engine, batch)
        loss = self._faults(loss, done)
        # One fused reduction per micro-batch, MAX over ranks: [loss not finite, stop signal, the loss], so
        # every rank skips the same micro-batch, stops at the same step and sees the same largest loss for
        # the spike guard. It runs before backward on purpose: a non-finite or spiking loss must never
        # reach the gradients.
        value = loss.detach().float()
        finite = torch.isfinite(value)
        flags = torch.stack([(~finite).to(torch.float32), torch.full((), float(stop.requested()), device=loss.device),
                             torch.where(finite, value, torch.zeros_like(value))])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, stop_signal, top = flags.tolist()
        if bad:
            self._count_skip(f"step {self.step + 1}: non-finite loss, batch skipped (")
            return False, int(stop_signal), None, None
        if self.spikes is not None:
            limit = self.spikes.threshold()
            if limit is not None and top > limit:
                self.spike_skipped += 1
                self._count_skip(f"step {self.step + 1}: loss spike {top:.4g} > {limit:.4g} (mean + {self.run.spike_sigma:g} "
                                 f"sigma of the last {self.run.spike_window}), micro-batch skipped (spike_skipped "
                                 f"{self.spike_skipped}; ")
                return False, int(stop_signal), None, None
            self.spikes.observe(top)
        with self.profiler.range("backward"):
            self.engine.backward(loss)
        with self.profiler.range("optimizer step"):
            if self.zero_stage == 0 and done == self.accum - 1:
                with _stage0_overflow_guard(self.engine, self.stage0):
                    self.engine.step()
            else:
                self.engine.step()
        return True, int(stop_signal), scalars, host

    def _count_skip(self, what: str) -> None:
        """One more skip of any kind; the run stops after run.max_nonfinite of them."""
        self.nonfinite += 1
        print0(f"{what}{self.nonfinite}/{self.run.max_nonfinite})")
        if self.nonfinite >= self.run.max_nonfinite:
            raise RuntimeError(f"{self.nonfinite} non-finite losses/skipped steps: stopping (run.max_nonfinite)")

    def _faults(self, loss: torch.Tensor, done: int) -> torch.Tensor:
        """Test hooks (run.faults); each listed step fires once, on the step's first micro-batch."""
        f, nxt = self.run.faults, self.step + 1
        if done:
            return loss

        def once(kind: str, steps) -> bool:
            if nxt not in steps or (kind, nxt) in self.fired:
                return False
            self.fired.add((kind, nxt))
            return True

        if once("nan", f.nan_at_steps):  # the retry with the next batch is clean
            loss = loss * float("nan")
        if once("inf", f.inf_grad_at_steps):
            loss = _InfiniteGrad.apply(loss)
        if once("spike", f.spike_at_steps) and self.rank == 0:
            loss = loss * 100.0
        if f.signal_at_step == nxt:
            os.kill(os.getpid(), signal.SIGUSR1)
        if f.step_sleep_seconds:
            time.sleep(f.step_sleep_seconds)
        if f.hang_at_step == nxt and f.hang_rank == self.rank:
            _hang(self.rank, nxt)
        return loss

    # ------------------------------------------------------------------ after a step
    def after_step(self, stop_signal: int) -> bool:
        """Log, evaluate, save as due; True when training stops here (a stop signal: saved first)."""
        run, step = self.run, self.step
        if self.window_steps and (step % run.log_every == 0 or step == run.max_steps or stop_signal):
            with self.profiler.range("logging"):
                self.log()
        self.profiler.end(step)
        self.memory.after_step(step)
        # A stop signal saves first and skips a due evaluation: Slurm gives ~120 s after USR1, KillWait after TERM.
        if self.evaluate is not None and not stop_signal and ((run.eval_every and step % run.eval_every == 0)
                                                              or step == run.max_steps):
            self._disarm()
            self.engine.eval()
            results = self.evaluate(full_precision_copy(self.engine.module, self.dev), step)
            self.engine.train()
            self.tracker.log_eval(step, results)
        if step % run.save_every == 0 or step == run.max_steps or stop_signal:
            self._disarm()
            self.save()
        if run.faults.crash_at_step == step:
            os._exit(17)  # test hook: a kill right after this step
        if stop_signal:
            since = stop.received_at()
            after = f" ({time.time() - since:.1f} s after the signal)" if since else ""
            print0(f"signal {stop_signal} received: checkpoint saved at step {step}, stopping{after}")
        return bool(stop_signal)

    def _disarm(self) -> None:
        if self.watchdog is not None:  # evaluation and saving are bounded by run.dist_timeout_minutes instead
            self.watchdog.disarm()

    def log(self) -> None:
        """Reduce the window's sums over ranks (one all-reduce) and write one log record."""
        names, host_names = sorted(self.sums), sorted(self.host_sums)
        packed = torch.cat([torch.stack([self.sums[k] for k in names]).to(self.dev),
                            torch.tensor([self.host_sums[k] for k in host_names], dtype=torch.float32, device=self.dev)])
        dist.all_reduce(packed)
        values = packed.tolist()
        totals, host_totals = dict(zip(names, values[:len(names)])), dict(zip(host_names, values[len(names):]))
        elapsed = time.perf_counter() - self.window_start
        out = {f"loss/{k}": v / (self.world * self.accum * self.window_steps) for k, v in totals.items()}
        n_tok = host_totals.get("n_tokens", 0.0)
        tflops = host_totals.get("flops", 0.0) / self.world / elapsed / 1e12
        opt = self.engine.optimizer
        out.update({
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": self.grad_norm if self.grad_norm is not None else float("nan"),
            "loss_scale": float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", 1.0)) or 1.0),
            "throughput/tokens_per_s": n_tok / elapsed,
            "throughput/samples_per_s": host_totals.get("n_samples", 0.0) / elapsed,
            "throughput/data_wait_share": self.data_wait / elapsed, "nonfinite_skipped": self.nonfinite,
            "skipped_steps": self.skipped_steps, "spike_skipped": self.spike_skipped,
        })
        if tflops:
            out["throughput/tflops_per_device"] = tflops
            if self.peak:
                out["throughput/mfu"] = tflops / self.peak
        if n_tok and "n_masked" in host_totals:
            out["mask/decoder_ratio"] = host_totals["n_masked"] / n_tok
        if host_totals.get("n_src") and "n_src_masked" in host_totals:
            out["mask/encoder_ratio"] = host_totals["n_src_masked"] / host_totals["n_src"]
        if self.dev.type == "cuda":
            out["memory/peak_allocated_gb"] = torch.cuda.max_memory_allocated(self.dev) / 2**30
            out["memory/peak_reserved_gb"] = torch.cuda.max_memory_reserved(self.dev) / 2**30
            torch.cuda.reset_peak_memory_stats(self.dev)
        self.tracker.log(self.step, out, self.run.max_steps)
        self.sums, self.host_sums, self.window_start, self.data_wait, self.window_steps = {}, {}, time.perf_counter(), 0.0, 0

    def save(self) -> None:
        engine = self.engine
        client = {"step": self.step, "nonfinite": self.nonfinite, "skipped_steps": self.skipped_steps,
                  "spike_skipped": self.spike_skipped, "loader": self.loader.state_dict(), "summary": {
                      "world_size": self.world, "global_batch": engine.train_batch_size(),
                      "micro_batch": engine.train_micro_batch_size_per_gpu(), "grad_accum": self.accum}}
        if self.spikes is not None:
            client["spike_window"] = self.spikes.state()
        if self.run.faults.save_sleep_seconds:
            time.sleep(self.run.faults.save_sleep_seconds)
        checkpoint.save(engine, self.root, self.step, client, self.model_meta, self.run.keep_last,
                        fail_midway=self.run.faults.crash_in_save_at_step == self.step)

    # ------------------------------------------------------------------ the end
    def close(self) -> None:
        """Stop the helpers (also after an error): watchdog, profiler (writes its traces), memory history, logs."""
        if self.watchdog is not None:
            self.watchdog.close()
        self.profiler.close()
        self.memory.close()
        self.tracker.close()

    def finish(self) -> dict:
        run, times = self.run, self.step_times
        median_step = sorted(times)[len(times) // 2] if times else float("nan")
        tokens = torch.tensor([float(self.run_tokens)], device=self.dev)
        dist.all_reduce(tokens)
        summary = {"steps": self.step, "finished": self.step >= run.max_steps, "nonfinite_skipped": self.nonfinite,
                   "skipped_steps": self.skipped_steps, "spike_skipped": self.spike_skipped,
                   "resume_fallbacks": self.resume_info["fallbacks"], "resumed_from": self.tag,
                   "median_step_seconds": median_step, "steps_this_run": len(times),
                   "tokens_per_step": tokens.item() / len(times) if times else None,
                   "checkpoint": checkpoint.latest_complete(self.root), "save_dir": run.save_dir, "run": asdict(run)}
        if is_rank0():
            with open(os.path.join(run.save_dir, "train_summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return summary


def train(run: RunConfig, optim: OptimConfig, model: torch.nn.Module, loader, loss_fn: Callable,
          model_meta: dict, config_dump: dict, evaluate: Callable[[torch.nn.Module, int], dict] | None = None) -> dict:
    """Run the loop. ``loader`` iterates batches (dicts of tensors) forever and has
    ``state_dict``/``load_state_dict``; ``loss_fn(engine, batch) -> (loss, {name: scalar tensor})``.
    ``evaluate(module, step) -> {name: float}`` (collective: every rank calls it) runs every
    ``run.eval_every`` steps and at the end; its numbers go to TensorBoard under ``eval/``.
    SIGUSR1 / SIGTERM (Slurm's stops) save a checkpoint at the next step boundary and end the run
    (``janus.stop``). Returns a summary dict (also written to ``<save_dir>/train_summary.json``)."""
    previous = stop.install()
    loop = _Loop(run, optim, model, loader, loss_fn, model_meta, config_dump, evaluate)
    try:
        loop.loop()
    except torch.cuda.OutOfMemoryError:
        loop.memory.dump("oom")
        raise
    finally:
        loop.close()
        stop.restore(previous)
        stop.clear()
    return loop.finish()
