"""`make demo`: a short JANUS training of a tiny BART on generated data, on CPU.

The target is the source with each token id shifted by one, so every cross-entropy term
falls quickly. The KL terms start near zero (a random model predicts near-uniform
distributions in every pattern), rise while the patterns learn at different speeds, then
fall: they are reported from their peak. Prints one line per logging step and a JSON
summary on the last line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import BartConfig

from janus.masking import span_mask
from janus.model import JanusBart
from janus.objectives import ObjectiveConfig

PAD = 1


def synthetic_batch(gen: torch.Generator, vocab: int, batch: int, max_len: int):
    lengths = torch.randint(max_len // 2, max_len + 1, (batch,), generator=gen)
    src = torch.randint(4, vocab - 2, (batch, max_len), generator=gen)
    valid = torch.arange(max_len) < lengths[:, None]
    src = torch.where(valid, src, PAD)
    tgt = torch.where(valid, src + 1, PAD)
    return src, valid.long(), tgt, span_mask(valid, 0.5, 2.0, generator=gen)


def train_tiny(steps: int = 300, log_every: int = 50, preset: str = "janus", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    vocab = 48
    config = BartConfig(vocab_size=vocab, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
    model = JanusBart(config)
    objective = ObjectiveConfig.from_preset(preset)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    history, t0 = [], time.time()
    for step in range(1, steps + 1):
        batch = synthetic_batch(gen, vocab, 32, 16)
        losses = model(*batch, objective=objective).losses
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        if step == 1 or step % log_every == 0:
            row = {k: round(float(v.detach()), 4) for k, v in losses.items() if not k.startswith("n_")}
            history.append({"step": step, **row})
            print(f"step {step:4d}  " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    first, last = history[0], history[-1]
    start = {k: (max(h[k] for h in history) if k.startswith("kl_") else first[k]) for k in first if k != "step"}
    return {"preset": preset, "steps": steps, "seconds": round(time.time() - t0, 1), "start": start,
            "last": last, "fell": {k: last[k] < v for k, v in start.items()}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--preset", default="janus")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    summary = train_tiny(args.steps, preset=args.preset)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
