"""Bad input: clear errors with file:line, or counted skips reported in the manifest; wiki markup."""
import io
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from data_pipeline.sources import DataError, Skips
from data_pipeline.wiki import strip_markup, wiki_articles

from test_data_helpers import build_tiny, make_docs, write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def messy(tmp_path) -> Path:
    good = make_docs(20)
    lines = [f'{{"text": "{good[0]}"}}',
             '{"text": "unterminated',  # line 2: malformed
             '{"title": "no text"}',  # line 3: missing field
             '{"text": "   "}',  # line 4: empty
             '',  # line 5: blank
             '{"text": 42}']  # line 6: not a string
    path = tmp_path / "messy.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff byte"}\n'  # line 7: invalid UTF-8
                     + "".join(f'{{"text": "{d}"}}\n' for d in good[1:]).encode())
    return path


def test_bad_lines_are_counted_with_locations(tmp_path, messy):
    manifest = build_tiny(tmp_path / "out", [str(messy)])
    docs = manifest["sources"][0]["documents"]
    assert docs["skipped"] == {"empty": 2, "invalid_utf8": 1, "malformed_json": 1, "missing_text_field": 2}
    assert docs["kept"] == 20 and docs["read"] == 26
    examples = manifest["sources"][0]["skip_examples"]
    assert examples["malformed_json"][0].startswith(f"{messy}:2: malformed_json")
    assert examples["invalid_utf8"][0].startswith(f"{messy}:7:")
    assert [e.split(": ")[0] for e in examples["missing_text_field"]] == [f"{messy}:3", f"{messy}:6"]
    assert manifest["totals"]["documents"]["skipped"] == docs["skipped"]


def test_strict_mode_stops_at_the_first_bad_line(tmp_path, messy):
    with pytest.raises(DataError, match=f"{messy}:2: malformed_json"):
        build_tiny(tmp_path / "out", [str(messy)], strict=True)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_reports_error_with_file_and_line(tmp_path, messy):
    result = subprocess.run([sys.executable, "-m", "data_pipeline.build", "--out", str(tmp_path / "out"), "--source", str(messy),
                             "--strict", "--vocab-size", "300", "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"error: {messy}:2: malformed_json" in result.stderr


@pytest.mark.parametrize("source, message", [
    ("{tmp}/missing.jsonl", "source not found"),
    ("{tmp}/data.csv", "unsupported file type"),
    ("{tmp}/a.jsonl@colour=red", "bad option"),
    ("{tmp}/a.jsonl@doc_sep=page", "doc_sep"),
    ("{tmp}/empty_dir", "holds no"),
    ("demo:poems", "unknown demo source"),
])
def test_bad_sources_fail_clearly(tmp_path, source, message):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "empty_dir").mkdir()
    write_jsonl(tmp_path / "a.jsonl", make_docs(5))
    with pytest.raises(DataError, match=message):
        build_tiny(tmp_path / "out", [source.format(tmp=tmp_path)])


def test_hf_folder_without_text_column_names_its_columns(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": ["x y z."]}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"no column 'text'.*body"):
        build_tiny(tmp_path / "out", [str(tmp_path / "hf")])


def test_tokenizer_without_bart_layout_is_rejected(tmp_path):
    raw = Tokenizer(models.BPE(vocab={"a": 0, "<pad>": 1, "<s>": 2, "</s>": 3, "<unk>": 4, "<mask>": 5}, merges=[], unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                            mask_token="<mask>").save_pretrained(str(tmp_path / "tok"))
    with pytest.raises(DataError, match="not BART's layout"):
        build_tiny(tmp_path / "out", [str(write_jsonl(tmp_path / "a.jsonl", make_docs(5)))], tokenizer=tmp_path / "tok")


def test_strip_markup():
    wikitext = ("{{Infobox country|name={{lang|fr|France}}|capital=[[Paris]]}}\n"
                "'''France''' is a [[country]] in [[Western Europe|western Europe]].<ref>{{cite web|url=x}}</ref> "
                "See [http://example.org the site].<!-- hidden -->\n"
                "== History ==\n* A &amp; B\n[[File:Map.png|thumb|A [[map]]]]\n[[Category:Countries]]\n"
                "{| class=\"wikitable\"\n|-\n| cell\n|}\nEnd.")
    assert strip_markup(wikitext) == "France is a country in western Europe. See the site.\nHistory\nA & B\nEnd."


def test_wiki_articles_skip_redirects_and_other_namespaces():
    xml = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
      <page><title>A</title><ns>0</ns><revision><text>'''A''' is a letter.</text></revision></page>
      <page><title>B</title><ns>0</ns><redirect title="A"/><revision><text>#REDIRECT [[A]]</text></revision></page>
      <page><title>Talk:A</title><ns>1</ns><revision><text>chat</text></revision></page>
      <page><title>C</title><ns>0</ns><revision><text>{{stub}}</text></revision></page>
    </mediawiki>"""
    skips = Skips(verbose=False)
    docs = list(wiki_articles(io.BytesIO(xml.encode()), "dump", skips))
    assert [(d.text, d.where) for d in docs] == [("A is a letter.", "dump[page 'A']")]
    assert dict(skips.counts) == {"wiki_redirect": 1, "wiki_non_article": 1, "empty": 1}
