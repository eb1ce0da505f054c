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
    stamps/                                              Make's parameter stamps (only ever written by recipes)
    analysis/<lm>/<data>/ctx<ctx>/                       topic selection per method, ablate-t<eval_tokens>/, steer/
    analysis/classifier/<data>/                          the topic classifier of a labelled corpus
    features/<lm>/<data>/ctx<ctx>/<group>/<name>/        a checkpoint's features file, density, dashboard/

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
import shutil
import sys
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.layers import layers_label, parse_layers

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


# ----- topic experiments (issue 11): ablation and steering ---------------------------------

def analysis_dir(data_dir: Path, lm: str, data: str, ctx: int) -> Path:
    """Topic selections (one folder per method), ``ablate-t<eval_tokens>/`` and ``steer/`` of one store."""
    return Path(data_dir) / "analysis" / lm_key(lm) / data_key(data) / f"ctx{ctx}"


def topic_classifier(data_dir: Path, data: str) -> Path:
    """The cached topic classifier trained on the training split of a labelled corpus."""
    return Path(data_dir) / "analysis" / "classifier" / data_key(data)


# ----- features (pipeline/features): one folder per checkpoint ------------------------------

def features_dir(data_dir: Path, lm: str, data: str, ctx: int, group: str, name: str) -> Path:
    """``features.safetensors`` + ``features.json``, ``density.*`` and ``dashboard/`` of one checkpoint."""
    return Path(data_dir) / "features" / lm_key(lm) / data_key(data) / f"ctx{ctx}" / group / name


# ----- checkpoint names of a MODEL (the registry's naming; tests/test_make_safety.py keeps the two in step)

TRANSCODER_VARIANTS = ("vanilla", "topk", "batchtopk", "jumprelu")
CLT_DEFAULT_VARIANT = "batchtopk"  # MODEL=clt
MODELS = (*TRANSCODER_VARIANTS, *(f"skip-{v}" for v in TRANSCODER_VARIANTS),
          "clt", *(f"clt-{v}" for v in TRANSCODER_VARIANTS))
KINDS = ("transcoder", "sae")
# issue 13: Matryoshka BatchTopK (per layer and CLT) and SPD
MODELS += ("matryoshka", "matryoshka-topk", "matryoshka-clt", "spd")
INITS = ("random", "rkcnn")


def init_tag(init: str) -> str:
    """What INIT adds to per-layer checkpoint names and eval keys ("" for the default)."""
    if init not in INITS:
        raise UserError(f"unknown INIT '{init}'; choose one of {', '.join(INITS)}")
    return "" if init == "random" else f"-{init}"


def checkpoint_names(model: str, k: int, layers: list[int], kind: str = "transcoder",
                     init: str = "random") -> list[tuple[str, str]]:
    """(group, name) of every checkpoint ``nnd train --model MODEL --k K --layers LAYERS`` writes:
    one per layer for (skip) transcoders and SAEs, one over all layers for a CLT."""
    if model not in MODELS:
        raise UserError(f"unknown MODEL '{model}'; choose from {', '.join(MODELS)}")
    if model == "spd":
        return [("spd", f"spd-k{k}-L{layer}") for layer in layers]
    if model == "matryoshka-clt":
        return [("clt", f"matryoshka-clt-{CLT_DEFAULT_VARIANT}-k{k}-L{layers_label(layers)}")]
    if model == "clt" or model.startswith("clt-"):
        variant = CLT_DEFAULT_VARIANT if model == "clt" else model[len("clt-"):]
        return [("clt", f"clt-{variant}-k{k}-L{layers_label(layers)}")]
    return [(kind, f"{model}{init_tag(init)}-k{k}-L{layer}") for layer in layers]


def method_key(model: str, k: int, init: str = "random") -> str:
    """The eval folder name of one (MODEL, K) of `make pareto`: <eval dir>/<model>-k<k>/metrics.json."""
    return f"{model}{init_tag(init)}-k{k}"


def neuron_baseline(k: int, layers: list[int]) -> str:
    """The eval folder name of `nnd baselines`' neuron baseline at K."""
    return f"neurons-k{k}-L{layers_label(layers)}"


def harvest_stamp(data_dir: Path, lm: str, data: str, ctx: int) -> Path:
    """Make's record of the last successful `make harvest` (its parameters) for one store."""
    return stamps(data_dir) / "harvest" / lm_key(lm) / data_key(data) / f"ctx{ctx}.done"


def train_stamp(data_dir: Path, lm: str, data: str, ctx: int) -> Path:
    """Make's record of the training parameters of the last successful train of one store's checkpoints."""
    return stamps(data_dir) / "train" / lm_key(lm) / data_key(data) / f"ctx{ctx}.params"


def eval_stamp(data_dir: Path, lm: str, data: str, ctx: int, eval_tokens: int) -> Path:
    """Make's record of the evaluation parameters (the layer set) of one eval set."""
    return stamps(data_dir) / "eval" / lm_key(lm) / data_key(data) / f"ctx{ctx}-t{eval_tokens}.params"


# ----- what `make clean-data` may delete ---------------------------------------------------

PIPELINE_ENTRIES = ("models", "harvest", "train", "eval", "reports", "stamps", "features", "analysis")


def clean_data(data_dir: Path) -> list[Path]:
    """Delete what the pipeline wrote under ``data_dir`` (never its README or anything else).

    Refuses a folder that is not a data folder: empty, the filesystem root, the home folder,
    this repository's root, or any folder holding a ``.git``."""
    if not str(data_dir).strip():
        raise UserError("DATA_DIR is empty; name the data folder to clean, e.g. DATA_DIR=data")
    root = Path(data_dir).expanduser().resolve()
    repo = Path(__file__).resolve().parents[2]
    if root == Path(root.anchor) or root == Path.home().resolve() or root == repo or (root / ".git").exists():
        raise UserError(f"DATA_DIR={data_dir} ({root}) is not a data folder; refusing to clean it")
    removed = []
    for name in PIPELINE_ENTRIES:
        entry = root / name
        if entry.is_symlink() or entry.is_file():
            entry.unlink()
        elif entry.is_dir():
            shutil.rmtree(entry)
        else:
            continue
        removed.append(entry)
    return removed


# ----- the Makefile's values: checked here after Make's character check --------------------

_NAME = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
_HUB_ID = re.compile(rf"{_NAME}(/{_NAME})?")
_PATH = re.compile(r"[A-Za-z0-9._/+-]+")


def _ks(text: str, what: str) -> list[int]:
    ks = [int(p) for p in text.split(",") if re.fullmatch(r"[0-9]+", p)]
    if not ks or len(ks) != len(text.split(",")) or min(ks) <= 0:
        raise UserError(f"{what}='{text}' must be a comma list of positive integers, e.g. 8,16,32,64")
    return list(dict.fromkeys(ks))


def _models(text: str, what: str) -> list[str]:
    names = text.split(",")
    bad = [n for n in names if n not in MODELS]
    if bad or not names:
        raise UserError(f"{what}='{text}': unknown {', '.join(bad) or 'empty name'}; choose from {', '.join(MODELS)}")
    return list(dict.fromkeys(names))


def check(a: argparse.Namespace) -> None:
    """Refuse a value no stage would accept, before Make builds a rule or a path from it."""
    if not str(a.data_dir) or not _PATH.fullmatch(str(a.data_dir)):
        raise UserError(f"DATA_DIR='{a.data_dir}' must be a non-empty path of letters, digits and ._/+-")
    if Path(a.data_dir).expanduser().resolve() == Path(Path(a.data_dir).resolve().anchor):
        raise UserError("DATA_DIR=/ is the filesystem root; name a data folder")
    if not _HUB_ID.fullmatch(a.lm):
        raise UserError(f"LM='{a.lm}' must be a bundled model name or a Hugging Face id owner/name")
    if not _PATH.fullmatch(a.data) or not (_HUB_ID.fullmatch(a.data) or is_local_corpus(a.data)):
        raise UserError(f"DATA='{a.data}' must be a bundled corpus, a Hugging Face dataset id, or a local "
                        f"file (.txt, .jsonl, .parquet) or folder of them")
    if a.group not in (*KINDS, "clt"):
        raise UserError(f"KIND='{a.group}' must be one of {', '.join(KINDS)}")
    if a.layers is not None:
        parse_layers(a.layers)


# ----- the command line the Makefile uses -------------------------------------------------

def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m pipeline.core.paths", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["model", "store", "checkpoint-group", "eval-dir", "report-dir", "data-key", "make-vars",
                                    "sweep-vars", "pareto-vars", "clean-data"])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--lm", default="smollm2-135m")
    p.add_argument("--data", default="bbc")
    p.add_argument("--split", default="train")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--group", default="transcoder")
    p.add_argument("--eval-tokens", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--layers", default=None, help="layer list (make-vars adds LAYERS_LABEL and the stamps)")
    p.add_argument("--models", default="topk", help="sweep-vars: MODEL comma list")
    p.add_argument("--ks", default="32", help="sweep-vars: K comma list")
    p.add_argument("--prefix", default="P_", help="sweep-vars: prefix of the Make names printed")
    p.add_argument("--init", default="random", help="sweep-vars: INIT (decoder initialisation) of the sweep")
    return p.parse_args(argv)


def sweep_vars(a: argparse.Namespace, prefix: str) -> dict[str, object]:
    """Every path of one sweep (MODELS x KS over LAYERS) as Make words: checkpoints, their done files,
    metrics.json per (model, K), and the neuron baselines' metrics at the same K.

    Lists are comma-joined. Names: <prefix>METHODS (keys), <prefix>CKPTS.<key>, <prefix>DONE.<key>,
    <prefix>METRICS.<key>, <prefix>ALL_DONE, <prefix>NEURONS.<k>, <prefix>ALL_NEURONS, <prefix>ALL_METRICS,
    and the checked <prefix>MODELS, <prefix>KS, <prefix>KIND."""
    d, layers = Path(a.data_dir), parse_layers(a.layers or "0-3")
    ev = eval_dir(d, a.lm, a.data, a.ctx, a.eval_tokens, a.dtype)
    models, ks = _models(a.models, "MODEL"), _ks(a.ks, "K")
    out: dict[str, object] = {}
    keys, seen, all_done = [], set(), []
    for model in models:
        for k in ks:
            init = a.init if model not in ("spd", "matryoshka-clt") and not model.startswith("clt") else "random"
            ckpts = [checkpoint(d, a.lm, a.data, a.ctx, g, n) for g, n in checkpoint_names(model, k, layers, a.group, init)]
            if tuple(ckpts) in seen:  # clt and clt-batchtopk name one checkpoint
                continue
            seen.add(tuple(ckpts))
            key = method_key(model, k, init)
            keys.append(key)
            done = [c / "done" for c in ckpts]
            all_done += done
            out[f"{prefix}CKPTS.{key}"] = ",".join(map(str, ckpts))
            out[f"{prefix}DONE.{key}"] = ",".join(map(str, done))
            out[f"{prefix}METRICS.{key}"] = metrics(ev, key)
    out[f"{prefix}METHODS"] = ",".join(keys)
    out[f"{prefix}ALL_DONE"] = ",".join(map(str, all_done))
    out[f"{prefix}ALL_METRICS"] = ",".join(str(out[f"{prefix}METRICS.{key}"]) for key in keys)
    out[f"{prefix}KS"] = ",".join(map(str, ks))
    out[f"{prefix}MODELS"] = ",".join(models)
    out[f"{prefix}KIND"] = a.group
    for k in ks:
        out[f"{prefix}NEURONS.{k}"] = metrics(ev, neuron_baseline(k, layers))
    out[f"{prefix}ALL_NEURONS"] = ",".join(str(out[f"{prefix}NEURONS.{k}"]) for k in ks)
    return out


def main(argv: list[str] | None = None) -> int:
    a = _args(sys.argv[1:] if argv is None else argv)
    try:
        return _main(a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(a: argparse.Namespace) -> int:
    d = Path(a.data_dir)
    if a.what == "clean-data":
        removed = clean_data(d)
        print(f"removed {', '.join(map(str, removed))}" if removed else f"nothing of the pipeline's under {d}")
        return 0
    check(a)
    found = {
        "model": lambda: model_dir(d, a.lm),
        "store": lambda: store(d, a.lm, a.data, a.split, a.ctx),
        "checkpoint-group": lambda: checkpoint_group(d, a.lm, a.data, a.ctx, a.group),
        "eval-dir": lambda: eval_dir(d, a.lm, a.data, a.ctx, a.eval_tokens, a.dtype),
        "report-dir": lambda: report_dir(eval_dir(d, a.lm, a.data, a.ctx, a.eval_tokens, a.dtype)),
        "data-key": lambda: data_key(a.data),
    }
    if a.what in found:
        print(found[a.what]())
        return 0
    if a.what in ("sweep-vars", "pareto-vars"):
        print(_words(sweep_vars(a, "P_" if a.what == "pareto-vars" else a.prefix)))
        return 0
    ev = eval_dir(d, a.lm, a.data, a.ctx, a.eval_tokens, a.dtype)
    assignments = {
        "LM_KEY": lm_key(a.lm), "DATA_KEY": data_key(a.data),
        "STORE": store(d, a.lm, a.data, "train", a.ctx), "CKPT_ROOT": checkpoint_group(d, a.lm, a.data, a.ctx, a.group),
        "T_ROOT": checkpoint_group(d, a.lm, a.data, a.ctx, "transcoder"),
        "CLT_ROOT": checkpoint_group(d, a.lm, a.data, a.ctx, "clt"),
        "EVAL_DIR": ev, "REPORT_DIR": report_dir(ev), "STAMPS": stamps(d),
        "HARVEST_STAMP": harvest_stamp(d, a.lm, a.data, a.ctx), "TRAIN_STAMP": train_stamp(d, a.lm, a.data, a.ctx),
        "EVAL_STAMP": eval_stamp(d, a.lm, a.data, a.ctx, a.eval_tokens),
    }
    if a.layers is not None:
        assignments["LAYERS_LABEL"] = layers_label(parse_layers(a.layers))
    print(_words(assignments))
    return 0


def _words(assignments: dict[str, object]) -> str:
    """One line, space-separated NAME=value words; a value with a space or a Make special would split
    or re-expand, so it is refused (every input was checked, so this is a bug guard)."""
    for name, value in assignments.items():
        if not re.fullmatch(r"[A-Za-z0-9._/+,-]*", str(value)):
            raise UserError(f"{name}={value} holds a character Make cannot take in a file name")
    return " ".join(f"{k}={v}" for k, v in assignments.items())


if __name__ == "__main__":
    sys.exit(main())


# ----- interpretability scores and diagnostics (issue 12) ------------------------------------

def snapshots_dir(checkpoint_dir: Path) -> Path:
    """Weight snapshots taken during the training of a checkpoint (beside it: a finished checkpoint
    folder is swapped in whole, so they cannot live inside it)."""
    checkpoint_dir = Path(checkpoint_dir)
    return checkpoint_dir.parent / ".snapshots" / checkpoint_dir.name


def interp_dir(data_dir: Path, lm: str, data: str, ctx: int) -> Path:
    """autointerp/, faithfulness/, tail/, emergence/ results (one folder per method inside each)."""
    return Path(data_dir) / "interp" / lm_key(lm) / data_key(data) / f"ctx{ctx}"
