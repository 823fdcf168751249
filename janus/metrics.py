"""GLGE evaluation metrics (docs/metrics.md), one function per metric family.

Every function takes plain lists of strings (one hypothesis / reference / source per
sample) and returns scores on GLGE's 0..100 scale (Distinct included, as in the papers'
tables). Empty hypotheses score 0; they never crash a metric. `evaluate` bundles the
metrics of one task with OVERALL (plain mean of the task's metrics) and the token
repetition ratio.

Heavy dependencies (rouge-score, nltk, pycocoevalcap, sacrebleu) are imported inside the
functions so that importing this module, and the CLI's --help, stay cheap.
"""
from __future__ import annotations

import re
import shutil
import string
from collections import Counter, defaultdict

ROUGE_TASKS = ("xsum", "cnndm", "gigaword", "msnews")
QG_TASKS = ("squadqg", "msqg")
TASKS = ROUGE_TASKS + QG_TASKS + ("personachat", "coqa", "nmt")

# Sentence boundaries for summary-level ROUGE-L: files2rouge splits on " ."; CNN/DM's GLGE
# files mark sentences with <S_SEP> (references) / [X_SEP] (UniLM-style outputs).
_SENT_SPLIT = re.compile(r" \.|<S_SEP>|\[X_SEP\]")


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed on this machine (e.g. METEOR without Java)."""


def check_same_length(**columns: list[str] | None) -> None:
    """Raise ValueError naming every column and its length unless all lengths agree."""
    sizes = {name: len(col) for name, col in columns.items() if col is not None}
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{name}={n}" for name, n in sizes.items())
        raise ValueError(f"line counts differ: {detail}")


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def rouge_summary(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F1 x100: Porter stemming, summary-level ROUGE-L (rougeLsum over
    " ."-split sentences), plain mean of per-example F1 (files2rouge as used by GLGE)."""
    from rouge_score import rouge_scorer

    check_same_length(hyps=hyps, refs=refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)

    def sentences(text: str) -> str:  # rougeLsum reads sentences from newlines
        return "\n".join(s.strip() for s in _SENT_SPLIT.split(text) if s.strip())

    per_example = [scorer.score(sentences(r), sentences(h)) for h, r in zip(hyps, refs)]
    return {name: 100 * _mean(s[key].fmeasure for s in per_example)
            for name, key in (("rouge1", "rouge1"), ("rouge2", "rouge2"), ("rougeL", "rougeLsum"))}


def _group_by_source(hyps, refs, srcs, lowercase):
    """coco-caption input as GLGE's QG scripts build it: one item per distinct source,
    all its references, and the hypothesis of the item's last line (a dict overwrite in
    the official script; identical sources normally get identical outputs anyway)."""
    res, gts = {}, defaultdict(list)
    for h, r, s in zip(hyps, refs, srcs):
        if lowercase:
            h, r, s = h.lower(), r.lower(), s.lower()
        key = " ".join(s.split())
        res[key] = [" ".join(h.split())]
        gts[key].append(" ".join(r.split()))
    return res, dict(gts)


def meteor_1_5(res: dict[str, list[str]], gts: dict[str, list[str]]) -> float:
    """Corpus METEOR 1.5 (x100) from pycocoevalcap's jar: res maps item -> [hypothesis],
    gts maps item -> references. Raises MetricUnavailable without a working Java; no other
    METEOR implementation is substituted (NLTK's differs by several points)."""
    if shutil.which("java") is None:
        raise MetricUnavailable(
            "METEOR 1.5 needs Java, but no 'java' command is on PATH; METEOR is reported "
            "as null (no other METEOR implementation is substituted)")
    from pycocoevalcap.meteor.meteor import Meteor

    # "|||" is the jar's field separator; pycocoevalcap strips it from hypotheses only.
    gts = {k: [r.replace("|||", " ") for r in v] for k, v in gts.items()}
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    except (OSError, ValueError) as e:  # JVM died or printed something unexpected
        raise MetricUnavailable(f"METEOR 1.5 jar failed ({e}); METEOR is reported as null") from e
    finally:
        if scorer.lock.locked():  # compute_score keeps it when it fails midway; __del__ needs it
            scorer.lock.release()
        del scorer  # closes the JVM now, not at interpreter exit
    return 100 * score


def coco_qg(hyps: list[str], refs: list[str], srcs: list[str], lowercase: bool = True,
            meteor: bool = True) -> dict:
    """Question-generation metrics as GLGE computes them with coco-caption: corpus BLEU-4
    ('closest' reference length), METEOR 1.5 and ROUGE-L (beta 1.2), x100, over items
    grouped by source (multi-reference). SQuAD QG lower-cases everything (lowercase=True);
    MSQG's script does not. If METEOR cannot run, "meteor" is None and "note" says why."""
    check_same_length(hyps=hyps, refs=refs, srcs=srcs)
    res, gts = _group_by_source(hyps, refs, srcs, lowercase)
    return coco_qg_grouped(res, gts, meteor)


def coco_qg_grouped(res: dict[str, list[str]], gts: dict[str, list[str]], meteor: bool = True) -> dict:
    """coco-caption BLEU-4 ('closest' reference length), METEOR 1.5 and ROUGE-L (beta 1.2), x100,
    of items already grouped: res maps item -> [hypothesis], gts maps item -> references.
    If METEOR cannot run, "meteor" is None and "note" says why."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    out = {"bleu4": 100 * float(bleu[3]), "meteor": None, "rougeL": 100 * float(rouge)}
    if meteor:
        try:
            out["meteor"] = meteor_1_5(res, gts)
        except MetricUnavailable as e:
            out["note"] = str(e)
    return out


def dialog_bleu(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """PersonaChat BLEU-1/2 x100: mean over samples of NLTK sentence_bleu with
    SmoothingFunction().method7 on whitespace tokens (GLGE's personachat/eval.py).
    method7 always averages neighbouring n-gram orders, so BLEU-1 of an exact copy
    exceeds 100; that is what the official numbers contain."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    check_same_length(hyps=hyps, refs=refs)
    smooth = SmoothingFunction().method7
    b1, b2 = [], []
    for h, r in zip(hyps, refs):
        h, r = h.split(), r.split()
        if not h:  # no unigram matches possible: 0 (the official script's try/except also gives 0)
            b1.append(0.0), b2.append(0.0)
            continue
        b1.append(sentence_bleu([r], h, weights=(1, 0, 0, 0), smoothing_function=smooth))
        b2.append(sentence_bleu([r], h, weights=(0.5, 0.5, 0, 0), smoothing_function=smooth))
    return {"bleu1": 100 * _mean(b1), "bleu2": 100 * _mean(b2)}


def distinct(hyps: list[str]) -> dict[str, float]:
    """Distinct-1/2 x100: unique n-grams / all n-grams, pooled over all predictions."""
    toks = [h.split() for h in hyps]
    out = {}
    for n in (1, 2):
        grams = [tuple(t[i:i + n]) for t in toks for i in range(len(t) - n + 1)]
        out[f"distinct{n}"] = 100 * len(set(grams)) / len(grams) if grams else 0.0
    return out


def _coqa_tokens(text: str) -> list[str]:
    """SQuAD/CoQA answer normalisation: lower-case, drop punctuation and articles."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def coqa_f1(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """CoQA as GLGE scores it (evaluate-v1.0.py --golden-file): mean token F1 x100 of each
    line against its one reference after answer normalisation; when either side normalises
    to nothing, the score is 1 if both do and 0 otherwise."""
    check_same_length(hyps=hyps, refs=refs)
    scores = []
    for h, r in zip(hyps, refs):
        h, r = _coqa_tokens(h), _coqa_tokens(r)
        if not h or not r:
            scores.append(float(h == r))
            continue
        same = sum((Counter(h) & Counter(r)).values())
        scores.append(0.0 if same == 0 else 2 * same / (len(h) + len(r)))
    return {"f1": 100 * _mean(scores)}


def nmt_bleu(hyps: list[str], refs: list[str]) -> dict:
    """sacreBLEU corpus BLEU (default 13a tokenisation) with its signature string."""
    from sacrebleu.metrics import BLEU

    check_same_length(hyps=hyps, refs=refs)
    metric = BLEU()
    return {"bleu": metric.corpus_score(hyps, [refs]).score, "signature": str(metric.get_signature())}


def repetition_ratio(hyps: list[str]) -> float:
    """Token repetition ratio x100 (paper Table 3): share of generated whitespace tokens
    that equal the token right before them, pooled over all hypotheses."""
    total = repeated = 0
    for h in hyps:
        t = h.split()
        total += len(t)
        repeated += sum(a == b for a, b in zip(t, t[1:]))
    return 100 * repeated / total if total else 0.0


def evaluate(task: str, hyps: list[str], refs: list[str], srcs: list[str] | None = None,
             meteor: bool = True) -> dict:
    """All GLGE metrics of `task` in the "modern" protocol (re-derived from the papers' metric
    descriptions with today's packages; not the official numbers: janus.glge_official has those)
    plus OVERALL and the repetition ratio, JSON-ready.
    OVERALL is None when one of the task's metrics is unavailable (METEOR without Java):
    a mean over fewer metrics would not be comparable to GLGE's."""
    check_same_length(hyps=hyps, refs=refs, srcs=srcs)
    if not hyps:
        raise ValueError("nothing to evaluate: 0 lines")
    if task in ROUGE_TASKS:
        scores = rouge_summary(hyps, refs)
    elif task in QG_TASKS:
        if srcs is None:
            raise ValueError(f"{task} needs the source lines: items are grouped by source")
        scores = coco_qg(hyps, refs, srcs, lowercase=task == "squadqg", meteor=meteor)
    elif task == "personachat":
        scores = {**dialog_bleu(hyps, refs), **distinct(hyps)}
    elif task == "coqa":
        scores = coqa_f1(hyps, refs)
    elif task == "nmt":
        scores = nmt_bleu(hyps, refs)
    else:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return package_scores(task, hyps, scores, protocol="modern")


def package_scores(task: str, hyps: list[str], scores: dict, protocol: str) -> dict:
    """One task's result, JSON-ready: task, protocol, n, the metrics, OVERALL (None when a metric
    is unavailable), the repetition ratio of ``hyps`` and any signature/note."""
    scores = dict(scores)
    extras = {k: scores.pop(k) for k in ("signature", "note") if k in scores}
    values = list(scores.values())
    overall = None if None in values else _mean(values)
    return {"task": task, "protocol": protocol, "n": len(hyps), **scores, "overall": overall,
            "repetition": repetition_ratio(hyps), **extras}
