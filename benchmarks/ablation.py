"""The paper's NMT ablation (Table 6), iteration curve (Figure 4) and token repetition (Table 3),
plus the Multi-Task NAT baseline, trained from scratch on the same data with the same budget.

    python -m benchmarks.ablation                         # small CPU run on German-English pairs (~45 min, 2 cores)
    python -m benchmarks.ablation --steps 2000 --arch transformer_iwslt_de_en --data-dir data/iwslt14 ...

Systems (``--systems``, comma-separated; default all): AR, CMLM, AUX, AR+NAR, AR+NAR+KL (paper
Table 6 rows), JANUS-paper (eq. 5), JANUS-released (the reference code's weights), MT-NAT
(Multi-Task NAT, lambda_t = t/T). Every system: same data, same BPE, same steps and batch (so the
same sentences in the same order per seed), same model dims, same masking, same seeds. Systems in
``--key-systems`` (JANUS-paper and CMLM) run with every seed in ``--key-seeds``; the others with the
first one. Each run is ``finetune/nmt.py`` (the shared DeepSpeed loop), which averages its last 5
checkpoints and decodes the test set: AR beam 5 when the AR pattern (or AUX) was trained,
mask-predict at each T of ``--iterations`` when NAR (or AUX) was; T = refinement passes after the
first (T + 1 decoder passes, top-5 lengths).

Data: without ``--data-dir``, full-sentence German-English pairs from Debian's ``trans-de-en``
dictionary (``/usr/share/trans/de-en``, ``de :: en`` lines whose ``|``-separated parts align); the
set-up installs the package with apt-get when it is missing (root), keeps example sentences only
(capitalised, ending in . ! ?, >= 3 words, no ``;``/``/``/brackets, at most ``--max-words`` (10) words),
de-duplicates both sides, shuffles with a fixed seed and splits test/valid/train. The text is
written under ``--out`` and never committed.

Writes ``<out>/ablation.json``, ``<out>/ablation.md`` (BLEU per system and mode, mean over seeds and
every seed, token repetition per T, median training time per step and its ratio to AR) and
``<out>/bleu_vs_iterations.png``. Results are updated after every run, and a finished run is reused
when the command is repeated with the same settings. The last printed line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRANS_FILE = "/usr/share/trans/de-en"

# name -> extra flags for finetune/nmt.py
SYSTEMS: dict[str, list[str]] = {
    "AR": ["--objective.preset", "ar"],
    "CMLM": ["--objective.preset", "cmlm"],
    "AUX": ["--objective.preset", "aux"],
    "AR+NAR": ["--objective.preset", "ar+nar"],
    "AR+NAR+KL": ["--objective.preset", "ar+nar+kl"],
    "JANUS-paper": ["--objective.preset", "paper"],
    "JANUS-released": ["--objective.preset", "released"],
    "MT-NAT": ["--system", "mtnat"],
}
_BAD = re.compile(r"[{}\[\]<>/;…~]")


# ------------------------------------------------------------------------------------------ data
def ensure_trans_de_en(path: str = TRANS_FILE) -> str:
    """The dictionary file, installing Debian's trans-de-en with apt-get when it is missing."""
    if os.path.exists(path):
        return path
    if path != TRANS_FILE:
        raise FileNotFoundError(f"{path}: no such file")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise FileNotFoundError(f"{path} is missing: install Debian's trans-de-en (apt-get install trans-de-en) "
                                "or pass --data-dir with {train,valid,test}.{de,en}")
    print(f"installing trans-de-en (apt-get) for {path}", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "trans-de-en"], check=True, env=env)
    if not os.path.exists(path):
        raise FileNotFoundError(f"trans-de-en installed but {path} is missing")
    return path


def _is_sentence(text: str, max_words: int) -> bool:
    words = len(text.split())
    return (not _BAD.search(text) and text[:1].isupper() and text[-1:] in ".!?" and 3 <= words <= max_words)


def extract_pairs(path: str, max_words: int = 15) -> list[tuple[str, str]]:
    """Full-sentence (de, en) pairs from a trans-style dictionary (``de | de :: en | en`` lines)."""
    pairs, seen_de, seen_en = [], set(), set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or " :: " not in line:
                continue
            de, en = line.rstrip("\n").split(" :: ", 1)
            de_parts, en_parts = de.split(" | "), en.split(" | ")
            if len(de_parts) != len(en_parts):
                continue
            for d, e in zip(de_parts, en_parts):
                d, e = " ".join(d.split()), " ".join(e.split())
                if not (_is_sentence(d, max_words) and _is_sentence(e, max_words)):
                    continue
                if d in seen_de or e in seen_en:  # no sentence on both sides of a split
                    continue
                seen_de.add(d)
                seen_en.add(e)
                pairs.append((d, e))
    return pairs


def write_splits(pairs: list[tuple[str, str]], out: Path, test: int, valid: int, max_train: int = 0) -> dict:
    pairs = sorted(pairs)
    random.Random(0).shuffle(pairs)
    if len(pairs) < test + valid + 10:
        raise ValueError(f"only {len(pairs)} sentence pairs: too few for test {test} + valid {valid} + train")
    splits = {"test": pairs[:test], "valid": pairs[test:test + valid], "train": pairs[test + valid:]}
    if max_train:
        splits["train"] = splits["train"][:max_train]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (out / f"{name}.de").write_text("".join(d + "\n" for d, _ in rows), encoding="utf-8")
        (out / f"{name}.en").write_text("".join(e + "\n" for _, e in rows), encoding="utf-8")
    return {k: len(v) for k, v in splits.items()}


# ------------------------------------------------------------------------------------------ runs
def run_flags(args, data_dir: Path, tok_dir: Path, save_dir: Path, seed: int) -> list[str]:
    flags = ["--data.dir", str(data_dir), "--data.src_lang", "de", "--data.tgt_lang", "en",
             "--data.tokenizer", str(tok_dir), "--data.max_source_length", str(args.max_len),
             "--data.max_target_length", str(args.max_len), "--data.masking", args.masking,
             "--data.seed", str(seed), "--run.seed", str(seed), "--model.arch", args.arch,
             "--run.max_steps", str(args.steps), "--run.micro_batch_size", str(args.micro_batch),
             "--run.save_every", str(max(1, args.steps // args.checkpoints_per_run)), "--run.keep_last", "5",
             "--run.log_every", str(max(1, args.steps // 20)), "--run.save_dir", str(save_dir),
             "--run.tensorboard", "false", "--run.resume", "none",
             "--optim.lr", str(args.lr), "--optim.warmup_steps", str(args.warmup),
             "--eval.average", "5", "--eval.iterations", args.iterations, "--eval.beam", "5",
             "--eval.batch_size", "50"]
    for name in ("layers", "d_model", "ffn", "heads", "dropout"):
        value = getattr(args, name)
        if value is not None:
            flags += [f"--model.{name}", str(value)]
    return flags


def launch(flags: list[str], nproc: int, log: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    env.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's JIT ops: a cache per Python environment, so two venvs never rebuild over each other.
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "finetune/nmt.py", *flags]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n"
                           + "".join(open(log).readlines()[-30:]))
    return json.loads(open(log).read().strip().splitlines()[-1])


def in_process(flags: list[str], log: Path) -> dict:
    """One rank in this process (no launcher start-up: quick smoke runs)."""
    import contextlib

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from finetune import nmt

    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        result = nmt.main(flags)
    return result


def run_one(args, name: str, seed: int, data_dir: Path, tok_dir: Path) -> dict:
    save = Path(args.out) / "runs" / f"{re.sub(r'[^A-Za-z0-9]+', '_', name)}_seed{seed}"
    flags = run_flags(args, data_dir, tok_dir, save, seed) + SYSTEMS[name] + ["--name", name]
    stamp = save / "ablation_flags.json"
    if (save / "results.json").exists() and stamp.exists() and json.loads(stamp.read_text()) == flags:
        result = json.loads((save / "results.json").read_text())  # finished earlier with the same settings
        if "heldout_nll" in result:
            return result
        return _add_losses(result, save, data_dir, args)
    if save.exists():
        shutil.rmtree(save)
    save.mkdir(parents=True)
    t = time.perf_counter()
    result = launch(flags, args.nproc, save / "train.log") if args.nproc > 1 else in_process(flags, save / "train.log")
    result["wall_seconds_total"] = time.perf_counter() - t
    stamp.write_text(json.dumps(flags))
    return _add_losses(result, save, data_dir, args)


def _add_losses(result: dict, save: Path, data_dir: Path, args) -> dict:
    modes = result.get("bleu", {})
    result["train_loss"] = final_train_losses(save)
    result["heldout_nll"] = heldout_nll(save / "final", data_dir, "test", args.max_len,
                                        ar=any(m.startswith("ar") for m in modes),
                                        nar=any(m.startswith("nar") for m in modes))
    (save / "results.json").write_text(json.dumps(result, indent=2))
    return result


# ------------------------------------------------------------------------------------------ held-out NLL
def heldout_nll(final_dir: Path, data_dir: Path, split: str, max_len: int, ar: bool, nar: bool,
                batch_size: int = 100, mask_seed: int = 12345) -> dict:
    """Per-token test NLL (no label smoothing) of the averaged model: ``ar`` = the AR pattern on every
    target token, ``nar`` = the NAR pattern on the masked tokens of one fixed set of CMLM masks (the same
    masks for every system). A far less noisy measure than BLEU when models are this small."""
    import numpy as np
    import torch

    from data_pipeline.collate import pad_batch
    from data_pipeline.tokenizer import load_tokenizer
    from finetune.data import cmlm_mask, read_lines, tokenize
    from janus.model import JanusBart
    from janus.objectives import KL_TERMS, ObjectiveConfig

    model = JanusBart.from_bart(str(final_dir)).eval()
    tok = load_tokenizer(final_dir)
    src = tokenize(tok, read_lines(str(data_dir / f"{split}.de")), max_len, "src")
    tgt = tokenize(tok, read_lines(str(data_dir / f"{split}.en")), max_len, "tgt")
    objective = ObjectiveConfig(ar=float(ar), nar=float(nar), aux=0.0, **{k: 0.0 for k in KL_TERMS},
                                label_smoothing=0.0, reduction="sum")
    sums = {"ar": 0.0, "nar": 0.0, "n_tokens": 0.0, "n_masked": 0.0}
    with torch.no_grad():
        for start in range(0, len(src), batch_size):
            ids = np.arange(start, min(start + batch_size, len(src)))
            x, xv = pad_batch([src.get(i) for i in ids], tok.pad_token_id, np.int64)
            y, yv = pad_batch([tgt.get(i) for i in ids], tok.pad_token_id, np.int64)
            dm = cmlm_mask(yv.sum(1), y.shape[1], mask_seed, np.zeros_like(ids), ids)
            out = model(torch.from_numpy(x), torch.from_numpy(xv.astype(np.int64)), torch.from_numpy(y),
                        torch.from_numpy(dm), objective=objective)
            for k in sums:
                if k in out.losses:
                    sums[k] += float(out.losses[k])
    result = {}
    if ar:
        result["ar"] = sums["ar"] / sums["n_tokens"]
    if nar:
        result["nar"] = sums["nar"] / sums["n_masked"]
    return result


def final_train_losses(save_dir: Path, share: float = 0.25) -> dict:
    """Mean of each logged loss term over the last ``share`` of training (label-smoothed, as trained)."""
    rows = [json.loads(line) for line in open(save_dir / "metrics.jsonl")]
    last = rows[-1]["step"]
    tail = [r for r in rows if r["step"] > (1 - share) * last] or rows[-1:]
    keys = [k for k in tail[-1] if k.startswith("loss/") and k != "loss/lambda"]
    return {k[5:]: statistics.fmean(r[k] for r in tail if k in r) for k in keys}


# ------------------------------------------------------------------------------------------ report
def _stats(values: list[float]) -> dict:
    out = {"mean": statistics.fmean(values), "values": values}
    if len(values) > 1:
        out["std"] = statistics.stdev(values)
    return out


def aggregate(results: dict[str, list[dict]]) -> dict:
    table = {}
    for name, runs in results.items():
        if not runs:
            continue
        modes = sorted({m for r in runs for m in r.get("bleu", {})}, key=_mode_key)
        table[name] = {
            "seeds": [r["seed"] for r in runs],
            "bleu": {m: _stats([r["bleu"][m] for r in runs if m in r["bleu"]]) for m in modes},
            "repetition": {m: _stats([r["repetition"][m] for r in runs if m in r["repetition"]]) for m in modes},
            "heldout_nll": {m: _stats([r["heldout_nll"][m] for r in runs if m in r.get("heldout_nll", {})])
                            for m in ("ar", "nar") if any(m in r.get("heldout_nll", {}) for r in runs)},
            "train_loss": {k: _stats([r["train_loss"][k] for r in runs if k in r.get("train_loss", {})])
                           for k in sorted({k for r in runs for k in r.get("train_loss", {})})},
            "step_seconds": _stats([r["train"]["median_step_seconds"] for r in runs]),
            "tokens_per_step": runs[0]["train"].get("tokens_per_step"),
            "parameters": runs[0].get("parameters"),
            "steps": runs[0].get("steps"),
        }
    ar = table.get("AR", {}).get("step_seconds", {}).get("mean")
    for row in table.values():
        row["step_time_vs_ar"] = row["step_seconds"]["mean"] / ar if ar else None
    return table


def _mode_key(mode: str):
    return (0, 0) if mode.startswith("ar") else (1, int(mode.split("T")[1]))


def _fmt(stat: dict | None, digits: int = 2) -> str:
    if not stat:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    if len(stat["values"]) > 1:
        text += f" ± {stat['std']:.{digits}f} (" + ", ".join(f"{v:.{digits}f}" for v in stat["values"]) + ")"
    return text


def markdown(table: dict, meta: dict, iterations: list[int]) -> str:
    lines = [f"# NMT ablation ({meta['data']['source']})", "",
             f"Train/valid/test pairs: {meta['data']['splits']}; BPE {meta['vocab_size']}; arch {meta['arch']} "
             f"{meta.get('dims', '')}; {meta['steps']} steps x {meta['global_batch']} sentences; masking "
             f"{meta['masking']}; lr {meta['lr']} (inverse sqrt, warmup {meta['warmup']}); last 5 checkpoints averaged. "
             f"NAR T = refinement passes after the first (T + 1 decoder passes), top-5 lengths. "
             f"sacreBLEU {meta.get('signature', '')}.", "",
             "## BLEU (test)", "",
             "| system | seeds | AR beam 5 | " + " | ".join(f"NAR T={t}" for t in iterations) + " |",
             "|---|---|---|" + "---|" * len(iterations)]
    for name, row in table.items():
        b = row["bleu"]
        ar = next((v for k, v in b.items() if k.startswith("ar")), None)
        lines.append(f"| {name} | {','.join(map(str, row['seeds']))} | {_fmt(ar)} | "
                     + " | ".join(_fmt(b.get(f"nar_T{t}")) for t in iterations) + " |")
    lines += ["", "## Test NLL per BPE token (no label smoothing; lower is better)", "",
              "AR = the AR pattern on every target token; NAR = the NAR pattern on the masked tokens of one fixed "
              "set of CMLM masks (identical for every system). Last column: training losses (label-smoothed) "
              "averaged over the last quarter of training.", "",
              "| system | AR NLL | NAR NLL | final train losses |", "|---|---|---|---|"]
    for name, row in table.items():
        nll = row.get("heldout_nll", {})
        losses = ", ".join(f"{k} {v['mean']:.3f}" for k, v in row.get("train_loss", {}).items()
                           if not k.startswith("kl") and k != "total")
        lines.append(f"| {name} | {_fmt(nll.get('ar'), 3)} | {_fmt(nll.get('nar'), 3)} | {losses} |")
    lines += ["", "## Token repetition (% of output tokens equal to the previous one)", "",
              "| system | AR beam 5 | " + " | ".join(f"NAR T={t}" for t in iterations) + " |",
              "|---|---|" + "---|" * len(iterations)]
    for name, row in table.items():
        r = row["repetition"]
        ar = next((v for k, v in r.items() if k.startswith("ar")), None)
        lines.append(f"| {name} | {_fmt(ar)} | " + " | ".join(_fmt(r.get(f"nar_T{t}")) for t in iterations) + " |")
    lines += ["", "## Training cost", "", "| system | s/step (median) | x AR | parameters (training) | tokens/step |",
              "|---|---|---|---|---|"]
    for name, row in table.items():
        ratio = f"{row['step_time_vs_ar']:.2f}" if row["step_time_vs_ar"] else "-"
        lines.append(f"| {name} | {_fmt(row['step_seconds'], 3)} | {ratio} | {row['parameters']} | "
                     f"{row['tokens_per_step']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(table: dict, iterations: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in table.items():
        pts = [(t, row["bleu"][f"nar_T{t}"]) for t in iterations if f"nar_T{t}" in row["bleu"]]
        if pts:
            xs = [t for t, _ in pts]
            ys = [s["mean"] for _, s in pts]
            lo = [s["mean"] - min(s["values"]) for _, s in pts]
            hi = [max(s["values"]) - s["mean"] for _, s in pts]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=f"{name} (NAR)")
    for name in ("AR", "JANUS-paper"):
        ar = next((v for k, v in table.get(name, {}).get("bleu", {}).items() if k.startswith("ar")), None)
        if ar:
            ax.axhline(ar["mean"], linestyle="--", linewidth=1, color="grey" if name == "AR" else "black",
                       label=f"{name}: AR beam 5")
    ax.set_xlabel("mask-predict iterations T (refinement passes after the first)")
    ax.set_ylabel("test BLEU")
    ax.set_xticks(iterations)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("BLEU vs iterations (bars: min..max over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--data-dir", help="existing {train,valid,test}.{de,en} (default: build from trans-de-en)")
    p.add_argument("--dict-file", default=TRANS_FILE, help="trans-style dictionary to extract sentence pairs from")
    p.add_argument("--max-words", type=int, default=10, help="longest sentence kept (words, each side)")
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--valid-size", type=int, default=100)
    p.add_argument("--max-train", type=int, default=0, help="cap on training pairs (0 = all)")
    p.add_argument("--vocab-size", type=int, default=2000, help="joint BPE size")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--key-systems", default="JANUS-paper,CMLM", help="systems run with every --key-seeds seed")
    p.add_argument("--key-seeds", default="1,2")
    p.add_argument("--arch", default="cpu_small")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", dest="d_model", type=int, default=128)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--micro-batch", type=int, default=32, help="sentences per rank and step")
    p.add_argument("--nproc", type=int, default=2, help="ranks (1 = in this process, no launcher)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--checkpoints-per-run", type=int, default=20, help="save every steps/this (last 5 averaged)")
    p.add_argument("--max-len", type=int, default=40, help="BPE tokens per side incl. <s> </s>")
    p.add_argument("--masking", default="cmlm", choices=["cmlm", "span"])
    p.add_argument("--iterations", default="1,4,10")
    args = p.parse_args(argv)

    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        p.error(f"unknown system(s) {unknown}; choose from {list(SYSTEMS)}")
    key = {n.strip() for n in args.key_systems.split(",") if n.strip()}
    seeds = [int(s) for s in args.key_seeds.split(",")]
    iterations = [int(t) for t in args.iterations.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # Data and one joint BPE shared by every system.
    if args.data_dir:
        data_dir = Path(args.data_dir)
        source = str(data_dir)
        splits = {s: sum(1 for _ in open(data_dir / f"{s}.de", encoding="utf-8")) for s in ("train", "valid", "test")}
    else:
        dict_file = ensure_trans_de_en(args.dict_file)
        data_dir = out / "data"
        pairs = extract_pairs(dict_file, args.max_words)
        splits = write_splits(pairs, data_dir, args.test_size, args.valid_size, args.max_train)
        origin = " (Debian trans-de-en)" if dict_file == TRANS_FILE else ""
        source = f"{dict_file}{origin}, {len(pairs)} sentence pairs of <= {args.max_words} words"
    print(f"data: {source}; splits {splits}", flush=True)
    tok_dir = out / "bpe"
    from finetune.data import read_lines
    from finetune.nmt import train_joint_bpe

    train_joint_bpe(read_lines(str(data_dir / "train.de")), read_lines(str(data_dir / "train.en")),
                    args.vocab_size, str(tok_dir))

    # Key systems first (their seeds matter most), then the rest; results are rewritten after each run.
    plan = [(n, s) for s in seeds for n in names if n in key] + [(n, seeds[0]) for n in names if n not in key]
    results: dict[str, list[dict]] = {n: [] for n in names}
    meta = {"data": {"source": source, "splits": splits}, "vocab_size": args.vocab_size, "arch": args.arch,
            "dims": {k: getattr(args, k) for k in ("layers", "d_model", "ffn", "heads", "dropout")},
            "steps": args.steps, "global_batch": args.micro_batch * args.nproc, "nproc": args.nproc,
            "masking": args.masking, "lr": args.lr, "warmup": args.warmup, "iterations": iterations,
            "seeds": {n: (seeds if n in key else seeds[:1]) for n in names}}
    table: dict = {}
    for i, (name, seed) in enumerate(plan, 1):
        t = time.perf_counter()
        r = run_one(args, name, seed, data_dir, tok_dir)
        results[name].append(r)
        meta["signature"] = r.get("signature") or meta.get("signature")
        print(f"[{i}/{len(plan)}] {name} seed {seed}: BLEU "
              + ", ".join(f"{k} {v:.2f}" for k, v in r.get("bleu", {}).items())
              + f"  ({r['train']['median_step_seconds']:.3f} s/step, {time.perf_counter() - t:.0f}s)", flush=True)
        table = aggregate({n: results[n] for n in names})
        meta["elapsed_seconds"] = time.perf_counter() - t_start
        (out / "ablation.json").write_text(json.dumps({"meta": meta, "systems": table}, indent=2))
        (out / "ablation.md").write_text(markdown(table, meta, iterations))
    plot(table, iterations, out / "bleu_vs_iterations.png")
    summary = {"out": str(out), "elapsed_seconds": round(time.perf_counter() - t_start, 1),
               "signature": meta.get("signature"),
               "bleu": {n: {m: round(s["mean"], 2) for m, s in row["bleu"].items()} for n, row in table.items()},
               "heldout_nll": {n: {m: round(s["mean"], 3) for m, s in row.get("heldout_nll", {}).items()}
                               for n, row in table.items()},
               "step_time_vs_ar": {n: (round(row["step_time_vs_ar"], 2) if row["step_time_vs_ar"] else None)
                                   for n, row in table.items()},
               "files": [str(out / f) for f in ("ablation.json", "ablation.md", "bleu_vs_iterations.png")]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
