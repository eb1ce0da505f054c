"""The MLP's own hidden units as a decomposition: the baseline every dictionary should beat.

Nothing to train: the evaluator splices it (``pipeline.eval.baselines``) by
keeping each token's k hidden units of largest |activation| and applying the
real output projection. Its Pareto axes count, per kept unit, every weight it
touches: a row of gate and up (gated MLPs) and a column of down.
"""

from __future__ import annotations

from pipeline.methods.base import MethodSpec


class NeuronsSpec(MethodSpec):
    name = "neurons"
    order = 5
