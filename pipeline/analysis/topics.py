"""Topic features and topic ablation.

Selection. Each training-split document of a labelled corpus gets one value
per unit: the **mean** of the unit's activation over the document's tokens,
read from the harvest store (the rows the dictionaries were trained on, no
extra forward). Mean, not max: a topic shows in many tokens of an article,
so the mean measures how much of the document engages the unit, while the
max fires on a single incidental word (one "minister" in a sports story) and
grows with document length; ``pool="max"`` is there for comparison. For each
topic T and unit, the AUROC of that value for "document is about T"
(documents of the other topics are the negatives) is computed from ranks,
ties counted as half. The top-n units by AUROC are T's units.

Ablation. The units of topic T are zeroed at every position of held-out
eval windows, through ``Units.make_splice`` (for a decomposition the
reconstruction error is added back, so only the ablated latents change
anything). Each prediction belongs to the topic of the document of the token
it predicts; ΔCE is measured on the predictions of topic T and on those of
the other topics, and selectivity is their ratio and their difference. The
control ablates n random alive units (one draw per n, seeded).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.core.errors import UserError
from pipeline.core.hashing import canonical_hash
from pipeline.core.io import exclusive_lock, write_atomic, write_json_atomic
from pipeline.core.progress import progress_bar
from pipeline.analysis.units import Units, zero_edit
from pipeline.eval.reference import batches
from pipeline.eval.splice import Splice, final_hidden, logits

POOLS = ("mean", "max")


# ----- labels -----------------------------------------------------------------------

def topic_names(labels: Sequence[str], wanted: Sequence[str] | None = None) -> list[str]:
    """The topics of a corpus (sorted), or the ``wanted`` subset, each checked."""
    known = sorted(set(labels))
    if not wanted:
        return known
    bad = [t for t in wanted if t not in known]
    if bad:
        raise UserError(f"unknown topic {', '.join(bad)}; the topics of this corpus are {', '.join(known)}")
    return list(dict.fromkeys(wanted))


# ----- AUROC --------------------------------------------------------------------------

def midranks(scores: np.ndarray) -> np.ndarray:
    """Ranks 1..N of each column of ``scores`` [N, U], tied values sharing their mean rank."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        return midranks(scores[:, None])[:, 0]
    n = scores.shape[0]
    order = np.argsort(scores, axis=0, kind="stable")
    ordered = np.take_along_axis(scores, order, axis=0)
    index = np.broadcast_to(np.arange(n)[:, None], ordered.shape)
    first = np.ones(ordered.shape, dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    last = np.ones(ordered.shape, dtype=bool)
    last[:-1] = ordered[:-1] != ordered[1:]
    start = np.maximum.accumulate(np.where(first, index, 0), axis=0)
    end = np.minimum.accumulate(np.where(last, index, n - 1)[::-1], axis=0)[::-1]
    ranks = np.empty_like(ordered)
    np.put_along_axis(ranks, order, (start + end) / 2 + 1, axis=0)
    return ranks


def auroc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """AUROC of each column of ``scores`` [N, U] (or [N]) for the boolean ``positive`` [N]:
    P(score of a positive > score of a negative), ties counting one half."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise UserError(f"AUROC needs positive and negative documents; got {n_pos} and {n_neg}")
    ranks = midranks(scores)
    return (ranks[positive].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def topic_auroc(scores: np.ndarray, labels: np.ndarray, n_topics: int) -> np.ndarray:
    """[n_topics, U]: AUROC per topic (one vs the rest) from one ranking of each column."""
    ranks = midranks(scores)
    out = np.empty((n_topics, ranks.shape[1]))
    for t in range(n_topics):
        positive = labels == t
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos == 0 or n_neg == 0:
            raise UserError(f"topic {t} has {n_pos} documents and the others {n_neg}; raise TOPIC_TOKENS so that "
                            f"every topic has documents among the rows read")
        out[t] = (ranks[positive].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


# ----- per-document activations from the harvest store -------------------------------------

@dataclass
class DocActivations:
    pooled: np.ndarray  # [docs, units] mean (or max) activation over each document's tokens
    docs: np.ndarray  # [docs] document index in the training split
    scale: np.ndarray  # [units] largest |activation| over the rows read
    fired: np.ndarray  # [units] rows with a non-zero activation
    rows: int


def doc_activations(units: Units, store, n_rows: int, pool: str = "mean", progress: bool = False) -> DocActivations:
    """Pool every unit's activation over each document of the first ``n_rows`` rows of a training store."""
    if pool not in POOLS:
        raise UserError(f"POOL={pool} must be one of {', '.join(POOLS)}")
    n_rows = min(n_rows, store.n_rows)
    doc = store.rows("doc")[:n_rows].astype(np.int64)
    docs, inverse = np.unique(doc, return_inverse=True)
    inverse = torch.from_numpy(inverse)
    counts = torch.bincount(inverse, minlength=len(docs)).double()
    pooled, scale, fired = [], [], []
    n_chunks = -(-n_rows // store.chunk_rows)
    bar = progress_bar(n_rows * len(units.layers), progress, f"{units.name}: activations per document")
    for layer in units.layers:
        n = units.sizes[layer]
        total = torch.zeros(len(docs), n, dtype=torch.float64) if pool == "mean" else \
            torch.full((len(docs), n), -math.inf, dtype=torch.float64)
        biggest = torch.zeros(n)
        fires = torch.zeros(n, dtype=torch.long)
        for i in range(n_chunks):
            start = i * store.chunk_rows
            x = torch.from_numpy(np.asarray(store.read_chunk(layer, units.input_hook, i), dtype=np.float32))
            x = x[: n_rows - start]
            with torch.inference_mode():
                acts = units.encode(layer, x).float()
            where = inverse[start : start + x.shape[0]]
            if pool == "mean":
                total.index_add_(0, where, acts.double())
            else:
                total.index_reduce_(0, where, acts.double(), "amax")
            biggest = torch.maximum(biggest, acts.abs().amax(0))
            fires += (acts != 0).sum(0)
            bar.update(x.shape[0])
        pooled.append((total / counts[:, None] if pool == "mean" else total).float())
        scale.append(biggest)
        fired.append(fires)
    bar.close()
    return DocActivations(torch.cat(pooled, 1).numpy(), docs, torch.cat(scale).numpy(), torch.cat(fired).numpy(), n_rows)


# ----- selection (cached per method) ------------------------------------------------------

@dataclass
class Selection:
    """What the experiments need from the training documents, for one method's units."""

    topics: list[str]
    auroc: np.ndarray  # [topics, units]
    scale: np.ndarray  # [units] largest |activation| seen (the steering unit of "max activation")
    alive: np.ndarray  # [units] bool: fired on the rows read
    docs_per_topic: dict[str, int]
    pool: str
    rows: int

    def top(self, topic: str, n: int) -> list[int]:
        """The ``n`` alive units of highest AUROC for ``topic`` (ties: lower unit number first)."""
        t = self.topics.index(topic)
        score = np.where(self.alive, self.auroc[t], -np.inf)
        order = np.argsort(-score, kind="stable")
        return [int(u) for u in order[: min(n, int(self.alive.sum()))]]

    def random(self, n: int, seed: int) -> list[int]:
        """``n`` alive units drawn uniformly (without replacement) with ``seed``."""
        alive = np.flatnonzero(self.alive)
        gen = torch.Generator().manual_seed(seed)
        return sorted(int(alive[i]) for i in torch.randperm(len(alive), generator=gen)[: min(n, len(alive))])


def select_units(units: Units, store, labels: Sequence[str], topics: Sequence[str], n_rows: int, pool: str,
                 progress: bool = False) -> Selection:
    """AUROC of every unit for every topic, over the training documents in the first ``n_rows`` store rows."""
    acts = doc_activations(units, store, n_rows, pool, progress)
    # documents of topics not asked for (-1) are negatives of every topic
    doc_topic = np.array([topics.index(labels[d]) if labels[d] in topics else -1 for d in acts.docs])
    per_topic = {t: int((doc_topic == i).sum()) for i, t in enumerate(topics)}
    empty = [t for t, count in per_topic.items() if count == 0]
    if empty or len(acts.docs) == max(per_topic.values()):
        raise UserError(f"the first {acts.rows} training rows hold {len(acts.docs)} documents, none of topic "
                        f"{', '.join(empty) or 'other than ' + topics[0]}; raise TOPIC_TOKENS")
    auc = topic_auroc(acts.pooled, doc_topic, len(topics))
    return Selection(list(topics), auc, acts.scale, acts.fired > 0, per_topic, pool, acts.rows)


def cached_selection(folder: Path, identity: dict, compute) -> Selection:
    """The selection saved in ``folder`` for this ``identity``, else ``compute()`` saved there (under a lock)."""
    from safetensors.numpy import load_file, save_file

    folder = Path(folder)
    identity = json.loads(json.dumps(identity, default=str))  # compared with the saved JSON as it reads back
    key = canonical_hash(identity)[:16]
    info_path, arrays_path = folder / f"selection-{key}.json", folder / f"selection-{key}.safetensors"
    with exclusive_lock(folder / f".selection-{key}.lock"):
        if info_path.exists() and arrays_path.exists():
            info = json.loads(info_path.read_text())
            if info["identity"] == identity:
                a = load_file(arrays_path)
                return Selection(info["topics"], a["auroc"], a["scale"], a["alive"].astype(bool),
                                 info["docs_per_topic"], info["pool"], info["rows"])
        sel = compute()
        write_atomic(arrays_path, lambda tmp: save_file(
            {"auroc": sel.auroc.astype(np.float64), "scale": sel.scale.astype(np.float32),
             "alive": sel.alive.astype(np.uint8)}, str(tmp)), ".safetensors")
        write_json_atomic(info_path, {"identity": identity, "topics": sel.topics, "docs_per_topic": sel.docs_per_topic,
                                      "pool": sel.pool, "rows": sel.rows})
        return sel


# ----- ablation -------------------------------------------------------------------------------

def prediction_ce(lm, tokens: Tensor, splice: Splice | None, replace: Sequence[int]) -> Tensor:
    """CE of every prediction [n_seq, ctx-2] (positions 1..ctx-2), through the evaluator's path."""
    out = []
    for batch in batches(tokens):
        hooks = splice.hooks(lm, list(replace), None) if splice is not None else []
        h = final_hidden(lm, batch, hooks)[:, 1:-1].contiguous()
        logp = F.log_softmax(logits(lm, h.reshape(-1, h.shape[-1])), dim=-1)
        out.append(-logp.gather(1, batch[:, 2:].reshape(-1, 1)).reshape(batch.shape[0], -1))
    return torch.cat(out)


@dataclass
class TopicEval:
    """Held-out windows balanced over topics, their clean CE and the topic of each prediction."""

    tokens: Tensor  # [n_seq, ctx]
    ce: Tensor  # [n_seq, ctx-2] clean CE of each prediction (positions 1..ctx-2)
    where: Tensor  # [n_seq, ctx-2] topic of each prediction: index into ``names``
    names: list[str]  # every topic of the corpus


def topic_eval(lm, cfg, labels: Sequence[str], wanted: Sequence[str], progress: bool = False) -> TopicEval:
    """``cfg.n_seq`` windows of the eval split, packed as the harvest packs them, taken round-robin over the
    topics and, within a topic, over its documents (the r-th window of every document of a topic before any
    (r+1)-th): each topic gets as many windows as the others, from as many documents as possible. A
    window belongs to the document of its first token; a prediction belongs to the topic of the document
    of the token it predicts. The clean CE comes from the same path as every ablation."""
    from pipeline.data.harvest import token_table
    from pipeline.eval.config import round_robin

    table = token_table(lm, cfg.data, "eval", cfg.ctx, None, cfg.text_field)
    names = sorted(set(labels))
    index = {t: i for i, t in enumerate(names)}
    by_doc = round_robin(table.doc[:, 1])
    topic = np.array([index[labels[d]] for d in table.doc[by_doc, 1]])
    rank = np.zeros(len(topic), dtype=np.int64)
    for t in range(len(names)):
        rank[topic == t] = np.arange(int((topic == t).sum()))
    order = by_doc[np.lexsort((topic, rank))][: cfg.n_seq]
    tokens = torch.from_numpy(table.ids[order].astype(np.int64))
    where = torch.from_numpy(np.vectorize(lambda d: index[labels[d]], otypes=[np.int64])(table.doc[order][:, 2:]))
    absent = [t for t in wanted if t not in index or not (where == index[t]).any()]
    alone = [t for t in wanted if t in index and (where == index[t]).all()]
    if absent or alone:
        raise UserError(f"the {len(order)} held-out windows (EVAL_TOKENS={cfg.eval_tokens}) hold no predictions of "
                        f"{'topic ' + ', '.join(absent) if absent else 'any topic but ' + ', '.join(alone)}; "
                        f"raise EVAL_TOKENS")
    return TopicEval(tokens, prediction_ce(lm, tokens, None, ()), where, names)


@dataclass
class AblationRow:
    method: str
    control: str  # "topic" (the topic's top units) or "random" (n random alive units)
    topic: str
    n: int
    delta_ce_topic: float  # ΔCE on predictions of this topic's documents
    delta_ce_other: float  # ΔCE on predictions of the other topics' documents
    ratio: float | None  # delta_ce_topic / delta_ce_other (None when the latter is not positive)
    difference: float  # delta_ce_topic - delta_ce_other
    units: list[str]


def _row(method: str, control: str, topic: str, names: Sequence[str], n: int, delta: Tensor, where: Tensor,
         chosen: list[str]) -> AblationRow:
    mine = where == names.index(topic)
    on, off = float(delta[mine].mean()), float(delta[~mine].mean())
    return AblationRow(method, control, topic, n, on, off, on / off if off > 0 else None, on - off, chosen)


def ablate_topics(lm, ev: TopicEval, units: Units, sel: Selection, ns: Sequence[int], seed: int,
                  progress: bool = False) -> list[AblationRow]:
    """Per topic and n: ΔCE of zeroing the topic's top-n units on its own and on the other topics' predictions;
    and per n one draw of n random alive units, measured for every topic."""
    runs = [(t, n) for t in sel.topics for n in ns] + [(None, n) for n in ns]
    bar = progress_bar(len(runs), progress, f"{units.name}: ablations", unit="run")
    out = []
    for topic, n in runs:
        chosen = sel.top(topic, n) if topic is not None else sel.random(n, seed * 1_000_003 + n)
        ce = prediction_ce(lm, ev.tokens, units.make_splice(zero_edit(units, chosen)), units.replace)
        delta = ce.double() - ev.ce.double()
        described = [units.describe(u) for u in chosen[:8]]
        if topic is not None:
            out.append(_row(units.name, "topic", topic, ev.names, n, delta, ev.where, described))
        else:
            out += [_row(units.name, "random", t, ev.names, n, delta, ev.where, described) for t in sel.topics]
        bar.update(1)
    bar.close()
    return out


def rows_to_json(rows: list[AblationRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def rows_from_json(rows: list[dict]) -> list[AblationRow]:
    return [AblationRow(**r) for r in rows]
