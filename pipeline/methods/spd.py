"""Stochastic Parameter Decomposition (SPD) of each gated MLP's weights: the baseline that
decomposes parameters, not activations (Bushnaq, Braun & Sharkey 2025, "Stochastic
Parameter Decomposition"; our implementation, read against the paper and goodfire-ai/spd).

Each of the MLP's three matrices W (gate and up: [d_mlp, d]; down: [d, d_mlp]) is written as
C rank-one subcomponents, W^T ~ sum_c V[:, c] U[c, :]. A subcomponent's *causal importance*
g_c(x) in [0, 1] is predicted per token by its own small network from its inner activation
(the true input of its matrix read along V[:, c]): Gamma_c(h) = w2 . gelu(w1 h + b1) + b2,
hidden width ``ci_hidden``; the down matrix's input is the true MLP hidden activation.

Losses (per batch, model units normalised so a median target row has norm sqrt(d)):

- **faithfulness**: sum over matrices ||W^T - V U||^2 / sum ||W||^2, times ``faithfulness_coef``;
- **stochastic reconstruction**: the MLP run with every subcomponent scaled by a mask
  m = g + (1 - g) r, r ~ U(0, 1) per token and subcomponent (``n_mask_samples`` draws), must
  match the true MLP output (the store's ``mlp_out``): the transcoders' capped MSE;
- **importance minimality**: coef x mean over tokens of sum_c (g_c^upper + eps)^p, p =
  ``pnorm``; the coefficient follows a controller to the target L0 = K, as vanilla's L1
  does (``pipeline.methods.sparsity``): log coef += rate x clip((L0 - K) / K, -1, 1).

g is a hard sigmoid of Gamma, leaky below 0 where it forms masks (so a wrongly silenced
subcomponent still gets a gradient) and leaky above 1 where it is penalised, as in the paper.
The masked forward is cheap with rank-one pieces: ((x @ V) * mask) @ U.

At evaluation a subcomponent is active iff Gamma_c(h) > ``threshold``, set after training on
training rows so that the mean number of active subcomponents per token over the MLP's three
matrices is exactly K (``L0Calibrator``, as BatchTopK's threshold); inactive ones are masked
out (mask 0), active ones kept whole (mask 1). The decomposition's "latents" are these masks
([rows, 3C], gate | up | down), so ablating a latent removes its subcomponent.

The reconstruction term is the run with all three matrices masked; with ``layerwise`` (off
by default) it also averages in the paper's layerwise term, each matrix masked alone with the
other two at their true weights, which gives each matrix's importances their own signal.

Initialisation: the leading singular pairs of each W (C >= rank gives the exact matrix, so
faithfulness starts at 0 and short runs need not find the weights first); subcomponents
beyond the rank start small and random. Left out (stated in the README): annealing p, and
the weight-delta mask of later goodfire-ai/spd versions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.core.errors import UserError
from pipeline.core.layers import layers_label
from pipeline.methods.base import (MethodSpec, StepOutput, TrainJob, TrainRequest, member_seed, one_per_layer,
                                   parameter_count)
from pipeline.methods.calibration import L0Calibrator
from pipeline.methods.coder import CoderConfig, robust_scales
from pipeline.methods.losses import MASSIVE_FACTOR, capped_mse, fvu_metrics
from pipeline.methods.transcoder import LayerwiseDecomposition

MATRICES = ("gate", "up", "down")
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda h: F.gelu(h, approximate="tanh")}
LEAK = 0.01  # slope of the hard sigmoid's leaky side
EXTRA_INIT_SCALE = 1e-2  # subcomponents beyond the rank start at this fraction of the mean singular value


@dataclass(frozen=True)
class SPDConfig(CoderConfig):
    layer: int = 0
    d_mlp: int = 0
    act: str = "silu"
    ci_hidden: int = 16  # hidden width of each subcomponent's causal-importance network
    n_mask_samples: int = 1  # stochastic masks drawn per batch
    # the paper's layerwise term: also each matrix masked alone, the others at their true weights.
    # Off by default: it makes a step ~2.5x dearer, and CPU budgets are short (on the planted
    # MLP of tests/test_spd.py it raised the worst recovered piece's cosine from 0.89 to 0.96)
    layerwise: bool = False
    faithfulness_coef: float = 1e3
    importance_coef_init: float = 1e-3
    pnorm: float = 1.0
    controller_rate: float = 0.02
    # The importance networks learn this many times faster than U and V (``fit`` reads a
    # parameter's ``lr_scale``): at the weights' rate (2e-3) a 100-step run could move their
    # biases by ~0.2, and SmolLM2 runs of 98 steps ended with ~1400 of 1728 subcomponents
    # important per token against a target of 16-32.
    ci_lr_scale: float = 10.0

    METHOD = "spd"

    def __post_init__(self):
        super().__post_init__()
        if self.n_latents % len(MATRICES):
            raise UserError(f"SPD splits its {self.n_latents} latents evenly over {', '.join(MATRICES)}; "
                            f"use LATENTS divisible by {len(MATRICES)}")
        if self.d_mlp <= 0 or self.act not in ACTIVATIONS:
            raise UserError(f"SPD needs d_mlp > 0 and an activation in {', '.join(ACTIVATIONS)}, got {self.d_mlp}, {self.act}")
        if self.ci_hidden <= 0 or self.n_mask_samples <= 0 or not self.pnorm > 0:
            raise UserError("SPD: ci_hidden, n_mask_samples and pnorm must be positive")

    @property
    def components(self) -> int:
        """C: subcomponents per matrix."""
        return self.n_latents // len(MATRICES)

    @property
    def name(self) -> str:
        return f"spd-k{self.k}-L{self.layer}"

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each matrix."""
        return {"gate": (self.d_in, self.d_mlp), "up": (self.d_in, self.d_mlp), "down": (self.d_mlp, self.d_out)}


def lower_leaky(z: Tensor) -> Tensor:
    return torch.where(z < 0, LEAK * z, z.clamp(max=1))


def upper_leaky(z: Tensor) -> Tensor:
    return torch.where(z > 1, 1 + LEAK * (z - 1), z.clamp(min=0))


class SPDLayer(nn.Module):
    """One MLP's decomposition: a ``Trainable`` and, on its own layer, a ``Decomposition`` piece."""

    family = "spd"

    def __init__(self, cfg: SPDConfig, weights: dict[str, Tensor] | None = None):
        super().__init__()
        self.cfg = cfg
        C, H = cfg.components, cfg.ci_hidden
        shapes = cfg.shapes()
        # the target weights, transposed to [d_in, d_out]: frozen, saved with the checkpoint
        for m, (d_in, d_out) in shapes.items():
            self.register_buffer(f"W_{m}", torch.zeros(d_in, d_out))
        self.V = nn.ParameterDict({m: nn.Parameter(torch.zeros(d_in, C)) for m, (d_in, _) in shapes.items()})
        self.U = nn.ParameterDict({m: nn.Parameter(torch.zeros(C, d_out)) for m, (_, d_out) in shapes.items()})
        gen = torch.Generator().manual_seed(cfg.seed)
        self.ci_w1 = nn.ParameterDict({m: nn.Parameter(torch.randn(C, H, generator=gen)) for m in MATRICES})
        self.ci_b1 = nn.ParameterDict({m: nn.Parameter(torch.randn(C, H, generator=gen) * 0.1) for m in MATRICES})
        self.ci_w2 = nn.ParameterDict({m: nn.Parameter(torch.randn(C, H, generator=gen) / math.sqrt(H)) for m in MATRICES})
        self.ci_b2 = nn.ParameterDict({m: nn.Parameter(torch.full((C,), 0.5)) for m in MATRICES})
        for p in (*self.ci_w1.values(), *self.ci_b1.values(), *self.ci_w2.values(), *self.ci_b2.values()):
            p.lr_scale = cfg.ci_lr_scale
        self.register_buffer("threshold", torch.tensor(0.0))  # on Gamma: active iff Gamma > threshold
        self.register_buffer("log_coef", torch.tensor(math.log(cfg.importance_coef_init)))
        self.register_buffer("target_scale", torch.tensor(1.0))
        self.register_buffer("massive_norm", torch.tensor(float("inf")))
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.n_latents, dtype=torch.int64))
        if weights is not None:
            self.set_weights(weights)

    # ----- the target weights and the SVD start ----------------------------------------
    @torch.no_grad()
    def set_weights(self, weights: dict[str, Tensor]) -> None:
        """``weights``: {gate, up, down} as [out, in] (HF layout); sets the targets and the SVD init."""
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        C = self.cfg.components
        for m in MATRICES:
            W = weights[m].float().T.contiguous()  # [d_in, d_out]
            if tuple(W.shape) != tuple(getattr(self, f"W_{m}").shape):
                raise UserError(f"SPD {m}: weights of shape {tuple(W.shape)}, expected {tuple(getattr(self, f'W_{m}').shape)}")
            getattr(self, f"W_{m}").copy_(W)
            u, s, vh = torch.linalg.svd(W, full_matrices=False)
            r = min(C, len(s))
            self.V[m][:, :r] = u[:, :r] * s[:r].sqrt()
            self.U[m][:r] = s[:r, None].sqrt() * vh[:r]
            if r < C:
                scale = EXTRA_INIT_SCALE * float(s.mean().sqrt())
                self.V[m][:, r:] = torch.randn(W.shape[0], C - r, generator=gen) * scale / math.sqrt(W.shape[0])
                self.U[m][r:] = torch.randn(C - r, W.shape[1], generator=gen) * scale / math.sqrt(W.shape[1])

    def target_weight(self, m: str) -> Tensor:
        return getattr(self, f"W_{m}")

    # ----- forward pieces ---------------------------------------------------------------
    def act(self, h: Tensor) -> Tensor:
        return ACTIVATIONS[self.cfg.act](h)

    def true_hidden(self, x: Tensor) -> Tensor:
        """The target MLP's hidden activation act(x W_gate) * (x W_up)."""
        return self.act(x @ self.W_gate) * (x @ self.W_up)

    def true_output(self, x: Tensor) -> Tensor:
        return self.true_hidden(x) @ self.W_down

    def gamma(self, x: Tensor) -> dict[str, Tensor]:
        """Pre-sigmoid causal importances {matrix: [rows, C]} from each matrix's true input."""
        inputs = {"gate": x, "up": x, "down": self.true_hidden(x)}
        out = {}
        for m in MATRICES:
            h = inputs[m] @ self.V[m].detach()  # inner activations [rows, C]
            z = F.gelu(h[..., None] * self.ci_w1[m] + self.ci_b1[m])
            out[m] = (z * self.ci_w2[m]).sum(-1) + self.ci_b2[m]
        return out

    def masked_output(self, x: Tensor, masks: dict[str, Tensor]) -> Tensor:
        """The MLP with subcomponent c of matrix m scaled by masks[m][:, c]: ((x V) * mask) U;
        a matrix without a mask keeps its true weights."""
        def apply(m: str, inp: Tensor) -> Tensor:
            if m not in masks:
                return inp @ self.target_weight(m)
            return ((inp @ self.V[m]) * masks[m]) @ self.U[m]

        hidden = self.act(apply("gate", x)) * apply("up", x)
        return apply("down", hidden)

    # ----- the Decomposition piece (model units) ------------------------------------------
    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Binary masks [..., 3C] (gate | up | down): 1 where Gamma > threshold."""
        flat = x.reshape(-1, x.shape[-1]).float()
        g = torch.cat([self.gamma(flat)[m] for m in MATRICES], dim=-1)
        return (g > self.threshold).float().reshape(*x.shape[:-1], self.cfg.n_latents)

    def split(self, acts: Tensor) -> dict[str, Tensor]:
        return dict(zip(MATRICES, acts.reshape(-1, self.cfg.n_latents).float().split(self.cfg.components, dim=-1)))

    def reconstruct(self, acts: Tensor, x: Tensor | None = None) -> Tensor:
        if x is None:
            raise ValueError("an SPD layer's output needs its input rows (the masks only gate its subcomponents)")
        out = self.masked_output(x.reshape(-1, x.shape[-1]).float(), self.split(acts))
        return out.reshape(*x.shape[:-1], self.cfg.d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(self.encode(x), x)

    # ----- Trainable -----------------------------------------------------------------------
    @torch.no_grad()
    def init_from_stats(self, input_stats: dict, target_stats: dict) -> None:
        self.target_scale.fill_((self.cfg.d_out / target_stats["mean_sq_norm"]) ** 0.5)

    @torch.no_grad()
    def init_from_batch(self, x: Tensor, y: Tensor) -> None:
        self.massive_norm.fill_(MASSIVE_FACTOR * y.float().norm(dim=-1).median())
        robust_scales(torch.tensor(1.0), self.target_scale, x, y, self.cfg.d_in, self.cfg.d_out)

    def faithfulness(self) -> Tensor:
        miss = sum((self.target_weight(m) - self.V[m] @ self.U[m]).pow(2).sum() for m in MATRICES)
        return miss / sum(self.target_weight(m).pow(2).sum() for m in MATRICES)

    def training_step(self, x: Tensor, y: Tensor, dead: Tensor | None, with_metrics: bool = True) -> StepOutput:
        x = x.float()
        ts = self.target_scale
        yn = y.float() * ts
        gammas = self.gamma(x)
        lower = {m: lower_leaky(g) for m, g in gammas.items()}
        cap = self.massive_norm * ts if self.cfg.cap_massive_rows else None
        recon = torch.zeros((), device=x.device)
        for _ in range(self.cfg.n_mask_samples):
            masks = {m: g + (1 - g) * torch.rand_like(g) for m, g in lower.items()}
            recon = recon + capped_mse(self.masked_output(x, masks) * ts - yn, yn, cap)
            if self.cfg.layerwise:
                for m in MATRICES:
                    recon = recon + capped_mse(self.masked_output(x, {m: masks[m]}) * ts - yn, yn, cap)
        recon = recon / (self.cfg.n_mask_samples * (1 + len(MATRICES) * self.cfg.layerwise))
        upper = torch.cat([upper_leaky(g) for g in gammas.values()], dim=-1)
        minimality = (upper + 1e-12).pow(self.cfg.pnorm).sum(-1).mean()
        penalty = self.log_coef.exp() * minimality
        faithful = self.cfg.faithfulness_coef * self.faithfulness()
        active = torch.cat([g.detach() > 0 for g in gammas.values()], dim=-1)
        out = StepOutput(recon + penalty + faithful, recon, penalty, faithful, active)
        if with_metrics:
            with torch.no_grad():
                err = self.masked_output(x, {m: (g > 0).float() for m, g in gammas.items()}) * ts - yn
                out.metrics = {"l0": active.sum(-1).float().mean(), **fvu_metrics(err, yn, self.massive_norm * ts),
                               "mse": err.pow(2).sum(-1).mean() / ts**2, "faithfulness": self.faithfulness(),
                               "minimality": minimality.detach()}
        return out

    def after_backward(self) -> None:
        pass

    @torch.no_grad()
    def after_step(self, out: StepOutput, n_tokens: int) -> None:
        l0 = out.codes.sum(-1).float().mean()
        self.log_coef.add_(self.cfg.controller_rate * ((l0 - self.cfg.k) / self.cfg.k).clamp(-1, 1))
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[out.codes.any(0)] = 0

    def dead_mask(self, window_tokens: int) -> Tensor:
        return self.tokens_since_fired >= window_tokens

    def sync_state(self) -> list[Tensor]:
        return [self.tokens_since_fired, self.log_coef]

    # ----- the inference threshold: mean active subcomponents per token = K ------------------
    def start_calibration(self):
        return L0Calibrator(self.cfg.k)

    @torch.no_grad()
    def add_calibration(self, calib: L0Calibrator, x: Tensor) -> None:
        g = self.gamma(x.reshape(-1, x.shape[-1]).float())
        calib.add(torch.cat([g[m] for m in MATRICES], dim=-1))

    def next_calibration_pass(self, calib: L0Calibrator) -> None:
        calib.next_pass()

    @torch.no_grad()
    def finish_calibration(self, calib: L0Calibrator) -> dict:
        self.threshold.fill_(calib.threshold())
        return {"rows": calib.rows, "exact": calib.exact, "threshold": float(self.threshold)}

    def extra_config(self) -> dict[str, float]:
        return {"importance_coef": float(self.log_coef.exp()), "threshold": float(self.threshold)}

    def config_dict(self) -> dict:
        return {"family": self.family, "config": self.cfg.to_dict(), **self.extra_config(),
                "target_scale": float(self.target_scale), "massive_norm": float(self.massive_norm)}


class SPDSpec(MethodSpec):
    """MODEL=spd: one SPD per layer and K; LATENTS = 3C subcomponents (C per matrix)."""

    name = "spd"
    models = {"spd": "spd"}
    order = 40

    def build(self, config: dict) -> nn.Module:
        return SPDLayer(SPDConfig(**config["config"]))

    def jobs(self, request: TrainRequest) -> list[TrainJob]:
        if request.kind != "transcoder":
            raise UserError("MODEL=spd decomposes the MLP's weights (mlp_in -> mlp_out); use KIND=transcoder")
        if request.mlp_weights is None:
            raise UserError("MODEL=spd needs the model's MLP weights; train it with `nnd train` (which loads them)")
        if request.init != "random":
            raise UserError(f"INIT={request.init} is for SAEs and transcoders; SPD starts from the weights' SVD")
        d, n = request.store.d_model, request.n_latents - request.n_latents % len(MATRICES)
        jobs = []
        for layer in request.layers:
            weights = request.mlp_weights(layer)
            for k in request.ks:
                cfg = SPDConfig(k=k, d_in=d, d_out=d, n_latents=n, layer=layer, d_mlp=weights.gate.shape[0],
                                act=weights.act, seed=member_seed(request.seed, "spd", k, layer))
                module = SPDLayer(cfg, {"gate": weights.gate, "up": weights.up, "down": weights.down})
                jobs.append(TrainJob(module, (layer, "mlp_in"), (layer, "mlp_out"), request.out("spd", cfg.name),
                                     metadata={"lm": request.store.manifest["lm"]}))
        return jobs

    def group_key(self, module: nn.Module) -> tuple:
        c = module.cfg
        return (c.k, c.n_latents)

    def combine(self, modules: Sequence[nn.Module]) -> LayerwiseDecomposition:
        """Per-layer SPD modules answer ``encode`` / ``reconstruct`` as transcoders do: latents are
        the subcomponent masks [rows, 3C] (gate | up | down)."""
        return LayerwiseDecomposition(one_per_layer(modules))

    def describe(self, decomposition, modules) -> dict:
        c = modules[0].cfg
        trainable = sum(parameter_count(m) for m in modules)  # the frozen target weights are buffers
        return {"name": f"spd-k{c.k}-n{c.n_latents}-L{layers_label(decomposition.layers)}", "label": "spd",
                "family": "spd", "variant": "spd", "kind": "spd", "k": c.k, "params": trainable,
                # a rank-one subcomponent of any of the three matrices holds d_model + d_mlp weights
                "weights_per_unit": c.d_in + c.d_mlp}
