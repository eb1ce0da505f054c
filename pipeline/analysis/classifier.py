"""The topic classifier that scores steered text: a logistic regression over hashed bag-of-words.

Features: the words (lower-case letters, 2 or more) and word bigrams of a
text, hashed (crc32, the same in every process) into 2^15 buckets, each
count taken as log(1 + count), the vector scaled to unit length so a
20-word generation and an 800-word article land on one scale. A multinomial
logistic regression with an L2 penalty is fitted with full-batch L-BFGS from
zeros (deterministic) on the training split of a labelled corpus, and its
accuracy is measured on the held-out eval split. It is trained once per
corpus and cached (``pipeline.core.paths.topic_classifier``).
"""

from __future__ import annotations

import json
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.core.hashing import canonical_hash
from pipeline.core.io import exclusive_lock, write_atomic, write_json_atomic

N_FEATURES = 1 << 15
L2 = 1e-4  # penalty on the weights, per training document
MAX_ITER = 300
VERSION = 1
WORD = re.compile(r"[a-z][a-z']+")


def features(texts: Sequence[str]) -> Tensor:
    """Hashed, log-scaled, unit-length unigram + bigram counts: a sparse [len(texts), N_FEATURES] tensor."""
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for i, text in enumerate(texts):
        words = WORD.findall(text.lower())
        grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
        counts = Counter(zlib.crc32(g.encode()) % N_FEATURES for g in grams)
        if not counts:
            continue
        v = np.log1p(np.fromiter(counts.values(), dtype=np.float64))
        v /= np.linalg.norm(v)
        rows += [i] * len(counts)
        cols += list(counts)
        vals += v.tolist()
    index = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
    return torch.sparse_coo_tensor(index, torch.tensor(vals, dtype=torch.float32), (len(texts), N_FEATURES)).coalesce()


@dataclass
class TopicClassifier:
    topics: list[str]
    weight: Tensor  # [N_FEATURES, topics]
    bias: Tensor  # [topics]
    heldout_accuracy: float
    heldout_docs: int
    train_docs: int

    def logits(self, x: Tensor) -> Tensor:
        return torch.sparse.mm(x, self.weight) + self.bias

    def probabilities(self, texts: Sequence[str]) -> Tensor:
        """P(topic | text) [len(texts), topics]."""
        with torch.no_grad():
            return F.softmax(self.logits(features(texts)), dim=-1)

    def accuracy(self, texts: Sequence[str], labels: Sequence[str]) -> float:
        predicted = self.probabilities(texts).argmax(-1).tolist()
        return sum(self.topics[p] == l for p, l in zip(predicted, labels)) / len(labels)


def fit(texts: Sequence[str], labels: Sequence[str]) -> TopicClassifier:
    """Multinomial logistic regression (L2) on the hashed features, full-batch L-BFGS from zeros."""
    topics = sorted(set(labels))
    x = features(texts)
    y = torch.tensor([topics.index(l) for l in labels])
    weight = torch.zeros(N_FEATURES, len(topics), requires_grad=True)
    bias = torch.zeros(len(topics), requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=MAX_ITER, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(torch.sparse.mm(x, weight) + bias, y) + 0.5 * L2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return TopicClassifier(topics, weight.detach(), bias.detach(), float("nan"), 0, len(texts))


def trained(folder: Path, train_docs, eval_docs, identity: dict) -> TopicClassifier:
    """The classifier cached in ``folder`` for this training set, else fitted, scored on ``eval_docs`` and saved."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    identity = {**identity, "version": VERSION, "n_features": N_FEATURES, "l2": L2,
                "train": canonical_hash([[d.key, d.label] for d in train_docs]),
                "eval": canonical_hash([[d.key, d.label] for d in eval_docs])}
    info_path, weights_path = folder / "classifier.json", folder / "classifier.safetensors"
    with exclusive_lock(folder / ".classifier.lock"):
        if info_path.exists() and weights_path.exists():
            info = json.loads(info_path.read_text())
            if info["identity"] == identity:
                t = load_file(weights_path)
                return TopicClassifier(info["topics"], t["weight"], t["bias"], info["heldout_accuracy"],
                                       info["heldout_docs"], info["train_docs"])
        clf = fit([d.text for d in train_docs], [d.label for d in train_docs])
        clf.heldout_docs = len(eval_docs)
        clf.heldout_accuracy = clf.accuracy([d.text for d in eval_docs], [d.label for d in eval_docs])
        write_atomic(weights_path, lambda tmp: save_file({"weight": clf.weight.contiguous(), "bias": clf.bias}, str(tmp)),
                     ".safetensors")
        write_json_atomic(info_path, {"identity": identity, "topics": clf.topics, "heldout_accuracy": clf.heldout_accuracy,
                                      "heldout_docs": clf.heldout_docs, "train_docs": clf.train_docs})
        return clf
