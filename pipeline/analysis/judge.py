"""Explainer and judge models for automated interpretability.

A ``Judge`` does two things: write a short text (``complete``) and compare
the log-probabilities of a few one-token answers to a question
(``answer_logprobs``: "Yes" vs "No", or "1".."5"), read from the first
token of the reply rather than parsed from free text. A question is a
conversation (``Messages``): worked examples as user/assistant turns, then
the question as the last user turn. Two implementations:

- ``LocalJudge``: any causal LM of transformers, run in this process
  (offline; by default the bundled SmolLM2-135M-Instruct). ``render="text"``
  writes the turns as plain few-shot text ("question answer" blocks) and
  reads the next token: the 135M model follows that pattern (the "Contains"
  question of a token-identity latent: AUROC 1.0 on 3 words) where its chat
  template leaves it at chance (AUROC 0.0-0.8 on the same texts).
  ``render="chat"`` applies the model's chat template, as a server would;
- ``OpenAIJudge``: any OpenAI-compatible ``/v1/chat/completions`` endpoint,
  asked with ``logprobs`` / ``top_logprobs`` (base URL, model and key from
  ``NND_JUDGE_BASE_URL``, ``NND_JUDGE_MODEL``, ``NND_JUDGE_API_KEY``).

An answer's log-probability sums (logsumexp) the first tokens that spell it
with or without a leading space and in either case ("Yes", " yes", ...).
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import Tensor

from pipeline.core.errors import UserError

ENV_BASE_URL, ENV_MODEL, ENV_KEY = "NND_JUDGE_BASE_URL", "NND_JUDGE_MODEL", "NND_JUDGE_API_KEY"
TOP_LOGPROBS = 20  # what an OpenAI-compatible endpoint is asked for (its usual maximum)


Messages = list[dict]  # [{"role": "user" | "assistant", "content": str}, ...], a user turn last
RENDERS = ("text", "chat")


class Judge(Protocol):
    name: str

    def complete(self, prompts: Sequence[Messages], max_tokens: int) -> list[str]:
        """Greedy replies (first line) to conversations."""

    def answer_logprobs(self, prompts: Sequence[Messages], answers: Sequence[str]) -> Tensor:
        """[prompts, answers]: log-probability that the reply starts with each answer."""


def as_text(messages: Messages) -> str:
    """Few-shot plain text: each user turn followed by its answer, blocks apart; ends after the question."""
    out = []
    for m in messages:
        out.append(m["content"] if m["role"] == "user" else f" {m['content']}\n\n")
    return "".join(out)


def spellings(answer: str) -> set[str]:
    return {v for a in (answer, answer.lower(), answer.capitalize()) for v in (a, " " + a)}


class LocalJudge:
    """A chat model of transformers, in this process (greedy, batched, left-padded)."""

    def __init__(self, hf_model, tokenizer, name: str = "local", render: str = "text", batch: int = 8):
        if render not in RENDERS:
            raise UserError(f"render={render} must be one of {', '.join(RENDERS)}")
        self.model, self.tok, self.render, self.batch = hf_model.eval(), tokenizer, render, batch
        self.name = f"{name} ({render})"
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def ids(self, messages: Messages) -> list[int]:
        if self.render == "text":
            return list(self.tok(as_text(messages))["input_ids"])
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])

    def _encode(self, prompts: Sequence[Messages]) -> tuple[Tensor, Tensor]:
        ids = [self.ids(p) for p in prompts]
        width = max(map(len, ids))
        tokens = torch.full((len(ids), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for r, row in enumerate(ids):
            tokens[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        return tokens, mask

    def _next_logprobs(self, tokens: Tensor, mask: Tensor) -> Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions)
        return out.logits[:, -1].float().log_softmax(-1)

    def answer_ids(self, answer: str) -> list[int]:
        ids = {self.tok.encode(s, add_special_tokens=False)[0] for s in spellings(answer)}
        return sorted(ids)

    def answer_logprobs(self, prompts: Sequence[Messages], answers: Sequence[str]) -> Tensor:
        ids = [torch.tensor(self.answer_ids(a)) for a in answers]
        out = torch.zeros(len(prompts), len(answers))
        for rows, lp in self._next_logprob_batches(prompts):
            out[rows] = torch.stack([lp[:, i].logsumexp(-1) for i in ids], dim=-1)
        return out

    def _next_logprob_batches(self, prompts: Sequence[Messages]):
        """(rows, next-token log-probs) batch by batch. As text, the worked examples (every turn but the last)
        are run once per distinct set and their keys/values reused for each question."""
        if self.render == "chat":
            for lo in range(0, len(prompts), self.batch):
                yield list(range(lo, min(lo + self.batch, len(prompts)))), \
                    self._next_logprobs(*self._encode(prompts[lo:lo + self.batch]))
            return
        groups: dict[str, list[int]] = {}
        for r, p in enumerate(prompts):
            groups.setdefault(as_text(p[:-1]), []).append(r)
        for prefix, rows in groups.items():
            cache = self._prefix_cache(prefix)
            for lo in range(0, len(rows), self.batch * 2):
                chunk = rows[lo:lo + self.batch * 2]
                yield chunk, self._after_prefix(cache, [prompts[r][-1]["content"] for r in chunk])

    def _prefix_cache(self, prefix: str):
        ids = self.tok(prefix)["input_ids"] if prefix else [self.tok.bos_token_id or self.pad]
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
        return out.past_key_values, len(ids)

    def _after_prefix(self, cache, questions: list[str]) -> Tensor:
        import copy

        past, n_prefix = cache
        ids = [self.tok(q, add_special_tokens=False)["input_ids"] for q in questions]
        width = max(map(len, ids))
        tokens = torch.full((len(ids), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(ids), n_prefix + width, dtype=torch.long)
        mask[:, :n_prefix] = 1
        for r, row in enumerate(ids):  # right-padded: padding after a question never reaches its last token
            tokens[r, :len(row)] = torch.tensor(row)
            mask[r, n_prefix:n_prefix + len(row)] = 1
        past = copy.deepcopy(past)
        past.batch_repeat_interleave(len(ids))
        positions = (n_prefix + torch.arange(width)).expand(len(ids), -1)
        with torch.inference_mode():
            logits = self.model(input_ids=tokens, attention_mask=mask, past_key_values=past, position_ids=positions,
                                use_cache=True).logits
        last = torch.tensor([len(r) - 1 for r in ids])
        return logits[torch.arange(len(ids)), last].float().log_softmax(-1)

    def generate(self, prompt: Messages, max_tokens: int, stop_newline: bool = False) -> tuple[list[int], list[Tensor]]:
        """Greedy token ids and each step's full log-probabilities (for a server's ``logprobs``); KV-cached."""
        tokens = torch.tensor([self.ids(prompt)])
        stops = {self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>")} - {None}
        chosen, steps, past = [], [], None
        with torch.inference_mode():
            for _ in range(max_tokens):
                out = self.model(input_ids=tokens, past_key_values=past, use_cache=True)
                past = out.past_key_values
                lp = out.logits[0, -1].float().log_softmax(-1)
                t = int(lp.argmax())
                if t in stops or (stop_newline and chosen and "\n" in self.tok.decode([t])):
                    break
                chosen.append(t)
                steps.append(lp)
                tokens = torch.tensor([[t]])
        return chosen, steps

    def complete(self, prompts: Sequence[Messages], max_tokens: int) -> list[str]:
        out = []
        for p in prompts:
            ids, _ = self.generate(p, max_tokens, stop_newline=True)
            out.append(first_line(self.tok.decode(ids, skip_special_tokens=True)))
        return out


@dataclass
class OpenAIJudge:
    """Any OpenAI-compatible chat endpoint: ``base_url`` ends in ``/v1``."""

    base_url: str
    model: str
    api_key: str = ""
    timeout: float = 120.0

    @property
    def name(self) -> str:
        return f"openai:{self.model}"

    @classmethod
    def from_env(cls) -> "OpenAIJudge":
        base, model = os.environ.get(ENV_BASE_URL, ""), os.environ.get(ENV_MODEL, "")
        if not base or not model:
            raise UserError(f"JUDGE=openai needs {ENV_BASE_URL} (e.g. http://localhost:8000/v1) and {ENV_MODEL} set "
                            f"({ENV_KEY} if the endpoint wants a key)")
        return cls(base.rstrip("/"), model, os.environ.get(ENV_KEY, ""))

    def _post(self, body: dict) -> dict:
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"the judge endpoint {self.base_url} did not answer ({e}); check {ENV_BASE_URL}") from e

    def _ask(self, prompt: Messages, max_tokens: int, logprobs: bool) -> dict:
        body = {"model": self.model, "messages": list(prompt), "max_tokens": max_tokens, "temperature": 0.0}
        if logprobs:
            body |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
        return self._post(body)["choices"][0]

    def complete(self, prompts: Sequence[Messages], max_tokens: int) -> list[str]:
        return [first_line(self._ask(p, max_tokens, False)["message"]["content"] or "") for p in prompts]

    def answer_logprobs(self, prompts: Sequence[Messages], answers: Sequence[str]) -> Tensor:
        rows = []
        for p in prompts:
            choice = self._ask(p, 1, True)
            content = (choice.get("logprobs") or {}).get("content") or []
            if not content:
                raise UserError(f"the judge endpoint {self.base_url} returned no logprobs; it must support "
                                f"`logprobs` and `top_logprobs` on /chat/completions")
            rows.append(answer_row(content[0]["top_logprobs"], answers))
        return torch.tensor(rows, dtype=torch.float32).reshape(len(prompts), len(answers))


def answer_row(top: list[dict], answers: Sequence[str]) -> list[float]:
    """Log-probabilities of ``answers`` from one position's ``top_logprobs``; an answer outside
    the list gets a floor just below the least likely listed token (an upper bound)."""
    floor = min((t["logprob"] for t in top), default=0.0) - math.log(2)
    out = []
    for a in answers:
        hits = [t["logprob"] for t in top if t["token"] in spellings(a)]
        out.append(float(torch.tensor(hits).logsumexp(0)) if hits else floor)
    return out


def first_line(text: str) -> str:
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return lines[0] if lines else ""


def make_judge(kind: str, lm) -> Judge:
    """``local``: ``lm``'s own model as few-shot text (offline); ``openai``: the endpoint in the environment."""
    if kind == "local":
        return LocalJudge(lm.hf_model, lm.tokenizer, name=lm.name)
    if kind == "openai":
        return OpenAIJudge.from_env()
    raise UserError(f"JUDGE={kind} must be local or openai")
