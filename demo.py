"""`make demo`: the whole pipeline on the embedded default corpus, on CPU.

1. builds shards from the real Wikipedia excerpt + news stories shipped in the gensim wheel
   (cached in runs/demo/shards after the first run),
2. pretrains a small BART-JANUS with DeepSpeed ZeRO-2 on 2 CPU ranks (torchrun, gloo),
   logging every loss term to TensorBoard and checkpointing,
3. exports the final checkpoint to an HF folder and checks that transformers loads it,
4. builds an XSum-style task from the same corpus (first sentence = summary of the rest),
   finetunes the export in AR mode and in NAR mode (new length head),
5. decodes the test set with AR beam 5 and mask-predict at T = 0, 1, 4, 10, scores it with
   the GLGE XSum metrics, prints a table like the paper's Table 2 (with ms/sample at batch 1)
   and writes a PNG of quality and latency vs iterations (the paper's Figure 4),
6. prints where everything is; the last line is a JSON summary.

Each run trains from scratch (the shards and the task files are reused). This is a tiny
model trained for minutes: the numbers show the pipeline works, not the paper's quality.
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


def run(cmd: list[str], env: dict | None = None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="where shards, runs and exports go")
    p.add_argument("--pretrain-steps", type=int, default=160)
    p.add_argument("--finetune-steps", type=int, default=120, help="per mode (AR and NAR)")
    p.add_argument("--iterations", default="0,1,4,10", help="mask-predict T values to report")
    p.add_argument("--latency-samples", type=int, default=16, help="test sources timed at batch 1")
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args(argv)
    out = (REPO / args.out).resolve()
    shards, pre_dir, export_dir = out / "shards", out / "pretrain", out / "bart-janus"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
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
         "--run.save_every", str(save_every), "--run.log_every", str(max(1, args.pretrain_steps // 12))], env)
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
        print(f"""finetuning:    {out / 'xsum-ar'}, {out / 'xsum-nar'}  (best/ = exported best dev model)
results:       {out / 'results.json'}, {out / 'results.md'}, plot {out / 'iterations.png'}""")
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

    task = out / "task"
    if not (task / "test.tgt").exists():
        run([sys.executable, "-m", "finetune.make_demo_task", "--out", str(task)], env)
    for mode, lr in (("ar", "2e-3"), ("nar", "2e-3")):
        save = out / f"xsum-{mode}"
        shutil.rmtree(save, ignore_errors=True)
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks),
             "finetune/train.py", "--task", "xsum", "--mode", mode, "--model.init_from", str(export_dir),
             "--data.dir", str(task), "--data.max_source_length", "128", "--run.save_dir", str(save),
             "--run.max_steps", str(args.finetune_steps), "--run.micro_batch_size", "16",
             "--run.save_every", str(args.finetune_steps), "--run.eval_every", str(max(1, args.finetune_steps // 2)),
             "--run.log_every", str(max(1, args.finetune_steps // 6)), "--optim.lr", lr,
             "--optim.warmup_steps", str(max(1, args.finetune_steps // 10)), "--eval.samples", "40"], env)

    torch.set_num_threads(2)
    sources, refs = read_lines(str(task / "test.src")), read_lines(str(task / "test.tgt"))
    probe = sources[: args.latency_samples]
    table = []
    for mode in ("ar", "nar"):
        best = out / f"xsum-{mode}" / "best"
        model = JanusBart.from_bart(str(best)).eval()
        tok = load_tokenizer(best)
        settings = [("AR beam 5", None)] if mode == "ar" else [(f"NAR T={t}", int(t)) for t in args.iterations.split(",")]
        for name, iters in settings:
            kw = dict(mode=mode, max_source_length=128, beam=BeamConfig(beam=5, max_len=64),
                      nar=MaskPredictConfig(iterations=iters or 0, max_len=64))
            hyps = decode_lines(model, tok, sources, batch_size=32, **kw)
            (out / f"test.{name.replace(' ', '_').replace('=', '')}.hyp").write_text("\n".join(hyps) + "\n")
            scores = evaluate("xsum", hyps, refs)
            ms = latency_ms(model, tok, probe, 1, **kw)
            table.append({"system": name, "iterations": iters, **{k: scores[k] for k in
                          ("rouge1", "rouge2", "rougeL", "overall", "repetition")}, "ms_per_sample": ms})
    ar_ms = table[0]["ms_per_sample"]
    lines = ["| system | ROUGE-1 | ROUGE-2 | ROUGE-L | OVERALL | repetition % | ms/sample (batch 1) |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['system']} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} | {r['overall']:.2f} "
                     f"| {r['repetition']:.2f} | {r['ms_per_sample']:.1f} ({ar_ms / r['ms_per_sample']:.1f}x) |")
    print("\nXSum-style demo task, test set (paper Table 2 layout; T = refinement passes after the first):")
    print("\n".join(lines))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(table, indent=2))
    plot_iterations(table, out / "iterations.png")
    return {"results": table, "plot": str(out / "iterations.png")}


def plot_iterations(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nar = [r for r in table if r["iterations"] is not None]
    ar = next(r for r in table if r["iterations"] is None)
    xs = [r["iterations"] for r in nar]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["overall"] for r in nar], "o-", color="tab:blue", label="NAR OVERALL (ROUGE mean)")
    ax.axhline(ar["overall"], color="tab:blue", ls=":", label="AR beam 5 OVERALL")
    ax.set_xlabel("mask-predict iterations T (T + 1 passes)")
    ax.set_ylabel("OVERALL")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["ms_per_sample"] for r in nar], "s--", color="tab:red", label="NAR ms/sample")
    ax2.axhline(ar["ms_per_sample"], color="tab:red", ls=":", label="AR ms/sample")
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
