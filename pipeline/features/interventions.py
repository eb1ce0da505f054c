"""Edit latents inside the live model and watch what changes: generation and next-token log-probs.

The decomposition is spliced with ``EditedSplice`` (its reconstruction error
added back), so with no edit the model is the clean one bit for bit and an
edit changes only what the edited latents contribute. An edit names a source
layer, latents, an operation and the positions it applies to:

- ``ablate``: set to 0; ``scale``: multiply by ``value``; ``set``: set to ``value`` (clamp);
- positions count tokens from 0 (BOS, which is never replaced); none = every position,
  generated ones included.

For a CLT an edit at source layer i acts on every layer i writes to, because
``EditedSplice`` decodes every replaced layer from the edited latents.
Generation re-runs the whole sequence at each step (no cache): short prompts
and a few dozen tokens are what this is for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.core.errors import UserError
from pipeline.eval.splice import FIRST_REPLACED, EditedSplice, final_hidden, logits
from pipeline.methods.base import Decomposition

OPS = ("ablate", "scale", "set")


@dataclass(frozen=True)
class LatentEdit:
    layer: int
    latents: tuple[int, ...]
    op: str
    value: float | None = None
    positions: tuple[int, ...] | None = None  # token positions (0 = BOS); None: all

    def check(self, decomposition: Decomposition) -> None:
        sources = sorted({i for j in decomposition.layers for i in decomposition.sources(j)})
        if self.layer not in sources:
            raise UserError(f"layer {self.layer} has no latents in this checkpoint; its latents are on layers "
                            f"{', '.join(map(str, sources))} (set FEATURE_LAYER)")
        n = decomposition.n_latents(self.layer)
        bad = [i for i in self.latents if not 0 <= i < n]
        if bad or not self.latents:
            raise UserError(f"FEATURE={','.join(map(str, bad)) or '(empty)'} is not a latent of layer {self.layer}, "
                            f"which has latents 0-{n - 1}")
        if self.op not in OPS:
            raise UserError(f"OP={self.op} is not one of {', '.join(OPS)}")
        if self.op in ("scale", "set") and self.value is None:
            raise UserError(f"OP={self.op} needs a VALUE (e.g. VALUE={'0.5' if self.op == 'scale' else '10'})")
        if self.op == "ablate" and self.value is not None:
            raise UserError("OP=ablate sets latents to 0 and takes no VALUE; use OP=set VALUE=... for another value")
        if self.positions is not None and any(p < FIRST_REPLACED for p in self.positions):
            raise UserError("POSITIONS count tokens from 0 (BOS), which is never replaced; use positions >= 1")


def default_layer(decomposition: Decomposition) -> int:
    sources = sorted({i for j in decomposition.layers for i in decomposition.sources(j)})
    if len(sources) > 1:
        raise UserError(f"this checkpoint has latents on layers {', '.join(map(str, sources))}; "
                        f"say which with FEATURE_LAYER (--layer)")
    return sources[0]


def edit_function(edits: list[LatentEdit], seq_len: int):
    """The ``Edit`` of ``EditedSplice`` for a batch of one sequence of ``seq_len`` tokens."""
    def edit(source: int, acts: Tensor) -> Tensor:
        mine = [e for e in edits if e.layer == source]
        if not mine:
            return acts
        out = acts.clone()
        for e in mine:
            rows = torch.arange(acts.shape[0]) if e.positions is None else torch.tensor(
                [p - FIRST_REPLACED for p in e.positions if p < seq_len], dtype=torch.long)
            if rows.numel() == 0:
                continue
            cols = torch.tensor(e.latents, dtype=torch.long)
            block = out[rows[:, None], cols]
            if e.op == "ablate":
                block = torch.zeros_like(block)
            elif e.op == "scale":
                block = block * e.value
            else:
                block = torch.full_like(block, e.value)
            out[rows[:, None], cols] = block
        return out

    return edit


def _next_logits(lm, decomposition: Decomposition | None, edits: list[LatentEdit], tokens: Tensor) -> Tensor:
    """fp32 logits [pos, vocab] of one sequence, clean (decomposition None) or edited."""
    hooks = []
    if decomposition is not None:
        splice = EditedSplice(decomposition, edit_function(edits, tokens.shape[1]))
        hooks = splice.hooks(lm, list(decomposition.layers), None)
    h = final_hidden(lm, tokens, hooks)
    return logits(lm, h[0])


@dataclass
class Generation:
    ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)  # of each chosen token


def generate(lm, decomposition: Decomposition | None, edits: list[LatentEdit], prompt_ids: list[int],
             new_tokens: int, temperature: float = 0.0, seed: int = 0) -> Generation:
    """Greedy (temperature 0) or seeded sampling; the same seed gives the same draws for clean and edited."""
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    chosen, lps = [], []
    for _ in range(new_tokens):
        out = _next_logits(lm, decomposition, edits, torch.tensor([ids]))[-1]
        logp = torch.log_softmax(out.double(), -1)
        if temperature > 0:
            probs = torch.softmax(out.double() / temperature, -1)
            token = int(torch.multinomial(probs, 1, generator=gen))
        else:
            token = int(out.argmax())
        ids.append(token)
        chosen.append(token)
        lps.append(float(logp[token]))
    return Generation(chosen, lm.tokenizer.decode(chosen), lps)


def prompt_ids(lm, prompt: str) -> list[int]:
    if not prompt.strip():
        raise UserError("PROMPT is empty; give the text to continue, e.g. PROMPT='The government said'")
    ids = lm.tokenizer.encode(prompt, add_special_tokens=False)
    return [lm.bos_token_id, *ids]


def logprob_change(lm, decomposition: Decomposition, edits: list[LatentEdit], ids: list[int], top: int = 10) -> dict:
    """Next-token log-probs after the prompt, clean vs edited: the tokens that gain and lose most, and KL."""
    tokens = torch.tensor([ids])
    clean = torch.log_softmax(_next_logits(lm, None, [], tokens)[-1].double(), -1)
    edited = torch.log_softmax(_next_logits(lm, decomposition, edits, tokens)[-1].double(), -1)
    diff = edited - clean
    kl = float((clean.exp() * (clean - edited)).sum())

    def rows(idx: Tensor) -> list[dict]:
        return [{"token": lm.tokenizer.decode([int(i)]), "id": int(i), "clean": float(clean[i]),
                 "edited": float(edited[i]), "change": float(diff[i])} for i in idx]

    k = min(top, diff.numel())
    return {"kl_clean_edited": kl, "gained": rows(diff.topk(k).indices), "lost": rows((-diff).topk(k).indices),
            "clean_top": rows(clean.topk(k).indices), "edited_top": rows(edited.topk(k).indices)}


def side_by_side(left: str, right: str, titles: tuple[str, str], width: int = 44) -> str:
    """Two texts in two columns, wrapped, for a terminal."""
    import textwrap

    a = textwrap.wrap(left.replace("\n", " ⏎ "), width) or [""]
    b = textwrap.wrap(right.replace("\n", " ⏎ "), width) or [""]
    lines = [f"{titles[0]:<{width}} | {titles[1]}", f"{'-' * width}-+-{'-' * width}"]
    for i in range(max(len(a), len(b))):
        lines.append(f"{a[i] if i < len(a) else '':<{width}} | {b[i] if i < len(b) else ''}")
    return "\n".join(lines)
