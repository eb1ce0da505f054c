"""SAELens 6.x's on-disk format for per-layer transcoders, SAEs and skip transcoders, both ways.

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` (what
``sae_lens.SAE.load_from_disk`` reads; checked against sae-lens 6.54.12):

- ``cfg.json``: ``architecture``, ``d_in``, ``d_sae`` (``d_out`` for
  transcoders), ``dtype``, ``device``, ``apply_b_dec_to_input``,
  ``normalize_activations``, ``reshape_activations``, ``k`` (TopK), and
  ``metadata`` with ``sae_lens_version``, ``model_name``, ``hook_name`` (what
  the latents read) and ``hook_name_out`` (what a transcoder writes). We add
  ``metadata.nnd``: our variant, k, layer, hooks and training facts.
- ``sae_weights.safetensors``: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
  ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``, ``threshold [d_sae]`` for the
  JumpReLU architectures, ``W_skip [d_out, d_in]`` for skip transcoders.

What SAELens computes (``apply_b_dec_to_input`` false, no normalisation):
``a = act(x @ W_enc + b_enc)``, act ReLU, TopK (the k largest per row, then
ReLU) or JumpReLU ``relu(z) * (z > threshold)``; ``y = a @ W_dec + b_dec``
(``+ x @ W_skip.T``). Ours, in model units: ``a = act((x * s_in) @ W_enc.T +
b_enc)``, ``y = (a @ W_dec + b_dec) / s_out``. So the export folds the scales
into the weights (``W_enc * s_in``, ``W_dec / s_out``, ``b_dec / s_out``,
``W_skip * s_in / s_out``), which leaves the latents the same numbers.

Variants: vanilla is ``standard`` / ``transcoder`` / ``skip_transcoder``;
JumpReLU keeps its thresholds; BatchTopK exports as JumpReLU with every
threshold at its inference threshold (what it does outside training); TopK
SAEs are ``topk``. SAELens has no TopK transcoder, so a TopK transcoder (or
skip transcoder) is refused.

Reading (``read``) accepts what SAELens 6 writes for these architectures:
``apply_b_dec_to_input`` is folded into ``b_enc``, a TopK SAE trained with
``rescale_acts_by_decoder_norm`` gets its decoder norms folded into the
encoder, JumpReLU thresholds <= 0 become the smallest positive float (our
JumpReLU holds log-thresholds; the two differ only for pre-activations in
(0, 1.2e-38]), and any other normalisation, hook_z reshaping or a scaling
factor other than 1 is refused with one line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from pipeline.core.errors import UserError
from pipeline.data.models import HOOKS
from pipeline.methods.sparsity import inference_thresholds
from pipeline.methods.transcoder import Transcoder

CONFIG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SAELENS_VERSION = "6.54.12"  # the sae-lens release whose loader this format is tested against

# (kind, our variant) -> SAELens architecture; kind is sae | transcoder | skip
ARCHITECTURES = {
    ("sae", "vanilla"): "standard", ("sae", "topk"): "topk",
    ("sae", "batchtopk"): "jumprelu", ("sae", "jumprelu"): "jumprelu",
    ("transcoder", "vanilla"): "transcoder",
    ("transcoder", "batchtopk"): "jumprelu_transcoder", ("transcoder", "jumprelu"): "jumprelu_transcoder",
    ("skip", "vanilla"): "skip_transcoder",
    ("skip", "batchtopk"): "jumprelu_skip_transcoder", ("skip", "jumprelu"): "jumprelu_skip_transcoder",
}
# SAELens architecture -> (kind, our variant) when reading
IMPORTS = {
    "standard": ("sae", "vanilla"), "topk": ("sae", "topk"), "jumprelu": ("sae", "jumprelu"),
    "transcoder": ("transcoder", "vanilla"), "jumprelu_transcoder": ("transcoder", "jumprelu"),
    "skip_transcoder": ("skip", "vanilla"), "jumprelu_skip_transcoder": ("skip", "jumprelu"),
}
# normalize_activations values that are the identity at inference in SAELens 6
IDENTITY_NORMALIZATIONS = ("none", "expected_average_only_in")
UNIT_SCALES = ("input_scale", "target_scale")


def is_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def kind_of(coder: Transcoder) -> str:
    return "skip" if coder.cfg.method == "skip" else coder.cfg.kind


def hook_name(hook: str, layer: int) -> str:
    return HOOKS[hook].format(layer=layer) if hook in HOOKS else hook


def parse_hook(name: str | None, what: str, path: Path) -> tuple[int, str]:
    """(layer, our hook) of a TransformerLens-style hook name such as ``blocks.3.hook_mlp_out``."""
    for hook, template in HOOKS.items():
        m = re.fullmatch(re.escape(template).replace(re.escape("{layer}"), r"(\d+)"), str(name))
        if m:
            return int(m.group(1)), hook
    raise UserError(f"{path}: metadata.{what} is {name!r}; evaluate splices MLP hooks only "
                    f"({', '.join(t.format(layer='L') for t in HOOKS.values())})")


def to_saelens(coder: Transcoder, metadata: dict) -> tuple[dict, dict[str, Tensor]]:
    """cfg.json content and tensors of ``coder``, scales folded in (see the module docstring)."""
    c = coder.cfg
    kind = kind_of(coder)
    architecture = ARCHITECTURES.get((kind, c.variant))
    if architecture is None:
        raise UserError(f"SAELens has no TopK {'skip ' if kind == 'skip' else ''}transcoder (its TopK architecture is an "
                        f"SAE, and a per-row top-k is no threshold); train MODEL={'skip-' if kind == 'skip' else ''}"
                        f"batchtopk, which exports exactly as a JumpReLU transcoder, or jumprelu")
    with torch.no_grad():
        s_in, s_out = coder.input_scale, coder.target_scale
        tensors = {"W_enc": (coder.W_enc * s_in).T, "b_enc": coder.b_enc, "W_dec": coder.W_dec / s_out,
                   "b_dec": coder.b_dec / s_out}
        thresholds = inference_thresholds(coder.sparsity)
        if thresholds is not None:
            tensors["threshold"] = thresholds
        if kind == "skip":
            tensors["W_skip"] = coder.W_skip * s_in / s_out
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    nnd = {"variant": c.variant, "k": c.k, "layer": c.layer, "kind": kind, "input_hook": c.input_hook,
           "target_hook": c.target_hook,
           **{k: metadata[k] for k in ("lm", "store_manifest", "store_manifest_hash", "train_hash", "tokens")
              if k in metadata}}
    cfg = {"architecture": architecture, "d_in": c.d_in, "d_sae": c.n_latents, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None,
                        "model_name": metadata.get("lm"), "hook_name": hook_name(c.input_hook, c.layer),
                        "hook_name_out": hook_name(c.target_hook, c.layer),
                        "context_size": metadata.get("store_manifest", {}).get("ctx"), "nnd": nnd}}
    if kind != "sae":
        cfg["d_out"] = c.d_out
    if architecture == "topk":
        cfg |= {"k": c.k, "rescale_acts_by_decoder_norm": False}
    return cfg, tensors


def read(path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """An SAELens folder as our checkpoint config (family, config, metadata) and the
    state-dict entries it sets (the rest keep the module's defaults: unit scales)."""
    path = Path(path)
    try:
        cfg = json.loads((path / CONFIG).read_text())
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            raw = {k: f.get_tensor(k).float() for k in f.keys()}
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise UserError(f"{path} is not a readable SAELens folder ({e.__class__.__name__}: {e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("metadata", {}), dict):
        raise UserError(f"{path}/{CONFIG} is not an SAELens config")
    meta = cfg.get("metadata", {})
    version = str(meta.get("sae_lens_version") or cfg.get("sae_lens_version") or "0")
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 6:
        raise UserError(f"{path}: written by sae-lens {version}; only the 6.x format (metadata.sae_lens_version >= 6) "
                        f"is read: load and save it with sae-lens 6 first")
    architecture = cfg.get("architecture")
    if architecture not in IMPORTS:
        raise UserError(f"{path}: SAELens architecture {architecture!r} has no equivalent here; "
                        f"readable: {', '.join(IMPORTS)}")
    if cfg.get("normalize_activations", "none") not in IDENTITY_NORMALIZATIONS:
        raise UserError(f"{path}: normalize_activations={cfg['normalize_activations']!r} is applied at run time; "
                        f"fold it into the weights first (only {' / '.join(IDENTITY_NORMALIZATIONS)} are read)")
    if cfg.get("reshape_activations", "none") != "none":
        raise UserError(f"{path}: reshape_activations={cfg['reshape_activations']!r} (attention heads) is not an MLP dictionary")
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in raw and not torch.all(raw[name] == 1):
            raise UserError(f"{path}: a {name} other than 1 is not read; fold it into W_dec first")
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in raw]
    if missing:
        raise UserError(f"{path}/{WEIGHTS} lacks {', '.join(missing)}")
    kind, variant = IMPORTS[architecture]
    nnd = meta.get("nnd") if isinstance(meta.get("nnd"), dict) else {}
    W_enc, b_enc, W_dec, b_dec = raw["W_enc"].T.contiguous(), raw["b_enc"], raw["W_dec"], raw["b_dec"]
    n_latents, d_in = W_enc.shape
    d_out = W_dec.shape[1]
    if W_dec.shape[0] != n_latents or b_enc.shape != (n_latents,) or b_dec.shape != (d_out,):
        raise UserError(f"{path}: weight shapes disagree (W_enc {tuple(raw['W_enc'].shape)}, W_dec {tuple(W_dec.shape)})")
    if kind == "sae" and cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc - b_dec @ W_enc.T  # (x - b_dec) @ W_enc + b_enc
    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec.norm(dim=1).clamp_min(1e-8)  # top-k of pre * |W_dec| == top-k with the norms folded in
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    layer, input_hook = parse_hook(meta.get("hook_name"), "hook_name", path)
    target_hook = input_hook
    if kind != "sae":
        out_layer, target_hook = parse_hook(meta.get("hook_name_out"), "hook_name_out", path)
        if out_layer != layer:
            raise UserError(f"{path}: reads layer {layer} but writes layer {out_layer}; only same-layer transcoders are read")
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    state |= {k: torch.tensor(1.0) for k in UNIT_SCALES}
    if kind == "skip":
        state["W_skip"] = raw["W_skip"]
    if variant == "jumprelu":
        threshold = raw["threshold"].reshape(-1)
        if nnd.get("variant") == "batchtopk" and torch.all(threshold == threshold[0]):
            variant = "batchtopk"
            state["sparsity.threshold"] = threshold[0].clone()
        else:
            state["sparsity.log_threshold"] = threshold.clamp_min(torch.finfo(torch.float32).tiny).log()
    k = int(cfg["k"]) if architecture == "topk" else int(nnd.get("k", 1))  # vanilla/JumpReLU: a target L0 (unknown: 1)
    config = {"variant": variant, "k": k, "d_in": d_in, "d_out": d_out, "n_latents": n_latents,
              "kind": "sae" if kind == "sae" else "transcoder", "layer": layer, "input_hook": input_hook,
              "target_hook": target_hook, "method": "skip" if kind == "skip" else "transcoder"}
    metadata = {"imported": {"format": "saelens", "path": str(path), "architecture": architecture,
                             "sae_lens_version": version, "model_name": meta.get("model_name")}}
    if meta.get("model_name"):
        metadata["lm"] = meta["model_name"]
    if isinstance(nnd.get("store_manifest"), dict):
        metadata["store_manifest"] = nnd["store_manifest"]
    return {"family": config["method"], "config": config, "metadata": metadata}, state
