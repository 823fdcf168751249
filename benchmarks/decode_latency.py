"""Decoding latency: AR beam search vs NAR mask-predict on the same model, side by side.

Paper protocol: batch size 1, ms/sample. The model has random weights at the chosen dims
(bart-base by default), sources of --source-len tokens, and every output is --target-len
tokens long (AR: EOS is only allowed at the last step; NAR: the length head is biased so its
top candidates are target-len +- 2), so both decoders do exactly the paper's amount of work.
NAR ``T`` = refinement passes after the first (T + 1 passes). Prints one JSON object on the
last line with ms/sample per setting and the speedups ``speedup_T{T}`` = AR / NAR (``_pruned``:
one length candidate after the first pass), for float32 (top-level keys) and bfloat16 (nested).

Self-speculative decoding (``janus.speculative``) runs beside AR greedy on the same model:
``spec_ms``, ``ar_greedy_ms``, ``spec_speedup_vs_greedy``, ``spec_exact`` (token-identical to
greedy) and its statistics; ``spec_failing_ms`` times it with a drafter whose every token is
rejected (the adaptive guard's worst case; ``spec_failing_no_guard_ms`` without the guard), and
``spec_guard_overhead`` = spec_failing / greedy - 1.

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
reports the task metric, repetition and batch-1 ms/sample for each; AR greedy and speculative
decoding too (with the share of outputs identical to greedy, the speculative statistics and where
its batch-1 time goes: encoder, drafting, verification, exact replays). ``--only`` picks options.
``--device`` (default: cuda when available, else cpu); CUDA is synchronised around timed regions.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import BartConfig

from benchmarks.train_step import DIMS as TRAIN_DIMS
from finetune.generate import DTYPES, default_device, synchronize
from janus.decoding import BeamConfig, MaskPredictConfig, beam_search, mask_predict, remask_count
from janus.model import JanusBart
from janus.speculative import SpecConfig, SpecGuard, combine_stats, speculative_decode

# "demo": the architecture of the demo's pretrained model (pretrain/configs/demo_cpu.json, 8000-token BPE).
DIMS = {**TRAIN_DIMS, "demo": dict(d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                   decoder_attention_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512, vocab_size=8000)}
SPEC_KEYS = ("passes_per_token", "tokens_per_verification", "accepted_per_verification", "single_verification_share",
             "draft_passes", "verify_passes", "replays", "replay_steps", "tokens")


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


def timed(fn, repeats: int, device="cpu") -> float:
    fn()  # warm-up
    synchronize(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return 1000 * (time.perf_counter() - t) / repeats


def failing_drafter(model, toks, L, N, cross, cross_mask, most):
    """Drafts <pad> everywhere: greedy never outputs it, so every draft token is rejected."""
    D = min(int((N - L).max()), most)
    return torch.full((len(L), D), model.config.pad_token_id, device=L.device), (N - L).clamp(max=D)


def quality_and_speed(args) -> dict:
    from data_pipeline.tokenizer import load_tokenizer
    from finetune.data import read_lines
    from finetune.generate import decode_lines, latency_ms
    from janus.metrics import evaluate

    device = torch.device(args.device)
    model = JanusBart.from_bart(args.model).eval().to(device)
    tok = load_tokenizer(args.model)
    sources, refs = read_lines(args.src), read_lines(args.ref)
    if args.limit:
        sources, refs = sources[:args.limit], refs[:args.limit]
    probe = sources[:args.samples]
    options = [("ar_beam5", "ar", {}), ("ar_greedy", "ar", dict(beam=1)), ("spec", "spec", {})]
    if args.relaxed_topk:
        options.append(("spec_relaxed", "spec", dict(relaxed_topk=args.relaxed_topk,
                                                      relaxed_margin=args.relaxed_margin)))
    if model.length_head is not None:
        for T in (int(t) for t in args.iterations.split(",")):
            options.append((f"nar_T{T}", "nar", dict(iterations=T)))
            if T:
                options.append((f"nar_T{T}_pruned", "nar", dict(iterations=T, prune_after=1)))
                options.append((f"nar_T{T}_pruned_margin", "nar",
                                dict(iterations=T, prune_after=1, prune_margin=args.prune_margin)))
            options.append((f"nar_T{T}_offsets", "nar", dict(iterations=T, length_offsets=True)))
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {o[0] for o in options}
        if unknown:
            raise SystemExit(f"--only: unknown options {sorted(unknown)}; choose from {[o[0] for o in options]}")
        options = [o for o in options if o[0] in wanted]
    result = {"model": args.model, "task": args.task, "n": len(sources), "timed_sources": len(probe),
              "device": str(device)}
    for dtype in args.dtypes.split(","):
        model = model.to(DTYPES[dtype])
        tag = "" if dtype == "float32" else f"_{dtype}"
        greedy_hyps = None
        for name, mode, opt_kw in options:
            beam_kw = opt_kw if mode == "ar" else {}
            spec_kw = opt_kw if mode == "spec" else {}
            nar_kw = opt_kw if mode == "nar" else {}
            kw = dict(mode=mode, max_source_length=args.source_len,
                      beam=BeamConfig(**{"beam": 5, "max_len": args.target_len, **beam_kw}),
                      nar=MaskPredictConfig(max_len=args.target_len, length_candidates=args.candidates, **nar_kw),
                      spec=SpecConfig(max_len=args.target_len, window=args.window, **spec_kw))
            stats: list = []
            hyps = decode_lines(model, tok, sources, batch_size=32, stats=stats, **kw)
            scores = evaluate(args.task, hyps, refs)
            row = {"metric": scores.get("bleu", scores.get("overall")), "repetition": scores["repetition"],
                   "ms_per_sample": latency_ms(model, tok, probe, 1, **kw)}
            if name == "ar_greedy":
                greedy_hyps = hyps
            if mode == "nar" and "ar_beam5" + tag in result:  # against AR beam 5 in the same dtype
                row["speedup"] = result["ar_beam5" + tag]["ms_per_sample"] / row["ms_per_sample"]
            if mode == "spec":
                row.update({k: combine_stats(stats)[k] for k in SPEC_KEYS})
                if greedy_hyps is not None:
                    row["exact_match_with_greedy"] = sum(a == b for a, b in zip(hyps, greedy_hyps)) / len(hyps)
                    row["speedup_vs_greedy"] = result["ar_greedy" + tag]["ms_per_sample"] / row["ms_per_sample"]
                if "ar_beam5" + tag in result:
                    row["speedup_vs_beam5"] = result["ar_beam5" + tag]["ms_per_sample"] / row["ms_per_sample"]
                row["batch1_interleaved"] = spec_time_split(model, tok, probe, args.source_len, kw["spec"])
            result[name + tag] = row
            print(json.dumps({name + tag: row}), flush=True)
    return result


def spec_time_split(model: JanusBart, tok, sources: list[str], max_source_length: int, cfg: SpecConfig,
                    repeats: int = 3) -> dict:
    """Batch-1 speculative decoding against AR greedy, interleaved source by source (each timed
    ``repeats`` times alternately, the fastest kept), so machine noise hits both alike:
    ``speedup_vs_greedy`` = total greedy ms / total speculative ms; and where the speculative time
    goes (mean ms per source: encoder side, drafting, verification + bookkeeping, exact replays).
    Also the guard's measured per-row costs (``guard_*_ms_per_row``: draft pass, verification,
    greedy-like step) and ``bound_vs_greedy_free_drafts`` = (accepted per drafted verification + 1)
    x greedy step / verification: the speedup this model's agreement allows even if drafting
    cost nothing."""
    dev = next(model.parameters()).device
    greedy = BeamConfig(beam=1, max_len=cfg.max_len, min_len=cfg.min_len, no_repeat_ngram=cfg.no_repeat_ngram)
    parts, t_greedy, t_spec = [], 0.0, 0.0
    guard, profile_guard = SpecGuard(cfg), SpecGuard(cfg)  # one guard state over the file, as in generate
    for src in sources:
        ids = torch.tensor([tok(src, truncation=True, max_length=max_source_length)["input_ids"]], device=dev)
        am = torch.ones_like(ids)
        best = {"greedy": float("inf"), "spec": float("inf")}
        for _ in range(repeats):
            for name, fn in (("greedy", lambda: beam_search(model, ids, am, greedy)),
                             ("spec", lambda: speculative_decode(model, ids, am, cfg, guard=guard))):
                synchronize(dev)
                t = time.perf_counter()
                fn()
                synchronize(dev)
                best[name] = min(best[name], time.perf_counter() - t)
        t_greedy, t_spec = t_greedy + best["greedy"], t_spec + best["spec"]
        parts.append(speculative_decode(model, ids, am, cfg, profile=True, guard=profile_guard)[2])
    total = combine_stats(parts)
    out = {k: total.get(k, 0.0) / len(sources) for k in ("ms_encoder", "ms_draft", "ms_verify", "ms_replay", "ms_total")}
    out.update(greedy_ms=1000 * t_greedy / len(sources), spec_ms=1000 * t_spec / len(sources),
               speedup_vs_greedy=t_greedy / t_spec, accepted_per_verification=total["accepted_per_verification"],
               **guard.state())
    g, v = out.get("guard_lean_ms_per_row"), out.get("guard_verify_ms_per_row")
    if g and v:
        out["bound_vs_greedy_free_drafts"] = (total["accepted_per_verification"] + 1) * g / v
    return out


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
    p.add_argument("--window", type=int, default=SpecConfig.window, help="speculative: draft window")
    p.add_argument("--relaxed-topk", type=int, default=0,
                   help="with --model: also run relaxed speculative acceptance (NOT lossless) with this top-k")
    p.add_argument("--relaxed-margin", type=float, default=1.0, help="with --relaxed-topk: the log-prob margin")
    p.add_argument("--only", default="", help="with --model: comma-separated options to run (e.g. "
                   "ar_beam5,ar_greedy,spec,nar_T0,nar_T1,nar_T4,nar_T10); default: all")
    p.add_argument("--no-spec", action="store_true", help="synthetic mode: skip speculative decoding")
    p.add_argument("--spec-sources", type=int, default=3, help="synthetic mode: random sources for the speculative timing")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    args = p.parse_args(argv)
    args.device = args.device or default_device()
    torch.set_num_threads(args.threads)
    if args.model:
        if not (args.src and args.ref):
            p.error("--model needs --src and --ref")
        result = quality_and_speed(args)
        print(json.dumps(result))
        return result
    result = {"dims": args.dims, "threads": args.threads, "source_len": args.source_len,
              "target_len": args.target_len, "batch_size": 1, "candidates": args.candidates, "device": args.device}
    for dtype in args.dtypes.split(","):
        timings = synthetic_speed(args, DTYPES[dtype])
        if dtype == "float32":  # the headline keys
            result.update(timings)
        else:
            result[dtype] = timings
    print(json.dumps(result))
    return result


def matmul_peak_gflops(dtype: torch.dtype, d: int, ffn: int, device="cpu") -> float:
    """The best matmul rate this machine reaches: the model's FFN shape and a large square-ish
    one, 1024 rows each."""
    rates = []
    for k, n in ((d, ffn), (1024, 4096)):
        x, w = torch.randn(1024, k, dtype=dtype, device=device), torch.randn(n, k, dtype=dtype, device=device)
        rates.append(2 * 1024 * k * n / timed(lambda: x @ w.T, 5, device) / 1e6)
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
    dev = torch.device(args.device)
    model = build(args.dims, args.target_len, args.source_len).to(device=dev, dtype=dtype)
    cfg0 = model.config
    x = torch.randint(4, cfg0.vocab_size - 1, (1, args.source_len), generator=torch.Generator().manual_seed(1)).to(dev)
    am = torch.ones_like(x)
    beam = BeamConfig(beam=5, max_len=args.target_len, min_len=args.target_len)
    out = {}
    tag = "" if dtype == torch.float32 else f" ({dtype})"
    with torch.no_grad():
        out["encoder_side_ms"] = timed(lambda: (model.cross_kv(enc := model.encode(x, am)),
                                                model.length_logits(enc, am)), args.samples, dev)
        out["matmul_peak_gflops"] = matmul_peak_gflops(dtype, cfg0.d_model, cfg0.decoder_ffn_dim, dev)
        out["ar_beam5_ms"] = timed(lambda: beam_search(model, x, am, beam), args.samples, dev)
        print(json.dumps({"ar_beam5_ms" + tag: out["ar_beam5_ms"]}), flush=True)
        C, N = args.candidates, args.target_len
        for T in (int(t) for t in args.iterations.split(",")):
            for prune in (0, 1):
                if prune and T == 0:
                    continue
                cfg = MaskPredictConfig(iterations=T, length_candidates=C, max_len=N + 2, prune_after=prune)
                suffix = f"T{T}" + ("_pruned" if prune else "")
                out[f"nar_{suffix}_ms"] = timed(lambda: mask_predict(model, x, am, cfg), args.samples, dev)
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
        if not args.no_spec:
            out.update(synthetic_spec(model, x, am, args, dev))
            print(json.dumps({k + tag: v for k, v in out.items() if k.startswith(("spec", "ar_greedy"))}), flush=True)
    return out


def synthetic_spec(model: JanusBart, x: torch.Tensor, am: torch.Tensor, args, dev) -> dict:
    """Speculative decoding vs AR greedy on the random model over ``--spec-sources`` random sources
    (the first is ``x``): per source the median of interleaved repeats, summed over sources."""
    parts = [synthetic_spec_one(model, x, am, args, dev)]
    for i in range(1, args.spec_sources):
        xi = torch.randint(4, model.config.vocab_size - 1, x.shape, generator=torch.Generator().manual_seed(100 + i))
        parts.append(synthetic_spec_one(model, xi.to(dev), am, args, dev))
    out = {k: sum(p[k] for p in parts) for k in parts[0] if k.endswith("_ms")}
    out["spec_speedup_vs_greedy"] = out["ar_greedy_ms"] / out["spec_ms"]
    out["spec_guard_overhead"] = out["spec_failing_ms"] / out["ar_greedy_ms"] - 1
    out["spec_no_guard_overhead"] = out["spec_failing_no_guard_ms"] / out["ar_greedy_ms"] - 1
    out["spec_exact"] = all(p["spec_exact"] for p in parts)
    out["spec_sources"] = len(parts)
    out["spec_per_source_ms"] = [{k: p[k] for k in p if k.endswith("_ms")} for p in parts]
    for key in ("spec_stats", "spec_failing_stats"):
        total = combine_stats([p[key] for p in parts])
        out[key] = {k: total[k] for k in SPEC_KEYS}
        out[key]["per_source"] = [{k: p[key][k] for k in ("draft_passes", "verify_passes", "replays", "replay_steps")}
                                  for p in parts]
    return out


def synthetic_spec_one(model: JanusBart, x: torch.Tensor, am: torch.Tensor, args, dev) -> dict:
    """Speculative decoding vs AR greedy on one source, interleaved repeats (medians), plus the
    guard's worst case: every draft rejected, with and without the adaptive guard."""
    N = args.target_len
    greedy_cfg = BeamConfig(beam=1, max_len=N, min_len=N)
    spec_cfg = SpecConfig(max_len=N, min_len=N, window=args.window)
    runs = {"ar_greedy_ms": lambda: beam_search(model, x, am, greedy_cfg),
            "spec_ms": lambda: speculative_decode(model, x, am, spec_cfg),
            "spec_failing_ms": lambda: speculative_decode(model, x, am, spec_cfg, drafter=failing_drafter),
            "spec_failing_no_guard_ms": lambda: speculative_decode(
                model, x, am, SpecConfig(max_len=N, min_len=N, window=args.window, adaptive=False),
                drafter=failing_drafter)}
    results = {k: fn() for k, fn in runs.items()}  # warm-up, and the outputs
    times: dict = {k: [] for k in runs}
    for _ in range(max(args.samples, 1)):
        for k, fn in runs.items():
            synchronize(dev)
            t = time.perf_counter()
            fn()
            synchronize(dev)
            times[k].append(1000 * (time.perf_counter() - t))
    out = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    greedy = results["ar_greedy_ms"][0]
    out["spec_speedup_vs_greedy"] = out["ar_greedy_ms"] / out["spec_ms"]
    out["spec_guard_overhead"] = out["spec_failing_ms"] / out["ar_greedy_ms"] - 1
    out["spec_no_guard_overhead"] = out["spec_failing_no_guard_ms"] / out["ar_greedy_ms"] - 1
    out["spec_exact"] = all(bool(torch.equal(results[k][0], greedy)) for k in runs if k != "ar_greedy_ms")
    out["spec_stats"] = results["spec_ms"][2]
    out["spec_failing_stats"] = results["spec_failing_ms"][2]
    return out


if __name__ == "__main__":
    main()
