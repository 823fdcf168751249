"""GLGE's official protocol (janus/glge_official.py) against an independent implementation of the
official scripts written here from their documented behaviour (ProphetNet's GLGE_baselines/script:
eval.py, files2rouge + ROUGE-1.5.5, eval_on_unilm_qg.py, qg/eval.py, personachat/eval.py with
NLTK 3.5, gigaword/eval.py, postprocess_cnn_dm.py). coco-caption's scorers (pycocoevalcap) are the
official scorer library and are called directly on the items built here. Every fixture is made of
official-format lines (untokenized references) and raw, cased model-style hypotheses, and every
task also checks that the "modern" (re-derived) protocol gives different numbers on it: those
assertions fail on the code that had only the modern protocol.
"""
import json
import math
import re
import subprocess
import sys
import unicodedata
from collections import Counter, defaultdict
from fractions import Fraction
from pathlib import Path

import pytest

from finetune.glge_eval import score
from janus.glge_official import bert_basic_tokenize, dedup_consecutive, evaluate_official, fix_tokenization
from janus.metrics import evaluate

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ BERT-uncased basic tokenization

def ref_bert(text: str) -> str:
    """BERT's BasicTokenizer(do_lower_case=True), written from its definition."""
    def punct(ch):
        cp = ord(ch)
        return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
            unicodedata.category(ch).startswith("P")

    out = []
    for word in text.split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        piece = ""
        for ch in word:
            if punct(ch):
                out += [piece] if piece else []
                out.append(ch)
                piece = ""
            else:
                piece += ch
        out += [piece] if piece else []
    return " ".join(out)


@pytest.mark.parametrize("text", ["India's N-Dubz café won't go (again)...", "\"Hi,\" she said; 3,000 U.S. $",
                                  "Ünïcode — dashes – and… ellipsis"])
def test_bert_basic_tokenization(text):
    assert bert_basic_tokenize(text) == ref_bert(text)
    assert bert_basic_tokenize("India's N-Dubz") == "india ' s n - dubz"  # submission_examples' form


def test_fix_tokenization_by_hand():
    assert fix_tokenization("what ' s the ( best ) \" way \" ?") == "what 's the -lrb- best -rrb- `` way '' ?"
    assert fix_tokenization("it isn ' t 3 , 000 or 3 . 5 - fold . . .") == "it is n't 3,000 or 3.5-fold ..."
    assert fix_tokenization("the U . N . said") == "the U.N. . said"  # the original consumes the acronym so
    assert fix_tokenization("' quoted ' [UNK]") == "` quoted ' UNK"


def test_dedup_consecutive():
    assert dedup_consecutive("the the cat cat sat the") == "the cat sat the"


# ------------------------------------------------------------------ ROUGE-1.5.5, re-implemented

# ROUGE-1.5.5's stems (-m: tokens longer than 3 characters go through the WordNet 2.0 exception
# lists, then the original Porter stemmer) for every such word in the fixtures, worked out by hand.
STEMS = {"children": "child", "went": "go", "goes": "go", "cafe": "cafe", "cake": "cake", "they": "thei",
         "dogs": "dog", "home": "home", "park": "park", "mice": "mouse", "caught": "catch", "better": "good",
         "plays": "plai", "played": "plai", "team": "team", "game": "game", "news": "new", "hours": "hour",
         "says": "sai", "said": "say", "when": "when", "killed": "kill", "with": "with", "from": "from", "police": "polic", "shot": "shoot",
         "city": "citi", "centre": "centr", "fire": "fire", "town": "town", "over": "over", "year": "year",
         "2015": "2015", "crashed": "crash", "into": "into", "wall": "wall", "driver": "driver",
         "injured": "injur", "there": "there", "people": "peopl", "were": "be", "hurt": "hurt",
         "minister": "minist", "resigned": "resign", "after": "after", "vote": "vote", "lost": "lose",
         "lrb": "lrb", "rrb": "rrb", "storm": "storm", "hits": "hit", "coast": "coast", "killing": "kill", "badly": "badli"}


def r155_tokens(text: str) -> list[str]:
    text = re.sub(r"[^a-z0-9-]", " ", text.lower().replace("-", " - "))
    toks = [t for t in text.split() if re.match(r"[a-z0-9$]", t)]
    missing = [t for t in toks if len(t) > 3 and t not in STEMS]
    assert not missing, f"add the ROUGE-1.5.5 stems of {missing} to STEMS"
    return [STEMS[t] if len(t) > 3 else t for t in toks]


def _r5(x: float) -> float:
    return float(f"{x:7.5f}")


def _prf(hit: int, model: int, peer: int) -> float:
    r, p = _r5(hit / model) if model else 0.0, _r5(hit / peer) if peer else 0.0
    return _r5(p * r / (0.5 * p + 0.5 * r)) if p + r > 0 else 0.0


def _lcs_positions(a: list[str], b: list[str]) -> set[int]:
    """Positions of ``a`` on one longest common subsequence with ``b``."""
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            t[i + 1][j + 1] = t[i][j] + 1 if a[i] == b[j] else max(t[i][j + 1], t[i + 1][j])
    i, j, pos = len(a), len(b), set()
    while i and j:
        if a[i - 1] == b[j - 1]:
            pos.add(i - 1)
            i, j = i - 1, j - 1
        elif t[i - 1][j] >= t[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return pos


def r155_doc(hyp_sents: list[str], ref_sents: list[str]) -> tuple[float, float, float]:
    """Per-document F of ROUGE-1/2 (n-grams over all sentences joined) and summary-level ROUGE-L
    (union LCS of each reference sentence with every hypothesis sentence, hits clipped by the
    unigram counts), each P/R/F rounded to 5 decimals as ROUGE-1.5.5 does."""
    h_s, r_s = [r155_tokens(s) for s in hyp_sents], [r155_tokens(s) for s in ref_sents]
    h, r = sum(h_s, []), sum(r_s, [])
    out = []
    for n in (1, 2):
        hg = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
        rg = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        out.append(_prf(sum((hg & rg).values()), sum(rg.values()), sum(hg.values())))
    hc, rc, hit = Counter(h), Counter(r), 0
    for ref in r_s:
        union = set().union(*(_lcs_positions(ref, hyp) for hyp in h_s)) if h_s else set()
        for j in sorted(union):
            if hc[ref[j]] > 0 and rc[ref[j]] > 0:
                hit, hc[ref[j]], rc[ref[j]] = hit + 1, hc[ref[j]] - 1, rc[ref[j]] - 1
    out.append(_prf(hit, len(r), len(h)))
    return tuple(out)


def perl_rand_ints(seed: int, n: int, count: int) -> list[int]:
    """``srand(seed); int(rand(n))`` x count in Perl >= 5.20 (its own drand48 on every platform)."""
    x, out = (seed << 16) + 0x330E, []
    for _ in range(count):
        x = (0x5DEECE66D * x + 0xB) % 2 ** 48
        out.append(int(x / 2 ** 48 * n))
    return out


def r155(pairs) -> dict:
    """ROUGE-1.5.5's Average_F with -r 1000: not the plain mean of the per-document F, but the mean
    of 1000 bootstrap means, resample i drawn with srand(i) over the documents in string order of
    their evaluation IDs (1, 10, 11, ..., 2, ...), rounded to 5 decimals."""
    docs = [r155_doc(h, r) for h, r in pairs]
    order = [int(i) - 1 for i in sorted(str(j + 1) for j in range(len(docs)))]
    n, out = len(docs), {}
    for m, name in enumerate(("rouge1", "rouge2", "rougeL")):
        means = [sum(docs[order[j]][m] for j in perl_rand_ints(seed, n, n)) / n for seed in range(1000)]
        out[name] = 100 * _r5(sum(sorted(means)) / 1000)
    return out


def files2rouge_split(line: str) -> list[str]:
    return [s for s in line.replace(" .", " .\n").split("\n") if s.strip()]


XSUM_REF = ["The children went to the café. They ate cake at home.",
            "Police say the driver was injured when his car crashed into a wall.",
            "A storm hits the coast, killing two people."]
XSUM_HYP = ["Children go to the café. They eat cake.",
            "The driver was injured after his car crashed into a wall, police said.",
            "Storm hits the coast . Two people were killed."]


def _close(got: dict, want: dict, keys) -> None:
    for k in keys:
        assert got[k] == pytest.approx(want[k], abs=2e-3), (k, got, want)


@pytest.mark.parametrize("task", ["xsum", "msnews"])
def test_files2rouge_tasks(task):
    pairs = [(files2rouge_split(ref_bert(h)), files2rouge_split(r)) for h, r in zip(XSUM_HYP, XSUM_REF)]
    want = r155(pairs)
    got = evaluate_official(task, XSUM_HYP, XSUM_REF)
    _close(got, want, ("rouge1", "rouge2", "rougeL"))
    modern = evaluate(task, XSUM_HYP, XSUM_REF)
    assert abs(modern["rouge1"] - want["rouge1"]) > 0.5  # rouge-score's stemmer and tokens differ


def test_rouge155_bootstrap_average_over_more_than_ten_documents():
    # 12 documents: ROUGE-1.5.5 orders them 1, 10, 11, 12, 2, ... before resampling
    hyps = [XSUM_HYP[i % 3] for i in range(12)]
    refs = [XSUM_REF[(i // 3) % 3] for i in range(12)]
    want = r155([(files2rouge_split(ref_bert(h)), files2rouge_split(r)) for h, r in zip(hyps, refs)])
    plain = [r155_doc(files2rouge_split(ref_bert(h)), files2rouge_split(r))[0] for h, r in zip(hyps, refs)]
    assert abs(want["rouge1"] - 100 * sum(plain) / 12) > 0.01  # the bootstrap mean is not the plain mean
    _close(evaluate_official("xsum", hyps, refs), want, ("rouge1", "rouge2", "rougeL"))


def test_empty_hypothesis_scores_zero_in_rouge155():
    got = evaluate_official("xsum", ["", XSUM_HYP[1]], ["a b c", XSUM_REF[1]])
    want = r155([([], ["a b c"]), (files2rouge_split(ref_bert(XSUM_HYP[1])), [XSUM_REF[1]])])
    _close(got, want, ("rouge1", "rouge2", "rougeL"))


def test_gigaword():
    refs = ["police shot man in city centre", "fire in town over ## year"]
    hyps = ["Police shot a man (in city centre)", "Fire in town over 10 year"]
    # fix_tokenization turns the brackets into -lrb- / -rrb- (ROUGE keeps "lrb"), 1 -> #
    post = ["police shot a man -lrb- in city centre -rrb-", "fire in town over #0 year"]
    assert [fix_tokenization(ref_bert(h)).replace("1", "#") for h in hyps] == post
    want = r155([([p], [r]) for p, r in zip(post, refs)])
    got = evaluate_official("gigaword", hyps, refs)
    _close(got, want, ("rouge1", "rouge2", "rougeL"))
    assert abs(evaluate("gigaword", hyps, refs)["rouge1"] - want["rouge1"]) > 0.5


def test_cnndm_postprocessing():
    refs = ["the driver was injured . <S_SEP> police said the car crashed into a wall .",
            "the minister resigned after the vote ."]
    hyps = ["The driver was injured badly. [X_SEP] Short one. [X_SEP] The driver was injured badly!"
            " [X_SEP] Police said the car crashed into a wall.",
            "The minister resigned after he lost the vote."]
    # pieces of <= 4 tokens go; a piece with > 70% of its words seen before goes
    kept = [["the driver was injured badly .", "police said the car crashed into a wall ."],
            ["the minister resigned after he lost the vote ."]]
    pairs = [(k, r.replace(" <S_SEP> ", "\n").split("\n")) for k, r in zip(kept, refs)]
    want = r155(pairs)
    got = evaluate_official("cnndm", hyps, refs)
    _close(got, want, ("rouge1", "rouge2", "rougeL"))
    assert abs(evaluate("cnndm", hyps, refs)["rougeL"] - want["rougeL"]) > 0.5


# ------------------------------------------------------------------ question generation

QG_SRC = ["Paris [SEP] Paris is the capital of France.", "paris [SEP] Paris is the capital of France. ",
          "1815 [SEP] Napoleon lost at Waterloo in 1815."]
QG_REF = ["what 's the capital of france ?", "which city is france 's capital ?", "when did napoleon lose at waterloo ?"]
QG_HYP = ["What's the capital of France?", "Which city is the capital?", "When did Napoleon lose at Waterloo?"]


def _coco(res, gts):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    return {"bleu4": 100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3], "rougeL": 100 * Rouge().compute_score(gts, res)[0]}


def test_squadqg_official():
    # eval_on_unilm_qg.py: hyp = fix_tokenization(hyp).lower(); src/ref stripped, lower-cased; last line wins
    res, gts = {}, defaultdict(list)
    for h, r, s in zip(QG_HYP, QG_REF, QG_SRC):
        key = s.strip().lower()
        res[key] = [fix_tokenization(ref_bert(h)).lower()]
        gts[key].append(r.lower())
    assert res["1815 [sep] napoleon lost at waterloo in 1815."] == ["when did napoleon lose at waterloo ?"]
    want = _coco(res, dict(gts))
    got = evaluate_official("squadqg", QG_HYP, QG_REF, QG_SRC, meteor=False)
    _close(got, want, ("bleu4", "rougeL"))
    modern = evaluate("squadqg", QG_HYP, QG_REF, QG_SRC, meteor=False)
    assert modern["bleu4"] < want["bleu4"] - 5


def test_squadqg_identical_up_to_tokenization_is_100():
    refs = ["what 's the capital of france ?", "who wrote `` hamlet '' -lrb- the play -rrb- ?"]
    hyps = ["What's the capital of France?", 'Who wrote "Hamlet" (the play)?']
    got = evaluate_official("squadqg", hyps, refs, ["s1", "s2"], meteor=False)
    assert got["bleu4"] == pytest.approx(100, abs=1e-4) and got["rougeL"] == pytest.approx(100)
    assert evaluate("squadqg", hyps, refs, ["s1", "s2"], meteor=False)["bleu4"] < 90


def test_msqg_no_lowercase_no_fix():
    refs = ["What is the capital of France ?", "who wrote it ?"]
    hyps = ["What is the capital of France?", "Who wrote it?"]
    srcs = ["a", "b"]
    res = {s: [ref_bert(h)] for h, s in zip(hyps, srcs)}  # qg/eval.py: lines as they are
    gts = {s: [r] for r, s in zip(refs, srcs)}
    want = _coco(res, gts)
    got = evaluate_official("msqg", hyps, refs, srcs, meteor=False)
    _close(got, want, ("bleu4", "rougeL"))
    assert abs(evaluate("msqg", hyps, refs, srcs, meteor=False)["bleu4"] - want["bleu4"]) > 5


# ------------------------------------------------------------------ PersonaChat: NLTK 3.5

def nltk35_bleu(ref: list[str], hyp: list[str], weights) -> float:
    """NLTK 3.5 sentence_bleu(method7) inside personachat/eval.py's try/except, written from
    NLTK 3.5's source: corpus_bleu over 4 orders, method4 (old formula) then method5."""
    def prec(n):
        hc = Counter(zip(*[hyp[i:] for i in range(n)])) if len(hyp) >= n else Counter()
        rc = Counter(zip(*[ref[i:] for i in range(n)]))
        return sum(min(c, rc[g]) for g, c in hc.items()), max(1, sum(hc.values()))

    try:
        counts = [prec(n) for n in range(1, 5)]
        if counts[0][0] == 0:
            return 0.0
        p_n = [Fraction(a, b) for a, b in counts]
        for i, (num, den) in enumerate(counts):  # method4 in NLTK 3.5
            if num == 0:
                p_n[i] = (i + 1 * 5 / math.log(len(hyp))) / den
        plus1 = p_n + [Fraction(*prec(5))]
        m = {-1: p_n[0] + 1}
        for i, p_i in enumerate(list(p_n)):  # method5
            p_n[i] = (m[i - 1] + p_i + plus1[i + 1]) / 3
            m[i] = p_n[i]
        c, r = len(hyp), len(ref)
        bp = 1 if c > r else math.exp(1 - r / c)
        return bp * math.exp(math.fsum(w * math.log(p) for w, p in zip(list(weights) + [0] * 4, p_n)))
    except (ValueError, ZeroDivisionError):
        return 0.0


PC_REF = ["i ' m a teacher . what about you ?", "i love my dog , he is so cute", "yes", "that sounds fun !",
          "i like to read books"]
PC_HYP = ["I'm a teacher. What do you do?", "I love my dog.", "Yes!", "Sounds like fun.", "hi"]


def test_method4_as_nltk35_by_hand():
    # hyp "i like dogs", ref "i like cats": p1 = 2/3, p2 = 1/2, p3 = 0/1 -> 2 + 5/ln 3, p4 = 0/1 -> 3 + 5/ln 3,
    # p5 = 0/1 (raw). method5: q1 = ((p1 + 1) + p1 + p2) / 3, q2 = (q1 + p2 + p3') / 3. BP = 1.
    p1, p2, p3 = 2 / 3, 1 / 2, 2 + 5 / math.log(3)
    q1 = (p1 + 1 + p1 + p2) / 3
    q2 = (q1 + p2 + p3) / 3
    ref, hyp = "i like cats".split(), "i like dogs".split()
    assert nltk35_bleu(ref, hyp, (1, 0, 0, 0)) == pytest.approx(q1)
    assert nltk35_bleu(ref, hyp, (0.5, 0.5, 0, 0)) == pytest.approx(math.sqrt(q1 * q2))
    got = evaluate_official("personachat", ["I like dogs"], ["i like cats"])
    assert got["bleu2"] == pytest.approx(100 * math.sqrt(q1 * q2))
    assert nltk35_bleu(["a", "b"], ["a"], (1, 0, 0, 0)) == 0.0  # one token: ZeroDivisionError -> 0


def test_nltk35_equals_current_nltk_without_zero_counts():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    ref, hyp = "the cat sat on the mat today".split(), "the cat sat on the mat".split()
    modern = sentence_bleu([ref], hyp, weights=(0.5, 0.5, 0, 0), smoothing_function=SmoothingFunction().method7)
    assert nltk35_bleu(ref, hyp, (0.5, 0.5, 0, 0)) == pytest.approx(modern)


def test_personachat_official():
    h_t = [ref_bert(h).split(" ") for h in PC_HYP]
    r_t = [r.split(" ") for r in PC_REF]
    want = {"bleu1": 100 * sum(nltk35_bleu(r, h, (1, 0, 0, 0)) for h, r in zip(h_t, r_t)) / len(h_t),
            "bleu2": 100 * sum(nltk35_bleu(r, h, (0.5, 0.5, 0, 0)) for h, r in zip(h_t, r_t)) / len(h_t)}
    for n in (1, 2):
        grams = Counter(g for t in h_t for g in zip(*[t[i:] for i in range(n)]))
        want[f"distinct{n}"] = 100 * (len(grams) + 1e-12) / (sum(grams.values()) + 1e-5)
    got = evaluate_official("personachat", PC_HYP, PC_REF)
    _close(got, want, want)
    modern = evaluate("personachat", PC_HYP, PC_REF)
    assert abs(modern["bleu1"] - want["bleu1"]) > 5 and abs(modern["distinct1"] - want["distinct1"]) > 1


def test_coqa_on_the_baselines_form():
    # the official F1 sees the baselines' form: "don't" -> "don ' t" -> tokens don, t
    got = evaluate_official("coqa", ["I don't know", "Paris"], ["dont know", "paris"])
    # "i don ' t know" -> [i, don, t, know] vs [dont, know]: P 1/4, R 1/2, F 1/3
    assert got["f1"] == pytest.approx(100 * (1 / 3 + 1) / 2)
    assert evaluate("coqa", ["I don't know", "Paris"], ["dont know", "paris"])["f1"] != pytest.approx(got["f1"])


def test_dedup_option_is_labelled():
    got = score("personachat", ["I I like like dogs"], ["i like dogs"], dedup=True)
    assert got["dedup"] is True and got["protocol"] == "official"
    assert got["bleu1"] == pytest.approx(evaluate_official("personachat", ["I like dogs"], ["i like dogs"])["bleu1"])


def test_cli_defaults_to_official(tmp_path):
    files = {"hyp": XSUM_HYP, "ref": XSUM_REF}
    for name, lines in files.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "finetune.glge_eval", "--task", "xsum", "--hyp", str(tmp_path / "hyp"),
           "--ref", str(tmp_path / "ref")]
    official = json.loads(subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout)
    modern = json.loads(subprocess.run(cmd + ["--protocol", "modern"], cwd=REPO, capture_output=True, text=True,
                                       check=True).stdout)
    assert official["protocol"] == "official" and modern["protocol"] == "modern"
    assert official["rouge1"] == pytest.approx(evaluate_official("xsum", XSUM_HYP, XSUM_REF)["rouge1"])
    assert modern["rouge1"] == pytest.approx(evaluate("xsum", XSUM_HYP, XSUM_REF)["rouge1"])
