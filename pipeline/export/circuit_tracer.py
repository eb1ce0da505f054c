"""A CLT checkpoint to circuit-tracer's per-layer CLT format, and back.

The format (one directory; what circuit-tracer's CLT loader reads):

- ``W_enc_{p}.safetensors`` for p = 0..n-1: ``W_enc_{p}`` [n_latents, d_in],
  ``b_enc_{p}`` [n_latents], ``b_dec_{p}`` [d_out] (the output bias of layer
  p), and for thresholded activations ``threshold_{p}`` [n_latents];
- ``W_dec_{p}.safetensors``: ``W_dec_{p}`` [n_latents, n - p, d_out]; slice
  ``[:, j - p]`` writes to layer j (the layout ``CrossLayerTranscoder`` trains in);
- ``config.yaml``: ``model_kind: cross_layer_transcoder``, ``feature_input_hook``
  and ``feature_output_hook`` relative to ``blocks.{layer}`` (``mlp.hook_in``,
  ``hook_mlp_out``), and an ``nnd`` block of our own (variant, k, layers, store
  and training facts) that circuit-tracer does not read.

Files are numbered by model layer from 0 (circuit-tracer counts the
``W_enc_*`` files to get the number of layers and places file p at layer p),
so only CLTs trained on layers 0..n-1 are exported.

What the files mean: in model units and without any normalisation,
``a_p = act_p(x_p @ W_enc_p.T + b_enc_p)`` with act ReLU, or JumpReLU
``z * (z > threshold_p)`` where thresholds are present, and
``y_j = b_dec_j + sum_{p <= j} a_p @ W_dec_p[:, j - p]``. Our input and target
scales are folded into the weights (``W_enc * input_scale_p``;
``W_dec[:, j - p] / target_scale_j``; ``b_dec_j / target_scale_j``), which
leaves the activations the same numbers as ours, so thresholds carry over.

Sparsity variants: ``vanilla`` is ReLU; ``jumprelu`` keeps its learned
thresholds; ``batchtopk`` exports exactly as a JumpReLU whose thresholds are
all its inference threshold (that is what it does outside training);
``topk`` (the k largest per row) has no equivalent in circuit-tracer's CLT and
is refused. Tensors are fp32 (circuit-tracer casts on load).

``load_circuit_tracer`` reads such a directory back into a
``CrossLayerTranscoder`` (unit scales, weights as stored). With our ``nnd``
block it restores the variant, k and layers; a directory from elsewhere loads
as ``jumprelu`` (thresholds present) or ``vanilla`` on layers 0..n-1.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline import checkpoint
from pipeline.methods.clt import CLTConfig, CrossLayerTranscoder
from pipeline.core.errors import UserError
from pipeline.core.io import folder_atomic
from pipeline.methods.sparsity import SparsitySettings

CONFIG = "config.yaml"
# Our hooks relative to ``blocks.{layer}``, as circuit-tracer names them (TransformerLens names).
HOOKS = {"mlp_in": "mlp.hook_in", "mlp_out": "hook_mlp_out", "mlp_out_raw": "mlp.hook_out"}
THRESHOLDED = ("jumprelu", "batchtopk")


def circuit_tracer_tensors(clt: CrossLayerTranscoder) -> dict[str, dict[str, torch.Tensor]]:
    """File name -> tensors, with the scales folded in (see the module docstring)."""
    cfg = clt.cfg
    if cfg.variant == "topk":
        raise UserError("a TopK CLT has no circuit-tracer equivalent (its CLTs use ReLU or JumpReLU thresholds); "
                        "train MODEL=clt-batchtopk, whose inference threshold exports exactly, or clt-jumprelu")
    if list(cfg.layers) != list(range(cfg.n_layers)):
        raise UserError(f"circuit-tracer places CLT file p at model layer p, so only CLTs on layers 0..n-1 export; "
                        f"this one is on layers {list(cfg.layers)}: train it with LAYERS=0-{cfg.layers[-1]}")
    files = {}
    with torch.no_grad():
        for p in range(cfg.n_layers):
            enc = {f"W_enc_{p}": clt.W_enc[p] * clt.input_scale[p], f"b_enc_{p}": clt.b_enc[p],
                   f"b_dec_{p}": clt.b_dec[p] / clt.target_scale[p]}
            if cfg.variant in THRESHOLDED:
                enc[f"threshold_{p}"] = _thresholds(clt, p)
            files[f"W_enc_{p}.safetensors"] = enc
            files[f"W_dec_{p}.safetensors"] = {f"W_dec_{p}": clt.W_dec[p] / clt.target_scale[p:, None]}
    return {name: {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()} for name, tensors in files.items()}


def _thresholds(clt: CrossLayerTranscoder, p: int) -> torch.Tensor:
    piece = clt.sparsity[p]
    if clt.cfg.variant == "jumprelu":
        return piece.log_threshold.exp()
    if torch.isnan(piece.threshold):
        raise UserError("this BatchTopK CLT has no inference threshold yet (it was never trained); train it first")
    # Inference keeps pre > max(threshold, 0): the same for every latent.
    return piece.threshold.clamp_min(0).expand(clt.cfg.n_latents)


def export_circuit_tracer(source: CrossLayerTranscoder | checkpoint.Checkpoint | str | Path, out: str | Path,
                          overwrite: bool = False) -> Path:
    """Write ``source`` (a CLT, or a CLT checkpoint) at ``out``; atomic (tmp dir, then rename)."""
    out = Path(out)
    metadata: dict = {}
    if isinstance(source, (str, Path)):
        source = checkpoint.load(source)
    if isinstance(source, checkpoint.Checkpoint):
        metadata = source.metadata
        source = source.module
    if not isinstance(source, CrossLayerTranscoder):
        raise UserError(f"{out}: only cross-layer transcoders export to circuit-tracer's CLT format")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; remove it or export elsewhere")
    files = circuit_tracer_tensors(source)
    cfg = source.cfg
    config = {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": HOOKS.get(cfg.input_hook, cfg.input_hook),
        "feature_output_hook": HOOKS.get(cfg.target_hook, cfg.target_hook),
        "nnd": {"variant": cfg.variant, "k": cfg.k, "layers": list(cfg.layers), "n_latents": cfg.n_latents,
                "input_hook": cfg.input_hook, "target_hook": cfg.target_hook,
                "settings": cfg.to_dict()["settings"],
                **{k: metadata[k] for k in ("lm", "store_manifest_hash", "train_hash", "tokens") if k in metadata}},
    }
    with folder_atomic(out) as tmp:
        for name, tensors in files.items():
            save_file(tensors, tmp / name)
        (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=True))
    return out


def load_circuit_tracer(path: str | Path) -> CrossLayerTranscoder:
    """A circuit-tracer CLT directory back into a ``CrossLayerTranscoder`` (eval mode)."""
    path = Path(path)
    n = len(list(path.glob("W_enc_*.safetensors")))
    if n == 0 or not (path / CONFIG).exists():
        raise UserError(f"{path} is not a circuit-tracer CLT directory (needs {CONFIG} and W_enc_*.safetensors)")
    config = yaml.safe_load((path / CONFIG).read_text())
    if config.get("model_kind") != "cross_layer_transcoder":
        raise UserError(f"{path}: model_kind is {config.get('model_kind')!r}, not cross_layer_transcoder")
    enc = [_read(path / f"W_enc_{p}.safetensors") for p in range(n)]
    dec = [_read(path / f"W_dec_{p}.safetensors")[f"W_dec_{p}"] for p in range(n)]
    n_latents, d_in = enc[0]["W_enc_0"].shape
    d_out = enc[0]["b_dec_0"].shape[0]
    ours = config.get("nnd", {})
    by_hook = {v: k for k, v in HOOKS.items()}
    variant = ours.get("variant") or ("jumprelu" if "threshold_0" in enc[0] else "vanilla")
    cfg = CLTConfig(variant=variant, k=ours.get("k", 1), d_in=d_in, d_out=d_out, n_latents=n_latents,
                    layers=tuple(ours.get("layers", range(n))),
                    input_hook=ours.get("input_hook", by_hook.get(config["feature_input_hook"], config["feature_input_hook"])),
                    target_hook=ours.get("target_hook", by_hook.get(config["feature_output_hook"], config["feature_output_hook"])),
                    settings=SparsitySettings(**ours.get("settings", {})))
    if cfg.n_layers != n:
        raise UserError(f"{path}: config.yaml names {cfg.n_layers} layers but there are {n} W_enc files")
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        for p in range(n):
            if dec[p].shape != clt.W_dec[p].shape:
                raise UserError(f"{path}: W_dec_{p} has shape {tuple(dec[p].shape)}, expected {tuple(clt.W_dec[p].shape)}")
            clt.W_enc[p].copy_(enc[p][f"W_enc_{p}"])
            clt.b_enc[p].copy_(enc[p][f"b_enc_{p}"])
            clt.b_dec[p].copy_(enc[p][f"b_dec_{p}"])
            clt.W_dec[p].copy_(dec[p])
            if variant in THRESHOLDED:
                _set_thresholds(clt, p, enc[p][f"threshold_{p}"])
    return clt.eval()


def _set_thresholds(clt: CrossLayerTranscoder, p: int, threshold: torch.Tensor) -> None:
    piece = clt.sparsity[p]
    if clt.cfg.variant == "jumprelu":
        if (threshold <= 0).any():  # our JumpReLU learns log-thresholds
            raise UserError(f"threshold_{p} has entries <= 0, which a JumpReLU with log-thresholds cannot hold")
        piece.log_threshold.copy_(threshold.log())
    else:
        if not torch.all(threshold == threshold[0]):
            raise UserError("a BatchTopK CLT has one threshold per source layer; these thresholds differ across latents")
        piece.threshold.copy_(threshold[0])


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).float() for k in f.keys()}

