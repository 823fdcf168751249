"""Decoding latency: AR beam search vs NAR mask-predict on the same model, side by side.

Paper protocol: batch size 1, ms/sample. The model has random weights at the chosen dims
(bart-base by default), sources of --source-len tokens, and every output is --target-len
tokens long (AR: EOS is only allowed at the last step; NAR: the length head is biased so its
top candidates are target-len +- 2), so both decoders do exactly the paper's amount of work.
NAR ``T`` = refinement passes after the first (T + 1 passes). Prints one JSON object on the
last line with ms/sample per setting and the speedups ``speedup_T{T}`` = AR / NAR (``_pruned``:
one length candidate after the first pass), for float32 (top-level keys) and bfloat16 (nested).

``ceiling_T{T}`` bounds what any mask-predict implementation could reach against this AR
decoder on this machine: AR time / (the measured encoder-side time + the NAR passes' matmul
FLOPs at the best matmul rate measured here). A goal above the ceiling needs a faster machine
balance (e.g. a GPU, where batch-1 AR is launch-bound), not better NAR code.

    python -m benchmarks.decode_latency                      # bart-base dims, source 512, target 64
    python -m benchmarks.decode_latency --dims small --samples 2

Quality + speed of every decoding option on a trained model (e.g. a finetune or NMT run's
export): ``--model DIR --src FILE --ref FILE --task nmt|xsum|...`` decodes the file with AR
beam 5 and mask-predict at each T, with and without length-candidate pruning (best only, or
within --prune-margin) and with the fairseq length-offset variant, in each of --dtypes, and
reports the task metric, repetition and batch-1 ms/sample for each.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import BartConfig

from benchmarks.train_step import DIMS
from finetune.generate import DTYPES
from janus.decoding import BeamConfig, MaskPredictConfig, beam_search, mask_predict, remask_count
from janus.model import JanusBart


def build(dims: str, target_len: int, source_len: int) -> JanusBart:
    torch.manual_seed(0)
    config = BartConfig(max_position_embeddings=max(1024, source_len + 2), dropout=0.0, **DIMS[dims])
    model = JanusBart(config, length_classes=target_len + 3).eval()
    with torch.no_grad():  # top-5 predicted lengths: target_len, +-1, +-2
        model.length_head.weight.zero_()
        model.length_head.bias.fill_(-100.0)
        for off, bias in ((0, 5.0), (-1, 4.0), (1, 3.0), (-2, 2.0), (2, 1.0)):
            model.length_head.bias[target_len + off] = bias
    return model


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - t) / repeats


def quality_and_speed(args) -> dict:
    from data_pipeline.tokenizer import load_tokenizer
    from finetune.data import read_lines
    from finetune.generate import decode_lines, latency_ms
    from janus.metrics import evaluate

    model = JanusBart.from_bart(args.model).eval()
    tok = load_tokenizer(args.model)
    sources, refs = read_lines(args.src), read_lines(args.ref)
    if args.limit:
        sources, refs = sources[:args.limit], refs[:args.limit]
    probe = sources[:args.samples]
    options = [("ar_beam5", "ar", {})]
    if model.length_head is not None:
        for T in (int(t) for t in args.iterations.split(",")):
            options.append((f"nar_T{T}", "nar", dict(iterations=T)))
            if T:
                options.append((f"nar_T{T}_pruned", "nar", dict(iterations=T, prune_after=1)))
                options.append((f"nar_T{T}_pruned_margin", "nar",
                                dict(iterations=T, prune_after=1, prune_margin=args.prune_margin)))
            options.append((f"nar_T{T}_offsets", "nar", dict(iterations=T, length_offsets=True)))
    result = {"model": args.model, "task": args.task, "n": len(sources), "timed_sources": len(probe)}
    for dtype in args.dtypes.split(","):
        model = model.to(DTYPES[dtype])
        tag = "" if dtype == "float32" else f"_{dtype}"
        for name, mode, nar_kw in options:
            kw = dict(mode=mode, max_source_length=args.source_len, beam=BeamConfig(beam=5, max_len=args.target_len),
                      nar=MaskPredictConfig(max_len=args.target_len, length_candidates=args.candidates, **nar_kw))
            hyps = decode_lines(model, tok, sources, batch_size=32, **kw)
            scores = evaluate(args.task, hyps, refs)
            row = {"metric": scores.get("bleu", scores.get("overall")), "repetition": scores["repetition"],
                   "ms_per_sample": latency_ms(model, tok, probe, 1, **kw)}
            if mode == "nar":  # against AR beam 5 in the same dtype
                row["speedup"] = result["ar_beam5" + tag]["ms_per_sample"] / row["ms_per_sample"]
            result[name + tag] = row
            print(json.dumps({name + tag: row}), flush=True)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", choices=list(DIMS), default="bart-base")
    p.add_argument("--source-len", type=int, default=512)
    p.add_argument("--target-len", type=int, default=64)
    p.add_argument("--samples", type=int, default=2, help="timed sources per setting (batch 1)")
    p.add_argument("--iterations", default="0,1,4,10")
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="dtypes to run; synthetic mode: float32 gives the headline keys, others nest; "
                        "--model mode: keys of other dtypes end in _<dtype>")
    p.add_argument("--model", help="trained model folder (with tokenizer): quality + speed of every option")
    p.add_argument("--src", help="with --model: source file")
    p.add_argument("--ref", help="with --model: reference file")
    p.add_argument("--task", default="nmt", help="with --model: metric family (nmt -> BLEU, else OVERALL)")
    p.add_argument("--limit", type=int, default=0, help="with --model: first N lines only")
    p.add_argument("--prune-margin", type=float, default=0.1,
                   help="with --model: the *_pruned_margin options keep lengths within this mean log-prob of the best")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model:
        if not (args.src and args.ref):
            p.error("--model needs --src and --ref")
        result = quality_and_speed(args)
        print(json.dumps(result))
        return result
    result = {"dims": args.dims, "threads": args.threads, "source_len": args.source_len,
              "target_len": args.target_len, "batch_size": 1, "candidates": args.candidates}
    for dtype in args.dtypes.split(","):
        timings = synthetic_speed(args, DTYPES[dtype])
        if dtype == "float32":  # the headline keys
            result.update(timings)
        else:
            result[dtype] = timings
    print(json.dumps(result))
    return result


def matmul_peak_gflops(dtype: torch.dtype, d: int, ffn: int) -> float:
    """The best matmul rate this machine reaches: the model's FFN shape and a large square-ish
    one, 1024 rows each."""
    rates = []
    for k, n in ((d, ffn), (1024, 4096)):
        x, w = torch.randn(1024, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        rates.append(2 * 1024 * k * n / timed(lambda: x @ w.T, 5) / 1e6)
    return max(rates)


def nar_pass_gflop(config: BartConfig, slots: int, length: int, queries: int, source_len: int) -> float:
    """Matmul GFLOP of one mask-predict decoder pass: ``slots`` target slots (candidates of
    ``length`` tokens) in all layers, ``queries`` of them (the masked ones) in the last layer
    and the output projection."""
    d, f, n = config.d_model, config.decoder_ffn_dim, config.decoder_layers
    per_row = 6 * d * d + 2 * d * f + 2 * d * (length + source_len)  # projections, FFN, attention
    kv = 2 * d * d  # self-attention keys/values: every slot in every layer
    macs = (n - 1) * slots * per_row + slots * kv + queries * (per_row - kv + d * config.vocab_size)
    return 2 * macs / 1e9


def synthetic_speed(args, dtype: torch.dtype) -> dict:
    """ms/sample of AR beam 5 and of NAR at each T on random weights, the AR/NAR ratios, and
    the ``ceiling_T{T}`` ratio no mask-predict implementation could beat on this machine: AR
    time over (measured encoder-side time + the NAR passes' matmul FLOPs at the peak rate)."""
    model = build(args.dims, args.target_len, args.source_len).to(dtype)
    cfg0 = model.config
    x = torch.randint(4, cfg0.vocab_size - 1, (1, args.source_len), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(x)
    beam = BeamConfig(beam=5, max_len=args.target_len, min_len=args.target_len)
    out = {}
    tag = "" if dtype == torch.float32 else f" ({dtype})"
    with torch.no_grad():
        out["encoder_side_ms"] = timed(lambda: (model.cross_kv(enc := model.encode(x, am)),
                                                model.length_logits(enc, am)), args.samples)
        out["matmul_peak_gflops"] = matmul_peak_gflops(dtype, cfg0.d_model, cfg0.decoder_ffn_dim)
        out["ar_beam5_ms"] = timed(lambda: beam_search(model, x, am, beam), args.samples)
        print(json.dumps({"ar_beam5_ms" + tag: out["ar_beam5_ms"]}), flush=True)
        C, N = args.candidates, args.target_len
        for T in (int(t) for t in args.iterations.split(",")):
            for prune in (0, 1):
                if prune and T == 0:
                    continue
                cfg = MaskPredictConfig(iterations=T, length_candidates=C, max_len=N + 2, prune_after=prune)
                suffix = f"T{T}" + ("_pruned" if prune else "")
                out[f"nar_{suffix}_ms"] = timed(lambda: mask_predict(model, x, am, cfg), args.samples)
                out[f"speedup_{suffix}"] = out["ar_beam5_ms"] / out[f"nar_{suffix}_ms"]
                gflop = 0.0
                for p in range(T + 1):
                    rows = C if not prune or p < prune else 1  # candidates decoded in pass p
                    masked = N if p == 0 else int(remask_count(torch.tensor(N), p - 1, T + 1))
                    gflop += nar_pass_gflop(cfg0, rows * N, N + 2, rows * masked, args.source_len)
                floor_ms = out["encoder_side_ms"] + 1000 * gflop / out["matmul_peak_gflops"]
                out[f"ceiling_{suffix}"] = out["ar_beam5_ms"] / floor_ms
                print(json.dumps({f"nar_{suffix}_ms" + tag: out[f"nar_{suffix}_ms"],
                                  f"speedup_{suffix}": out[f"speedup_{suffix}"],
                                  f"ceiling_{suffix}": out[f"ceiling_{suffix}"]}), flush=True)
    return out


if __name__ == "__main__":
    main()
