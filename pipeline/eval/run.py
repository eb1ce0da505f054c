"""Evaluate splices on held-out tokens: what replacing MLPs costs the model.

Every method (a set of per-layer dictionaries, a CLT, a baseline) is spliced
in two modes: ``single_layer`` (one job per layer, the others clean) and
``all_layers`` (one job, every layer replaced at once). A job runs the eval
tokens through the live model with the method's hooks and measures:

- CE of the next-token predictions, ΔCE against the clean model (with its
  standard error over predictions, paired), KL(clean || spliced), and CE
  recovered against zero- and mean-ablation of the same layers:
  100 (CE_abl - CE) / (CE_abl - CE_clean) (single-layer summaries use the
  CEs averaged over layers, so a cheap-to-ablate layer cannot dominate);
- per replaced layer, against the output the real MLP would have written
  from the live input: MSE (squared error summed over d, mean over rows),
  FVU, FVU on the rows below the massive-activation threshold, L0, alive and
  dead latents, dense latents (firing on >1% / >10% of rows) and the mean
  activation of active latents.

Which tokens: ``EVAL_TOKENS`` rows of the eval split (documents that never
enter a training store), packed exactly as the harvest packs them. A row is
a position 1..ctx-1 of a window (BOS at 0 is never replaced, as in the
stores); CE and KL are over the predictions made at positions 1..ctx-2.

Cost. A SmolLM2 forward runs at a few hundred tokens/s on 2 cores, so
everything that does not depend on the method is computed once per eval set
and cached under ``data/eval/<lm>/<data>/ctx<ctx>-t<EVAL_TOKENS>/reference/``: the
tokens, the clean final hidden states (not the logits: 576 floats per row
instead of 49k), the clean CE per prediction, the massive-row thresholds and
the zero-/mean-ablation results. Jobs run batch-major: each batch's clean
log-probabilities are recomputed once from the cached hidden states and
shared by all jobs of the run.

Precision. The model runs in fp32 by default. Clean and spliced runs go
through the same code on the same batches, so a splice that changes nothing
reproduces the clean CE bit for bit. ``dtype=bfloat16`` runs the model in
bf16, about 3x faster here; measured on SmolLM2 it moves ΔCE by up to
~0.005 nats against fp32 (3k tokens), comparable to the ΔCE of a good
single-layer splice, so it is an option for quick looks, not the default.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.data import corpora
from pipeline.eval.baselines import NeuronSplice, mean_ablation, mlp_parameters, weights_per_hidden_unit, zero_ablation
from pipeline.core.errors import UserError
from pipeline.eval.splice import CLTSplice, DictionarySplice, Splice, final_hidden, logits

EVAL_BATCH = 8  # sequences per forward; fixed so reference and splices share exactly the same batches
MODES = ("single_layer", "all_layers")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MASSIVE_FACTOR = 5.0  # a row is "massive" when its clean target norm exceeds 5x the median (see GUIDE/dictionary)
REFERENCE_VERSION = 2
ABLATIONS = ("zero", "mean")


@dataclass(frozen=True)
class EvalConfig:
    lm: str = "smollm2-135m"
    data: str = "bbc"
    ctx: int = 128
    eval_tokens: int = 4096
    dtype: str = "float32"
    data_dir: Path = Path("data")
    text_field: str = "text"
    eval_dir: Path | None = None  # where this eval set lives; default under data_dir (``out_dir``)

    def __post_init__(self):
        if self.eval_tokens <= 0:
            raise UserError(f"EVAL_TOKENS={self.eval_tokens} must be a positive number of tokens, e.g. EVAL_TOKENS=4096")
        if self.ctx < 3:
            raise UserError(f"CTX={self.ctx} must be at least 3 (BOS, a replaced token and its prediction)")
        if self.dtype not in DTYPES:
            raise UserError(f"DTYPE={self.dtype} is not one of {', '.join(DTYPES)}")

    @property
    def n_seq(self) -> int:
        return -(-self.eval_tokens // (self.ctx - 1))

    @property
    def rows(self) -> int:
        return self.n_seq * (self.ctx - 1)

    @property
    def out_dir(self) -> Path:
        """``data/eval/<lm>/<data>/ctx<ctx>-t<eval_tokens>[-bf16]``: reference, one folder per method, report."""
        if self.eval_dir is not None:
            return Path(self.eval_dir)
        suffix = "" if self.dtype == "float32" else "-bf16"
        return (Path(self.data_dir) / "eval" / self.lm.replace("/", "__") / corpora.store_name(self.data)
                / f"ctx{self.ctx}-t{self.eval_tokens}{suffix}")

    @property
    def train_store(self) -> Path:
        from pipeline.data.harvest import store_path

        return store_path(self.data_dir, self.lm, self.data, "train", self.ctx)


def load_model(cfg: EvalConfig):
    from pipeline.data.models import load_lm

    lm = load_lm(cfg.lm, cfg.data_dir)
    if cfg.dtype != "float32":
        lm.bridge.to(DTYPES[cfg.dtype])
    return lm


def eval_tokens(lm, cfg: EvalConfig) -> Tensor:
    """The first ``cfg.n_seq`` windows of the eval split, [n_seq, ctx] int64."""
    from pipeline.data.harvest import token_table

    # The whole split is packed to know its size: it is 5% of the corpus.
    table = token_table(lm, cfg.data, "eval", cfg.ctx, None, cfg.text_field)
    if cfg.n_seq > table.ids.shape[0]:
        raise UserError(
            f"EVAL_TOKENS={cfg.eval_tokens} is larger than the eval split of DATA={cfg.data}, which has "
            f"{table.n_rows} tokens at CTX={cfg.ctx}; lower EVAL_TOKENS"
        )
    return torch.from_numpy(table.ids[: cfg.n_seq].astype(np.int64))


# ----- methods ------------------------------------------------------------------

@dataclass
class Method:
    """One thing to splice and how to describe it in tables and plots."""

    name: str  # unique, used as the folder of its metrics.json
    label: str  # legend group: method without K ("transcoder topk", "neurons")
    family: str  # transcoder | sae | clt | neurons | zero | mean
    splice: Splice
    layers: tuple[int, ...]
    k: int | None = None
    n_latents: dict[int, int] = field(default_factory=dict)
    params: int = 0
    info: dict = field(default_factory=dict)  # recorded as is (checkpoints, variant, training facts)


def neuron_method(lm, k: int, layers: Sequence[int]) -> Method:
    layers = tuple(sorted(layers))
    return Method(f"neurons-k{k}-L{layer_spec(layers)}", "neurons", "neurons", NeuronSplice(k, layers), layers, k=k,
                  n_latents={l: lm.d_mlp for l in layers}, params=sum(mlp_parameters(lm, l) for l in layers))


def zero_method(lm, layers: Sequence[int]) -> Method:
    layers = tuple(sorted(layers))
    return Method(f"zero-ablation-L{layer_spec(layers)}", "zero-ablation", "zero", zero_ablation(layers, lm.d_model), layers)


def mean_method(lm, cfg: EvalConfig, layers: Sequence[int]) -> Method:
    layers = tuple(sorted(layers))
    return Method(f"mean-ablation-L{layer_spec(layers)}", "mean-ablation", "mean",
                  mean_ablation(lm, cfg.train_store, layers), layers, params=len(layers) * lm.d_model,
                  info={"means_from": str(cfg.train_store)})


def layer_spec(layers: Sequence[int]) -> str:
    """(0, 1, 2, 3) -> '0-3'; (0, 2) -> '0,2'."""
    layers = sorted(layers)
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


# ----- checkpoints -----------------------------------------------------------------

def checkpoint_dirs(paths: Sequence[Path]) -> list[Path]:
    """Checkpoint directories named by ``paths``: each a checkpoint, a folder of them, or a glob."""
    import glob

    from pipeline.checkpoint import CONFIG

    found: list[Path] = []
    expanded = []
    for p in map(str, paths):
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        expanded += matches or [p]
    for p in map(Path, expanded):
        if not p.exists():
            raise UserError(f"checkpoint {p} does not exist; train it first (make train ...) or fix CKPT")
        if (p / CONFIG).exists():
            found.append(p)
            continue
        inside = sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith(".") and (c / CONFIG).exists())
        if not inside:
            raise UserError(f"{p} holds no checkpoints (no */config.json); train them first (make train ...)")
        found.extend(inside)
    return found


def checkpoint_origin(paths: Sequence[Path]) -> dict:
    """lm / data / ctx of the store the first checkpoint was trained on (defaults for evaluate)."""
    from pipeline.checkpoint import read_config

    meta = read_config(checkpoint_dirs(paths)[0]).get("metadata", {})
    return {k: v for k, v in meta.get("store_manifest", {}).items() if k in ("lm", "data", "ctx")}


def load_checkpoints(lm, paths: Sequence[Path]) -> list[Method]:
    """The methods in ``paths``, checked against ``lm``: each CLT alone, and per-layer
    SAEs/transcoders grouped by configuration (kind, variant, k, latents), one method
    per group spliced over all of its layers."""
    from pipeline import checkpoint

    groups: dict[tuple, list[tuple[Path, nn.Module]]] = {}
    methods = []
    for d in checkpoint_dirs(paths):
        module = checkpoint.load(d)
        _check_origin(lm, d, checkpoint.read_config(d).get("metadata", {}))
        if hasattr(module, "encode_layer"):
            methods.append(_clt_method(lm, d, module))
        else:
            c = module.cfg
            groups.setdefault((c.kind, c.variant, c.k, c.n_latents), []).append((d, module))
    methods += [_dictionary_method(lm, loaded) for _, loaded in sorted(groups.items())]
    return methods


def _check_origin(lm, path: Path, meta: dict) -> None:
    origin = meta.get("store_manifest", {})
    if origin.get("lm") not in (None, lm.name) or origin.get("lm_weights_sha256") not in (None, lm.weights_sha256):
        raise UserError(
            f"checkpoint {path} was trained on activations of LM={origin.get('lm')} "
            f"(weights {str(origin.get('lm_weights_sha256'))[:12]}), not of {lm.name} "
            f"(weights {lm.weights_sha256[:12]}); evaluate it with LM={origin.get('lm')} or retrain it"
        )


def _check_dims(lm, path: Path, d_in: int, d_out: int) -> None:
    if (d_in, d_out) != (lm.d_model, lm.d_model):
        raise UserError(
            f"checkpoint {path} maps d={d_in} -> d={d_out}, but {lm.name} has d_model={lm.d_model}; "
            f"it was trained for another model: evaluate it with the LM it was trained on"
        )


def _dictionary_method(lm, loaded: list[tuple[Path, nn.Module]]) -> Method:
    splice_hook = lm.mlp_out_hook_for_splice
    modules: dict[int, nn.Module] = {}
    for d, m in loaded:
        c = m.cfg
        _check_dims(lm, d, c.d_in, c.d_out)
        lm.check_layers([c.layer])
        want_input = "mlp_in" if c.kind == "transcoder" else splice_hook
        if (c.input_hook, c.target_hook) != (want_input, splice_hook):
            raise UserError(
                f"checkpoint {d} maps {c.input_hook} -> {c.target_hook}, but evaluate replaces {splice_hook} of "
                f"{lm.name} (from {want_input}); train it with those hooks"
            )
        if c.layer in modules:
            raise UserError(f"two checkpoints of one configuration for layer {c.layer} ({d} and another); "
                            f"pass each checkpoint once")
        modules[c.layer] = m
    (kind, variant, k, n_latents), = {(m.cfg.kind, m.cfg.variant, m.cfg.k, m.cfg.n_latents) for _, m in loaded}
    layers = tuple(sorted(modules))
    return Method(
        name=f"{kind}-{variant}-k{k}-n{n_latents}-L{layer_spec(layers)}",
        label=f"{kind} {variant}", family=kind, splice=DictionarySplice(modules), layers=layers, k=k,
        n_latents={l: modules[l].cfg.n_latents for l in layers},
        params=sum(p.numel() for m in modules.values() for p in m.parameters()),
        info={"variant": variant, "kind": kind, "checkpoints": [str(d) for d, _ in loaded],
              "train": [_train_facts(d) for d, _ in loaded]},
    )


def _clt_method(lm, path: Path, clt: nn.Module) -> Method:
    c = clt.cfg
    layers = tuple(sorted(c.layers))
    lm.check_layers(list(layers))
    _check_dims(lm, path, getattr(c, "d_in", lm.d_model), getattr(c, "d_out", lm.d_model))
    variant, k, n_latents = getattr(c, "variant", "?"), getattr(c, "k", None), getattr(c, "n_latents", None)
    return Method(
        name=f"clt-{variant}-k{k}-n{n_latents}-L{layer_spec(layers)}", label=f"clt {variant}", family="clt",
        splice=CLTSplice(clt), layers=layers, k=k, n_latents={l: n_latents for l in layers},
        params=sum(p.numel() for p in clt.parameters()),
        info={"variant": variant, "kind": "clt", "checkpoints": [str(path)], "train": [_train_facts(path)]},
    )


def _train_facts(path: Path) -> dict:
    from pipeline.checkpoint import read_config

    meta = read_config(path).get("metadata", {})
    return {k: meta.get(k) for k in ("train_hash", "tokens", "steps", "store_manifest_hash")}


# ----- accumulating metrics -------------------------------------------------------

class LayerStats:
    """Streaming reconstruction and sparsity statistics of one replaced layer (float64 sums)."""

    def __init__(self, massive_norm: float):
        self.massive_norm = massive_norm
        self.rows = 0
        self.sse = 0.0
        self.sum_y = 0.0
        self.sum_sq = 0.0
        self.normal = {"rows": 0, "sse": 0.0, "sum_y": 0.0, "sum_sq": 0.0}
        self.active = 0
        self.act_sum = 0.0
        self.fires: Tensor | None = None

    def add(self, target: Tensor, recon: Tensor, acts: Tensor | None) -> None:
        y = target.double()
        sq_err = (recon.double() - y).pow(2).sum(-1)
        self.rows += y.shape[0]
        self.sse += float(sq_err.sum())
        self.sum_y = self.sum_y + y.sum(0)
        self.sum_sq += float(y.pow(2).sum())
        normal = y.norm(dim=-1) <= self.massive_norm
        yn = y[normal]
        self.normal["rows"] += int(normal.sum())
        self.normal["sse"] += float(sq_err[normal].sum())
        self.normal["sum_y"] = self.normal["sum_y"] + yn.sum(0)
        self.normal["sum_sq"] += float(yn.pow(2).sum())
        if acts is not None:
            counts = (acts != 0).sum(0)
            self.fires = counts if self.fires is None else self.fires + counts
            self.active += int(counts.sum())
            self.act_sum += float(acts.sum())  # inactive latents add 0

    @staticmethod
    def _fvu(rows: int, sse: float, sum_y, sum_sq: float) -> float | None:
        if rows == 0:
            return None
        variance = sum_sq - float((sum_y * sum_y).sum()) / rows
        return sse / variance if variance > 0 else None

    def result(self) -> dict:
        out = {
            "rows": self.rows,
            "mse": self.sse / self.rows,
            "fvu": self._fvu(self.rows, self.sse, self.sum_y, self.sum_sq),
            "fvu_normal": self._fvu(self.normal["rows"], self.normal["sse"], self.normal["sum_y"], self.normal["sum_sq"]),
            "massive_frac": 1 - self.normal["rows"] / self.rows,
        }
        if self.fires is not None:
            n_latents = self.fires.numel()
            freq = self.fires.double() / self.rows
            alive = int((self.fires > 0).sum())
            out |= {
                "latents": n_latents,
                "l0": self.active / self.rows,
                "alive": alive,
                "dead_pct": 100.0 * (1 - alive / n_latents),
                "dense_1pct": int((freq > 0.01).sum()),
                "dense_10pct": int((freq > 0.10).sum()),
                "mean_act": self.act_sum / self.active if self.active else None,
            }
        return out


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products of two [rows, n] tensors, without an [rows, n] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


@dataclass
class CleanBatch:
    """What every job of a batch compares against, computed once per batch.

    KL(p || q) = sum p log p - sum p log q: the first term (``neg_entropy``)
    is shared; both are the same row-wise dot product, so a splice that
    changes nothing gives exactly 0.
    """

    targets: Tensor  # [predictions] next-token ids
    ce: Tensor  # [predictions] clean CE
    p: Tensor  # [predictions, vocab] clean probabilities
    neg_entropy: Tensor  # [predictions] sum p log p

    @classmethod
    def from_hidden(cls, lm, hidden: Tensor, targets: Tensor, ce: Tensor) -> "CleanBatch":
        logp = F.log_softmax(logits(lm, hidden.reshape(-1, hidden.shape[-1])), dim=-1)
        p = logp.exp()
        return cls(targets, ce, p, rowdot(p, logp))


class JobStats:
    """Everything one job measures: predictions and its replaced layers."""

    def __init__(self, massive_norm: dict[int, float]):
        self.massive_norm = massive_norm
        self.layers: dict[int, LayerStats] = {}
        self.n = 0
        self.ce_sum = 0.0
        self.delta_sum = 0.0
        self.delta_sq = 0.0
        self.kl_sum = 0.0

    def record(self, layer: int, target: Tensor, recon: Tensor, acts: Tensor | None) -> None:
        if layer not in self.layers:
            self.layers[layer] = LayerStats(self.massive_norm[layer])
        self.layers[layer].add(target, recon, acts)

    def add_predictions(self, logp: Tensor, clean: "CleanBatch") -> None:
        ce = -logp.gather(1, clean.targets[:, None]).squeeze(1).double()
        delta = ce - clean.ce.double()
        self.n += ce.numel()
        self.ce_sum += float(ce.sum())
        self.delta_sum += float(delta.sum())
        self.delta_sq += float(delta.pow(2).sum())
        self.kl_sum += float((clean.neg_entropy - rowdot(clean.p, logp)).double().sum())

    def result(self) -> dict:
        mean_delta = self.delta_sum / self.n
        var = max(self.delta_sq / self.n - mean_delta**2, 0.0)
        return {
            "ce": self.ce_sum / self.n,
            "delta_ce": mean_delta,
            "delta_ce_se": math.sqrt(var / max(self.n - 1, 1)),
            "kl": self.kl_sum / self.n,
            "predictions": self.n,
            "layers": {l: s.result() for l, s in sorted(self.layers.items())},
        }


# ----- the reference (clean model, ablations) ------------------------------------------

@dataclass
class Reference:
    tokens: Tensor  # [n_seq, ctx]
    hidden: Tensor  # [n_seq, ctx-2, d]: clean final hidden states at predicting positions 1..ctx-2
    ce: Tensor  # [n_seq, ctx-2]: clean CE of each prediction
    info: dict  # clean_ce, massive_norm per layer, ablations, identity

    @property
    def clean_ce(self) -> float:
        return self.info["clean_ce"]

    @property
    def massive_norm(self) -> dict[int, float]:
        return {int(l): v for l, v in self.info["massive_norm"].items()}

    def ablation(self, family: str, replace: Sequence[int]) -> dict | None:
        """The cached result of zero- or mean-ablating ``replace`` (a job result), if any."""
        r = self.info["ablations"].get(family, {}).get(layer_spec(replace))
        return None if r is None else {**r, "layers": {int(l): v for l, v in r["layers"].items()}}


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x))


def _tokens_hash(tokens: Tensor) -> str:
    return hashlib.sha256(tokens.numpy().astype("<i8").tobytes()).hexdigest()


def reference(lm, cfg: EvalConfig, progress: bool = False) -> Reference:
    """The clean-model reference of this eval set, computed once (under a lock) and cached."""
    from safetensors.torch import load_file, save_file

    folder = cfg.out_dir / "reference"
    identity = {"version": REFERENCE_VERSION, "lm": cfg.lm, "lm_weights_sha256": lm.weights_sha256,
                "data": cfg.data, "ctx": cfg.ctx, "rows": cfg.rows, "dtype": cfg.dtype, "batch": EVAL_BATCH}
    with _locked(folder):
        info_path, tensors_path = folder / "reference.json", folder / "clean.safetensors"
        if info_path.exists() and tensors_path.exists():
            info = json.loads(info_path.read_text())
            if info["identity"] == identity:
                t = load_file(tensors_path)
                return Reference(t["tokens"], t["hidden"], t["ce"], info)
        tokens = eval_tokens(lm, cfg)
        hidden, ce, norms = _clean_pass(lm, tokens, progress)
        massive = {l: MASSIVE_FACTOR * float(n.median()) for l, n in norms.items()}
        info = {"identity": identity, "tokens_sha256": _tokens_hash(tokens), "clean_ce": float(ce.double().mean()),
                "massive_norm": massive, "massive_factor": MASSIVE_FACTOR, "ablations": {}}
        tmp = tensors_path.with_name(f".{tensors_path.name}.tmp-{os.getpid()}")
        save_file({"tokens": tokens, "hidden": hidden.contiguous(), "ce": ce}, tmp)
        os.replace(tmp, tensors_path)
        _write_json_atomic(info_path, info)
        return Reference(tokens, hidden, ce, info)


def _clean_pass(lm, tokens: Tensor, progress: bool) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    from pipeline.eval.splice import rows_of, splice_hook_name

    norms: dict[int, list[Tensor]] = {l: [] for l in range(lm.n_layers)}

    def observe(layer):
        def hook(y, hook=None):
            norms[layer].append(rows_of(y).float().norm(dim=-1))
        return hook

    observers = [(splice_hook_name(lm, l), observe(l)) for l in range(lm.n_layers)]
    hidden, ces = [], []
    bar = _progress(tokens.shape[0] * (tokens.shape[1] - 1), progress, "eval reference (clean)")
    for batch in _batches(tokens):
        h = final_hidden(lm, batch, observers)[:, 1:-1].contiguous()
        logp = F.log_softmax(logits(lm, h.reshape(-1, h.shape[-1])), dim=-1)
        ces.append(-logp.gather(1, batch[:, 2:].reshape(-1, 1)).reshape(batch.shape[0], -1))
        hidden.append(h)
        bar.update(batch.numel() - batch.shape[0])
    bar.close()
    return torch.cat(hidden), torch.cat(ces), {l: torch.cat(v) for l, v in norms.items()}


def _save_ablations(lm, cfg: EvalConfig, ref: Reference, found: dict[str, dict[str, dict]]) -> None:
    folder = cfg.out_dir / "reference"
    with _locked(folder):
        info = json.loads((folder / "reference.json").read_text())
        for family, by_layers in found.items():
            info["ablations"].setdefault(family, {}).update(by_layers)
        _write_json_atomic(folder / "reference.json", info)
    ref.info["ablations"] = info["ablations"]


# ----- running jobs -------------------------------------------------------------

def _batches(tokens: Tensor) -> Iterator[Tensor]:
    for start in range(0, tokens.shape[0], EVAL_BATCH):
        yield tokens[start : start + EVAL_BATCH]


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc=desc, disable=not enabled, dynamic_ncols=True)


@dataclass(frozen=True)
class Job:
    method: int  # index into the run's methods
    replace: tuple[int, ...]


def run_jobs(lm, ref: Reference, methods: list[Method], jobs: list[Job], progress: bool = False) -> dict[Job, dict]:
    """Run every job over the eval tokens, batch-major (clean log-probs computed once per batch)."""
    stats = {job: JobStats(ref.massive_norm) for job in jobs}
    rows_per_seq = ref.tokens.shape[1] - 1
    bar = _progress(ref.tokens.shape[0] * rows_per_seq * len(jobs), progress, f"eval {len(jobs)} splices")
    start = 0
    for batch in _batches(ref.tokens):
        n = batch.shape[0]
        d = ref.hidden.shape[-1]
        with torch.inference_mode():
            clean = CleanBatch.from_hidden(lm, ref.hidden[start : start + n], batch[:, 2:].reshape(-1),
                                           ref.ce[start : start + n].reshape(-1))
            for job in jobs:
                s = stats[job]
                hooks = methods[job.method].splice.hooks(lm, job.replace, s.record)
                h = final_hidden(lm, batch, hooks)[:, 1:-1]
                s.add_predictions(F.log_softmax(logits(lm, h.reshape(-1, d)), dim=-1), clean)
                bar.update(n * rows_per_seq)
        start += n
    bar.close()
    return {job: s.result() for job, s in stats.items()}


# ----- evaluating methods ----------------------------------------------------------

def _jobs_for(index: int, method: Method, modes: Sequence[str]) -> list[Job]:
    jobs = []
    if "single_layer" in modes:
        jobs += [Job(index, (l,)) for l in method.layers]
    if "all_layers" in modes and (len(method.layers) > 1 or "single_layer" not in modes):
        jobs.append(Job(index, method.layers))
    return jobs


def evaluate_methods(lm, cfg: EvalConfig, methods: list[Method], modes: Sequence[str] = MODES,
                     progress: bool = False) -> list[dict]:
    """Metrics of every method; zero-/mean-ablations missing from the reference are run alongside."""
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UserError(f"MODES {list(modes)} must be a non-empty subset of {', '.join(MODES)}")
    t0 = time.perf_counter()
    ref = reference(lm, cfg, progress)
    methods = list(methods)
    n_requested = len(methods)
    jobs = [job for i, m in enumerate(methods) for job in _jobs_for(i, m, modes)]
    # Ablations every job needs for "CE recovered", unless cached or already planned.
    planned = {(methods[j.method].family, j.replace) for j in jobs}
    needed: dict[str, set[tuple[int, ...]]] = {"zero": set(), "mean": set()}
    for j in list(jobs):
        for family in needed:
            if ref.ablation(family, j.replace) is None and (family, j.replace) not in planned:
                needed[family].add(j.replace)
    for family, replaces in needed.items():
        if not replaces:
            continue
        layers = sorted({l for r in replaces for l in r})
        method = zero_method(lm, layers) if family == "zero" else mean_method(lm, cfg, layers)
        methods.append(method)
        jobs += [Job(len(methods) - 1, r) for r in sorted(replaces)]
    # Ablation jobs already in the reference are not run again.
    cached = {j: ref.ablation(methods[j.method].family, j.replace) for j in jobs
              if methods[j.method].family in ABLATIONS and ref.ablation(methods[j.method].family, j.replace)}
    results = run_jobs(lm, ref, methods, [j for j in jobs if j not in cached], progress)
    found: dict[str, dict[str, dict]] = {}
    for job, r in results.items():
        family = methods[job.method].family
        if family in ABLATIONS:
            found.setdefault(family, {})[layer_spec(job.replace)] = r
    if found:
        _save_ablations(lm, cfg, ref, found)
    results |= cached
    seconds = time.perf_counter() - t0
    out = []
    for i, method in enumerate(methods[:n_requested]):
        mine = {job.replace: r for job, r in results.items() if job.method == i}
        out.append(_metrics(lm, cfg, ref, method, mine, modes, seconds))
    return out


def _recovered(ref: Reference, family: str, replace: Sequence[int], ce: float) -> float | None:
    abl = ref.ablation(family, replace)
    if abl is None or abl["ce"] == ref.clean_ce:
        return None
    return 100.0 * (abl["ce"] - ce) / (abl["ce"] - ref.clean_ce)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


PREDICTION_KEYS = ("ce", "delta_ce", "delta_ce_se", "kl", "ce_recovered_zero", "ce_recovered_mean")
LAYER_KEYS = ("mse", "fvu", "fvu_normal", "l0")


def _prediction_metrics(ref: Reference, replace: tuple[int, ...], r: dict) -> dict:
    return {
        "ce": r["ce"], "delta_ce": r["delta_ce"], "delta_ce_se": r["delta_ce_se"], "kl": r["kl"],
        "ce_recovered_zero": _recovered(ref, "zero", replace, r["ce"]),
        "ce_recovered_mean": _recovered(ref, "mean", replace, r["ce"]),
    }


def _metrics(lm, cfg: EvalConfig, ref: Reference, method: Method, results: dict[tuple[int, ...], dict],
             modes: Sequence[str], seconds: float) -> dict:
    out = {
        "name": method.name, "label": method.label, "family": method.family, "k": method.k,
        "layers": list(method.layers), "n_latents": {str(l): n for l, n in method.n_latents.items()},
        "params": method.params, **method.info,
        "lm": cfg.lm, "lm_weights_sha256": lm.weights_sha256, "data": cfg.data, "ctx": cfg.ctx,
        "eval_rows": cfg.rows, "eval_predictions": int(ref.ce.numel()), "dtype": cfg.dtype,
        "clean_ce": ref.clean_ce, "tokens_sha256": ref.info["tokens_sha256"],
        "massive_norm": {str(l): ref.massive_norm[l] for l in method.layers},
        "modes": {}, "seconds_run": seconds,
    }
    if "single_layer" in modes:
        per_layer = {}
        for l in method.layers:
            r = results[(l,)]
            per_layer[l] = {**_prediction_metrics(ref, (l,), r), **r["layers"][l]}
        summary = {key: _mean(per_layer[l].get(key) for l in method.layers) for key in PREDICTION_KEYS + LAYER_KEYS}
        # Recovered from mean CEs, not a mean of ratios: a layer whose ablation
        # costs little has a tiny denominator and would swamp the average.
        for family in ("zero", "mean"):
            ablated = [ref.ablation(family, (l,)) for l in method.layers]
            if all(a is not None for a in ablated):
                gap = _mean(a["ce"] for a in ablated) - ref.clean_ce
                summary[f"ce_recovered_{family}"] = 100.0 * (gap - summary["delta_ce"]) / gap if gap else None
        summary["mean_l0"] = summary.pop("l0")
        summary |= _sparsity_axes(lm, method, "single_layer", {l: per_layer[l].get("l0") for l in method.layers})
        out["modes"]["single_layer"] = {**summary, "layers": {str(l): v for l, v in per_layer.items()}}
    if "all_layers" in modes:
        r = results[method.layers]
        per_layer = r["layers"]
        summary = _prediction_metrics(ref, method.layers, r)
        summary |= {key: _mean(per_layer[l].get(key) for l in method.layers) for key in LAYER_KEYS}
        summary["mean_l0"] = summary.pop("l0")
        summary |= _sparsity_axes(lm, method, "all_layers", {l: per_layer[l].get("l0") for l in method.layers})
        out["modes"]["all_layers"] = {**summary, "layers": {str(l): v for l, v in per_layer.items()}}
    return out


def _sparsity_axes(lm, method: Method, mode: str, l0: dict[int, float | None]) -> dict:
    """The Pareto x-axes besides mean L0.

    ``active_components``: latents that write to one MLP reconstruction, on
    average: L0 for per-layer methods; for a CLT a latent of source layer i
    serves the n - i layers at and after it, so sum_i l0_i (n - i) / n.
    ``active_params``: weights the active components touch. Transcoder and
    SAE latents: an encoder row and a decoder row (d_in + d_out); CLT latents:
    an encoder row and n - i decoder rows; neurons: every weight a kept hidden
    unit touches (gate, up and down for gated MLPs). ``all_layers`` sums over
    the replaced layers; ``single_layer`` averages what replacing one layer
    touches (for a CLT at layer j: the sources i <= j, one decoder row each).
    """
    if method.family in ("zero", "mean") or any(v is None for v in l0.values()):
        return {"active_components": None, "active_params": None}
    layers = list(method.layers)
    d = lm.d_model
    if method.family == "clt":
        n = len(layers)
        pos = {layer: i for i, layer in enumerate(layers)}
        components = sum(l0[l] * (n - pos[l]) / n for l in layers)
        if mode == "all_layers":
            params = sum(l0[l] * (d + (n - pos[l]) * d) for l in layers)
        else:
            params = _mean(sum(l0[i] * 2 * d for i in layers if i <= j) for j in layers)
        return {"active_components": components, "active_params": params}
    per_component = {l: weights_per_hidden_unit(lm, l) if method.family == "neurons" else 2 * d for l in layers}
    total = sum(l0[l] * per_component[l] for l in layers)
    return {"active_components": _mean(l0.values()),
            "active_params": total if mode == "all_layers" else total / len(layers)}


def metrics_path(cfg: EvalConfig, name: str) -> Path:
    return cfg.out_dir / name / "metrics.json"


def write_metrics(cfg: EvalConfig, metrics: dict, path: Path | None = None) -> Path:
    path = Path(path) if path is not None else metrics_path(cfg, metrics["name"])
    from pipeline import __version__

    _write_json_atomic(path, {**metrics, "code_version": __version__})
    return path
