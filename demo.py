"""`make demo`: the whole pipeline on the embedded default corpus, on CPU, with outputs that
show what the model learned.

1. builds shards from the real Wikipedia excerpt + news stories shipped in the gensim wheel
   (cached in runs/demo/shards after the first run),
2. pretrains a small BART-JANUS (d 128, 2+2 layers, 8000-token BPE) with DeepSpeed ZeRO-2 on
   2 CPU ranks (torchrun, gloo), logging every loss term to TensorBoard and checkpointing,
3. exports the final checkpoint to an HF folder and checks that transformers loads it,
4. builds the `lead-short` task from the same corpus (source: two consecutive sentences, cut to
   30 words; target: the first one, 4-12 words; `python -m finetune.make_demo_task`) and finetunes
   the export twice: `--mode ar` (the AR model) and `--mode janus` (one model trained with the
   JANUS objective, CMLM + length head together with the AR and AUX patterns),
5. decodes the test set with AR beam 5 (AR model), mask-predict at T = 0, 1, 4, 10 and
   self-speculative decoding (JANUS model; lossless: the same output as its greedy AR decoding,
   which the demo checks), scores it with the GLGE XSum metrics, prints a table like the paper's
   Table 2 (with ms/sample at batch 1), three test examples with every decoder's output, and
   writes a PNG of quality and latency vs iterations (the paper's Figure 4),
6. prints where everything is; the last line is a JSON summary.

Why this task and these settings: a 2M-parameter model trained for minutes cannot summarise, but
it can learn to copy the first sentence and stop there, so the outputs can be read and checked.
Copying is quick to discover when the copied positions are few (hence 4-12 word leads), when
the embeddings are not tiny (`init_std` 0.08 in pretrain/configs/demo_cpu.json: with BART's 0.02
a short pretraining collapses the tied embeddings towards the unigram distribution and the
finetuning needs far more steps to find the copy) and without dropout. Plain CMLM finetuning
(`--nar-mode nar`, the paper's GLGE recipe) does not find the copy within this budget; trained
jointly with the AR pattern (`--mode janus`) the NAR decoder does. Each run trains from scratch
(the shards and the task files are reused).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
TASK_KIND = "lead-short"
MAX_SOURCE, MAX_TARGET = 64, 32  # BPE tokens; the task's sources have <= 30 words, targets <= 12


def run(cmd: list[str], env: dict | None = None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="where shards, runs and exports go")
    p.add_argument("--pretrain-steps", type=int, default=60)
    p.add_argument("--finetune-steps", type=int, default=200, help="per finetuning run (AR and JANUS/NAR)")
    p.add_argument("--nar-mode", choices=["janus", "nar"], default="janus",
                   help="finetuning mode of the model behind the NAR rows: janus (AR + NAR + AUX + length head, "
                        "also decoded speculatively) or nar (plain CMLM + length head, the paper's GLGE recipe)")
    p.add_argument("--lr", type=float, default=3e-3, help="finetuning peak learning rate")
    p.add_argument("--iterations", default="0,1,4,10", help="mask-predict T values to report")
    p.add_argument("--latency-samples", type=int, default=16, help="test sources timed at batch 1")
    p.add_argument("--eval-samples", type=int, default=60, help="dev samples decoded at each finetuning evaluation")
    p.add_argument("--test-samples", type=int, default=0, help="test sources decoded and scored (0 = all 60)")
    p.add_argument("--examples", type=int, default=3, help="test examples printed with every decoder's output")
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args(argv)
    out = (REPO / args.out).resolve()
    shards, pre_dir, export_dir = out / "shards", out / "pretrain", out / "bart-janus"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # DeepSpeed JIT-builds its CPU comm op on first use: cache it with this interpreter, so that other
    # environments sharing ~/.cache/torch_extensions neither rebuild it under our feet nor hold its lock.
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    t0 = time.time()

    if not (shards / "manifest.json").exists():
        run([sys.executable, "-m", "data_pipeline.build", "--demo", "--out", str(shards), "--overwrite"], env)
    else:
        print(f"reusing shards in {shards}")
    shutil.rmtree(pre_dir, ignore_errors=True)
    save_every = max(1, args.pretrain_steps // 3)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks),
         "pretrain/train.py", "--config", "pretrain/configs/demo_cpu.json", "--data.shards_dir", str(shards),
         "--run.save_dir", str(pre_dir), "--run.max_steps", str(args.pretrain_steps),
         "--run.save_every", str(save_every), "--run.log_every", str(max(1, args.pretrain_steps // 6))], env)
    shutil.rmtree(export_dir, ignore_errors=True)
    run([sys.executable, "-m", "pretrain.export", "--save-dir", str(pre_dir), "--out", str(export_dir)], env)

    from transformers import BartForConditionalGeneration

    BartForConditionalGeneration.from_pretrained(export_dir)  # the export must load in plain transformers
    rows = [json.loads(line) for line in open(pre_dir / "metrics.jsonl")]
    first, last = rows[0], rows[-1]
    terms = [k for k in first if k.startswith("loss/")]
    print("\npretraining loss terms, first logged step -> last:")
    for k in terms:
        print(f"  {k[5:]:<10} {first[k]:8.4f} -> {last[k]:8.4f}")
    summary = {"pretrain_steps": last["step"], "pretrain_first": {k: first[k] for k in terms},
               "pretrain_last": {k: last[k] for k in terms}, "shards": str(shards), "pretrain_dir": str(pre_dir),
               "export": str(export_dir)}
    if args.finetune_steps > 0:
        summary.update(finetune_and_evaluate(args, out, export_dir, env))
    print(f"""
shards:        {shards}  (manifest.json, tokenizer/)
pretraining:   {pre_dir}  (metrics.jsonl, checkpoints/, config.json)
tensorboard:   .venv/bin/tensorboard --logdir {out}
export (HF):   {export_dir}  (BartForConditionalGeneration.from_pretrained / JanusBart.from_bart)""")
    if args.finetune_steps > 0:
        print(f"""task:          {out / TASK_KIND}  ({{train,dev,test}}.{{src,tgt}})
finetuning:    {out / 'lead-ar'}, {out / f'lead-{args.nar_mode}'}  (best/ = exported best dev model)
results:       {out / 'results.json'}, {out / 'results.md'}, plot {out / 'iterations.png'}, test.*.hyp""")
    summary["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(summary))
    return summary


def finetune_and_evaluate(args, out: Path, export_dir: Path, env: dict) -> dict:
    import torch

    from data_pipeline.tokenizer import load_tokenizer
    from finetune.data import read_lines
    from finetune.generate import decode_lines, latency_ms
    from janus.decoding import BeamConfig, MaskPredictConfig
    from janus.metrics import evaluate
    from janus.model import JanusBart
    from janus.speculative import SpecConfig, combine_stats

    task = out / TASK_KIND
    if not (task / "test.tgt").exists():
        run([sys.executable, "-m", "finetune.make_demo_task", "--out", str(task), "--kind", TASK_KIND], env)
    steps = args.finetune_steps
    runs = {"ar": out / "lead-ar", args.nar_mode: out / f"lead-{args.nar_mode}"}
    for mode, save in runs.items():
        shutil.rmtree(save, ignore_errors=True)
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks),
             "finetune/train.py", "--task", "xsum", "--mode", mode, "--model.init_from", str(export_dir),
             "--model.dropout", "0.0", "--data.dir", str(task), "--data.max_source_length", str(MAX_SOURCE),
             "--data.max_target_length", str(MAX_TARGET), "--run.save_dir", str(save), "--run.max_steps", str(steps),
             "--run.micro_batch_size", "16", "--run.save_every", str(steps), "--run.eval_every",
             str(max(1, steps // 2)), "--run.log_every", str(max(1, steps // 8)), "--optim.lr", str(args.lr),
             "--optim.warmup_steps", str(max(1, steps // 10)), "--eval.samples", str(args.eval_samples),
             # The demo scores everything with the re-derived metrics (pure Python): GLGE's official
             # protocol needs Perl modules a laptop may lack, and a copying task has no published numbers.
             "--eval.protocol", "modern"], env)

    # One thread: the tiny model's ops gain nothing from a second one, and on a busy machine a second
    # thread stalls every op (batch-1 timings 8x slower measured with other jobs running).
    torch.set_num_threads(1)
    sources, refs = read_lines(str(task / "test.src")), read_lines(str(task / "test.tgt"))
    if args.test_samples:
        sources, refs = sources[: args.test_samples], refs[: args.test_samples]
    probe = sources[: args.latency_samples]
    beam = BeamConfig(beam=5, max_len=MAX_TARGET)
    spec = SpecConfig(max_len=MAX_TARGET)
    spec_model = "ar" if args.nar_mode == "nar" else "janus"  # the one trained with the AR pattern and a NAR one
    systems = [("AR beam 5", "ar", "ar", None)]
    systems += [(f"NAR T={t}", args.nar_mode, "nar", int(t)) for t in args.iterations.split(",")]
    systems += [("speculative", spec_model, "spec", None)]
    models, table, outputs, spec_stats = {}, [], {}, []
    for name, model_name, decoder, iters in systems:
        if model_name not in models:
            best = runs[model_name] / "best"
            models[model_name] = (JanusBart.from_bart(str(best)).eval(), load_tokenizer(best))
        model, tok = models[model_name]
        kw = dict(mode=decoder, max_source_length=MAX_SOURCE, beam=beam, spec=spec,
                  nar=MaskPredictConfig(iterations=iters or 0, max_len=MAX_TARGET))
        hyps = decode_lines(model, tok, sources, batch_size=32, stats=spec_stats if decoder == "spec" else None, **kw)
        outputs[name] = hyps
        (out / f"test.{name.replace(' ', '_').replace('=', '')}.hyp").write_text("\n".join(hyps) + "\n")
        scores = evaluate("xsum", hyps, refs)
        ms = latency_ms(model, tok, probe, 1, **kw)
        table.append({"system": name, "model": model_name, "iterations": iters, **{k: scores[k] for k in
                      ("rouge1", "rouge2", "rougeL", "overall", "repetition")}, "ms_per_sample": ms})

    # Lossless check: speculative decoding must reproduce the same model's greedy AR output.
    model, tok = models[spec_model]
    greedy = decode_lines(model, tok, sources, mode="ar", batch_size=32, max_source_length=MAX_SOURCE,
                          beam=BeamConfig(beam=1, max_len=MAX_TARGET))
    same = sum(a == b for a, b in zip(greedy, outputs["speculative"]))
    st = combine_stats(spec_stats)
    spec_info = {"identical_to_greedy": same, "sources": len(sources),
                 **{k: st[k] for k in ("passes_per_token", "accepted_per_verification", "single_verification_share")}}

    ar_ms = table[0]["ms_per_sample"]
    lines = ["| system | model | ROUGE-1 | ROUGE-2 | ROUGE-L | OVERALL | repetition % | ms/sample (batch 1) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['system']} | {r['model']} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} "
                     f"| {r['overall']:.2f} | {r['repetition']:.2f} | {r['ms_per_sample']:.1f} "
                     f"({ar_ms / r['ms_per_sample']:.1f}x) |")
    notes = (f"speculative = self-speculative decoding of the {spec_model} model (its NAR pattern drafts, its AR "
             f"query stream verifies): identical to its greedy AR output for {same}/{len(sources)} test sources; "
             f"{spec_info['passes_per_token']:.2f} decoder passes per token, "
             f"{spec_info['accepted_per_verification']:.2f} draft tokens accepted per verification.")
    print(f"\n{TASK_KIND} demo task (copy the first of two sentences), {len(sources)} test pairs, GLGE XSum metrics "
          f"in the modern protocol (paper Table 2 layout; T = refinement passes after the first; speed-up vs AR beam 5 in brackets):")
    print("\n".join(lines))
    print(notes)

    examples = [{"source": sources[i], "reference": refs[i], **{name: outputs[name][i] for name, *_ in systems}}
                for i in range(min(args.examples, len(sources)))]
    width = max(len(k) for k in examples[0]) if examples else 0
    text = [f"\n{len(examples)} test examples, with every decoder's output:"]
    for n, ex in enumerate(examples, 1):
        text.append(f"\nexample {n}")
        text += [f"  {k + ':':<{width + 1}} {v}" for k, v in ex.items()]
    print("\n".join(text))

    md = lines + ["", notes, "", "Examples (test set):", ""]
    for n, ex in enumerate(examples, 1):
        md += [f"{n}. " + "; ".join(f"**{k}**: {v}" for k, v in ex.items())]
    (out / "results.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps({"table": table, "speculative": spec_info, "examples": examples},
                                                 indent=2))
    plot_iterations(table, out / "iterations.png")
    return {"results": table, "speculative": spec_info, "examples": examples, "plot": str(out / "iterations.png")}


def plot_iterations(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nar = [r for r in table if r["system"].startswith("NAR")]
    ar = next(r for r in table if r["system"] == "AR beam 5")
    spec = next((r for r in table if r["system"] == "speculative"), None)
    xs = [r["iterations"] for r in nar]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["overall"] for r in nar], "o-", color="tab:blue", label="NAR OVERALL (ROUGE mean)")
    ax.axhline(ar["overall"], color="tab:blue", ls=":", label="AR beam 5 OVERALL")
    ax.set_xlabel("mask-predict iterations T (T + 1 passes)")
    ax.set_ylabel("OVERALL")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["ms_per_sample"] for r in nar], "s--", color="tab:red", label="NAR ms/sample")
    ax2.axhline(ar["ms_per_sample"], color="tab:red", ls=":", label="AR beam 5 ms/sample")
    if spec is not None:
        ax2.axhline(spec["ms_per_sample"], color="tab:green", ls="-.", label="speculative ms/sample")
    ax2.set_ylabel("ms/sample (batch 1)")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, fontsize=8, loc="center right")
    ax.set_title("Quality and latency vs iterations (demo task)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
