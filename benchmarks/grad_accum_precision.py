"""What bf16 gradient accumulation and reduction cost in accuracy, measured through DeepSpeed itself.

    torchrun --nproc_per_node 2 -m benchmarks.grad_accum_precision [--accum 8] [--stage 2]

DeepSpeed's bf16 mode runs the model in bf16; by default it also accumulates the micro-batch
gradients and reduces them across ranks in bf16 (``data_types.grad_accum_dtype`` and
``communication_data_type`` follow the model's dtype unless set). For each setting below this
runs ``--accum`` micro-batches per rank through a real DeepSpeed engine (ZeRO ``--stage``, the
project's bf16 config otherwise), reads the accumulated, reduced gradient at the boundary
(``deepspeed.utils.safe_get_full_grad``, before the optimizer step) and compares it with the float64
reference: the mean over every rank's micro-batches of the gradients of the same bf16-rounded
model computed in float64. Settings:

* ``bf16/bf16``: accumulation and reduction in bf16 (DeepSpeed's default for bf16);
* ``fp32/bf16``: fp32 accumulation, bf16 reduction;
* ``fp32/fp32``: both in fp32 (what the project's bf16 configs set);
* ``config``: the base config file exactly as it is (shows that its setting reaches DeepSpeed:
  the engine's accumulation and communication dtypes are reported for every setting).

Each rank prints nothing; rank 0 prints a line per setting and one JSON object last:
{setting: {"rel_err": ||g - g_ref|| / ||g_ref|| over all parameters, "worst_param_rel_err": ...,
"rel_diff_vs_fp32": the same against the fp32/fp32 setting's gradient (what bf16 sums alone add)}}.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import BartConfig

from janus.model import JanusBart
from janus.objectives import ObjectiveConfig

# accumulation / communication dtypes; "config": the base config's own settings, unchanged.
SETTINGS = {"bf16/bf16": ("bf16", "bf16"), "fp32/bf16": ("fp32", "bf16"), "fp32/fp32": ("fp32", "fp32"),
            "config": (None, None)}


def micro_batches(rank: int, n: int, vocab: int, B: int = 4, S: int = 24, N: int = 24):
    """n padded micro-batches for this rank (different data on every rank and micro-batch)."""
    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(n):
        x = torch.randint(4, vocab - 1, (B, S), generator=g)
        y = torch.randint(4, vocab - 1, (B, N), generator=g)
        y[0, N // 2:] = 1
        out.append((x, torch.ones_like(x), y, torch.rand(B, N, generator=g) < 0.5))
    return out


def make_model(seed: int = 0) -> JanusBart:
    torch.manual_seed(seed)
    config = BartConfig(vocab_size=2048, d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512, max_position_embeddings=64,
                        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    model = JanusBart(config)
    with torch.no_grad():  # trained-like scales (BART's 0.02 init gives near-uniform outputs)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    return model


def reference_grads(model: JanusBart, batches: list, objective: ObjectiveConfig) -> dict[str, torch.Tensor]:
    """float64 gradients of the bf16-rounded model, summed over ``batches``."""
    ref = make_model()
    ref.load_state_dict({k: v.to(torch.bfloat16).double() for k, v in model.state_dict().items()})
    ref = ref.double()
    for b in batches:
        ref(*b, objective=objective).loss.backward()
    return {n: p.grad for n, p in ref.named_parameters()}


def ds_config(base: str, stage: int | None, accum: int, accum_dtype: str | None, comm_dtype: str | None) -> dict:
    with open(base) as f:
        ds = json.load(f)
    if stage is not None:
        ds["zero_optimization"]["stage"] = stage
    ds.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=accum,
              train_batch_size=4 * accum * int(os.environ.get("WORLD_SIZE", 1)))
    if accum_dtype is not None:
        ds["data_types"] = {"grad_accum_dtype": accum_dtype}
        ds["communication_data_type"] = comm_dtype
    return ds


def run_setting(name: str, args, rank: int, world: int, ref: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The accumulated, reduced gradient (float64) of one setting, read before the optimizer step,
    and the dtypes the engine ended up with."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    accum_dtype, comm_dtype = SETTINGS[name]
    model = make_model()
    objective = ObjectiveConfig(preset="janus")
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                      config=ds_config(args.base, args.stage, args.accum, accum_dtype, comm_dtype))
    batches = micro_batches(rank, args.accum, model.config.vocab_size)
    for i, b in enumerate(batches):
        engine.backward(engine(*b, objective=objective).loss)
        if i < len(batches) - 1:
            engine.step()  # counts the micro-batch; the optimizer steps only at the boundary
    assert engine.is_gradient_accumulation_boundary()
    grads = {}
    for n, p in engine.module.named_parameters():
        g = safe_get_full_grad(p)
        if g is not None and n in ref:
            grads[n] = g.double()
    engine.step()
    _, accum_dtype = engine.get_data_types()
    used = {"grad_accum_dtype": str(accum_dtype).replace("torch.", ""),
            "communication_data_type": str(engine.communication_data_type).replace("torch.", ""),
            "optimizer_accum_dtype": str(getattr(engine.optimizer, "gradient_accumulation_dtype", None)).replace(
                "torch.", ""), "stage": engine.zero_optimization_stage()}
    return grads, used


def errors(grads: dict, ref: dict, scale: float) -> tuple[float, float]:
    """(relative error over all parameters, worst parameter's) of ``grads`` against ``ref * scale``."""
    num = den = worst = 0.0
    for n, g in grads.items():
        r = ref[n] * scale
        if float(r.norm()) < 1e-12:
            continue
        d = float((g - r).norm())
        num, den, worst = num + d * d, den + float(r.norm()) ** 2, max(worst, d / float(r.norm()))
    return (num / den) ** 0.5, worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node 2 -m benchmarks.grad_accum_precision",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accum", type=int, default=8, help="micro-batches per rank per optimizer step")
    p.add_argument("--stage", type=int, default=None, choices=(2, 3),
                   help="ZeRO stage (default: the base config's). ZeRO-1 is left out: its bf16 optimizer reduces "
                        "inside the optimizer step, so no reduced gradient can be read before it")
    p.add_argument("--base", default="ds_configs/zero2_bf16.json", help="bf16 DeepSpeed config the settings modify")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = p.parse_args(argv)
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    objective = ObjectiveConfig(preset="janus")
    model = make_model()
    # The reference sums every rank's micro-batches (each rank recomputes them all: same numbers).
    ref = None
    for r in range(world):
        g = reference_grads(model, micro_batches(r, args.accum, model.config.vocab_size), objective)
        ref = g if ref is None else {k: ref[k] + g[k] for k in ref}
    results, grads = {}, {}
    for name in sorted(args.settings, key=lambda n: n != "fp32/fp32"):  # the fp32 setting first
        grads[name], used = run_setting(name, args, rank, world, ref)
        rel, worst = errors(grads[name], ref, 1.0 / (args.accum * world))  # DeepSpeed averages
        results[name] = {"rel_err": rel, "worst_param_rel_err": worst, **used}
        if "fp32/fp32" in grads and name != "fp32/fp32":  # what the low-precision sums alone add
            results[name]["rel_diff_vs_fp32"] = errors(grads[name], grads["fp32/fp32"], 1.0)[0]
        if rank == 0:
            extra = (f", {results[name]['rel_diff_vs_fp32']:.2e} from the fp32/fp32 gradient"
                     if "rel_diff_vs_fp32" in results[name] else "")
            print(f"{name:>10}  accum x{args.accum}, {world} ranks, ZeRO-{used['stage']} (accumulates in "
                  f"{used['grad_accum_dtype']}, reduces in {used['communication_data_type']}): relative error "
                  f"{rel:.2e} (worst parameter {worst:.2e}){extra}", flush=True)
    if rank == 0:
        print(json.dumps({"accum": args.accum, "ranks": world, "base": args.base, **results}))
    dist.barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
