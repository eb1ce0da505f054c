"""Skip transcoders: a transcoder plus a learned linear map of its input,
y = decode(encode(x)) + W_skip x (Paulo, Shabalin & Belrose 2025, "Transcoders
beat sparse autoencoders for interpretability": lower reconstruction loss at
equal interpretability, since the latents no longer spend capacity on the
MLP's linear part).

MODEL=skip-topk | skip-batchtopk | skip-jumprelu | skip-vanilla. ``W_skip``
starts at zero, so training starts from a plain transcoder. Pareto axes: the
latents are the components; active parameters add the whole ``W_skip``
(d_out x d_in weights touched by every token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from pipeline.core.errors import UserError
from pipeline.methods.base import ParetoAxes, TrainJob, TrainRequest
from pipeline.methods.codes import Codes
from pipeline.methods.sparsity import SPARSITY
from pipeline.methods.transcoder import Transcoder, TranscoderConfig, TranscoderSpec


@dataclass(frozen=True)
class SkipTranscoderConfig(TranscoderConfig):
    METHOD = "skip"


class SkipTranscoder(Transcoder):
    family = "skip"

    def __init__(self, cfg: SkipTranscoderConfig):
        super().__init__(cfg)
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in))  # normalised units

    def _predict(self, xn: Tensor, codes: Codes) -> Tensor:
        return super()._predict(xn, codes) + xn @ self.W_skip.T

    def reconstruct(self, acts: Tensor, x: Tensor | None = None) -> Tensor:
        if x is None:
            raise ValueError("a skip transcoder's reconstruction needs its input rows")
        skip = (x.float() * self.input_scale) @ self.W_skip.T / self.target_scale
        return self.decode(acts) + skip.reshape(*acts.shape[:-1], self.cfg.d_out)


class SkipTranscoderSpec(TranscoderSpec):
    name = "skip"
    models = {f"skip-{v}": v for v in SPARSITY}
    order = 15
    module_class = SkipTranscoder
    config_class = SkipTranscoderConfig

    def model_name(self, variant: str) -> str:
        return f"skip-{variant}"

    def jobs(self, request: TrainRequest) -> list[TrainJob]:
        if request.kind != "transcoder":
            raise UserError("a skip transcoder maps mlp_in to mlp_out (an SAE with a skip path would learn the identity); "
                            "use KIND=transcoder")
        return super().jobs(request)

    def pareto_axes(self, d_model: int, layers: Sequence[int], l0: dict[int, float], mode: str,
                    weights_per_unit: int | None = None) -> ParetoAxes:
        base = super().pareto_axes(d_model, layers, l0, mode)
        skip = d_model * d_model * (len(layers) if mode == "all_layers" else 1)
        return ParetoAxes(base.active_components, base.active_params + skip)
