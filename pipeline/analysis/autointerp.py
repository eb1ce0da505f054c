"""Automated interpretability: explain latents, then score the explanations with a judge.

For a seeded sample of alive latents of any ``Decomposition`` (their top and
quantile contexts come from the features file, ``pipeline.features``):

- **explain**: the explainer sees the top contexts, firing tokens marked
  ``<<...>>``, and writes a short explanation;
- **detection**: for held-out activating contexts (the uniform samples of the
  latent's nonzero activations, i.e. its quantiles) and contexts where it is
  silent on every token, the judge is asked whether the explanation applies;
- **fuzzing**: activating contexts with the firing tokens marked vs the same
  contexts with as many silent tokens marked: do the marks fit?
- both scored from the judge's log-probabilities: the score of a context is
  log P(Yes) - log P(No); per latent the AUROC of the scores (positives vs
  negatives) and the balanced accuracy of the judge's own decision (score > 0);
- **intruder** (no explanation): k contexts of the latent and one of another
  latent, shuffled; is the judge's most likely number the intruder's? Accuracy
  against chance 1/(k+1).

Controls, scored the same way: (a) the method's latents with their
explanations shuffled among them (a derangement); (b) "latents" defined by
one token's identity (firing exactly on that token), whose explanation
``"x"`` is known, with their true and with shuffled explanations.
If (b) true does not beat (b) shuffled, the judge cannot tell a right
explanation from a wrong one and ``verdict`` says so.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from pipeline.analysis.judge import Judge, Messages
from pipeline.analysis.topics import auroc
from pipeline.core.errors import UserError
from pipeline.core.progress import progress_bar
from pipeline.methods.base import Decomposition

YES_NO = ("Yes", "No")


@dataclass(frozen=True)
class AutointerpConfig:
    latents: int = 40  # sampled alive latents per checkpoint
    token_latents: int = 16  # token-identity controls
    explain_examples: int = 8  # top contexts shown to the explainer
    positives: int = 5  # held-out activating contexts scored per latent
    negatives: int = 5  # silent contexts scored per latent
    intruder_k: int = 4  # contexts of the latent per intruder trial (chance 1/(k+1))
    intruder_trials: int = 2
    left: int = 12  # context tokens shown before the firing token
    right: int = 3
    explain_tokens: int = 16  # longest explanation (tokens)
    negative_pool: int = 400  # random contexts encoded to find silent ones
    seed: int = 0

    def __post_init__(self):
        for name in ("latents", "explain_examples", "positives", "negatives", "intruder_k", "negative_pool"):
            if getattr(self, name) < 1:
                raise UserError(f"autointerp {name}={getattr(self, name)} must be at least 1")
        for name in ("token_latents", "intruder_trials", "left", "right"):
            if getattr(self, name) < 0:
                raise UserError(f"autointerp {name}={getattr(self, name)} must be >= 0")
        if self.token_latents == 1:
            raise UserError("autointerp token_latents must be 0 or at least 2 (their explanations are shuffled)")


@dataclass
class Context:
    tokens: list[int]
    acts: list[float]  # the latent's activation on each token


@dataclass
class Latent:
    name: str  # "L3#123", or 'token "government"'
    explain: list[Context]
    pos: list[Context]
    neg: list[Context]
    known: str | None = None  # the true explanation, where it is known (token identity)


# ----- contexts -------------------------------------------------------------------------

def _trim(tokens, acts, left: int, right: int, offsets: Sequence[int]) -> Context:
    """The part of a stored context from -left..+right around the firing token, tokens -1 dropped."""
    keep = [i for i, o in enumerate(offsets) if -left <= o <= right and int(tokens[i]) >= 0]
    return Context([int(tokens[i]) for i in keep], [float(acts[i]) for i in keep])


def method_latents(tensors: dict, meta: dict, silent: dict, pool_tokens: np.ndarray, cfg: AutointerpConfig) -> list[Latent]:
    """A seeded sample of alive latents with their contexts, from a features file (``tensors``, ``meta``) and the
    silent-context pool (``silent[layer]``: [contexts, n] True where the latent is 0 on the whole context)."""
    rng = random.Random(cfg.seed)
    offsets = meta["context_offsets"]
    need = cfg.explain_examples + 1
    candidates = []
    for layer in meta["source_layers"]:
        count = tensors[f"L{layer}.count"]
        rows = (tensors[f"L{layer}.top_row"] >= 0).sum(1)
        ok = (count >= need) & (rows >= need) & (silent[layer].sum(0) >= cfg.negatives)
        candidates += [(layer, int(i)) for i in ok.nonzero().flatten()]
    if len(candidates) < 2:
        raise UserError(f"only {len(candidates)} latents fire on {need}+ rows and are silent on {cfg.negatives}+ "
                        f"random contexts; scan more rows (FEATURE_TOKENS) or lower the sample sizes")
    chosen = rng.sample(candidates, min(cfg.latents, len(candidates)))
    return [_method_latent(tensors, offsets, silent, pool_tokens, layer, i, cfg, rng) for layer, i in chosen]


def _method_latent(tensors, offsets, silent, pool_tokens, layer, i, cfg, rng) -> Latent:
    p = f"L{layer}."
    top = [_trim(tensors[p + "top_ctx_tok"][i, r].tolist(), tensors[p + "top_ctx_act"][i, r].float().tolist(),
                 cfg.left, cfg.right, offsets) for r in range(int((tensors[p + "top_row"][i] >= 0).sum()))]
    samples = []
    if p + "sample_row" in tensors:
        n = int((tensors[p + "sample_row"][i] >= 0).sum())
        samples = [_trim(tensors[p + "sample_ctx_tok"][i, r].tolist(), tensors[p + "sample_ctx_act"][i, r].float().tolist(),
                         cfg.left, cfg.right, offsets) for r in range(n)]
    explain = top[:cfg.explain_examples]
    held_out = samples or top[cfg.explain_examples:]
    held_out = held_out if len(held_out) >= 1 else top[-1:]
    pos = rng.sample(held_out, min(cfg.positives, len(held_out)))
    quiet = silent[layer][:, i].nonzero().flatten().tolist()
    neg = [Context(pool_tokens[c].tolist(), [0.0] * pool_tokens.shape[1]) for c in rng.sample(quiet, cfg.negatives)]
    return Latent(f"L{layer}#{i}", explain, pos, neg)


def context_starts(n_rows: int, window: int, width: int, count: int, rng: random.Random) -> list[int]:
    """``count`` random first rows of ``width`` consecutive rows inside one window."""
    per_window = window - width + 1
    if per_window < 1:
        raise UserError(f"contexts of {width} tokens do not fit windows of {window}; lower left/right")
    windows = n_rows // window
    return [w * window + rng.randrange(per_window) for w in (rng.randrange(windows) for _ in range(count))]


def silent_pool(decomposition: Decomposition, store, layers: Sequence[int], cfg: AutointerpConfig,
                max_chunks: int = 4) -> tuple[np.ndarray, dict]:
    """Random contexts of the store (tokens [C, width]) and, per source layer, which latents are silent on every
    token of each ([C, n] bool). The contexts come from the first ``max_chunks`` chunks (whole windows)."""
    rng = random.Random(cfg.seed + 1)
    window = int(store.manifest["ctx"]) - 1
    width = cfg.left + 1 + cfg.right
    chunks = min(max_chunks, store.n_chunks)
    n_rows = sum(store.rows_in_chunk(c) for c in range(chunks))
    starts = np.array(context_starts(n_rows, window, width, cfg.negative_pool, rng))
    index = starts[:, None] + np.arange(width)
    tokens = store.rows("tokens")[:n_rows][index].astype(np.int64)
    silent = {}
    with torch.inference_mode():
        for layer in layers:
            x = np.concatenate([store.read_chunk(layer, decomposition.input_hook, c)[:store.rows_in_chunk(c)]
                                for c in range(chunks)])
            rows = torch.from_numpy(np.ascontiguousarray(x[index.reshape(-1)])).float()
            acts = torch.cat([decomposition.encode_layer(layer, rows[lo:lo + 2048]) for lo in range(0, len(rows), 2048)])
            silent[layer] = (acts.reshape(len(starts), width, -1) <= 0).all(1)
    return tokens, silent


def token_latents(tokens: np.ndarray, window: int, tokenizer, cfg: AutointerpConfig) -> list[Latent]:
    """``cfg.token_latents`` "latents" that fire (1.0) exactly on one word-like token, from a token array of whole
    windows: the words are drawn (seeded) from the 300 most frequent ones with enough occurrences."""
    rng = random.Random(cfg.seed + 2)
    width = cfg.left + 1 + cfg.right
    need = cfg.explain_examples + cfg.positives
    ids, counts = np.unique(tokens, return_counts=True)
    words = [(int(c), int(i)) for i, c in zip(ids, counts)
             if c >= 2 * need and _word(tokenizer.decode([int(i)]))]
    words = [i for _, i in sorted(words, reverse=True)[:300]]
    if len(words) < cfg.token_latents:
        raise UserError(f"the store has only {len(words)} word tokens with {2 * need}+ occurrences for the "
                        f"token-identity controls; scan more rows or lower token_latents")
    chosen = rng.sample(words, cfg.token_latents)
    starts = context_starts(len(tokens), window, width, 20 * cfg.token_latents * cfg.negatives + 200, rng)
    return [_token_latent(tokens, window, tokenizer, t, starts, cfg, rng) for t in chosen]


def _word(text: str) -> bool:
    s = text.strip()
    return len(s) >= 4 and s.isalpha() and text.startswith(" ")


def _token_latent(tokens, window, tokenizer, t, starts, cfg, rng) -> Latent:
    rows = np.flatnonzero(tokens == t)
    pos_in = rows % window
    rows = rows[(pos_in >= cfg.left) & (pos_in < window - cfg.right)]
    picked = rng.sample(rows.tolist(), min(len(rows), cfg.explain_examples + cfg.positives))

    def around(r: int) -> Context:
        ids = tokens[r - cfg.left:r + cfg.right + 1].tolist()
        return Context([int(i) for i in ids], [1.0 if i == t else 0.0 for i in ids])

    ctxs = [around(r) for r in picked]
    quiet = [s for s in starts if t not in tokens[s:s + cfg.left + cfg.right + 1]]
    neg = [Context(tokens[s:s + cfg.left + cfg.right + 1].tolist(), [0.0] * (cfg.left + cfg.right + 1))
           for s in rng.sample(quiet, cfg.negatives)]
    word = tokenizer.decode([int(t)]).strip()
    return Latent(f'token "{word}"', ctxs[:cfg.explain_examples], ctxs[cfg.explain_examples:], neg, f'"{word}"')


# ----- prompts --------------------------------------------------------------------------

def render(tokenizer, ctx: Context, marked: Sequence[bool] | None = None) -> str:
    """The context as text, one line, the ``marked`` tokens wrapped in << >>."""
    parts = []
    for i, t in enumerate(ctx.tokens):
        piece = tokenizer.decode([t]).replace("\n", " ")
        if marked is not None and marked[i]:
            stripped = piece.lstrip()
            piece = piece[:len(piece) - len(stripped)] + f"<<{stripped}>>"
        parts.append(piece)
    return " ".join("".join(parts).split())


def firing(ctx: Context) -> list[bool]:
    top = max(ctx.acts, default=0.0)
    return [a > 0 and a >= 0.5 * top for a in ctx.acts]


def _turns(shots: Sequence[tuple[str, str]], question: str) -> Messages:
    msgs = []
    for q, a in shots:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": question}]


EXPLAIN_Q = "Texts where a feature fires, firing words in << >>:\n{texts}\nThe feature fires on:"
EXPLAIN_SHOTS = [
    (EXPLAIN_Q.format(texts="1. she played <<music>> all night\n2. the <<music>> was loud\n3. new <<music>> from the band"),
     '"music"'),
    (EXPLAIN_Q.format(texts="1. the <<bank>> raised rates\n2. a loan from the <<bank>>\n3. <<bank>> shares fell"),
     '"bank"'),
]
# The detection question is the one the bundled 135M model answers from its examples: "Contains ..."
# right after the text, words in quotes (exp: AUROC 1.0 on three words where other phrasings were at chance).
DETECT_Q = "Text: {text}\nContains {explanation}:"
DETECT_SHOTS = [
    (DETECT_Q.format(text="She played music all night long", explanation='"music"'), "Yes"),
    (DETECT_Q.format(text="The bank raised interest rates again", explanation='"music"'), "No"),
    (DETECT_Q.format(text="The bank raised interest rates again", explanation='"bank"'), "Yes"),
    (DETECT_Q.format(text="She played music all night long", explanation='"bank"'), "No"),
    (DETECT_Q.format(text="The team won the cup final", explanation='"rain"'), "No"),
    (DETECT_Q.format(text="Heavy rain flooded the streets", explanation='"rain"'), "Yes"),
    (DETECT_Q.format(text="Heavy rain flooded the streets", explanation='"cup"'), "No"),
    (DETECT_Q.format(text="The team won the cup final", explanation='"cup"'), "Yes"),
]
FUZZ_Q = "Text: {text}\nMarked word is {explanation}:"
FUZZ_SHOTS = [
    (FUZZ_Q.format(text="She played <<music>> all night", explanation='"music"'), "Yes"),
    (FUZZ_Q.format(text="She <<played>> music all night", explanation='"music"'), "No"),
    (FUZZ_Q.format(text="The <<bank>> raised rates again", explanation='"bank"'), "Yes"),
    (FUZZ_Q.format(text="The bank raised <<rates>> again", explanation='"bank"'), "No"),
    (FUZZ_Q.format(text="Heavy rain <<flooded>> the streets", explanation='"rain"'), "No"),
    (FUZZ_Q.format(text="Heavy <<rain>> flooded the streets", explanation='"rain"'), "Yes"),
]
INTRUDER_Q = "Texts:\n{texts}\nOne text is unlike the others. It is number"
_SHOT_TEXTS = ["she played music all night", "the music was loud", "new music from the band", "music on the radio",
               "we love this music", "the music hall was full", "old music records", "music lessons at school"]


def intruder_shot(k: int) -> list[tuple[str, str]]:
    texts = _SHOT_TEXTS[:k]
    at = 1 % (k + 1)
    texts.insert(at, "the bank raised interest rates")
    return [(INTRUDER_Q.format(texts="\n".join(f"{i + 1}. {t}" for i, t in enumerate(texts))), str(at + 1))]


def explain_prompt(tokenizer, latent: Latent) -> Messages:
    texts = "\n".join(f"{i + 1}. {render(tokenizer, c, firing(c))}" for i, c in enumerate(latent.explain))
    return _turns(EXPLAIN_SHOTS, EXPLAIN_Q.format(texts=texts))


def explain(judge: Judge, tokenizer, latents: Sequence[Latent], max_tokens: int, progress: bool) -> list[str]:
    out = []
    bar = progress_bar(len(latents), progress, desc="explain", unit="latent")
    for latent in latents:
        text = judge.complete([explain_prompt(tokenizer, latent)], max_tokens)[0]
        out.append(text or "(no explanation)")
        bar.update(1)
    bar.close()
    return out


# ----- scoring --------------------------------------------------------------------------

@dataclass
class Score:
    auroc: float
    balanced_accuracy: float


def score_of(pos: np.ndarray, neg: np.ndarray) -> Score:
    value = float(auroc(np.concatenate([pos, neg]), np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]))
    return Score(value, float(0.5 * ((pos > 0).mean() + (neg <= 0).mean())))


def answers(judge: Judge, prompts: list[Messages], options: Sequence[str], desc: str, progress: bool,
            chunk: int = 64) -> torch.Tensor:
    """``judge.answer_logprobs`` in chunks, with a progress bar."""
    bar = progress_bar(len(prompts), progress, desc=desc, unit="prompt")
    out = []
    for lo in range(0, len(prompts), chunk):
        out.append(judge.answer_logprobs(prompts[lo:lo + chunk], options))
        bar.update(len(out[-1]))
    bar.close()
    return torch.cat(out) if out else torch.zeros(0, len(options))


def yes_no(judge: Judge, prompts: list[Messages], desc: str = "judge", progress: bool = False) -> np.ndarray:
    lp = answers(judge, prompts, YES_NO, desc, progress)
    return (lp[:, 0] - lp[:, 1]).numpy()


def detection(judge: Judge, tokenizer, latents: Sequence[Latent], explanations: Sequence[str],
              progress: bool = False) -> list[Score]:
    prompts, sizes = [], []
    for latent, e in zip(latents, explanations):
        for c in latent.pos + latent.neg:
            prompts.append(_turns(DETECT_SHOTS, DETECT_Q.format(text=render(tokenizer, c), explanation=e)))
        sizes.append((len(latent.pos), len(latent.neg)))
    return _split_scores(yes_no(judge, prompts, "detection", progress), sizes)


def fuzzing(judge: Judge, tokenizer, latents: Sequence[Latent], explanations: Sequence[str], seed: int,
            progress: bool = False) -> list[Score]:
    """Firing tokens marked (positives) vs as many silent tokens of the same contexts marked (negatives)."""
    rng = random.Random(seed + 3)
    prompts, sizes = [], []
    for latent, e in zip(latents, explanations):
        right, wrong = [], []
        for c in latent.pos:
            marks = firing(c)
            quiet = [i for i, a in enumerate(c.acts) if a <= 0]
            if not quiet:
                continue
            decoy = set(rng.sample(quiet, min(len(quiet), max(1, sum(marks)))))
            right.append(_turns(FUZZ_SHOTS, FUZZ_Q.format(text=render(tokenizer, c, marks), explanation=e)))
            wrong.append(_turns(FUZZ_SHOTS, FUZZ_Q.format(text=render(tokenizer, c, [i in decoy for i in range(len(c.acts))]),
                                                          explanation=e)))
        prompts += right + wrong
        sizes.append((len(right), len(wrong)))
    return _split_scores(yes_no(judge, prompts, "fuzzing", progress), sizes)


def _split_scores(scores: np.ndarray, sizes: list[tuple[int, int]]) -> list[Score]:
    out, at = [], 0
    for n_pos, n_neg in sizes:
        pos, neg = scores[at:at + n_pos], scores[at + n_pos:at + n_pos + n_neg]
        at += n_pos + n_neg
        out.append(score_of(pos, neg) if n_pos and n_neg else Score(math.nan, math.nan))
    return out


def intruder(judge: Judge, tokenizer, latents: Sequence[Latent], k: int, trials: int, seed: int,
             progress: bool = False) -> list[float]:
    """Per latent: the fraction of trials whose most likely answer is the intruder's number."""
    rng = random.Random(seed + 4)
    prompts, truth, owner = [], [], []
    for n, latent in enumerate(latents):
        own = latent.pos + latent.explain
        others = [m for m in range(len(latents)) if m != n]
        for _ in range(trials if len(own) >= k and others else 0):
            texts = [render(tokenizer, c) for c in rng.sample(own, k)]
            other = latents[rng.choice(others)]
            at = rng.randrange(k + 1)
            texts.insert(at, render(tokenizer, rng.choice(other.pos + other.explain)))
            q = INTRUDER_Q.format(texts="\n".join(f"{i + 1}. {t}" for i, t in enumerate(texts)))
            prompts.append(_turns(intruder_shot(k), q))
            truth.append(at)
            owner.append(n)
    hits = np.zeros(len(latents))
    tried = np.zeros(len(latents))
    if prompts:
        guess = answers(judge, prompts, [str(i + 1) for i in range(k + 1)], "intruder", progress).argmax(-1).numpy()
        for g, t, n in zip(guess, truth, owner):
            hits[n] += g == t
            tried[n] += 1
    return [float(h / t) if t else math.nan for h, t in zip(hits, tried)]


# ----- a whole set --------------------------------------------------------------------------

@dataclass
class SetResult:
    """One set of latents scored with one set of explanations."""

    name: str  # method, method-shuffled, tokens, tokens-shuffled
    latents: list[str]
    explanations: list[str]
    detection: list[Score]
    fuzzing: list[Score]
    intruder: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        out = {"n": len(self.latents)}
        for name, values in (("detection_auroc", [s.auroc for s in self.detection]),
                             ("detection_bacc", [s.balanced_accuracy for s in self.detection]),
                             ("fuzzing_auroc", [s.auroc for s in self.fuzzing]),
                             ("fuzzing_bacc", [s.balanced_accuracy for s in self.fuzzing]),
                             ("intruder_accuracy", self.intruder)):
            out[name] = mean_se(values)
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "summary": self.summary(),
                "latents": [{"latent": l, "explanation": e, "detection": asdict(d), "fuzzing": asdict(f),
                             **({"intruder": i} if self.intruder else {})}
                            for l, e, d, f, i in zip(self.latents, self.explanations, self.detection, self.fuzzing,
                                                     self.intruder or [None] * len(self.latents))]}


def mean_se(values: Sequence[float]) -> dict | None:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return None
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return {"mean": float(v.mean()), "se": se, "n": int(len(v))}


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of 0..n-1 that moves every element (n >= 2)."""
    rng = random.Random(seed)
    order = list(range(n))
    while any(i == o for i, o in enumerate(order)):
        rng.shuffle(order)
    return order


def score_set(name: str, judge: Judge, tokenizer, latents: Sequence[Latent], explanations: Sequence[str],
              cfg: AutointerpConfig, with_intruder: bool, progress: bool = False) -> SetResult:
    det = detection(judge, tokenizer, latents, explanations, progress)
    fuzz = fuzzing(judge, tokenizer, latents, explanations, cfg.seed, progress)
    intr = intruder(judge, tokenizer, latents, cfg.intruder_k, cfg.intruder_trials, cfg.seed, progress) \
        if with_intruder and cfg.intruder_trials else []
    return SetResult(name, [l.name for l in latents], list(explanations), det, fuzz, intr)


def score_with_controls(prefix: str, judge: Judge, tokenizer, latents: Sequence[Latent], explanations: Sequence[str],
                        cfg: AutointerpConfig, progress: bool) -> list[SetResult]:
    """The set with its explanations, and with them shuffled among its latents (control a)."""
    true = score_set(prefix, judge, tokenizer, latents, explanations, cfg, True, progress)
    order = derangement(len(latents), cfg.seed + 5)
    shuffled = score_set(f"{prefix}-shuffled", judge, tokenizer, latents, [explanations[o] for o in order], cfg,
                         False, progress)
    return [true, shuffled]


def verdict(tokens: SetResult, tokens_shuffled: SetResult) -> dict:
    """Can the judge tell a right explanation from a wrong one on the token-identity latents? Their detection
    AUROC with the true explanations must beat the shuffled ones by 0.1 and by two standard errors."""
    a, b = tokens.summary()["detection_auroc"], tokens_shuffled.summary()["detection_auroc"]
    if a is None or b is None:
        return {"judge_discriminates": False, "statement": "no token-identity controls were scored"}
    gap = a["mean"] - b["mean"]
    se = math.sqrt(np.nan_to_num(a["se"]) ** 2 + np.nan_to_num(b["se"]) ** 2)
    ok = gap >= 0.1 and gap > 2 * se
    statement = (f"the judge tells true from shuffled explanations on token-identity latents: detection AUROC "
                 f"{a['mean']:.3f} vs {b['mean']:.3f} (gap {gap:+.3f}, s.e. {se:.3f})" if ok else
                 f"THE JUDGE CANNOT TELL TRUE FROM SHUFFLED EXPLANATIONS on token-identity latents (detection AUROC "
                 f"{a['mean']:.3f} vs {b['mean']:.3f}, gap {gap:+.3f}, s.e. {se:.3f}): its scores of the method's "
                 f"latents are not meaningful; use a stronger judge (JUDGE=openai)")
    return {"judge_discriminates": bool(ok), "gap": gap, "se": se, "statement": statement}


# ----- one checkpoint -------------------------------------------------------------------------

def run(judge: Judge, tokenizer, decomposition: Decomposition, store, tensors: dict, meta: dict,
        cfg: AutointerpConfig, progress: bool = True) -> dict:
    """Explain and score a sample of the decomposition's latents, with both controls; a JSON-ready dict."""
    layers = meta["source_layers"]
    pool_tokens, silent = silent_pool(decomposition, store, layers, cfg)
    latents = method_latents(tensors, meta, silent, pool_tokens, cfg)
    explanations = explain(judge, tokenizer, latents, cfg.explain_tokens, progress)
    sets = score_with_controls("method", judge, tokenizer, latents, explanations, cfg, progress)
    check = {"judge_discriminates": None, "statement": "no token-identity controls (token_latents=0)"}
    if cfg.token_latents:
        window = int(store.manifest["ctx"]) - 1
        rows = min(store.n_rows, max(meta.get("rows_scanned", 0), 50 * window))
        tokens = token_latents(store.rows("tokens")[:rows - rows % window], window, tokenizer, cfg)
        sets += score_with_controls("tokens", judge, tokenizer, tokens, [t.known for t in tokens], cfg, progress)
        check = verdict(sets[2], sets[3])
    return {"judge": judge.name, "config": asdict(cfg), "chance_intruder": 1 / (cfg.intruder_k + 1),
            "verdict": check, "sets": {s.name: s.to_json() for s in sets}}
