"""Steering toward a topic: concept score against fluency.

For each topic T the steered unit is T's top unit by AUROC
(``pipeline.analysis.topics``). At every position of a greedy generation
(BOS excepted) from a fixed list of neutral prompts, the unit is edited:

- ``add`` (the default): its activation gains α × s, where s is the largest
  |activation| the unit reached on the training documents read for the
  selection. Decoding is linear in the latents, so this adds α × s × the
  unit's decoder direction to every layer the unit writes to (a CLT latent:
  its later layers too; a neuron: its column of the output projection), with
  the reconstruction error left in place (``EditedSplice``). Measuring α in
  units of s puts methods whose decoder rows have different norms on one
  scale: α = 1 adds what the unit writes at its strongest.
- ``clamp``: the activation is set to α × s at every position.

α = 0 is the unsteered model in both modes (that row is not edited), so its
generation is the clean one, bit for bit.

Scores per generated continuation (the prompt excluded): concept = P(T |
text) from the bag-of-words classifier (``pipeline.analysis.classifier``);
fluency = mean log-probability of its tokens under the clean model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.core.errors import UserError
from pipeline.core.progress import progress_bar
from pipeline.analysis.classifier import TopicClassifier
from pipeline.analysis.topics import Selection
from pipeline.analysis.units import Units
from pipeline.eval.splice import Edit, Splice, final_hidden, logits

MODES = ("add", "clamp")

# Neutral openings: no topic of the corpus in them. Fixed, so runs compare; --prompts takes the first N.
NEUTRAL_PROMPTS = (
    "I think that",
    "The best thing about it is",
    "Here is what happened:",
    "Let me tell you about",
    "It all started when",
    "In my opinion,",
    "The first thing to know is",
    "Yesterday,",
)


def check_alphas(alphas: Sequence[float]) -> list[float]:
    alphas = list(dict.fromkeys(float(a) for a in alphas))
    if not alphas:
        raise UserError("ALPHAS is empty; give steering strengths, e.g. ALPHAS=0,2,4,8")
    if any(a != a or abs(a) == float("inf") for a in alphas):
        raise UserError(f"ALPHAS {alphas} must be finite numbers")
    return alphas


def steer_edit(units: Units, batch: int, row_units: Sequence[int | None], values: Sequence[float], mode: str) -> Edit:
    """Edit batch row b's unit ``row_units[b]`` (None: leave the row alone) with ``values[b]`` at every position."""
    if mode not in MODES:
        raise UserError(f"STEER_MODE={mode} must be one of {', '.join(MODES)}")
    plan: dict[int, tuple[list[int], list[int], list[float]]] = {}
    for b, (u, v) in enumerate(zip(row_units, values)):
        if u is None:
            continue
        (layer, local), = ((l, int(i[0])) for l, i in units.locate([u]).items())
        rows, cols, vals = plan.setdefault(layer, ([], [], []))
        rows.append(b), cols.append(local), vals.append(v)
    plan_t = {l: (torch.tensor(r), torch.tensor(c), torch.tensor(v, dtype=torch.float32)) for l, (r, c, v) in plan.items()}

    def edit(layer: int, acts: Tensor) -> Tensor:
        if layer not in plan_t:
            return acts
        rows, cols, vals = plan_t[layer]
        out = acts.clone().view(batch, -1, acts.shape[-1])
        if mode == "add":
            out[rows, :, cols] = out[rows, :, cols] + vals[:, None]
        else:
            out[rows, :, cols] = vals[:, None].expand(-1, out.shape[1])
        return out.view_as(acts)

    return edit


def generate(lm, prompt: Tensor, splice: Splice | None, replace: Sequence[int], new_tokens: int) -> Tensor:
    """Greedy continuation of ``prompt`` [batch, P] (BOS first) by ``new_tokens`` tokens, the splice live at
    every step: [batch, P + new_tokens]. Each step re-runs the whole sequence through the evaluator's path."""
    ids = prompt
    for _ in range(new_tokens):
        hooks = splice.hooks(lm, list(replace), None) if splice is not None else []
        h = final_hidden(lm, ids, hooks)[:, -1]
        ids = torch.cat([ids, logits(lm, h).argmax(-1)[:, None]], dim=1)
    return ids


def fluency(lm, ids: Tensor, prompt_len: int) -> Tensor:
    """Mean log-probability under the clean model of each row's tokens after the prompt [batch]."""
    h = final_hidden(lm, ids, [])[:, prompt_len - 1 : -1].contiguous()
    logp = F.log_softmax(logits(lm, h.reshape(-1, h.shape[-1])), dim=-1)
    got = logp.gather(1, ids[:, prompt_len:].reshape(-1, 1)).reshape(ids.shape[0], -1)
    return got.double().mean(1)


def prompt_ids(lm, text: str) -> Tensor:
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([[lm.bos_token_id, *ids]], dtype=torch.long)


@dataclass
class SteerRow:
    method: str
    mode: str
    topic: str
    alpha: float
    unit: str  # the steered unit (L<layer>#<index>)
    auroc: float  # its AUROC for the topic on the training documents
    concept: float  # mean over prompts of P(topic | continuation)
    fluency: float  # mean over prompts of the continuation's mean log-prob under the clean model
    example: str  # the continuation of the first prompt


def steer(lm, units: Units, sel: Selection, clf: TopicClassifier, alphas: Sequence[float], mode: str,
          prompts: Sequence[str], new_tokens: int, progress: bool = False) -> list[SteerRow]:
    """Every (topic, α) for one method; one batch per prompt (all topics and α, the unsteered row once)."""
    alphas = check_alphas(alphas)
    missing = [t for t in sel.topics if t not in clf.topics]
    if missing:
        raise UserError(f"the classifier knows the topics {', '.join(clf.topics)}, not {', '.join(missing)}")
    top = {t: sel.top(t, 1)[0] for t in sel.topics}
    plan = [(None, 0.0)] + [(t, a) for t in sel.topics for a in alphas if a != 0]
    sums: dict[tuple[str, float], list[float]] = {}
    examples: dict[tuple[str, float], str] = {}
    bar = progress_bar(len(prompts), progress, f"{units.name}: steering", unit="prompt")
    for p, text in enumerate(prompts):
        start = prompt_ids(lm, text)
        row_units = [None if t is None else top[t] for t, _ in plan]
        values = [0.0 if t is None else a * float(sel.scale[top[t]]) for t, a in plan]
        splice = units.make_splice(steer_edit(units, len(plan), row_units, values, mode))
        ids = generate(lm, start.expand(len(plan), -1), splice, units.replace, new_tokens)
        flu = fluency(lm, ids, start.shape[1])
        texts = [lm.tokenizer.decode(row[start.shape[1]:].tolist(), skip_special_tokens=True) for row in ids]
        probs = clf.probabilities(texts)
        for b, (t, a) in enumerate(plan):
            for topic in (sel.topics if t is None else [t]):
                s = sums.setdefault((topic, a), [0.0, 0.0])
                s[0] += float(probs[b, clf.topics.index(topic)])
                s[1] += float(flu[b])
                if p == 0:
                    examples[(topic, a)] = texts[b]
        bar.update(1)
    bar.close()
    rows = []
    for topic in sel.topics:
        u = top[topic]
        for a in alphas:
            concept, flu_sum = sums[(topic, a)]
            rows.append(SteerRow(units.name, mode, topic, a, units.describe(u), float(sel.auroc[sel.topics.index(topic), u]),
                                 concept / len(prompts), flu_sum / len(prompts), examples[(topic, a)]))
    return rows


def first_alpha(rows: Sequence[SteerRow], target: float) -> dict[str, float | None]:
    """Per topic (and ``"mean"``: the topic-averaged concept score), the smallest α whose concept score
    reaches ``target``; None where no α of the sweep does."""
    out: dict[str, float | None] = {}
    by_alpha: dict[float, list[float]] = {}
    for topic in dict.fromkeys(r.topic for r in rows):
        hits = sorted(r.alpha for r in rows if r.topic == topic and r.concept >= target)
        out[topic] = hits[0] if hits else None
    for r in rows:
        by_alpha.setdefault(r.alpha, []).append(r.concept)
    hits = sorted(a for a, c in by_alpha.items() if sum(c) / len(c) >= target)
    out["mean"] = hits[0] if hits else None
    return out


def rows_to_json(rows: Sequence[SteerRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def rows_from_json(rows: list[dict]) -> list[SteerRow]:
    return [SteerRow(**r) for r in rows]
