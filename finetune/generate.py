"""Decode a source file with a finetuned model: AR beam search, NAR mask-predict, or speculative.

    python -m finetune.generate --model runs/xsum-ar/best --src test.src --out test.hyp --mode ar --beam 5
    python -m finetune.generate --model runs/xsum-nar/best --src test.src --out test.hyp --mode nar --iterations 4
    python -m finetune.generate --model runs/xsum-janus/best --src test.src --out test.hyp --mode spec --window 32
    python -m finetune.generate ... --latency        # ms/sample at batch 1 and at --batch-size
    python -m finetune.generate ... --device cuda    # default: cuda when available, else cpu

NAR ``--iterations T`` = T refinement passes after the first parallel pass (T + 1 decoder
passes; T = 0 is a single pass). ``--mode spec`` is self-speculative decoding
(``janus.speculative``): the model's NAR pattern drafts, its AR query stream verifies many tokens
per pass; the output is token-identical to greedy AR decoding (``--mode ar --beam 1``) unless
``--relaxed-topk`` is set. Every field of the decoding configs (``BeamConfig``,
``MaskPredictConfig``, ``SpecConfig``) is a flag, generated from the dataclasses (``--help``);
a flag shared by several of them (``--max-len``) sets all. Output: one detokenised line per
source line. The last line printed is a JSON summary (counts, seconds, ms/sample, the config
used, and for ``spec`` the decoder passes per token, accepted tokens per verification and the
share of sources done in one verification).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from data_pipeline.collate import pad_batch
from data_pipeline.tokenizer import load_tokenizer
from finetune.data import read_lines
from janus.config import add_dataclass_flags, dataclass_from_flags
from janus.decoding import BeamConfig, MaskPredictConfig, beam_search, mask_predict
from janus.model import JanusBart
from janus.speculative import SpecConfig, SpecGuard, combine_stats, speculative_decode

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("ar", "nar", "spec")
CONFIGS = {"ar": BeamConfig, "nar": MaskPredictConfig, "spec": SpecConfig}
CLI_DEFAULTS = {MaskPredictConfig: {"iterations": 4}}  # this command's defaults where they differ from the dataclass


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device) -> None:
    """Wait for queued GPU work, so that host timers measure it (no-op off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_lines(model: JanusBart, tokenizer, sources: list[str], *, mode: str, batch_size: int,
                 max_source_length: int, beam: BeamConfig | None = None, nar: MaskPredictConfig | None = None,
                 spec: SpecConfig | None = None, stats: list | None = None, show_progress: bool = False,
                 guard: SpecGuard | None = None) -> list[str]:
    """Detokenised outputs for ``sources``, batched (sorted by length for less padding), on the
    model's device. ``mode`` ar | nar | spec uses ``beam`` / ``nar`` / ``spec`` (defaults when None);
    with ``stats`` (a list), spec mode appends each batch's statistics (``combine_stats`` them).
    Spec mode keeps one adaptive-guard state (``guard``, a new one when None) over all batches."""
    from tqdm import tqdm

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}: must be an integer >= 1")
    beam, nar, spec = beam or BeamConfig(), nar or MaskPredictConfig(), spec or SpecConfig()
    if mode == "spec" and guard is None:
        guard = SpecGuard(spec)
    dev = next(model.parameters()).device
    max_source_length = min(max_source_length, model.config.max_position_embeddings)
    enc = tokenizer(sources, add_special_tokens=True, truncation=True, max_length=max_source_length)["input_ids"]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    outputs: list[str] = [""] * len(enc)
    for start in tqdm(range(0, len(order), batch_size), desc="decoding", disable=not show_progress):
        idx = order[start:start + batch_size]
        padded, _ = pad_batch([np.asarray(enc[i], dtype=np.int64) for i in idx], tokenizer.pad_token_id, np.int64)
        ids = torch.from_numpy(padded).to(dev)  # built on the host, copied once
        am = ids.ne(tokenizer.pad_token_id).long()
        if mode == "ar":
            tokens = beam_search(model, ids, am, beam)[0]
        elif mode == "nar":
            tokens = mask_predict(model, ids, am, nar)[0]
        else:
            tokens, _, st = speculative_decode(model, ids, am, spec, guard=guard)
            if stats is not None:
                stats.append(st)
        texts = tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        for r, text in enumerate(texts):
            outputs[idx[r]] = " ".join(text.split())
    return outputs


def latency_ms(model: JanusBart, tokenizer, sources: list[str], batch_size: int, **kw) -> float:
    """ms/sample. Batch 1 (the paper's protocol): the median over sources, robust to machine
    noise; larger batches: total time / number of sources. GPU work is synchronised before each
    timer reads. Speculative decoding keeps one guard state over the sources, as over a file."""
    dev = next(model.parameters()).device
    if kw.get("mode") == "spec" and kw.get("guard") is None:
        kw = {**kw, "guard": SpecGuard(kw.get("spec") or SpecConfig())}
    if batch_size == 1:
        times = []
        for src in sources:
            synchronize(dev)
            t = time.perf_counter()
            decode_lines(model, tokenizer, [src], batch_size=1, **kw)
            synchronize(dev)
            times.append(time.perf_counter() - t)
        return 1000 * sorted(times)[len(times) // 2]
    synchronize(dev)
    t = time.perf_counter()
    decode_lines(model, tokenizer, sources, batch_size=batch_size, **kw)
    synchronize(dev)
    return 1000 * (time.perf_counter() - t) / len(sources)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder with tokenizer (e.g. a finetune run's best/)")
    p.add_argument("--src", required=True)
    p.add_argument("--out", help="hypotheses file (default: print)")
    p.add_argument("--mode", choices=MODES, required=True,
                   help="ar: beam search; nar: mask-predict; spec: self-speculative (= greedy AR output)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-source-length", type=int, default=512)
    p.add_argument("--latency", action="store_true", help="also time batch 1 and --batch-size (ms/sample)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="weights and activations while decoding (log-softmax stays float32); bfloat16 is "
                        "about 2.4x faster on CPUs with AVX512-BF16/AMX and on A100/H100")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    titles = {BeamConfig: "AR beam search (--mode ar)", MaskPredictConfig: "NAR mask-predict (--mode nar)",
              SpecConfig: "self-speculative decoding (--mode spec)"}
    for cls, title in titles.items():
        add_dataclass_flags(p, cls, group=p.add_argument_group(title), defaults=CLI_DEFAULTS.get(cls))
    return p


def decoding_config(mode: str, args: argparse.Namespace):
    """The config object of ``mode`` from the command line (the other modes' flags are ignored)."""
    return dataclass_from_flags(CONFIGS[mode], args)


def main(argv=None) -> dict:
    p = build_parser()
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: must be an integer >= 1")
    try:
        cfg = decoding_config(args.mode, args)
    except ValueError as e:
        p.error(str(e))
    device = torch.device(args.device or default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = JanusBart.from_bart(args.model).eval().to(device=device, dtype=DTYPES[args.dtype])
    if args.mode == "nar" and model.length_head is None:
        p.error(f"{args.model} has no length head: it was not finetuned in NAR or JANUS mode")
    tokenizer = load_tokenizer(args.model)
    sources = read_lines(args.src)
    stats: list = []
    kw = dict(mode=args.mode, max_source_length=args.max_source_length, **{
        {"ar": "beam", "nar": "nar", "spec": "spec"}[args.mode]: cfg})
    synchronize(device)
    t = time.perf_counter()
    guard = SpecGuard(cfg) if args.mode == "spec" else None
    hyps = decode_lines(model, tokenizer, sources, batch_size=args.batch_size, show_progress=True, stats=stats,
                        guard=guard, **kw)
    synchronize(device)
    seconds = time.perf_counter() - t
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(hyps) + "\n")
    else:
        print("\n".join(hyps))
    summary = {"n": len(hyps), "mode": args.mode, "dtype": args.dtype, "device": str(device),
               "seconds": round(seconds, 3), "ms_per_sample": 1000 * seconds / len(hyps),
               "batch_size": args.batch_size, "config": dataclasses.asdict(cfg)}
    if args.mode == "nar":
        summary["iterations"] = cfg.iterations
    if args.mode == "spec":
        summary["speculative"] = {**combine_stats(stats), **(guard.state() if cfg.adaptive else {})}
    if args.latency:
        probe = sources[: min(len(sources), 32)]
        summary["latency_ms_batch1"] = latency_ms(model, tokenizer, probe, 1, **kw)
        summary[f"latency_ms_batch{args.batch_size}"] = latency_ms(model, tokenizer, probe, args.batch_size, **kw)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
