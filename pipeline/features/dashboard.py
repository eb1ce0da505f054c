"""A static feature dashboard: one folder that opens from disk, with no server and no network.

Layout (written whole, then swapped in)::

    dashboard/
      index.html                 the page (styles inline); loads the three scripts below
      app.js                     the viewer (assets/dashboard.js)
      data/index.js              nndIndex({...}): one row per latent (frequency, max, mean, top tokens)
      data/vocab.js              nndVocab({...}): text of every token id the cards use
      data/cards/L<layer>-<block>.js   nndCards(layer, block, [...]): the cards of BLOCK latents each

Browsers refuse ``fetch()`` of ``file://`` URLs, so data comes as scripts
that call a function of the viewer (JSONP style): the index at start, a block
of cards when one of its latents is opened. The index is paged, so 20k+
latents render one page at a time; a card file holds ``BLOCK`` latents.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.core.io import folder_atomic
from pipeline.features.examples import read_features

BLOCK = 64
ASSETS = Path(__file__).parent / "assets"


def _r(x: float) -> float:
    """Three significant digits: enough to read, small to ship."""
    return float(f"{float(x):.3g}")


def _js(function: str, *args) -> str:
    # json.dumps escapes nothing that could close a <script>; these are separate files, never inlined
    return f"{function}({', '.join(json.dumps(a, ensure_ascii=False, separators=(',', ':')) for a in args)});\n"


def _contexts(acts: torch.Tensor, ctx_act: torch.Tensor, ctx_tok: torch.Tensor, centre: int,
              rows: torch.Tensor) -> list[dict]:
    out = []
    for j in range(acts.shape[0]):
        if int(rows[j]) < 0:
            continue
        valid = ctx_tok[j] >= 0
        first = int(valid.nonzero()[0]) if valid.any() else centre
        last = int(valid.nonzero()[-1]) + 1 if valid.any() else centre + 1
        out.append({"a": _r(acts[j]), "c": centre - first, "row": int(rows[j]),
                    "t": [int(t) for t in ctx_tok[j, first:last]],
                    "v": [_r(v) for v in ctx_act[j, first:last].float()]})
    return out


def _card(t: dict, layer: int, i: int, freq_rank: np.ndarray, centre: int) -> dict:
    p = f"L{layer}."
    card = {
        "i": i, "freq": _r(t[p + "frequency"][i]), "count": int(t[p + "count"][i]), "mean": _r(t[p + "mean_act"][i]),
        "max": _r(t[p + "max_act"][i]), "hist": [int(c) for c in t[p + "hist"][i]], "rank": _r(freq_rank[i]),
        "top": _contexts(t[p + "top_act"][i], t[p + "top_ctx_act"][i], t[p + "top_ctx_tok"][i], centre,
                         t[p + "top_row"][i]),
        "up": [[int(a), _r(b)] for a, b in zip(t[p + "logit_top_id"][i], t[p + "logit_top_value"][i])],
        "down": [[int(a), _r(b)] for a, b in zip(t[p + "logit_bottom_id"][i], t[p + "logit_bottom_value"][i])],
    }
    if p + "sample_act" in t:
        card["q"] = _contexts(t[p + "sample_act"][i], t[p + "sample_ctx_act"][i], t[p + "sample_ctx_tok"][i],
                              centre, t[p + "sample_row"][i])
    return card


def _top_tokens(t: dict, layer: int, i: int, vocab: dict, centre: int, n: int = 4) -> str:
    """The distinct activating tokens of a latent's top contexts (what the index searches)."""
    seen: list[str] = []
    for tok, row in zip(t[f"L{layer}.top_ctx_tok"][i, :, centre], t[f"L{layer}.top_row"][i]):
        text = vocab.get(str(int(tok)))
        if int(row) >= 0 and text is not None and text not in seen:
            seen.append(text)
        if len(seen) == n:
            break
    return "\u241f".join(seen)  # a separator no token text holds


def build_dashboard(features: Path, out_dir: Path, title: str | None = None) -> Path:
    """Write the dashboard folder for a features file; returns its index.html."""
    tensors, meta = read_features(features)
    centre = -min(meta["context_offsets"])
    vocab = meta["tokens"]
    layers = meta["source_layers"]
    index = {"layer": [], "i": [], "freq": [], "max": [], "mean": [], "top": []}
    with folder_atomic(out_dir) as tmp:
        (tmp / "data" / "cards").mkdir(parents=True)
        for layer in layers:
            freq = tensors[f"L{layer}.frequency"].numpy()
            rank = freq.argsort().argsort() / max(len(freq) - 1, 1)  # 0 = rarest, 1 = densest
            n = len(freq)
            for block in range(0, n, BLOCK):
                cards = [_card(tensors, layer, i, rank, centre) for i in range(block, min(n, block + BLOCK))]
                (tmp / "data" / "cards" / f"L{layer}-{block // BLOCK}.js").write_text(
                    _js("nndCards", layer, block // BLOCK, cards), encoding="utf-8")
            index["layer"] += [layer] * n
            index["i"] += list(range(n))
            index["freq"] += [_r(f) for f in freq]
            index["max"] += [_r(m) for m in tensors[f"L{layer}.max_act"].numpy()]
            index["mean"] += [_r(m) for m in tensors[f"L{layer}.mean_act"].numpy()]
            index["top"] += [_top_tokens(tensors, layer, i, vocab, centre) for i in range(n)]
        about = {k: meta.get(k) for k in ("method", "label", "family", "k", "lm", "checkpoint", "rows_scanned",
                                          "window", "source_layers", "n_latents", "hist_log10_edges", "density")}
        about |= {"title": title or meta.get("method"), "block": BLOCK}
        (tmp / "data" / "index.js").write_text(_js("nndIndex", about, index), encoding="utf-8")
        (tmp / "data" / "vocab.js").write_text(_js("nndVocab", vocab), encoding="utf-8")
        shutil.copy(ASSETS / "dashboard.js", tmp / "app.js")
        html = (ASSETS / "dashboard.html").read_text(encoding="utf-8")
        (tmp / "index.html").write_text(html.replace("{{TITLE}}", _html_text(about["title"] or "features")),
                                        encoding="utf-8")
    return Path(out_dir) / "index.html"


def _html_text(s: str) -> str:
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
