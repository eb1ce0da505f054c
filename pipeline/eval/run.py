"""Evaluate splices on held-out tokens: what replacing MLPs costs the model.

Every method (a set of per-layer dictionaries, a CLT, a baseline) is spliced
in two modes: ``single_layer`` (one job per layer, the others clean) and
``all_layers`` (one job, every layer replaced at once). A job runs the eval
tokens through the live model with the method's hooks and measures:

- CE of the next-token predictions, ΔCE against the clean model (paired,
  with its standard error over eval windows: predictions within a window
  are correlated), KL(clean || spliced, summed stably in float64), and CE
  recovered against zero- and mean-ablation of the same layers:
  100 (CE_abl - CE) / (CE_abl - CE_clean) (single-layer summaries use the
  CEs averaged over layers, so a cheap-to-ablate layer cannot dominate);
- per replaced layer, against the output the real MLP would have written
  from the live input: MSE (squared error summed over d, mean over rows),
  FVU, FVU on the rows below the massive-activation threshold, L0, alive and
  dead latents, dense latents (firing on >1% / >10% of rows) and the mean
  activation of active latents.

Which tokens: ``EVAL_TOKENS`` rows of the eval split (documents whose text,
or a near-duplicate of it, never enters a training store), packed exactly as
the harvest packs them, windows drawn round-robin over the split's documents
(``pipeline.eval.config.eval_tokens``). A row is
a position 1..ctx-1 of a window (BOS at 0 is never replaced, as in the
stores); CE and KL are over the predictions made at positions 1..ctx-2.

Cost. A SmolLM2 forward runs at a few hundred tokens/s on 2 cores, so
everything that does not depend on the method is computed once per eval set
and cached (``pipeline.eval.reference``). Jobs run batch-major: each batch's
clean log-probabilities are recomputed once from the cached hidden states and
shared by all jobs of the run.

Modules of this package: ``config`` (the eval set), ``methods`` (checkpoints
and baselines as spliceable methods), ``splice`` (hooks), ``baselines``,
``reference`` (the cached clean pass), ``stats`` (streaming statistics),
``run`` (this file: jobs), ``metrics`` (typed results, Pareto axes), ``report``.

Precision. The model runs in fp32 by default. Clean and spliced runs go
through the same code on the same batches, so a splice that changes nothing
reproduces the clean CE bit for bit. ``dtype=bfloat16`` runs the model in
bf16, about 3x faster here; measured on SmolLM2 it moves ΔCE by up to
~0.005 nats against fp32 (3k tokens), comparable to the ΔCE of a good
single-layer splice, so it is an option for quick looks, not the default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from pipeline.core.errors import UserError
from pipeline.core.layers import layers_label
from pipeline.core.progress import progress_bar
from pipeline.eval.config import MODES, EvalConfig
from pipeline.eval.methods import EvalMethod, mean_method, zero_method
from pipeline.eval.metrics import ABLATIONS, MethodMetrics, method_metrics
from pipeline.eval.reference import Reference, batches, reference, save_ablations
from pipeline.eval.splice import final_hidden, logits
from pipeline.eval.stats import CleanBatch, JobStats


@dataclass(frozen=True)
class SpliceJob:
    method: int  # index into the run's methods
    replace: tuple[int, ...]


def run_jobs(lm, ref: Reference, methods: list[EvalMethod], jobs: list[SpliceJob], progress: bool = False) -> dict[SpliceJob, dict]:
    """Run every job over the eval tokens, batch-major (clean log-probs computed once per batch)."""
    stats = {job: JobStats(ref.massive_norm) for job in jobs}
    rows_per_seq = ref.tokens.shape[1] - 1
    bar = progress_bar(ref.tokens.shape[0] * rows_per_seq * len(jobs), progress, f"eval {len(jobs)} splices")
    start = 0
    for batch in batches(ref.tokens, lm.device):
        n = batch.shape[0]
        d = ref.hidden.shape[-1]
        with torch.inference_mode():
            clean = CleanBatch.from_hidden(lm, ref.hidden[start : start + n].to(lm.device), batch[:, 2:].reshape(-1),
                                           ref.ce[start : start + n].reshape(-1).to(lm.device))
            for job in jobs:
                s = stats[job]
                hooks = methods[job.method].splice.hooks(lm, job.replace, s.record)
                h = final_hidden(lm, batch, hooks)[:, 1:-1]
                s.add_predictions(F.log_softmax(logits(lm, h.reshape(-1, d)), dim=-1), clean)
                bar.update(n * rows_per_seq)
        start += n
    bar.close()
    return {job: s.result() for job, s in stats.items()}


# ----- evaluating methods ----------------------------------------------------------

def _jobs_for(index: int, method: EvalMethod, modes: Sequence[str]) -> list[SpliceJob]:
    jobs = []
    if "single_layer" in modes:
        jobs += [SpliceJob(index, (l,)) for l in method.layers]
    if "all_layers" in modes and (len(method.layers) > 1 or "single_layer" not in modes):
        jobs.append(SpliceJob(index, method.layers))
    return jobs


def evaluate_methods(lm, cfg: EvalConfig, methods: list[EvalMethod], modes: Sequence[str] = MODES,
                     progress: bool = False) -> list[MethodMetrics]:
    """Metrics of every method; zero-/mean-ablations missing from the reference are run alongside."""
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UserError(f"MODES {list(modes)} must be a non-empty subset of {', '.join(MODES)}")
    t0 = time.perf_counter()
    ref = reference(lm, cfg, progress)
    methods = list(methods)
    n_requested = len(methods)
    jobs = [job for i, m in enumerate(methods) for job in _jobs_for(i, m, modes)]
    # Ablations every job needs for "CE recovered", unless cached or already planned.
    planned = {(methods[j.method].family, j.replace) for j in jobs}
    needed: dict[str, set[tuple[int, ...]]] = {"zero": set(), "mean": set()}
    for j in list(jobs):
        for family in needed:
            if ref.ablation(family, j.replace) is None and (family, j.replace) not in planned:
                needed[family].add(j.replace)
    for family, replaces in needed.items():
        if not replaces:
            continue
        layers = sorted({l for r in replaces for l in r})
        method = zero_method(lm, layers) if family == "zero" else mean_method(lm, cfg, layers)
        methods.append(method)
        jobs += [SpliceJob(len(methods) - 1, r) for r in sorted(replaces)]
    # Ablation jobs already in the reference are not run again.
    cached = {j: ref.ablation(methods[j.method].family, j.replace) for j in jobs
              if methods[j.method].family in ABLATIONS and ref.ablation(methods[j.method].family, j.replace)}
    results = run_jobs(lm, ref, methods, [j for j in jobs if j not in cached], progress)
    found: dict[str, dict[str, dict]] = {}
    for job, r in results.items():
        family = methods[job.method].family
        if family in ABLATIONS:
            found.setdefault(family, {})[layers_label(job.replace)] = r
    if found:
        save_ablations(cfg, ref, found)
    results |= cached
    seconds = time.perf_counter() - t0
    out = []
    for i, method in enumerate(methods[:n_requested]):
        mine = {job.replace: r for job, r in results.items() if job.method == i}
        out.append(method_metrics(lm, cfg, ref, method, mine, modes, seconds))
    return out


def evaluate_and_write(lm, cfg: EvalConfig, methods: list[EvalMethod], modes: Sequence[str] = MODES,
                       progress: bool = False, out=None) -> list[tuple[MethodMetrics, object]]:
    """``evaluate_methods``, then each ``metrics.json``; fails before the work when an output
    cannot be written, and holds a lock on every output so two evaluations of the same
    method cannot run at once (the second names the holder)."""
    from pathlib import Path

    from pipeline.core.io import check_writable, exclusive_locks
    from pipeline.eval.metrics import metrics_path, write_metrics

    targets = [Path(out) if out is not None else metrics_path(cfg, m.name) for m in methods]
    for target in targets:
        check_writable(target.parent, 1 << 20, "the evaluation")
    locks = [t.with_name(f".{t.name}.lock") for t in targets]
    with exclusive_locks(locks, lambda p: f"evaluation {p.with_name(p.name[1:-5])}"):
        results = evaluate_methods(lm, cfg, methods, modes, progress)
        return [(m, write_metrics(cfg, m, out)) for m in results]
