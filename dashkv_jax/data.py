"""Text for experiments: documents through Hugging Face `datasets`, and token windows from them.

`load_documents` returns a `datasets.Dataset` with a `text` column (and `title` where the source
has one) from one of three sources:

- the bundled corpus `BUNDLED_CORPUS` ("enwiki-gensim"): the English Wikipedia excerpt that ships
  as test data in the `gensim` wheel (`pip install --no-deps gensim`; CC BY-SA), parsed once to
  clean article prose and cached as parquet;
- a local file or folder (.txt, .json, .jsonl, .parquet), read by the matching `datasets` builder
  once every text file in it is checked to be UTF-8 (`check_utf8`);
- a Hugging Face Hub dataset name, passed to `datasets.load_dataset` (needs a network).

Every source is split into "train", "validation" and "heldout" the same way: by stable hashes
of each document's title (or of its text where there is no title), so the split is
deterministic across runs and machines, and no document is in two. Train on "train", choose
settings on "validation", report on "heldout".

`iter_token_windows` turns documents into fixed-length int32 token windows: the first `length`
tokens of each document (perplexity on held-out articles), or windows cut from the documents
joined end to end (long 4K-8K token contexts).
"""

from __future__ import annotations

import bz2
import codecs
import hashlib
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets
import mwparserfromhell
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mwparserfromhell import nodes

from dashkv_jax.errors import DashKVError

BUNDLED_CORPUS = "enwiki-gensim"
SPLITS = ("train", "validation", "heldout", "all")
# The share of the non-held-out documents kept for validation (choosing settings).
VALIDATION_FRACTION = 0.15

# Local file suffix -> `datasets` builder name.
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

_GENSIM_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Bump when the parsing rules change, so cached corpora are rebuilt.
_PARSER_VERSION = 2
# Articles with less clean text than this are stubs.
_MIN_ARTICLE_CHARS = 500

# Sections from these on hold citations and link lists, not prose.
_END_SECTIONS = frozenset(
    {
        "see also",
        "references",
        "notes",
        "footnotes",
        "citations",
        "sources",
        "bibliography",
        "further reading",
        "external links",
        "notes and references",
        "references and notes",
    }
)
# Tags whose content is not prose: citations, tables, formulas, galleries, code.
_DROP_TAGS = frozenset(
    {
        "ref",
        "references",
        "table",
        "gallery",
        "math",
        "chem",
        "ce",
        "timeline",
        "imagemap",
        "score",
        "hiero",
        "graph",
        "mapframe",
        "syntaxhighlight",
        "source",
        "pre",
        "templatedata",
    }
)
# Templates that stand for a symbol.
_SYMBOL_TEMPLATES = {
    "mdash": "\u2014",
    "mdashb": "\u2014",
    "ndash": "\u2013",
    "snd": " \u2013 ",
    "spnd": " \u2013 ",
    "spaced ndash": " \u2013 ",
    "\u00b7": " \u00b7 ",
    "nbsp": " ",
    "'s": "'s",
}
# Templates that render their first positional argument, more or less as is.
_VALUE_TEMPLATES = frozenset(
    {"nowrap", "nobr", "small", "smaller", "sic", "not a typo", "nihongo", "nts", "val", "vr"}
)
# Link namespaces that render as media or page metadata, not as words in the sentence.
_DROP_LINK_NAMESPACES = frozenset({"file", "image", "media", "category"})
# An interlanguage link's prefix: "fr", "simple", "zh-min-nan", ...
_LANGUAGE_PREFIX = re.compile(r"[a-z]{2,3}(-[a-z]{2,8})*|simple")

# Markup the parser leaves half-parsed when it is malformed; cut before parsing.
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
_MEDIA_LINK_START = re.compile(r"\[\[\s*(?:file|image|media|category)\s*:", re.IGNORECASE)
_TABLE_START = re.compile(r"^\{\|", re.MULTILINE)
_DISAMBIGUATION = re.compile(
    r"\{\{\s*(?:disambig|disambiguation|dab|hndis|geodis|set index)\b", re.IGNORECASE
)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")

# Looks like a Hub dataset id ("name" or "owner/name") rather than a filesystem path.
_HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")
_FILE_SUFFIXES = frozenset(BUILDERS) | {".csv", ".tsv", ".gz", ".bz2", ".xz", ".zip", ".xml"}


def load_documents(
    source: str = BUNDLED_CORPUS,
    split: str = "train",
    *,
    text_field: str = "text",
    heldout_fraction: float = 0.2,
    seed: int = 0,
    config: str | None = None,
    hub_split: str = "train",
) -> datasets.Dataset:
    """Loads a corpus as a `datasets.Dataset` of documents, one row per document.

    Args:
      source: `BUNDLED_CORPUS`, a local file or folder (.txt: one document per file; .json/.jsonl:
        one per record; .parquet: one per row), or a Hub dataset name.
      split: "train", "validation", "heldout" or "all". Documents go to "heldout" when a stable
        hash of their title (or text, where there is no title) with `seed` falls below
        `heldout_fraction`; of the others, `VALIDATION_FRACTION` go to "validation" by a second
        hash, the rest to "train".
      text_field: the column holding the document text; it is renamed to `text`.
      heldout_fraction: the expected share of documents held out.
      seed: changes which documents are held out.
      config: the Hub dataset's configuration name (Hub sources only).
      hub_split: which of the Hub dataset's own splits to read (Hub sources only).

    Returns:
      A Dataset with a `text` column, `title` where the source has one, and the source's other
      columns, in the source's order.

    Raises:
      FileNotFoundError: `source` is a path that does not exist, or the bundled corpus' file is
        not installed.
      ValueError: an unknown split, an unsupported file type, a missing text column, or a split
        that comes out empty.
      ConnectionError: a Hub dataset that cannot be reached.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split=}")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction=}")

    if source == BUNDLED_CORPUS:
        documents = _load_bundled()
    elif os.path.exists(os.path.expanduser(source)):
        documents = _load_local(Path(source).expanduser())
    elif _looks_like_path(source):
        raise FileNotFoundError(f"no such file or folder: {source!r}")
    else:
        documents = _load_hub(source, config, hub_split)

    if text_field not in documents.column_names:
        raise ValueError(
            f"{source!r} has no column {text_field!r}; its columns: {documents.column_names}"
        )
    if text_field != "text":
        if "text" in documents.column_names:
            documents = documents.remove_columns("text")
        documents = documents.rename_column(text_field, "text")

    if split == "all":
        return documents
    key_column = "title" if "title" in documents.column_names else "text"
    keep = [
        i for i, key in enumerate(documents[key_column])
        if split_of(key, heldout_fraction, seed) == split
    ]  # fmt: skip
    if not keep:
        raise ValueError(
            f"split {split!r} of {source!r} is empty ({len(documents)} documents, "
            f"{heldout_fraction=}, {seed=}); give more documents or use split='all'"
        )
    return documents.select(keep)


def is_heldout(key: str, heldout_fraction: float, seed: int = 0) -> bool:
    """Whether the document with this title (or text) belongs to the held-out split.

    A SHA-256 hash, not Python's salted `hash`, so the answer is the same in every process.
    """
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def split_of(key: str, heldout_fraction: float, seed: int = 0) -> str:
    """The split ("train", "validation" or "heldout") of the document with this title or text."""
    if is_heldout(key, heldout_fraction, seed):
        return "heldout"
    return "validation" if is_heldout(key, VALIDATION_FRACTION, seed + 1) else "train"


def first_window(split: str, tokenizer, length: int, *, max_context: int) -> np.ndarray:
    """The first `length` token ids [length] of a split of the bundled corpus, its documents
    joined: the window the experiments score. Raises DashKVError when `length` exceeds the
    model's `max_context` or the split is shorter."""
    if length > max_context:
        raise DashKVError(f"context {length} exceeds the model's context of {max_context}")
    docs = load_documents(split=split)
    ids = next(iter_token_windows(docs, tokenizer, length, concatenate=True), None)
    if ids is None:
        raise DashKVError(f"the {split} split has fewer than {length} tokens")
    return ids


def iter_token_windows(
    documents: Iterable[str] | datasets.Dataset,
    tokenizer,
    length: int,
    *,
    concatenate: bool = False,
    separator: str = "\n\n",
    bos_id: int | None = None,
) -> Iterator[np.ndarray]:
    """Yields token windows of exactly `length` ids, as int32 arrays of shape [length].

    Args:
      documents: strings, or a Dataset with a `text` column (as from `load_documents`).
      tokenizer: a `tokenizers.Tokenizer`; texts are encoded without its special tokens.
      length: tokens per window, `bos_id` included.
      concatenate: False: one window per document, its first tokens; documents shorter than a
        window are skipped. True: the documents joined by `separator` into one stream, cut into
        consecutive non-overlapping windows; the tail shorter than a window is dropped.
      separator: the text between documents when concatenating.
      bos_id: if given, the first id of every window.

    Windows come lazily, in document order; take the first n with `itertools.islice`.
    """
    if length < 1 + (bos_id is not None):
        raise ValueError(f"length must leave room for at least one text token, got {length=}")
    if isinstance(documents, datasets.Dataset):
        documents = (row["text"] for row in documents)
    prefix = [] if bos_id is None else [bos_id]
    n_text = length - len(prefix)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    if not concatenate:
        for text in documents:
            ids = encode(text)
            if len(ids) >= n_text:
                yield np.asarray(prefix + ids[:n_text], dtype=np.int32)
        return

    separator_ids = encode(separator) if separator else []
    buffer: list[int] = []
    for i, text in enumerate(documents):
        if i:
            buffer.extend(separator_ids)
        buffer.extend(encode(text))
        start = 0
        while len(buffer) - start >= n_text:
            yield np.asarray(prefix + buffer[start : start + n_text], dtype=np.int32)
            start += n_text
        del buffer[:start]


def bundled_corpus_path() -> Path:
    """The bz2 Wikipedia dump inside the installed `gensim` package (which is never imported)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the bundled corpus {BUNDLED_CORPUS!r} ships in the gensim wheel, which is not "
            "installed: pip install --no-deps gensim"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GENSIM_DUMP
    if not path.is_file():
        raise FileNotFoundError(f"gensim is installed but its Wikipedia excerpt is missing: {path}")
    return path


def cache_dir() -> Path:
    """Where parsed corpora are kept: $DASHKV_CACHE_DIR, else $XDG_CACHE_HOME/dashkv_jax."""
    if "DASHKV_CACHE_DIR" in os.environ:
        return Path(os.environ["DASHKV_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dashkv_jax"


def parse_wikipedia_dump(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """Yields (title, clean text) for each article of a MediaWiki XML dump (.xml or .xml.bz2).

    Skips redirects, pages outside the article namespace, disambiguation pages, and articles
    whose clean text is shorter than a stub's.
    """
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rb") as f:
        for _, element in ET.iterparse(f, events=("end",)):
            if _local_name(element.tag) != "page":
                continue
            fields = {_local_name(child.tag): child for child in element}
            revision = {_local_name(child.tag): child for child in fields["revision"]}
            title = fields["title"].text or ""
            wikitext = revision["text"].text or ""
            is_article = fields["ns"].text == "0" and "redirect" not in fields
            element.clear()  # Keeps memory flat while streaming.
            if not is_article or _DISAMBIGUATION.search(wikitext):
                continue
            text = wikitext_to_text(wikitext)
            if len(text) >= _MIN_ARTICLE_CHARS:
                yield title, text


def wikitext_to_text(wikitext: str) -> str:
    """Strips MediaWiki markup to plain prose: paragraphs separated by blank lines.

    Keeps the words of links, bold, italics, headings and list items, and the value of a few
    inline templates such as {{convert}}; drops all other templates, citations, tables,
    formulas, images, categories, interlanguage links, and the sections from "See also" /
    "References" on.
    """
    wikitext = _COMMENT.sub("", wikitext)
    wikitext = _REF.sub("", wikitext)
    wikitext = _drop_balanced(wikitext, _MEDIA_LINK_START, "[[", "]]")
    wikitext = _drop_balanced(wikitext, _TABLE_START, "{|", "|}")
    parts = []
    for node in mwparserfromhell.parse(wikitext).nodes:
        if isinstance(node, nodes.Heading):
            if _plain(node.title).strip().lower() in _END_SECTIONS:
                break
        parts.append(_plain_node(node))
    return _tidy("".join(parts))


def _drop_balanced(text: str, start: re.Pattern, opener: str, closer: str) -> str:
    """Removes each span from a `start` match to its balancing `closer`, nesting included."""
    pieces, position = [], 0
    while match := start.search(text, position):
        pieces.append(text[position : match.start()])
        depth, i = 0, match.start()
        while i < len(text):
            if text.startswith(opener, i):
                depth, i = depth + 1, i + len(opener)
            elif text.startswith(closer, i):
                depth, i = depth - 1, i + len(closer)
                if depth == 0:
                    break
            else:
                i += 1
        position = i
    pieces.append(text[position:])
    return "".join(pieces)


def _plain(wikicode) -> str:
    return "".join(_plain_node(node) for node in wikicode.nodes)


def _plain_node(node) -> str:
    if isinstance(node, nodes.Text):
        return node.value
    if isinstance(node, nodes.Wikilink):
        return _plain_link(node)
    if isinstance(node, nodes.Tag):
        tag = str(node.tag).strip().lower()
        if tag in _DROP_TAGS:
            return ""
        if tag in ("br", "p"):
            return "\n"
        if node.contents is None or tag in ("li", "dt", "dd", "hr"):
            return ""  # List bullets and rules: the item's words follow as text.
        return _plain(node.contents)
    if isinstance(node, nodes.Heading):
        return f"\n\n{_plain(node.title).strip()}\n\n"
    if isinstance(node, nodes.ExternalLink):
        return _plain(node.title) if node.title else ""
    if isinstance(node, nodes.HTMLEntity):
        return node.normalize()
    if isinstance(node, nodes.Template):
        return _plain_template(node)
    return ""  # Comments and template arguments.


def _plain_link(link) -> str:
    title = str(link.title).strip()
    namespace, colon, _ = title.partition(":")
    namespace = namespace.strip().lower()
    if colon and namespace in _DROP_LINK_NAMESPACES:
        return ""
    if colon and link.text is None and _LANGUAGE_PREFIX.fullmatch(namespace):
        return ""
    if link.text is not None:
        return _plain(link.text)
    return _plain(link.title).strip().lstrip(":")


def _plain_template(template) -> str:
    """Inline templates whose value is part of the sentence; all others render as nothing."""
    name = str(template.name).strip().lower()
    if name in _SYMBOL_TEMPLATES:
        return _SYMBOL_TEMPLATES[name]
    positional = [_plain(p.value).strip() for p in template.params if not p.showkey]
    if name in ("convert", "cvt") and len(positional) >= 2:
        return f"{positional[0]} {positional[1]}"
    if name == "as of" and positional:
        return f"As of {positional[0]}"
    if name in ("lang", "transl") and len(positional) >= 2:
        return positional[-1]
    if (name in _VALUE_TEMPLATES or name.startswith("lang-")) and positional:
        return positional[0]
    if name == "quote":
        named = {str(p.name).strip(): _plain(p.value).strip() for p in template.params}
        return named.get("text") or named.get("quote") or (positional[0] if positional else "")
    return ""


def _tidy(text: str) -> str:
    text = text.replace("\xa0", " ").replace("\u200b", "")
    text = _MAGIC_WORD.sub("", text)
    text = re.sub(r"'''(?=s\b)", "'", text)  # ''Iliad'''s: the italics end, then "'s".
    text = re.sub(r"'{2,}", "", text)  # Bold or italics the parser left unbalanced.
    text = re.sub(r"\(\s*[,;:]*\s*\)", "", text)  # Brackets emptied by dropped templates.
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([,.;:!?])(?=\s|$)", r"\1", text)
    lines = [line.strip() for line in text.split("\n")]
    # A line with no letter or digit is debris of dropped markup; one that opens with a table
    # cell's bar is a table row the parser missed.
    lines = ["" if not re.search(r"\w", line) or line[0] in "|!" else line for line in lines]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _looks_like_path(source: str) -> bool:
    return (
        not _HUB_NAME.fullmatch(source)
        or source.startswith(".")
        or Path(source).suffix.lower() in _FILE_SUFFIXES
    )


def _load_bundled() -> datasets.Dataset:
    dump = bundled_corpus_path()
    stat = dump.stat()
    # Keyed by the dump's size and mtime and the parser version: a new gensim or new rules reparse.
    name = f"{BUNDLED_CORPUS}-{stat.st_size}-{stat.st_mtime_ns}-v{_PARSER_VERSION}.parquet"
    cached = cache_dir() / name
    if not cached.is_file():
        titles, texts = [], []
        for title, text in parse_wikipedia_dump(dump):
            titles.append(title)
            texts.append(text)
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Written then renamed, so a concurrent reader never sees a half-written file.
        partial = cached.with_name(f"{name}.{os.getpid()}.tmp")
        pq.write_table(pa.table({"title": titles, "text": texts}), partial)
        os.replace(partial, cached)
    return datasets.Dataset(pq.read_table(cached))


def check_utf8(path: str | os.PathLike) -> None:
    """Raises DashKVError naming `path` and the first bad byte unless the file is UTF-8 text
    (read in 1 MiB blocks, so a large corpus costs no memory)."""
    path = Path(path)
    if not path.is_file():
        raise DashKVError(f"no file at {str(path)!r}")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while True:
            block = f.read(1 << 20)
            held = len(decoder.getstate()[0])  # the end of the last block, not yet decoded
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                byte = offset - held + err.start
                raise DashKVError(f"{path} is not UTF-8 text (byte {byte})") from None
            if not block:
                return
            offset += len(block)


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents; DashKVError (one line) for a missing file or other bytes."""
    check_utf8(path)
    return Path(path).read_text(encoding="utf-8")


def _load_local(path: Path) -> datasets.Dataset:
    supported = ", ".join(sorted(BUILDERS))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
        if not files:
            raise ValueError(f"no {supported} files in folder {str(path)!r}")
    elif path.suffix.lower() in BUILDERS:
        files = [path]
    else:
        raise ValueError(
            f"unsupported file type {path.suffix!r} for {str(path)!r}; supported: {supported}"
        )
    builders = {BUILDERS[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise ValueError(f"folder {str(path)!r} mixes file types {sorted(builders)}; use one")
    (builder,) = builders
    if builder in ("text", "json"):
        for file in files:
            check_utf8(file)
    # A text file is one document, not one per line.
    options = {"sample_by": "document"} if builder == "text" else {}
    data_files = [str(p) for p in files]
    return datasets.load_dataset(builder, data_files=data_files, split="train", **options)


def _load_hub(name: str, config: str | None, hub_split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(name, config, split=hub_split)
    except ConnectionError as e:
        raise ConnectionError(
            f"could not load {name!r} from the Hugging Face Hub (no network, or offline mode?), "
            f"and no local file or folder has that name. Use a local path, or the bundled "
            f"corpus {BUNDLED_CORPUS!r}. Cause: {e}"
        ) from e
