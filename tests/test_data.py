"""Tests for dashkv_jax.data on real text: the bundled Wikipedia excerpt and small local files."""

import bz2
import itertools
import json
import os
import subprocess
import sys
import time

import datasets
import huggingface_hub.constants
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers

from dashkv_jax import data
from dashkv_jax.errors import DashKVError

# Markup that must never reach the clean text.
MARKUP = ("[[", "]]", "{{", "}}", "<ref", "</", "{|", "|}", "''", "thumb|", "File:", "Category:")
MARKUP += ("__TOC__", "&amp;", "&nbsp;", "==")


@pytest.fixture(scope="module")
def corpus():
    return data.load_documents(split="all")


@pytest.fixture(scope="module")
def tokenizer(corpus):
    """A small byte-level BPE trained on the corpus itself: a real `tokenizers.Tokenizer`."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<bos>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus["text"][:20], trainer)
    return tok


# --- the bundled corpus ------------------------------------------------------------------------


def test_bundled_corpus_is_the_gensim_wikipedia_excerpt(corpus):
    assert data.bundled_corpus_path().name.startswith("enwiki-latest-pages-articles1.xml")
    assert corpus.column_names == ["title", "text"]
    # The excerpt holds 106 articles; a handful are disambiguation pages or stubs.
    assert 90 <= len(corpus) <= 106
    assert len(set(corpus["title"])) == len(corpus)
    assert sum(len(t) for t in corpus["text"]) > 2_000_000
    assert min(len(t) for t in corpus["text"]) >= 500
    assert "Anarchism" in corpus["title"]
    assert not any(t.endswith("(disambiguation)") for t in corpus["title"])


def test_bundled_text_is_clean_prose(corpus):
    for title, text in zip(corpus["title"], corpus["text"], strict=True):
        for markup in MARKUP:
            assert markup not in text, f"{markup!r} left in {title!r}"
        assert "\n\n\n" not in text
    anarchism = corpus["text"][corpus["title"].index("Anarchism")]
    assert anarchism.startswith("Anarchism is a political philosophy that advocates")
    assert "\n\nHistory\n\n" in anarchism  # Headings stay, as their own paragraph.
    assert "Further reading" not in anarchism  # The lists at the end are cut.


def test_bundled_corpus_is_cached(corpus):
    cached = list(data.cache_dir().glob(f"{data.BUNDLED_CORPUS}-*.parquet"))
    assert cached
    start = time.perf_counter()
    again = data.load_documents(split="all")
    assert time.perf_counter() - start < 2.0
    assert again["title"] == corpus["title"]
    assert again["text"] == corpus["text"]


def test_splits_partition_the_articles(corpus):
    splits = {s: data.load_documents(split=s) for s in ("train", "validation", "heldout")}
    titles = {s: set(d["title"]) for s, d in splits.items()}
    assert not titles["train"] & titles["validation"]
    assert not (titles["train"] | titles["validation"]) & titles["heldout"]
    assert sum(len(d) for d in splits.values()) == len(corpus)
    assert 0.1 * len(corpus) <= len(splits["heldout"]) <= 0.35 * len(corpus)
    assert len(splits["validation"]) >= 1
    # Every article is where the stable hash of its title says.
    assert all(data.split_of(t, 0.2) == s for s, ts in titles.items() for t in ts)
    heldout = splits["heldout"]

    again = data.load_documents(split="heldout")
    assert again["title"] == heldout["title"]
    other_seed = data.load_documents(split="heldout", seed=1)
    assert other_seed["title"] != heldout["title"]


def test_split_is_the_same_in_another_process():
    # Another process with another str-hash salt must hold out the same articles.
    script = "from dashkv_jax import data; print(data.load_documents(split='heldout')['title'])"
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert result.stdout.strip() == str(data.load_documents(split="heldout")["title"])


# --- wikitext parsing, on hand-written markup --------------------------------------------------


def test_wikitext_to_text_strips_markup():
    wikitext = (
        "'''Foo''' is a [[bar]] of [[Baz|bazzes]],<ref name=a>{{cite web|url=x}}</ref> about "
        "{{convert|5|km|mi}} long.<ref name=a/> {{citation needed}}\n"
        "[[File:Foo.jpg|thumb|A caption with a [[link]]\nover two lines.]]\n"
        "<!-- a comment -->\n"
        "{| class=wikitable\n|-\n| cell || {| \n| nested\n|}\n|}\n"
        "== History ==\n"
        "* It began in [[1900]]{{mdash}}or so.\n"
        "Energy is <math>E = mc^2</math> here. See [http://example.org the site].\n"
        "[[Category:Things]]\n[[fr:Foo]]\n"
        "== References ==\n{{reflist}}\n* A book.\n"
    )
    assert data.wikitext_to_text(wikitext) == (
        "Foo is a bar of bazzes, about 5 km long.\n\n"
        "History\n\n"
        "It began in 1900\u2014or so.\n"
        "Energy is here. See the site."
    )


def test_parse_wikipedia_dump_keeps_only_articles(tmp_path):
    prose = "Alpha is a letter of the Greek alphabet. " * 20

    def page(title, ns, text, redirect=False):
        redirect_tag = f'<redirect title="{title}x" />' if redirect else ""
        return (
            f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{redirect_tag}"
            f"<revision><id>2</id><text>{text}</text></revision></page>"
        )

    xml = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
        + page("Alpha", 0, f"'''{prose}'''")
        + page("Alfa", 0, "#REDIRECT [[Alpha]]", redirect=True)
        + page("Wikipedia:About", 4, prose)
        + page("Alpha (disambiguation)", 0, prose + "{{disambiguation}}")
        + page("Stub", 0, "A stub.")
        + "</mediawiki>"
    )
    dump = tmp_path / "dump.xml.bz2"
    dump.write_bytes(bz2.compress(xml.encode()))
    assert list(data.parse_wikipedia_dump(dump)) == [("Alpha", prose.strip())]


# --- local files and the Hub -------------------------------------------------------------------


def test_local_txt_folder_is_one_document_per_file(tmp_path):
    (tmp_path / "a.txt").write_text("First document.\nIts second line.\n")
    (tmp_path / "b.txt").write_text("Second document.")
    (tmp_path / "notes.md").write_text("ignored: not a supported type")
    documents = data.load_documents(str(tmp_path), split="all")
    assert isinstance(documents, datasets.Dataset)
    assert sorted(documents["text"]) == ["First document.\nIts second line.\n", "Second document."]

    single = data.load_documents(str(tmp_path / "b.txt"), split="all")
    assert single["text"] == ["Second document."]


def test_local_jsonl_splits_by_title(tmp_path):
    rows = [{"title": f"Doc {i}", "body": f"Text of document {i}."} for i in range(200)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    train = data.load_documents(str(path), "train", text_field="body")
    validation = data.load_documents(str(path), "validation", text_field="body")
    heldout = data.load_documents(str(path), "heldout", text_field="body")
    assert set(train.column_names) == {"title", "text"}
    assert len(train) + len(validation) + len(heldout) == 200
    assert not set(train["title"]) & set(heldout["title"])
    assert not set(validation["title"]) & (set(train["title"]) | set(heldout["title"]))
    assert 20 <= len(heldout) <= 60
    assert heldout["text"][0] == f"Text of document {heldout['title'][0].split()[-1]}."


def test_local_parquet_without_titles_splits_by_text(tmp_path):
    texts = [f"Paragraph number {i}." for i in range(100)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet")
    heldout = data.load_documents(str(tmp_path / "docs.parquet"), "heldout")
    assert heldout["text"] == [t for t in texts if data.is_heldout(t, 0.2)]


def test_errors(tmp_path):
    missing = str(tmp_path / "nowhere" / "docs.txt")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_documents(missing)
    with pytest.raises(FileNotFoundError, match="missing-folder"):
        data.load_documents("./missing-folder")

    (tmp_path / "table.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"\.jsonl.*\.parquet.*\.txt"):
        data.load_documents(str(tmp_path / "table.csv"))
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_documents(split="test")
    with pytest.raises(ValueError, match="no column 'body'"):
        data.load_documents(text_field="body")

    (tmp_path / "one.txt").write_text("Only one document.")
    with pytest.raises(ValueError, match="is empty"):
        data.load_documents(str(tmp_path / "one.txt"), split="train", heldout_fraction=1.0)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_corpus_file_that_is_not_utf8_is_named_with_its_first_bad_byte(tmp_path, suffix):
    (tmp_path / f"good{suffix}").write_text('{"text": "fine"}\n')
    (tmp_path / f"bad{suffix}").write_bytes(b'{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(DashKVError, match=rf"bad{suffix} is not UTF-8 text \(byte 13\)"):
        data.load_documents(str(tmp_path))


def test_check_utf8_counts_bytes_across_its_blocks(tmp_path):
    block = 1 << 20
    path = tmp_path / "long.txt"
    path.write_bytes(b"a" * (block - 1) + "\u00e9".encode() + b"ok \xff")  # the e-acute straddles
    with pytest.raises(DashKVError, match=rf"byte {block + 4}\)"):
        data.check_utf8(path)
    path.write_bytes(b"a" * (block - 1) + b"\xc3")  # cut short at the end
    with pytest.raises(DashKVError, match=rf"byte {block - 1}\)"):
        data.check_utf8(path)
    path.write_bytes(("\u00e9" * block).encode())
    assert data.read_text(path) == "\u00e9" * block


def test_unreachable_hub_dataset_is_a_clear_connection_error(monkeypatch):
    # Offline mode fails at once, as a machine without a network does after its retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="could not load 'someone/some-corpus'"):
        data.load_documents("someone/some-corpus")


# --- token windows -----------------------------------------------------------------------------


def test_first_tokens_of_each_document(tokenizer):
    texts = ["short text", "a much longer text " * 50, "another long document. " * 40]
    windows = list(data.iter_token_windows(texts, tokenizer, 64))
    assert len(windows) == 2  # "short text" is under 64 tokens.
    for window, text in zip(windows, texts[1:], strict=True):
        assert window.dtype == np.int32 and window.shape == (64,)
        np.testing.assert_array_equal(window, tokenizer.encode(text).ids[:64])

    bos = tokenizer.token_to_id("<bos>")
    (window,) = itertools.islice(data.iter_token_windows(texts, tokenizer, 64, bos_id=bos), 1)
    assert window[0] == bos
    np.testing.assert_array_equal(window[1:], tokenizer.encode(texts[1]).ids[:63])


def test_concatenated_windows_cut_one_stream(tokenizer):
    texts = ["one two three " * 30, "four five " * 7, "six seven eight nine " * 25]
    stream = []
    for i, text in enumerate(texts):
        stream += (tokenizer.encode("\n\n").ids if i else []) + tokenizer.encode(text).ids
    windows = list(data.iter_token_windows(texts, tokenizer, 50, concatenate=True))
    assert len(windows) == len(stream) // 50
    np.testing.assert_array_equal(np.concatenate(windows), stream[: 50 * len(windows)])


def test_heldout_articles_give_long_contexts(tokenizer):
    heldout = data.load_documents(split="heldout")
    perplexity_windows = list(data.iter_token_windows(heldout, tokenizer, 1024))
    assert len(perplexity_windows) >= 10
    long_windows = list(data.iter_token_windows(heldout, tokenizer, 8192, concatenate=True))
    assert len(long_windows) >= 10
    text = tokenizer.decode(long_windows[0].tolist())
    assert text.startswith(heldout["text"][0][:100])
