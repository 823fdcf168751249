"""Training-step cost of the JANUS objective vs plain HF BART, side by side in one run.

Both models get the same batch (source and target blocks of ``--seq`` tokens), dims,
threads and optimizer (AdamW); a step is forward + backward + optimizer step. Steps of
the two models are interleaved so machine noise hits both alike. Prints one JSON object
on the last line; ``janus_over_bart`` is the key figure (at bart-base dims).

    python -m benchmarks.train_step                 # small + bart-base dims
    python -m benchmarks.train_step --dims small --steps 3
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import BartConfig, BartForConditionalGeneration

from janus.masking import span_mask
from janus.model import JanusBart
from janus.objectives import ObjectiveConfig

DIMS = {
    "small": dict(d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024, vocab_size=8192),
    "bart-base": dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                      decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, vocab_size=50265),
}


def make_batch(vocab: int, batch: int, seq: int, ratio: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab - 1, (batch, seq), generator=g)
    labels = torch.randint(4, vocab - 1, (batch, seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    decoder_mask = span_mask(labels.ne(1), ratio, mean_span=3.0, generator=g)
    return input_ids, attention_mask, labels, decoder_mask


def bench(dims: str, batch: int, seq: int, steps: int, preset: str, ratio: float) -> dict:
    config = BartConfig(max_position_embeddings=max(1024, seq + 2), **DIMS[dims])
    torch.manual_seed(0)
    hf = BartForConditionalGeneration(config).train()
    janus = JanusBart(config).train()
    x, am, y, dm = make_batch(config.vocab_size, batch, seq, ratio)
    objective = ObjectiveConfig.from_preset(preset)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    opt_j = torch.optim.AdamW(janus.parameters(), lr=1e-5)

    def step_hf():
        loss = hf(input_ids=x, attention_mask=am, labels=y).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    def step_janus():
        loss = janus(x, am, y, dm, objective=objective).loss
        loss.backward()
        opt_j.step()
        opt_j.zero_grad(set_to_none=True)

    times = {"bart": [], "janus": []}
    step_hf(), step_janus()  # warm-up (allocator, optimizer state)
    for _ in range(steps):
        for name, fn in (("bart", step_hf), ("janus", step_janus)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    tokens = batch * seq
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {
        "dims": dims, "batch": batch, "seq": seq, "preset": preset, "decoder_mask_ratio": float(dm.float().mean()),
        "bart_step_s": med["bart"], "janus_step_s": med["janus"],
        "bart_tokens_per_s": tokens / med["bart"], "janus_tokens_per_s": tokens / med["janus"],
        "janus_over_bart": med["janus"] / med["bart"], "steps": steps,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", choices=[*DIMS, "all"], default="all")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="measured steps per model (median reported)")
    p.add_argument("--preset", default="janus")
    p.add_argument("--ratio", type=float, default=0.5, help="decoder mask ratio")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for dims in (DIMS if args.dims == "all" else [args.dims]):
        results[dims] = bench(dims, args.batch, args.seq, args.steps, args.preset, args.ratio)
        print(json.dumps(results[dims]), flush=True)
    summary = {"threads": args.threads, **{f"{d}": r for d, r in results.items()}}
    if "bart-base" in results:
        summary["janus_over_bart"] = results["bart-base"]["janus_over_bart"]
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
