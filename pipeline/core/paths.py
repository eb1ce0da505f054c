"""The data layout: every path a stage reads or writes, defined once.

Stages, the library and the Makefile all get their paths from here. The
module imports only the standard library, so Make can ask it before any
virtual environment exists::

    python3 -m pipeline.core.paths store --data-dir data --lm smollm2-135m --data bbc --ctx 128
    python3 -m pipeline.core.paths make-vars --data-dir data --lm ... --layers 0-3 ...   # Make assignments

Layout under ``DATA_DIR``::

    models/<lm>/                                         safetensors copy of a model
    harvest/<lm>/<data>/<split>-ctx<ctx>.zarr            activation store
    train/<lm>/<data>/ctx<ctx>/<group>/<name>/           a checkpoint (group: transcoder | sae | clt)
    eval/<lm>/<data>/ctx<ctx>-t<eval_tokens>[-bf16]/     an eval set: reference/, <method>/metrics.json, report/
    stamps/                                              Make's parameter stamps

``<lm>`` and ``<data>`` are path-safe keys of the names the user gave
(``lm_key``, ``data_key``): a Hugging Face id ``owner/name`` becomes
``owner__name``; a local corpus path keeps its readable characters and
gains a short hash of the absolute path, so two folders called ``text``
never share a store.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
# The corpora ``pipeline.data.corpora`` bundles (and the toy source); a test keeps the two in step.
BUNDLED_CORPORA = ("bbc", "sotu", "wiki", "shakespeare", "mix", "toy")


def lm_key(lm: str) -> str:
    return lm.replace("/", "__")


def is_local_corpus(data: str) -> bool:
    """A local file or folder of documents (bundled names win over a folder of the same name)."""
    if data in BUNDLED_CORPORA:
        return False
    return data.endswith(LOCAL_SUFFIXES) or Path(data).expanduser().is_dir()


def data_key(data: str) -> str:
    """A path-safe name for a corpus: bundled names and hub ids as they read; local paths with a hash."""
    if is_local_corpus(data):
        absolute = str(Path(data).expanduser().resolve())
        stem = _SAFE.sub("_", Path(absolute).name).strip("_") or "corpus"
        return f"local-{stem}-{hashlib.sha256(absolute.encode()).hexdigest()[:8]}"
    return _SAFE.sub("_", data.strip("/")).strip("_")


def model_dir(data_dir: Path, lm: str) -> Path:
    return Path(data_dir) / "models" / lm_key(lm)


def store(data_dir: Path, lm: str, data: str, split: str, ctx: int) -> Path:
    return Path(data_dir) / "harvest" / lm_key(lm) / data_key(data) / f"{split}-ctx{ctx}.zarr"


def train_root(data_dir: Path) -> Path:
    return Path(data_dir) / "train"


def checkpoint_group(data_dir: Path, lm: str, data: str, ctx: int, group: str) -> Path:
    """Folder of one group of checkpoints (``transcoder``, ``sae``, ``clt``) of one store."""
    return train_root(data_dir) / lm_key(lm) / data_key(data) / f"ctx{ctx}" / group


def checkpoint(data_dir: Path, lm: str, data: str, ctx: int, group: str, name: str) -> Path:
    return checkpoint_group(data_dir, lm, data, ctx, group) / name


def eval_dir(data_dir: Path, lm: str, data: str, ctx: int, eval_tokens: int, dtype: str = "float32") -> Path:
    suffix = "" if dtype == "float32" else "-bf16"
    return Path(data_dir) / "eval" / lm_key(lm) / data_key(data) / f"ctx{ctx}-t{eval_tokens}{suffix}"


def metrics(eval_folder: Path, method: str) -> Path:
    return Path(eval_folder) / method / "metrics.json"


def reference_dir(eval_folder: Path) -> Path:
    return Path(eval_folder) / "reference"


def report_dir(eval_folder: Path) -> Path:
    return Path(eval_folder) / "report"


def stamps(data_dir: Path) -> Path:
    return Path(data_dir) / "stamps"


# ----- the command line the Makefile uses -------------------------------------------------

def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m pipeline.core.paths", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["model", "store", "checkpoint-group", "eval-dir", "report-dir", "data-key", "make-vars"])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--lm", default="smollm2-135m")
    p.add_argument("--data", default="bbc")
    p.add_argument("--split", default="train")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--group", default="transcoder")
    p.add_argument("--eval-tokens", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = _args(sys.argv[1:] if argv is None else argv)
    d = Path(a.data_dir)
    found = {
        "model": lambda: model_dir(d, a.lm),
        "store": lambda: store(d, a.lm, a.data, a.split, a.ctx),
        "checkpoint-group": lambda: checkpoint_group(d, a.lm, a.data, a.ctx, a.group),
        "eval-dir": lambda: eval_dir(d, a.lm, a.data, a.ctx, a.eval_tokens, a.dtype),
        "report-dir": lambda: report_dir(eval_dir(d, a.lm, a.data, a.ctx, a.eval_tokens, a.dtype)),
        "data-key": lambda: data_key(a.data),
    }
    if a.what != "make-vars":
        print(found[a.what]())
        return
    ev = eval_dir(d, a.lm, a.data, a.ctx, a.eval_tokens, a.dtype)
    assignments = {
        "LM_KEY": lm_key(a.lm), "DATA_KEY": data_key(a.data),
        "STORE": store(d, a.lm, a.data, "train", a.ctx), "CKPT_ROOT": checkpoint_group(d, a.lm, a.data, a.ctx, a.group),
        "T_ROOT": checkpoint_group(d, a.lm, a.data, a.ctx, "transcoder"),
        "CLT_ROOT": checkpoint_group(d, a.lm, a.data, a.ctx, "clt"),
        "EVAL_DIR": ev, "REPORT_DIR": report_dir(ev), "STAMPS": stamps(d),
    }
    # One line, space-separated NAME=value words (values are validated paths without spaces).
    print(" ".join(f"{k}={v}" for k, v in assignments.items()))


if __name__ == "__main__":
    main()
