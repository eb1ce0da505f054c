"""CLTs and per-layer transcoder sets to circuit-tracer's formats (checked against circuit-tracer 0.5.0), and back.

**CLT** (``model_kind: cross_layer_transcoder``; load with
``circuit_tracer.transcoder.cross_layer_transcoder.load_clt(folder)``):

- ``W_enc_{p}.safetensors`` for every model layer p: ``W_enc_{p}`` [n_latents, d_in],
  ``b_enc_{p}`` [n_latents], ``b_dec_{p}`` [d_out] (the output bias of layer
  p), and for thresholded activations ``threshold_{p}`` [n_latents];
- ``W_dec_{p}.safetensors``: ``W_dec_{p}`` [n_latents, depth - p, d_out]; slice
  ``[:, j - p]`` writes to layer j (the layout ``CrossLayerTranscoder`` trains in);
- meaning: ``a_p = act_p(x_p @ W_enc_p.T + b_enc_p)`` with act ReLU, or JumpReLU
  ``z * (z > threshold_p)`` where thresholds are present;
  ``y_j = b_dec_j + sum_{p <= j} a_p @ W_dec_p[:, j - p]``.

**Transcoder set** (``model_kind: transcoder_set``; load with
``circuit_tracer.utils.hf_utils.load_transcoders(yaml.safe_load(config.yaml))``):
``layer_{i}.safetensors`` for every model layer i with ``W_enc`` [n_latents, d],
``b_enc``, ``W_dec`` [n_latents, d], ``b_dec``, ``activation_function.threshold``
[n_latents] for JumpReLU, ``W_skip`` [d, d] for skip transcoders
(``y = act(x @ W_enc.T + b_enc) @ W_dec + b_dec + x @ W_skip.T``). config.yaml
lists the files by absolute path (``transcoders``), as circuit-tracer reads
local sets: move the folder and it must be exported again.

Both: ``config.yaml`` has ``model_kind``, ``feature_input_hook`` and
``feature_output_hook`` relative to ``blocks.{layer}`` (``mlp.hook_in``,
``hook_mlp_out``), ``scan``, ``model`` (the folder below), and an ``nnd``
block of our own (variant, k, layers, training facts) that circuit-tracer does
not read. Our input and target scales are folded into the weights
(``W_enc * input_scale``, ``W_dec / target_scale``, ``b_dec / target_scale``,
``W_skip * input_scale / target_scale``), which leaves the activations the
same numbers as ours, so thresholds carry over. Tensors are fp32.

**Full depth.** circuit-tracer takes the number of layers from the number of
files and needs it to equal the model's: ``get_activations`` and ``attribute``
fail otherwise. Layers the dictionary does not cover get all-zero weights
(nothing fires there, the reconstruction is 0, so attribution sends that
layer's whole MLP output through its error node) and thresholds of 1. The
zeros are written as holes in sparse files (``write_safetensors``): a 4-layer
CLT of SmolLM2 (30 layers, 2304 latents) is a 2.5 GB decoder on paper, but
takes the disk and, with circuit-tracer's lazy decoder, the memory of what
is stored; a copy without ``--sparse`` fills the holes in.

**Model folder.** ``model/`` beside the files is the LM as transformers 4.57
(circuit-tracer's) reads it: our folders are written by transformers 5, whose
``rope_parameters`` 4.57 ignores (rope_theta then silently falls back to
10000 instead of SmolLM2's 100000) and whose tokenizer class
``TokenizersBackend`` 4.57 does not know. The copy adds ``rope_theta`` and
names ``PreTrainedTokenizerFast``; the weights are hard-linked (copied across
filesystems). transformers 5 reads the copy as the original.

Sparsity variants: ``vanilla`` is ReLU; ``jumprelu`` keeps its learned
thresholds; ``batchtopk`` exports exactly as a JumpReLU whose thresholds are
all its inference threshold (what it does outside training); ``topk`` (the
k largest per row) is no threshold and circuit-tracer loads no TopK
dictionary from disk, so it is refused.

``load_circuit_tracer`` reads a CLT folder back into a ``CrossLayerTranscoder``
(unit scales, weights as stored). With our ``nnd`` block it restores the
variant, k and layers; a folder from elsewhere loads as ``jumprelu``
(thresholds present) or ``vanilla`` on all its layers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import yaml
from safetensors import safe_open

from pipeline import checkpoint
from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.io import folder_atomic
from pipeline.export.options import ExportOptions
from pipeline.methods.clt import CLTConfig, CrossLayerTranscoder
from pipeline.methods.sparsity import SparsitySettings, inference_thresholds
from pipeline.methods.transcoder import Transcoder

CONFIG = "config.yaml"
MODEL = "model"  # the LM folder for transformers 4.57, beside the dictionary files
# Our hooks relative to ``blocks.{layer}``, as circuit-tracer names them (TransformerLens names).
HOOKS = {"mlp_in": "mlp.hook_in", "mlp_out": "hook_mlp_out", "mlp_out_raw": "mlp.hook_out"}
THRESHOLDED = ("jumprelu", "batchtopk")
PAD_THRESHOLD = 1.0  # thresholds of uncovered layers (their pre-activations are all exactly 0)


@dataclass(frozen=True)
class Padded:
    """A ``shape`` fp32 tensor that is zero except ``data`` in its leading corner along dim 1
    (None: all zero). Written as holes in a sparse file."""

    shape: tuple[int, ...]
    data: torch.Tensor | None = None


Entry = torch.Tensor | Padded


# ----- what the files hold ---------------------------------------------------------------------

def clt_tensors(clt: CrossLayerTranscoder, depth: int | None = None) -> dict[str, dict[str, Entry]]:
    """File name -> tensors of a CLT over model layers 0..depth-1, scales folded in."""
    cfg = clt.cfg
    if cfg.variant == "topk":
        raise UserError("a TopK CLT has no circuit-tracer equivalent (its CLTs use ReLU or JumpReLU thresholds); "
                        "train MODEL=clt-batchtopk, whose inference threshold exports exactly, or clt-jumprelu")
    layers = list(cfg.layers)
    if layers != list(range(layers[0], layers[-1] + 1)):
        raise UserError(f"circuit-tracer's CLT writes from layer p to every later layer in order, so only CLTs on "
                        f"consecutive layers export; this one is on layers {layers}: train it with LAYERS="
                        f"{layers[0]}-{layers[-1]}")
    depth = _depth(depth, layers)
    n, d_in, d_out = cfg.n_latents, cfg.d_in, cfg.d_out
    files = {}
    with torch.no_grad():
        for layer in range(depth):
            if layer in layers:
                p = layers.index(layer)
                enc = {f"W_enc_{layer}": clt.W_enc[p] * clt.input_scale[p], f"b_enc_{layer}": clt.b_enc[p],
                       f"b_dec_{layer}": clt.b_dec[p] / clt.target_scale[p]}
                if cfg.variant in THRESHOLDED:
                    enc[f"threshold_{layer}"] = inference_thresholds(clt.sparsity[p])
                dec = Padded((n, depth - layer, d_out), clt.W_dec[p] / clt.target_scale[p:, None])
            else:
                enc = {f"W_enc_{layer}": Padded((n, d_in)), f"b_enc_{layer}": Padded((n,)),
                       f"b_dec_{layer}": Padded((d_out,))}
                if cfg.variant in THRESHOLDED:
                    enc[f"threshold_{layer}"] = torch.full((n,), PAD_THRESHOLD)
                dec = Padded((n, depth - layer, d_out))
            files[f"W_enc_{layer}.safetensors"] = enc
            files[f"W_dec_{layer}.safetensors"] = {f"W_dec_{layer}": dec}
    return {name: {k: _plain(v) for k, v in tensors.items()} for name, tensors in files.items()}


def transcoder_set_tensors(coders: Sequence[Transcoder], depth: int | None = None) -> dict[str, dict[str, Entry]]:
    """File name -> tensors of per-layer transcoders (one configuration) over layers 0..depth-1."""
    by_layer = {}
    for coder in coders:
        c = coder.cfg
        if c.kind != "transcoder":
            raise UserError("circuit-tracer's transcoders read the MLP input and write its output; an SAE "
                            "(KIND=sae) is not one: export it with FORMAT=saelens")
        if c.layer in by_layer:
            raise UserError(f"two checkpoints for layer {c.layer}; pass one configuration, each layer once")
        by_layer[c.layer] = coder
    first = next(iter(by_layer.values()))
    c0 = first.cfg
    if len({(m.cfg.variant, m.cfg.k, m.cfg.n_latents, m.cfg.method, m.cfg.input_hook, m.cfg.target_hook)
            for m in by_layer.values()}) != 1:
        raise UserError("a transcoder set is one configuration (variant, K, LATENTS, hooks) over several layers; "
                        "these checkpoints differ: export each configuration on its own")
    if c0.variant == "topk":
        raise UserError("circuit-tracer loads no TopK transcoder from disk (its per-layer files are ReLU or JumpReLU), and "
                        "a per-row top-k is no per-latent threshold, so a calibrated JumpReLU would compute other latents; "
                        "train MODEL=batchtopk, whose inference threshold exports exactly, or jumprelu")
    depth = _depth(depth, sorted(by_layer))
    n, d_in, d_out = c0.n_latents, c0.d_in, c0.d_out
    skip = c0.method == "skip"
    files = {}
    with torch.no_grad():
        for layer in range(depth):
            coder = by_layer.get(layer)
            if coder is not None:
                s_in, s_out = coder.input_scale, coder.target_scale
                t = {"W_enc": coder.W_enc * s_in, "b_enc": coder.b_enc, "W_dec": coder.W_dec / s_out,
                     "b_dec": coder.b_dec / s_out}
                thresholds = inference_thresholds(coder.sparsity)
                if thresholds is not None:
                    t["activation_function.threshold"] = thresholds
                if skip:
                    t["W_skip"] = coder.W_skip * s_in / s_out
            else:
                t = {"W_enc": Padded((n, d_in)), "b_enc": Padded((n,)), "W_dec": Padded((n, d_out)),
                     "b_dec": Padded((d_out,))}
                if c0.variant in THRESHOLDED:
                    t["activation_function.threshold"] = torch.full((n,), PAD_THRESHOLD)
                if skip:
                    t["W_skip"] = Padded((d_out, d_in))
            files[f"layer_{layer}.safetensors"] = t
    return {name: {k: _plain(v) for k, v in tensors.items()} for name, tensors in files.items()}


def _depth(depth: int | None, layers: Sequence[int]) -> int:
    depth = layers[-1] + 1 if depth is None else depth
    if layers[-1] >= depth:
        raise UserError(f"the dictionary covers layer {layers[-1]}, but the model has {depth} layers")
    return depth


def _plain(entry: Entry) -> Entry:
    if isinstance(entry, Padded):
        data = None if entry.data is None else entry.data.detach().float().contiguous().cpu()
        return Padded(tuple(entry.shape), data)
    return entry.detach().float().contiguous().cpu()


# ----- writing ------------------------------------------------------------------------------------

def write_safetensors(path: Path, tensors: dict[str, Entry]) -> None:
    """A safetensors file (fp32, little-endian) whose zero regions are holes: seeked over, never written."""
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = 4 * math.prod(t.shape)
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    base = 8 + len(text)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, t in tensors.items():
            start = base + header[name]["data_offsets"][0]
            if isinstance(t, torch.Tensor):
                f.seek(start)
                f.write(t.numpy().astype("<f4", copy=False).tobytes())
            elif t.data is not None and tuple(t.data.shape) == t.shape:
                f.seek(start)
                f.write(t.data.numpy().astype("<f4", copy=False).tobytes())
            elif t.data is not None:  # leading slices along dim 1 of each row along dim 0
                row = 4 * math.prod(t.shape[1:])
                for i, part in enumerate(t.data.numpy().astype("<f4", copy=False)):
                    f.seek(start + i * row)
                    f.write(part.tobytes())
        f.truncate(base + offset)


def write_model_folder(src: Path, dst: Path) -> None:
    """``src`` (a model folder written by transformers 5) as transformers 4.57 reads it too."""
    dst.mkdir()
    for f in sorted(src.iterdir()):
        if f.is_dir():
            continue
        if f.name == "config.json":
            config = json.loads(f.read_text())
            rope = config.get("rope_parameters")
            if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
                config["rope_theta"] = rope["rope_theta"]
            (dst / f.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        elif f.name == "tokenizer_config.json":
            config = json.loads(f.read_text())
            if config.get("tokenizer_class") == "TokenizersBackend":
                config["tokenizer_class"] = "PreTrainedTokenizerFast"
            (dst / f.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        elif f.suffix == ".safetensors":
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copyfile(f, dst / f.name)
        else:
            shutil.copyfile(f, dst / f.name)


def export_circuit_tracer(checkpoints: Sequence[checkpoint.Checkpoint], out: str | Path,
                          options: ExportOptions = ExportOptions()) -> Path:
    """Write a CLT checkpoint, or the per-layer transcoder checkpoints of one configuration, at
    ``out`` over the full depth of the model they were trained on, with ``out/model`` (atomic)."""
    out = Path(out)
    if not checkpoints:
        raise UserError("no checkpoints to export")
    lms = {c.metadata.get("lm") for c in checkpoints}
    if len(lms) != 1 or None in lms:
        raise UserError(f"the checkpoints name LMs {sorted(map(str, lms))}; export checkpoints of one recorded LM")
    lm = lms.pop()
    model_src = paths.model_dir(options.data_dir, lm)
    try:
        depth = int(json.loads((model_src / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{model_src}/config.json is unreadable ({e.__class__.__name__}); circuit-tracer needs the model "
                        f"folder of LM={lm} beside the export: run make harvest LM={lm} or set DATA_DIR") from None
    write_circuit_tracer(checkpoints, out, options.overwrite, depth, model_src)
    return out


def write_circuit_tracer(source, out: str | Path, overwrite: bool = False, depth: int | None = None,
          model_src: Path | None = None) -> Path:
    """The files for ``source`` (a CLT or CLT checkpoint path, or checkpoints / modules of per-layer
    transcoders) at ``out``; ``depth`` None: up to the last covered layer; ``model_src``: copied to model/."""
    out = Path(out)
    modules, metadata = _modules(source)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; remove it or export elsewhere")
    first = modules[0]
    if isinstance(first, CrossLayerTranscoder):
        if len(modules) != 1:
            raise UserError("export one CLT at a time")
        files, kind, c = clt_tensors(first, depth), "cross_layer_transcoder", first.cfg
        layers = list(c.layers)
    elif all(isinstance(m, Transcoder) for m in modules):
        files, kind, c = transcoder_set_tensors(modules, depth), "transcoder_set", first.cfg
        layers = sorted(m.cfg.layer for m in modules)
    else:
        raise UserError("only CLTs and per-layer transcoders export to circuit-tracer")
    final = out.resolve()
    config = {
        "model_kind": kind,
        "feature_input_hook": HOOKS.get(c.input_hook, c.input_hook),
        "feature_output_hook": HOOKS.get(c.target_hook, c.target_hook),
        "scan": f"nnd/{metadata.get('lm', 'unknown')}/{final.name}",
        "nnd": {"variant": c.variant, "k": c.k, "layers": layers, "n_latents": c.n_latents, "method": c.method,
                "input_hook": c.input_hook, "target_hook": c.target_hook, "settings": c.to_dict()["settings"],
                **{k: metadata[k] for k in ("lm", "store_manifest_hash", "train_hash", "tokens") if k in metadata}},
    }
    if kind == "transcoder_set":
        config["transcoders"] = [str(final / name) for name in files]
    if model_src is not None:
        config["model"] = str(final / MODEL)
    with folder_atomic(out) as tmp:
        for name, tensors in files.items():
            write_safetensors(tmp / name, tensors)
        (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=True))
        if model_src is not None:
            write_model_folder(model_src, tmp / MODEL)
    return out


def _modules(source) -> tuple[list, dict]:
    items = source if isinstance(source, (list, tuple)) else [source]
    modules, metadata = [], {}
    for item in items:
        if isinstance(item, (str, Path)):
            item = checkpoint.load(item)
        if isinstance(item, checkpoint.Checkpoint):
            metadata = metadata or item.metadata
            item = item.module
        modules.append(item)
    if not modules:
        raise UserError("no checkpoints to export")
    return modules, metadata


# ----- reading a CLT back -------------------------------------------------------------------------

def load_circuit_tracer(path: str | Path) -> CrossLayerTranscoder:
    """A circuit-tracer CLT folder back into a ``CrossLayerTranscoder`` (eval mode): the layers its
    ``nnd`` block names (padding dropped), else every file's."""
    path = Path(path)
    depth = len(list(path.glob("W_enc_*.safetensors")))
    if depth == 0 or not (path / CONFIG).exists():
        raise UserError(f"{path} is not a circuit-tracer CLT directory (needs {CONFIG} and W_enc_*.safetensors)")
    config = yaml.safe_load((path / CONFIG).read_text())
    if config.get("model_kind") != "cross_layer_transcoder":
        raise UserError(f"{path}: model_kind is {config.get('model_kind')!r}, not cross_layer_transcoder")
    ours = config.get("nnd", {})
    layers = tuple(ours.get("layers", range(depth)))
    if layers[-1] >= depth:
        raise UserError(f"{path}: config.yaml names layer {layers[-1]} but there are {depth} W_enc files")
    enc = {l: _read(path / f"W_enc_{l}.safetensors") for l in layers}
    dec = {l: _read(path / f"W_dec_{l}.safetensors")[f"W_dec_{l}"] for l in layers}
    first = layers[0]
    n_latents, d_in = enc[first][f"W_enc_{first}"].shape
    d_out = enc[first][f"b_dec_{first}"].shape[0]
    by_hook = {v: k for k, v in HOOKS.items()}
    variant = ours.get("variant") or ("jumprelu" if f"threshold_{first}" in enc[first] else "vanilla")
    cfg = CLTConfig(variant=variant, k=ours.get("k", 1), d_in=d_in, d_out=d_out, n_latents=n_latents, layers=layers,
                    input_hook=ours.get("input_hook", by_hook.get(config["feature_input_hook"], config["feature_input_hook"])),
                    target_hook=ours.get("target_hook", by_hook.get(config["feature_output_hook"], config["feature_output_hook"])),
                    settings=SparsitySettings(**ours.get("settings", {})))
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        for p, l in enumerate(layers):
            want = clt.W_dec[p].shape[1]
            if dec[l].shape[0] != n_latents or dec[l].shape[1] < want:
                raise UserError(f"{path}: W_dec_{l} has shape {tuple(dec[l].shape)}, expected [{n_latents}, >= {want}, ...]")
            clt.W_enc[p].copy_(enc[l][f"W_enc_{l}"])
            clt.b_enc[p].copy_(enc[l][f"b_enc_{l}"])
            clt.b_dec[p].copy_(enc[l][f"b_dec_{l}"])
            clt.W_dec[p].copy_(dec[l][:, :want])
            if variant in THRESHOLDED:
                _set_thresholds(clt, p, enc[l][f"threshold_{l}"])
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
