"""`make demo`: the whole pretraining pipeline on the embedded default corpus, on CPU.

1. builds shards from the real Wikipedia excerpt + news stories shipped in the gensim wheel
   (cached in runs/demo/shards after the first run),
2. pretrains a small BART-JANUS with DeepSpeed ZeRO-2 on 2 CPU ranks (torchrun, gloo),
   logging every loss term to TensorBoard and checkpointing,
3. exports the final checkpoint to an HF folder and checks that transformers loads it,
4. prints where everything is and how to look at it; the last line is a JSON summary.

Each run starts the training from scratch in runs/demo/pretrain (the shards are reused).
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
    p.add_argument("--pretrain-steps", type=int, default=240)
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
    print("\nloss terms, first logged step -> last:")
    for k in terms:
        print(f"  {k[5:]:<10} {first[k]:8.4f} -> {last[k]:8.4f}")
    print(f"""
shards:        {shards}  (manifest.json, tokenizer/)
pretraining:   {pre_dir}  (metrics.jsonl, checkpoints/, config.json)
tensorboard:   .venv/bin/tensorboard --logdir {pre_dir / 'tensorboard'}
export (HF):   {export_dir}  (BartForConditionalGeneration.from_pretrained / JanusBart.from_bart)
""")
    summary = {"seconds": round(time.time() - t0, 1), "steps": last["step"],
               "first": {k: first[k] for k in terms}, "last": {k: last[k] for k in terms},
               "shards": str(shards), "pretrain_dir": str(pre_dir), "export": str(export_dir)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
