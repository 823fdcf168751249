"""GLGE metrics against hand computations on tiny examples (the arithmetic is in the
comments), plus the CLI end to end. Only the METEOR test starts a JVM (~10 s)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.glge_eval import read_aligned, read_lines, score
from janus.metrics import coco_qg, coqa_f1, dialog_bleu, distinct, evaluate, nmt_bleu, repetition_ratio, rouge_summary

REPO = Path(__file__).resolve().parents[1]


def test_rouge_by_hand():
    # ref tokens: the cat sat | the dog ran ; hyp: the dog sat | a cat(s) ran ("cats" stems to "cat")
    # ROUGE-1: clipped unigram overlap the:1 cat:1 sat:1 dog:1 ran:1 = 5 of 6 on both sides -> F 5/6
    # ROUGE-2: ref {the cat, cat sat, sat the, the dog, dog ran}, hyp {the dog, dog sat, sat a,
    #          a cat, cat ran}: only "the dog" is shared -> F 1/5
    # ROUGE-Lsum: ref sentence 1 vs hyp sentences: LCS "the sat" + "cat" -> union {the cat sat} = 3;
    #   ref sentence 2: "the dog" + "ran" = 3, but hyp's single "the" is used up -> 2. Hits 5 -> 5/6
    #   (a plain, non-summary ROUGE-L would give LCS 3 -> 1/2).
    # Second example has an empty hypothesis: 0 everywhere. Scores are means of per-example F.
    got = rouge_summary(["the dog sat . a cats ran .", ""], ["the cat sat . the dog ran .", "x y"])
    assert got["rouge1"] == pytest.approx(100 * (5 / 6 + 0) / 2)
    assert got["rouge2"] == pytest.approx(100 * (1 / 5 + 0) / 2)
    assert got["rougeL"] == pytest.approx(100 * (5 / 6 + 0) / 2)


QG_SRC = ["France [SEP] Paris is the capital of France.",
          "france [sep] paris is the capital of france.",  # same item once lower-cased
          "Hamlet [SEP] Shakespeare wrote Hamlet."]
QG_REF = ["What is the capital of France ?", "which city is the capital of france ?", "who wrote hamlet ?"]
QG_HYP = ["what is the capital city of france ?", "what is the capital city of france ?", "who wrote ?"]


def test_coco_bleu4_and_rouge_l_by_hand():
    # Item A (refs of 7 and 8 tokens), hyp "what is the capital city of france ?" (8 tokens):
    #   1-grams 8/8; 2-grams: what is, is the, the capital, of france, france ? = 5/7;
    #   3-grams: what is the, is the capital, of france ? = 3/6; 4-grams: what is the capital = 1/5.
    # Item B, hyp "who wrote ?" vs "who wrote hamlet ?": 1-grams 3/3, 2-grams 1/2, 3-grams 0/1, 4: 0/0.
    # Corpus: p = 11/11, 6/9, 3/7, 1/5; hyp length 11, closest ref lengths 8 + 4 = 12.
    bp = math.exp(1 - 12 / 11)
    bleu4 = bp * (1 * 6 / 9 * 3 / 7 * 1 / 5) ** 0.25

    # ROUGE-L (beta 1.2) uses max precision and max recall over the references:
    # A: LCS with ref 1 = 7 -> P 7/8, R 7/7; with ref 2 = 6 -> P 6/8, R 6/8.  B: LCS 3 -> P 1, R 3/4.
    def f(p, r, b2=1.2 ** 2):
        return (1 + b2) * p * r / (r + b2 * p)

    rouge_l = (f(7 / 8, 1.0) + f(1.0, 3 / 4)) / 2
    got = coco_qg(QG_HYP, QG_REF, QG_SRC, lowercase=True, meteor=False)
    assert got["bleu4"] == pytest.approx(100 * bleu4, rel=1e-6)
    assert got["rougeL"] == pytest.approx(100 * rouge_l, rel=1e-6)


def test_msqg_keeps_case_squadqg_lowercases():
    hyp, ref, src = ["Who wrote Hamlet in London ?"], ["who wrote hamlet in london ?"], ["s"]
    assert coco_qg(hyp, ref, src, lowercase=True, meteor=False)["bleu4"] == pytest.approx(100)
    # case-sensitive: "Who", "Hamlet", "London" miss -> unigram precision 3/6 < 1
    assert coco_qg(hyp, ref, src, lowercase=False, meteor=False)["bleu4"] < 50


def test_dialog_bleu_method7_by_hand():
    # ref "i love my big dog very much" (7), hyp "i love my dog very much" (6)
    # clipped precisions: p1 = 6/6; p2: i love, love my, dog very, very much = 4/5;
    # p3: i love my, dog very much = 2/4 (all > 0, so method4 leaves p1..p3 alone).
    # method5 averages neighbours: p1' = ((p1 + 1) + p1 + p2) / 3, p2' = (p1' + p2 + p3) / 3.
    p1, p2, p3 = 1.0, 4 / 5, 2 / 4
    p1s = (p1 + 1 + p1 + p2) / 3
    p2s = (p1s + p2 + p3) / 3
    bp = math.exp(1 - 7 / 6)
    got = dialog_bleu(["i love my dog very much", ""], ["i love my big dog very much", "hello there"])
    assert got["bleu1"] == pytest.approx(100 * (bp * p1s + 0) / 2)
    assert got["bleu2"] == pytest.approx(100 * (bp * math.sqrt(p1s * p2s) + 0) / 2)


def test_distinct_by_hand():
    # unigrams a b a b a c: 3 unique of 6; bigrams ab ba ab ac: 3 unique of 4
    got = distinct(["a b a b", "a c", ""])
    assert got == pytest.approx({"distinct1": 100 * 3 / 6, "distinct2": 100 * 3 / 4})


def test_repetition_by_hand():
    # 7 tokens; "the the", "cat cat", "cat cat" repeat the previous token -> 3/7
    assert repetition_ratio(["the the cat cat cat", "a b", ""]) == pytest.approx(100 * 3 / 7)
    assert repetition_ratio(["x", "x"]) == 0.0  # no repetition across sample boundaries


def test_coqa_f1_by_hand():
    # "The Cat sat!" -> [cat, sat]; "a cat sat on the mat" -> [cat, sat, on, mat]: P 1, R 1/2, F 2/3.
    # both empty -> 1; empty prediction for a non-empty answer -> 0
    got = coqa_f1(["The Cat sat!", "", ""], ["a cat sat on the mat", "", "yes"])
    assert got["f1"] == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)


def test_sacrebleu_by_hand_and_signature():
    # hyp "the cat sat on the mat", ref "the cat sat on a mat": p = 5/6, 3/5, 2/4, 1/3; BP 1
    got = nmt_bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert got["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, rel=1e-4)
    assert "tok:13a" in got["signature"] and "version:" in got["signature"]


def test_overall_is_mean_of_task_metrics():
    got = evaluate("personachat", ["a b a b", "a c"], ["a b", "c d"])
    parts = [got[k] for k in ("bleu1", "bleu2", "distinct1", "distinct2")]
    assert got["overall"] == pytest.approx(sum(parts) / 4)
    assert got["repetition"] == 0.0 and got["n"] == 2


@pytest.mark.parametrize("protocol", ["modern", "official"])
@pytest.mark.parametrize("task", ["xsum", "cnndm", "gigaword", "personachat", "coqa", "nmt", "squadqg", "msqg"])
def test_empty_hypotheses_score_zero(task, protocol):
    n = 2
    got = score(task, [""] * n, ["some reference words here", "another one"], ["s1", "s2"], protocol=protocol,
                meteor=False)
    # the official Distinct counts the empty token of "".split(" "): 1 distinct of 2, as the script does
    skip = ("distinct1", "distinct2") if protocol == "official" else ()
    metrics = {k: v for k, v in got.items()
               if k not in ("task", "protocol", "n", "overall", "repetition", "signature", "meteor") + skip}
    assert metrics and all(v == pytest.approx(0, abs=1e-3) for v in metrics.values()), got


def test_meteor_reports_null_without_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java
    got = evaluate("squadqg", QG_HYP, QG_REF, QG_SRC)
    assert got["meteor"] is None and got["overall"] is None
    assert "java" in got["note"].lower()
    assert got["bleu4"] > 0


def test_line_count_mismatch(tmp_path):
    hyp, ref = tmp_path / "out.hyp", tmp_path / "test.tgt"
    hyp.write_text("a\nb\nc\n")
    ref.write_text("a\nb\n")
    with pytest.raises(ValueError) as err:
        read_aligned({"hyp": str(hyp), "ref": str(ref), "src": None})
    assert all(s in str(err.value) for s in (str(hyp), str(ref), "3 lines", "2 lines"))
    with pytest.raises(ValueError, match="hyps=3, refs=2"):
        evaluate("xsum", ["a", "b", "c"], ["a", "b"])
    proc = _cli("--task", "xsum", "--hyp", str(hyp), "--ref", str(ref))
    assert proc.returncode != 0 and "3 lines" in proc.stderr and "2 lines" in proc.stderr


def test_read_lines_keeps_empty_hypotheses(tmp_path):
    p = tmp_path / "h"
    p.write_text("a\n\nb\n")
    assert read_lines(str(p)) == ["a", "", "b"]


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "finetune.glge_eval", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_squadqg_end_to_end_with_meteor(tmp_path):
    # A perfect copy: BLEU-4 and ROUGE-L are 100 by definition, METEOR 1.5 (via the JVM) ~100.
    if subprocess.run(["which", "java"], capture_output=True).returncode != 0:
        pytest.skip("java is not installed")
    files = {}
    for name, lines in (("hyp", QG_REF), ("ref", QG_REF), ("src", QG_SRC)):
        files[name] = tmp_path / name
        files[name].write_text("\n".join(lines) + "\n")
    proc = _cli("--task", "squadqg", *(x for k, p in files.items() for x in (f"--{k}", str(p))))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert got["task"] == "squadqg" and got["n"] == 3
    assert got["bleu4"] == pytest.approx(100, abs=1e-4)
    assert got["rougeL"] == pytest.approx(100)
    assert 95 < got["meteor"] <= 100
    assert got["overall"] == pytest.approx((got["bleu4"] + got["meteor"] + got["rougeL"]) / 3)
    assert got["repetition"] == 0.0
