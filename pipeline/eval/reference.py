"""The clean-model reference of an eval set, computed once and cached (under a lock).

Everything that does not depend on the method: the tokens, the clean final
hidden states (not the logits: 576 floats per row instead of 49k), the clean
CE per prediction, the massive-row thresholds and the zero-/mean-ablation
results, under ``<eval dir>/reference/``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.core import paths
from pipeline.core.io import exclusive_lock, write_atomic, write_json_atomic
from pipeline.core.layers import layers_label
from pipeline.core.progress import progress_bar
from pipeline.eval.config import EVAL_BATCH, EvalConfig, eval_tokens
from pipeline.eval.splice import final_hidden, logits, rows_of, splice_hook_name
from pipeline.methods.losses import MASSIVE_FACTOR

REFERENCE_VERSION = 3  # 3: content-deduplicated split, windows round-robin over documents


def batches(tokens: Tensor, device: torch.device | str = "cpu") -> Iterator[Tensor]:
    for start in range(0, tokens.shape[0], EVAL_BATCH):
        yield tokens[start : start + EVAL_BATCH].to(device)


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
        r = self.info["ablations"].get(family, {}).get(layers_label(replace))
        return None if r is None else {**r, "layers": {int(l): v for l, v in r["layers"].items()}}


def json_default(x):
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

    folder = paths.reference_dir(cfg.out_dir)
    identity = {"version": REFERENCE_VERSION, "lm": cfg.lm, "lm_weights_sha256": lm.weights_sha256,
                "data": cfg.data, "ctx": cfg.ctx, "rows": cfg.rows, "dtype": cfg.dtype, "batch": EVAL_BATCH,
                "selection": "round-robin over documents"}
    with exclusive_lock(folder / "lock"):
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
        hidden, ce = hidden.cpu(), ce.cpu()  # kept on the host; batches go to the model's device as they are used
        write_atomic(tensors_path, lambda tmp: save_file({"tokens": tokens, "hidden": hidden.contiguous(), "ce": ce}, tmp))
        write_json_atomic(info_path, info, json_default)
        return Reference(tokens, hidden, ce, info)


def _clean_pass(lm, tokens: Tensor, progress: bool) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    
    norms: dict[int, list[Tensor]] = {l: [] for l in range(lm.n_layers)}

    def observe(layer):
        def hook(y, hook=None):
            norms[layer].append(rows_of(y).float().norm(dim=-1))
        return hook

    observers = [(splice_hook_name(lm, l), observe(l)) for l in range(lm.n_layers)]
    hidden, ces = [], []
    bar = progress_bar(tokens.shape[0] * (tokens.shape[1] - 1), progress, "eval reference (clean)")
    for batch in batches(tokens, lm.device):
        h = final_hidden(lm, batch, observers)[:, 1:-1].contiguous()
        logp = F.log_softmax(logits(lm, h.reshape(-1, h.shape[-1])), dim=-1)
        ces.append(-logp.gather(1, batch[:, 2:].reshape(-1, 1)).reshape(batch.shape[0], -1))
        hidden.append(h)
        bar.update(batch.numel() - batch.shape[0])
    bar.close()
    return torch.cat(hidden), torch.cat(ces), {l: torch.cat(v) for l, v in norms.items()}


def save_ablations(cfg: EvalConfig, ref: Reference, found: dict[str, dict[str, dict]]) -> None:
    folder = paths.reference_dir(cfg.out_dir)
    with exclusive_lock(folder / "lock"):
        info = json.loads((folder / "reference.json").read_text())
        for family, by_layers in found.items():
            info["ablations"].setdefault(family, {}).update(by_layers)
        write_json_atomic(folder / "reference.json", info, json_default)
    ref.info["ablations"] = info["ablations"]
