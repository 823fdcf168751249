"""The paper's GLGE tables in one command: finetune, select, decode, score, time, tabulate.

    python -m finetune.glge_suite --model runs/bart-janus-hf --glge /data/glge --out runs/glge
    python -m finetune.glge_suite ... --modes ar,nar,janus --nproc 8         # + JANUS finetuning
    sbatch --array=0-2 slurm/glge_suite.sh                                    # one task per array job

For each task (XSum, SQuAD 1.1 QG, PersonaChat: ``<glge>/easy/<task>_data/org_data/
{train,dev,test}.{src,tgt}``) and each mode, it

1. finetunes the model with ``finetune/train.py`` and the paper's recipe for the mode (AR: lr 3e-5,
   warmup 200, 10 epochs; NAR: lr 1e-4, warmup 1000, 50 epochs, length head; label smoothing 0.1;
   JANUS: the full JANUS objective with NAR's schedule; max output length 64 / 64 / 32), which
   keeps the best dev checkpoint (``<out>/<task>/<mode>/run/best``);
2. decodes the test set: AR models with beam 5, NAR models with mask-predict at T = 0, 1, 4, 10
   refinement passes after the first (``--iterations``), JANUS models with all of these plus
   self-speculative decoding;
3. scores every output with GLGE's official protocol (``finetune.glge_eval``; ``--dedup-nar``
   adds BANG-style NAR rows with consecutive duplicate tokens removed, labelled as such) and
   times batch-1 latency (median ms/sample over ``--latency-samples`` test sources);
4. writes ``<out>/tables.md`` and ``<out>/tables.json`` from every finished task/mode in ``--out``:
   the paper's Table 2 (XSum), Table 4 (SQuAD QG) and Table 5 (PersonaChat) layout, with
   speed-ups against the same task's AR beam 5 row.

Resumable: a task/mode whose ``results.json`` exists is not redone (an interrupted finetuning
resumes from its last checkpoint); the tables are rebuilt from whatever results exist.
``--epochs`` / ``--max-steps`` / ``--train-samples`` / ``--dev-samples`` / ``--test-samples``
shrink everything for smoke tests; numbers from shrunk runs are not the paper's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TASKS = ("xsum", "squadqg", "personachat")
MODES = ("ar", "nar", "janus")
TABLES = {  # task -> (paper table, [(metric key, column title)])
    "xsum": ("Table 2: XSum", [("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L")]),
    "squadqg": ("Table 4: SQuAD 1.1 QG", [("rougeL", "ROUGE-L"), ("bleu4", "BLEU-4"), ("meteor", "METEOR")]),
    "personachat": ("Table 5: PersonaChat", [("bleu1", "BLEU-1"), ("bleu2", "BLEU-2"), ("distinct1", "Distinct-1"),
                                             ("distinct2", "Distinct-2")]),
}
SPLITS = ("train", "dev", "test")
REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    """Progress line on stderr (stdout stays for the final summary)."""
    print(f"[glge_suite {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def csv_list(kind, choices=None):
    """argparse type: a comma-separated list of ``kind`` (restricted to ``choices``)."""
    def parse(text: str) -> list:
        items = [kind(x) for x in text.split(",") if x.strip()]
        bad = [x for x in items if choices and x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(choices or [])}")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune.glge_suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="BART-JANUS export (python -m pretrain.export) or HF BART folder")
    p.add_argument("--glge", required=True, help="GLGE data root holding <version>/<task>_data/org_data/")
    p.add_argument("--out", required=True, help="output folder (runs, outputs, tables); reused to resume")
    p.add_argument("--version", default="easy", help="GLGE version folder (default easy)")
    p.add_argument("--tasks", type=csv_list(str, TASKS), default=list(TASKS), help="default: all three")
    p.add_argument("--modes", type=csv_list(str, MODES), default=["ar", "nar"],
                   help="ar, nar, janus (JANUS finetuning: AR, mask-predict and speculative decoding of one model)")
    p.add_argument("--iterations", type=csv_list(int), default=[0, 1, 4, 10],
                   help="mask-predict refinement passes after the first (default 0,1,4,10)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--dedup-nar", action="store_true", help="also score NAR outputs BANG-style (duplicates removed)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs java); SQuAD QG OVERALL is then null")
    g = p.add_argument_group("finetuning (finetune/train.py; the paper's recipe per mode unless overridden)")
    g.add_argument("--nproc", type=int, default=1, help="ranks per finetuning run (torchrun when > 1)")
    g.add_argument("--epochs", type=float, help="override the mode's epochs (AR 10, NAR/JANUS 50)")
    g.add_argument("--max-steps", type=int, help="override: optimizer steps per run")
    g.add_argument("--micro-batch-size", type=int, default=32)
    g.add_argument("--eval-every", type=int, default=0, help="dev evaluation every N steps (0: only at the end)")
    g.add_argument("--deepspeed-config", help="DeepSpeed JSON (default: finetune/train.py's)")
    g.add_argument("--train-arg", action="append", default=[], metavar="FLAG=VALUE",
                   help="extra finetune/train.py flag, repeatable (e.g. --train-arg=--optim.lr=1e-4)")
    g = p.add_argument_group("sizes (for smoke tests; shrunk runs do not give the paper's numbers)")
    g.add_argument("--train-samples", type=int, default=0, help="first N training pairs (0: all)")
    g.add_argument("--dev-samples", type=int, default=200, help="dev pairs decoded per evaluation (0: all)")
    g.add_argument("--test-samples", type=int, default=0, help="first N test pairs (0: all)")
    g.add_argument("--latency-samples", type=int, default=100, help="test sources timed at batch 1")
    g = p.add_argument_group("decoding")
    g.add_argument("--batch-size", type=int, default=32, help="test decoding batch size")
    g.add_argument("--max-source-length", type=int, default=512)
    g.add_argument("--device", help="torch device for decoding (default: cuda when available, else cpu)")
    g.add_argument("--threads", type=int, default=0, help="torch threads while decoding (0: torch's default)")
    return p


# --------------------------------------------------------------------------- inputs

def task_dir(args, task: str) -> Path:
    return Path(args.glge) / args.version / f"{task}_data" / "org_data"


def check_inputs(args) -> None:
    """Every file the run needs, checked up front, with what is missing named."""
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise ValueError(f"--model {model}: no config.json there (expected an HF BART / BART-JANUS export folder)")
    missing = [str(task_dir(args, t) / f"{s}.{ext}") for t in args.tasks for s in SPLITS for ext in ("src", "tgt")
               if not (task_dir(args, t) / f"{s}.{ext}").is_file()]
    if missing:
        raise ValueError("GLGE files missing (expected <glge>/<version>/<task>_data/org_data/{train,dev,test}.{src,tgt}):"
                         "\n  " + "\n  ".join(missing))
    for name in ("beam", "nproc", "micro_batch_size", "batch_size", "latency_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(t < 0 for t in args.iterations):
        raise ValueError(f"--iterations must be >= 0, got {args.iterations}")


def prepare_data(args, task: str) -> Path:
    """The task's data folder, or a copy cut to --train/--test-samples under <out>/<task>/data."""
    src = task_dir(args, task)
    if not (args.train_samples or args.test_samples):
        return src
    dst = Path(args.out) / task / "data"
    dst.mkdir(parents=True, exist_ok=True)
    limits = {"train": args.train_samples, "dev": 0, "test": args.test_samples}
    for split in SPLITS:
        for ext in ("src", "tgt"):
            lines = (src / f"{split}.{ext}").read_text(encoding="utf-8").split("\n")
            lines = lines[:-1] if lines and lines[-1] == "" else lines
            keep = lines[:limits[split]] if limits[split] else lines
            (dst / f"{split}.{ext}").write_text("\n".join(keep) + "\n", encoding="utf-8")
    return dst


# --------------------------------------------------------------------------- finetuning

def train_command(args, task: str, mode: str, data: Path, save: Path) -> list[str]:
    flags = ["--task", task, "--mode", mode, "--model.init_from", str(Path(args.model).resolve()),
             "--data.dir", str(data.resolve()), "--data.max_source_length", str(args.max_source_length),
             "--run.save_dir", str(save.resolve()), "--run.micro_batch_size", str(args.micro_batch_size),
             "--run.eval_every", str(args.eval_every), "--eval.samples", str(args.dev_samples),
             "--eval.beam", str(args.beam)]
    if args.epochs is not None:
        flags += ["--epochs", str(args.epochs)]
    if args.max_steps is not None:
        flags += ["--run.max_steps", str(args.max_steps), "--run.save_every", str(args.max_steps)]
    if args.deepspeed_config:
        flags += ["--run.deepspeed_config", args.deepspeed_config]
    for extra in args.train_arg:
        flags += extra.split("=", 1)
    script = str(REPO / "finetune" / "train.py")
    if args.nproc == 1:
        return [sys.executable, script, *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
            script, *flags]


def finetune(args, task: str, mode: str, data: Path, run_dir: Path) -> Path:
    """Run finetune/train.py (resuming an interrupted run) and return its best dev checkpoint."""
    save = run_dir / "run"
    best = save / "best"
    cmd = train_command(args, task, mode, data, save)
    log(f"{task}/{mode}: finetuning -> {save} (log: {run_dir / 'train.log'})")
    with open(run_dir / "train.log", "a") as logf:
        proc = subprocess.run(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{task}/{mode}: finetuning failed (exit {proc.returncode}); see {run_dir / 'train.log'}")
    if not (best / "dev_scores.json").is_file():
        raise RuntimeError(f"{task}/{mode}: no best checkpoint in {best} after finetuning; see {run_dir / 'train.log'}")
    return best


# --------------------------------------------------------------------------- decoding + scoring

def systems_for(mode: str, iterations: list[int], beam: int) -> list[tuple[str, str, int | None]]:
    """(row name, decoder, iterations) of the rows a model finetuned in ``mode`` contributes."""
    ar = [(f"AR beam {beam}", "ar", None)]
    nar = [(f"NAR T={t}", "nar", t) for t in iterations]
    return {"ar": ar, "nar": nar, "janus": ar + nar + [("speculative", "spec", None)]}[mode]


def decode_and_score(args, task: str, mode: str, best: Path, data: Path, run_dir: Path) -> list[dict]:
    """Decode the test set with each of the mode's systems, score (official protocol), time batch 1."""
    import torch

    from data_pipeline.tokenizer import load_tokenizer
    from finetune.data import TASK_MAX_TARGET, read_lines
    from finetune.generate import decode_lines, default_device, latency_ms
    from finetune.glge_eval import score
    from janus.decoding import BeamConfig, MaskPredictConfig
    from janus.model import JanusBart
    from janus.speculative import SpecConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or default_device())
    model = JanusBart.from_bart(str(best)).eval().to(device)
    tok = load_tokenizer(str(best))
    src, ref = read_lines(str(data / "test.src")), read_lines(str(data / "test.tgt"))
    probe = src[:args.latency_samples]
    max_len = TASK_MAX_TARGET[task]
    rows = []
    for name, decoder, iters in systems_for(mode, args.iterations, args.beam):
        kw = dict(mode=decoder, max_source_length=args.max_source_length, beam=BeamConfig(beam=args.beam, max_len=max_len),
                  nar=MaskPredictConfig(iterations=iters or 0, max_len=max_len), spec=SpecConfig(max_len=max_len))
        log(f"{task}/{mode}: decoding {len(src)} test sources with {name}")
        with torch.inference_mode():
            hyps = decode_lines(model, tok, src, batch_size=args.batch_size, **kw)
            ms = latency_ms(model, tok, probe, 1, **kw)
        slug = name.replace(" ", "_").replace("=", "")
        (run_dir / f"test.{slug}.hyp").write_text("\n".join(hyps) + "\n", encoding="utf-8")
        variants = [(name, False)] + ([(f"{name} (dedup)", True)] if args.dedup_nar and decoder == "nar" else [])
        for label, dedup in variants:
            scores = score(task, hyps, ref, src, protocol="official", dedup=dedup, meteor=not args.no_meteor)
            rows.append({"system": label, "model": mode, "decoder": decoder, "iterations": iters, "dedup": dedup,
                         "ms_per_sample": ms, "hyp_file": str(run_dir / f"test.{slug}.hyp"), **scores})
    return rows


def run_task_mode(args, task: str, mode: str) -> dict:
    """One task/mode end to end, or its saved results when it was done before."""
    run_dir = Path(args.out) / task / mode
    done = run_dir / "results.json"
    if done.is_file():
        log(f"{task}/{mode}: done before ({done}), not redone")
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, task)
    best = finetune(args, task, mode, data, run_dir)
    rows = decode_and_score(args, task, mode, best, data, run_dir)
    result = {"task": task, "mode": mode, "best": str(best),
              "dev": json.loads((best / "dev_scores.json").read_text()), "rows": rows}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, done)  # written whole or not at all: the resume marker
    return result


# --------------------------------------------------------------------------- tables

def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def build_tables(results: list[dict], beam: int) -> dict:
    """Per task: the rows (AR beam first), each with OVERALL, latency and speed-up vs AR beam ``beam``."""
    tables = {}
    for task in TASKS:
        rows = [r for res in results if res["task"] == task for r in res["rows"]]
        if not rows:
            continue
        rank = {"ar": 0, "nar": 1, "spec": 2}
        rows.sort(key=lambda r: (rank[r["decoder"]], MODES.index(r["model"]), r["iterations"] or 0, r["dedup"]))
        base = next((r["ms_per_sample"] for r in rows if r["decoder"] == "ar" and r["model"] == "ar"), None)
        base = base or next((r["ms_per_sample"] for r in rows if r["decoder"] == "ar"), None)
        for r in rows:
            r["speedup"] = base / r["ms_per_sample"] if base and r["ms_per_sample"] else None
        tables[task] = {"title": TABLES[task][0], "baseline": f"AR beam {beam}", "rows": rows}
    return tables


def tables_markdown(tables: dict) -> str:
    out = ["# GLGE results (official protocol)", "",
           "Scores: GLGE's official evaluation (finetune.glge_eval --protocol official) on the test set; "
           "latency: median ms/sample at batch 1; speed-up against the task's AR beam search row. "
           "T = mask-predict refinement passes after the first.", ""]
    for table in tables.values():
        cols = TABLES[next(t for t in TASKS if TABLES[t][0] == table["title"])][1]
        out += [f"## {table['title']}", "",
                "| system | model | " + " | ".join(c for _, c in cols) + " | OVERALL | repetition % | ms/sample | speed-up |",
                "|---|---|" + "---|" * (len(cols) + 4)]
        for r in table["rows"]:
            speed = "n/a" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            out.append(f"| {r['system']} | {r['model']} | " + " | ".join(_fmt(r.get(k)) for k, _ in cols)
                       + f" | {_fmt(r['overall'])} | {_fmt(r['repetition'])} | {r['ms_per_sample']:.1f} | {speed} |")
        out.append("")
    return "\n".join(out)


def all_results(out: Path) -> list[dict]:
    """Every finished task/mode under ``out`` (this call's and earlier or parallel ones')."""
    return [json.loads((out / t / m / "results.json").read_text()) for t in TASKS for m in MODES
            if (out / t / m / "results.json").is_file()]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_tables(args) -> dict:
    """tables.json / tables.md from every finished task/mode in --out (array jobs share one folder)."""
    out = Path(args.out)
    tables = build_tables(all_results(out), args.beam)
    _write_atomic(out / "tables.json", json.dumps(tables, indent=2))
    _write_atomic(out / "tables.md", tables_markdown(tables) + "\n")
    return tables


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_inputs(args)
    except ValueError as e:
        parser.error(str(e))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        for mode in args.modes:
            run_task_mode(args, task, mode)
    tables = write_tables(args)
    log(f"tables: {Path(args.out) / 'tables.md'} and tables.json")
    print(tables_markdown(tables))
    return tables


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        sys.exit(f"error: {e}")
