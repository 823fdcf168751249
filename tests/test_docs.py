"""The design docs stay true to the code: the drawn attention mask in docs/attention.md is what
janus.streams builds today, and every file the docs (and the top-level README) point to exists."""
import glob
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BEGIN, END = "<!-- BEGIN docs/draw_mask.py output -->", "<!-- END docs/draw_mask.py output -->"
# Top-level entries of the repository a backticked path may start with.
TOP = {"janus", "data_pipeline", "pretrain", "finetune", "ds_configs", "slurm", "benchmarks", "tests", "docs",
       "README.md", "Makefile", "demo.py", "pyproject.toml"}
PACKAGES = ("janus", "data_pipeline", "pretrain", "finetune", "benchmarks")
FILE_SUFFIXES = {"py", "md", "sh", "json", "txt", "png", "toml"}


def load_draw_mask():
    spec = importlib.util.spec_from_file_location("draw_mask", DOCS / "draw_mask.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documented_drawing() -> str:
    text = (DOCS / "attention.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "docs/attention.md must hold one drawing block"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")
    lines = block.split("\n")
    assert lines[0] == "```text" and lines[-1] == "```", "the drawing block must be one ```text fence"
    return "\n".join(lines[1:-1]) + "\n"


def test_attention_doc_drawing_is_what_the_code_builds():
    drawn = load_draw_mask().draw_papers_example()
    assert documented_drawing() == drawn, (
        "docs/attention.md is out of date with janus/streams.py: paste the output of "
        "`python docs/draw_mask.py` between its BEGIN/END markers")


def test_drawing_check_catches_a_changed_mask(monkeypatch):
    """The comparison above is not vacuous: a mask with one more allowed entry (AUX queries
    seeing their own true token, a leak) draws differently from the documented one."""
    from janus import streams

    original = streams.attention_mask_from_attributes

    def leaky(seg, k):
        allow = original(seg, k)
        rs, cs = seg[:, :, None], seg[:, None, :]
        own = (rs == streams.QUERY) & (cs == streams.TRUE_SLOT) & (k[:, :, None] == k[:, None, :])
        return allow | own.unsqueeze(1)

    monkeypatch.setattr(streams, "attention_mask_from_attributes", leaky)
    assert load_draw_mask().draw_papers_example() != documented_drawing()


def test_drawing_matches_the_test_of_the_papers_example():
    """The drawn NAR + AUX contexts are the ones tests/test_model.py expects by name."""
    drawing = load_draw_mask().draw_papers_example()
    half = drawing.split("NAR + AUX pattern", 1)[1].splitlines()
    names = half[2].split("|")
    columns = [n for part in names for n in part.split()]
    rows = {line.split()[0]: line for line in half[7:] if line.strip()}
    seen = {}
    for name, line in rows.items():
        cells = [c for c in line.split("->")[0].split()[1:] if c != "|"]
        seen[name] = {col for col, cell in zip(columns, cells) if cell == "#"}
    assert seen["t3"] == {"y1", "y4", "y6", "m5", "t2", "t3"}
    assert seen["q3"] == {"y1", "y4", "y6", "t2", "m3", "m5"}
    assert seen["q5"] == {"y1", "y4", "y6", "t2", "t3", "m5"}


def test_draw_mask_script_prints_the_drawing():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "docs/draw_mask.py"], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == documented_drawing()


def doc_files() -> list[Path]:
    return sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]


def _strip_fences(text: str) -> tuple[str, list[str]]:
    """(text without fenced code blocks, the fenced blocks)."""
    fences = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    return re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M), fences


def _code_words(text: str) -> list[str]:
    prose, fences = _strip_fences(text)
    spans = re.findall(r"`([^`\n]+)`", prose) + fences
    return [w.strip(",;:()[]'\"") for span in spans for w in span.split()]


def _check_path(word: str) -> str | None:
    """An error message if ``word`` names a repository file that does not exist."""
    path, _, test_name = word.partition("::")
    first = path.split("/", 1)[0]
    if first not in TOP or ("/" not in path and path not in TOP):
        return None
    if "*" in path:
        return None if glob.glob(str(ROOT / path)) else f"{word}: no file matches"
    target = ROOT / path
    if not target.exists():
        return f"{word}: no such file or folder"
    if test_name and not re.search(rf"^def {re.escape(test_name)}\(", target.read_text(), flags=re.M):
        return f"{word}: no test {test_name} in {path}"
    return None


def _check_module(match: re.Match) -> str | None:
    pkg, mod, attr = match.group(1), match.group(2), match.group(3)
    if mod in FILE_SUFFIXES:
        return None
    file, folder = ROOT / pkg / f"{mod}.py", ROOT / pkg / mod
    if folder.is_dir():
        return None
    if not file.is_file():
        return f"{match.group(0)}: no module {pkg}/{mod}.py"
    if attr and not re.search(rf"\b{re.escape(attr)}\b", file.read_text()):
        return f"{match.group(0)}: {pkg}/{mod}.py has no {attr}"
    return None


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_reference_in_the_docs_resolves(doc):
    text = doc.read_text()
    problems = []
    prose, _ = _strip_fences(text)
    links = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)
    links += re.findall(r"^\[[^\]]+\]:\s*(\S+)", prose, flags=re.M)
    for link in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", link) or link.startswith("#"):
            continue  # a URL or an anchor on the same page
        target = (doc.parent / link.split("#", 1)[0]).resolve()
        if not target.exists():
            problems.append(f"link {link}: no such file")
        elif ROOT not in target.parents and target != ROOT:
            problems.append(f"link {link}: points outside the repository")
    for word in _code_words(text):
        problem = _check_path(word)
        if problem:
            problems.append(problem)
    module_ref = re.compile(rf"(?<![\w/.\-])({'|'.join(PACKAGES)})\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?")
    for word in _code_words(text):
        for match in module_ref.finditer(word):
            problem = _check_module(match)
            if problem:
                problems.append(problem)
    assert not problems, f"{doc.relative_to(ROOT)}: " + "; ".join(problems)


def _project_files():
    skip = {".git", ".venv", "runs", "__pycache__", "bart_janus.egg-info", ".pytest_cache"}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        for name in filenames:
            if name.endswith((".py", ".md", ".sh", ".json", ".toml", ".cfg", ".txt")) or name == "Makefile":
                yield Path(dirpath) / name


def test_no_file_points_to_design_notes_outside_docs():
    """The design documentation is docs/; no file refers to a design file elsewhere."""
    design = "DESIGN" + ".md"
    offenders = []
    for path in _project_files():
        text = path.read_text(errors="replace")
        if design in text or "DESIGN" + " notes" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"references to {design} (point to a docs/ page instead): {offenders}"


def test_docs_index_lists_every_page():
    index = (DOCS / "README.md").read_text()
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    missing = [p for p in sorted(pages) if f"]({p})" not in index]
    assert not missing, f"docs/README.md does not link {missing}"



def test_objectives_doc_lists_every_preset_with_its_values():
    """docs/objectives.md's preset table holds every preset with the values the code resolves."""
    from janus.objectives import PRESETS, ObjectiveConfig

    columns = ("ar", "nar", "aux", "kl_ar_aux", "kl_aux_ar", "kl_nar_aux", "kl_aux_nar", "kl_ar_nar", "kl_nar_ar",
               "length", "label_smoothing", "reduction")
    text = (DOCS / "objectives.md").read_text()
    stale = []
    for name in PRESETS:
        cfg = ObjectiveConfig(preset=name)
        cells = [v if isinstance(v, str) else f"{v:g}" for v in (getattr(cfg, c) for c in columns)]
        row = f"| `{name}` | " + " | ".join(cells) + " | " + ", ".join(cfg.patterns()) + " |"
        if row not in text:
            stale.append(row)
    assert not stale, "docs/objectives.md preset table is out of date; expected rows:\n" + "\n".join(stale)
