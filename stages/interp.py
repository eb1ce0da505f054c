"""`nnd autointerp`, `nnd faithfulness`, `nnd tail`, `nnd emergence`, `nnd judge-server` (issue 12).

Each result is cached per method under ``paths.interp_dir(...)/<analysis>/<method>/result.json`` with
the identity it was computed from (checkpoint, store, settings, judge) and reused while that holds; the
tables and figures (from every cached method with the same settings) go to the run's report folder,
``<eval dir>/report/interp/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, List, Optional

import typer

from pipeline.core import defaults
from pipeline.core.errors import UserError
from stages.common import cached, gathered, plain, stage

CKPT_HELP = "checkpoint directory, folder of checkpoints, or quoted glob (repeatable)"


class Setup:
    """The model, the methods of ``ckpt`` (one per checkpoint directory), the store and the output folders."""

    def __init__(self, ckpt: List[Path], data_dir: Path, eval_tokens: int, lm: Optional[str] = None):
        from pipeline.core import paths
        from pipeline.data.store import HarvestStore
        from pipeline.eval.config import EvalConfig, load_model
        from pipeline.eval.methods import checkpoint_dirs, checkpoint_origin
        from pipeline.features.extract import load_method

        self.dirs = checkpoint_dirs(ckpt)
        if not self.dirs:
            raise UserError(f"no finished checkpoint in {', '.join(map(str, ckpt))}")
        origin = checkpoint_origin(ckpt)
        if not {"lm", "data", "ctx"} <= set(origin):
            raise UserError(f"checkpoint {self.dirs[0]} records no training store (lm, data, ctx); retrain it")
        self.cfg = EvalConfig(lm=lm or origin["lm"], data=origin["data"], ctx=int(origin["ctx"]),
                              eval_tokens=eval_tokens, data_dir=data_dir)
        self.lm = load_model(self.cfg)
        self.methods = [(d, load_method(self.lm, d)) for d in self.dirs]
        self.store_path = paths.store(data_dir, self.cfg.lm, self.cfg.data, "train", self.cfg.ctx)
        self.store = HarvestStore.open(self.store_path)
        self.root = paths.interp_dir(data_dir, self.cfg.lm, self.cfg.data, self.cfg.ctx)
        self.report = paths.report_dir(self.cfg.out_dir) / "interp"

    def identity(self, method) -> dict:
        return {"checkpoints": method.info.get("checkpoints"), "train": method.info.get("train"),
                "store": self.store.content_hash, "lm_weights_sha256": self.lm.weights_sha256}


def _print(paths) -> None:
    for p in paths:
        print(p)


@stage
def autointerp(
    ckpt: List[Path] = typer.Option(..., help=CKPT_HELP),
    judge: str = typer.Option(defaults.JUDGE, help="local (the bundled chat model, offline) | openai (NND_JUDGE_* env)"),
    latents: int = typer.Option(defaults.AUTOINTERP_LATENTS, help="alive latents explained and scored per checkpoint"),
    token_latents: int = typer.Option(defaults.AUTOINTERP_TOKEN_LATENTS, help="token-identity control latents (0: none)"),
    rows: int = typer.Option(defaults.FEATURE_TOKENS, help="store rows the features pass scans (0 = all)"),
    seed: int = typer.Option(defaults.SEED, help="seed of the latent sample, contexts and shuffles"),
    eval_tokens: int = typer.Option(defaults.EVAL_TOKENS, help="names the run's report folder (eval set)"),
    data_dir: Path = typer.Option(Path(defaults.DATA_DIR), help="root of all stage outputs"),
    force: bool = typer.Option(False, help="recompute even when a cached result matches"),
    progress: bool = typer.Option(True, help="show progress bars"),
):
    """Explain a sample of latents, score detection / fuzzing (judge log-probs) and intruders, with controls."""
    from pipeline.analysis import autointerp as ai
    from pipeline.analysis.interp_report import write_autointerp
    from pipeline.analysis.judge import make_judge
    from pipeline.features.examples import FeatureConfig, read_features
    from pipeline.features.extract import build_features, target_for

    cfg = ai.AutointerpConfig(latents=latents, token_latents=token_latents, seed=seed)
    s = Setup(ckpt, data_dir, eval_tokens)
    the_judge = make_judge(judge, s.lm)
    params = {"config": cfg.__dict__, "judge": the_judge.name}
    for d, method in s.methods:
        target = target_for(d, data_dir)
        build_features(s.lm, target, FeatureConfig(rows=rows, seed=seed))
        tensors, meta = read_features(target.features)
        result, hit = cached(s.root / "autointerp" / method.name / "result.json",
                             {**s.identity(method), "features": meta["identity_hash"]}, params,
                             lambda: ai.run(the_judge, s.lm.tokenizer, method.splice.decomposition, s.store, tensors,
                                            meta, cfg, progress), force)
        summary = result["sets"]["method"]["summary"]
        print(f"autointerp: {method.name}: {'cached' if hit else 'done'}; detection AUROC "
              f"{summary['detection_auroc']['mean']:.3f}, fuzzing AUROC {summary['fuzzing_auroc']['mean']:.3f}, "
              f"intruder {summary['intruder_accuracy']['mean'] if summary['intruder_accuracy'] else float('nan'):.3f} "
              f"(chance {result['chance_intruder']:.2f})")
        print(f"autointerp: {result['verdict']['statement']}")
    _print(write_autointerp(gathered(s.root / "autointerp", "result.json", params, [m.name for _, m in s.methods]), s.report))


@stage
def faithfulness(
    ckpt: List[Path] = typer.Option(..., help=CKPT_HELP),
    rows: int = typer.Option(defaults.JACOBIAN_ROWS, help="store rows (tokens) at which the Jacobians are compared"),
    probes: int = typer.Option(defaults.JACOBIAN_PROBES, help="random output directions (0 = exact full Jacobians)"),
    effects: int = typer.Option(defaults.EFFECT_DRAWS, help="latent ablations compared with direction removals"),
    neurons: bool = typer.Option(True, help="also the neuron baseline (the MLP keeping its top-k hidden units) at the method's k"),
    seed: int = typer.Option(defaults.SEED, help="seed of the probes and draws"),
    eval_tokens: int = typer.Option(defaults.EVAL_TOKENS, help="held-out tokens the feature effects are drawn from"),
    data_dir: Path = typer.Option(Path(defaults.DATA_DIR), help="root of all stage outputs"),
    force: bool = typer.Option(False, help="recompute even when a cached result matches"),
    progress: bool = typer.Option(True, help="show progress bars"),
):
    """Jacobian cosine (replacement vs true MLP) per layer, and feature-effect agreement."""
    from pipeline.analysis import faithfulness as fa
    from pipeline.analysis.interp_report import write_faithfulness
    from pipeline.eval.reference import reference

    if rows < 1 or probes < 0 or effects < 0:
        raise UserError(f"rows={rows} must be >= 1, probes={probes} and effects={effects} >= 0")
    s = Setup(ckpt, data_dir, eval_tokens)
    ref = reference(s.lm, s.cfg, progress)
    params = {"rows": rows, "probes": probes, "effects": effects, "seed": seed, "eval_tokens": eval_tokens,
              "neurons": neurons}
    for _, method in s.methods:
        d = method.splice.decomposition
        if d.input_hook != "mlp_in":
            raise UserError(f"{method.name} reads {d.input_hook}, not the MLP input: faithfulness compares "
                            f"transcoders and CLTs with the MLP they replace")
        result, hit = cached(s.root / "faithfulness" / method.name / "result.json", s.identity(method), params,
                             lambda: fa.run(s.lm, d, s.store, ref.tokens, rows, probes, effects, seed, progress,
                                            neuron_k=method.k if neurons else None), force)
        per_layer = ", ".join(f"L{l} {v['jacobian_cosine']['mean']:.3f}" + (
            f" (neurons k={method.k}: {v['neurons_jacobian_cosine']['mean']:.3f})" if "neurons_jacobian_cosine" in v else "")
            for l, v in result["layers"].items())
        e = result["feature_effects"]
        print(f"faithfulness: {method.name}: {'cached' if hit else 'done'}; Jacobian cosine {per_layer}; "
              f"top-increase agreement {e['top_increase_agreement']} over {e['draws']} draws")
    _print(write_faithfulness(gathered(s.root / "faithfulness", "result.json", params, [m.name for _, m in s.methods]), s.report))


@stage
def tail(
    ckpt: List[Path] = typer.Option(..., help=CKPT_HELP),
    eval_tokens: int = typer.Option(defaults.EVAL_TOKENS, help="held-out tokens, rounded up to whole windows"),
    data_dir: Path = typer.Option(Path(defaults.DATA_DIR), help="root of all stage outputs"),
    force: bool = typer.Option(False, help="recompute even when a cached result matches"),
    progress: bool = typer.Option(True, help="show progress bars"),
):
    """Massive activation rows (tokens, positions, dims) and each method's FVU / ΔCE split, error by norm."""
    from pipeline.analysis import tail as tl
    from pipeline.analysis.interp_report import write_tail
    from pipeline.eval.reference import reference

    s = Setup(ckpt, data_dir, eval_tokens)
    ref = reference(s.lm, s.cfg, progress)
    params = {"eval_tokens": eval_tokens, "buckets": tl.N_BUCKETS}
    for _, method in s.methods:
        d = method.splice.decomposition
        result, hit = cached(s.root / f"tail-t{eval_tokens}" / method.name / "result.json", s.identity(method), params,
                             lambda: tl.run(s.lm, ref, [(method.name, d)], list(d.layers), progress), force)
        for l, entry in result["layers"].items():
            f, c = entry["methods"][method.name]["fvu"], entry["methods"][method.name]["dce"]
            print(f"tail: {method.name} L{l}: {100 * entry['massive']['massive_fraction']:.2f}% rows massive, "
                  f"{100 * entry['massive']['massive_variance_share']:.1f}% of variance; FVU {f['fvu']:.4f} = "
                  f"{f['fvu_massive']:.4f} massive + {f['fvu_ordinary']:.4f} ordinary; ΔCE {c['dce']:.4f} = "
                  f"{c['dce_massive_only']:.4f} + {c['dce_ordinary_only']:.4f} + {c['dce_interaction']:+.4f} interaction"
                  + (" (cached)" if hit else ""))
    merged = {"massive_factor": ref.info.get("massive_factor"), "layers": {}}
    for name, result in gathered(s.root / f"tail-t{eval_tokens}", "result.json", params, [m.name for _, m in s.methods]).items():
        for l, entry in result["layers"].items():
            slot = merged["layers"].setdefault(l, {"massive": entry["massive"], "methods": {}})
            slot["methods"] |= entry["methods"]
    merged["layers"] = dict(sorted(merged["layers"].items(), key=lambda kv: int(kv[0])))
    _print(write_tail(merged, s.report))


@stage
def emergence(
    ckpt: Path = typer.Option(..., help="one checkpoint trained with snapshots (SNAPSHOT_TOKENS)"),
    threshold: float = typer.Option(defaults.MATCH_COSINE, help="cosine at which two decoder directions match"),
    clusters: int = typer.Option(defaults.CLUSTERS, help="k-means clusters of the final decoder directions"),
    layer: Optional[int] = typer.Option(None, help="source layer of the latents (default: the first)"),
    rows: int = typer.Option(defaults.FEATURE_TOKENS, help="store rows the features pass scans (0 = all)"),
    seed: int = typer.Option(defaults.SEED, help="seed of k-means and the map"),
    eval_tokens: int = typer.Option(defaults.EVAL_TOKENS, help="names the run's report folder (eval set)"),
    data_dir: Path = typer.Option(Path(defaults.DATA_DIR), help="root of all stage outputs"),
    progress: bool = typer.Option(True, help="show progress bars"),
):
    """Matched / born / died latents across training snapshots; 2-D map and clusters of the final directions."""
    from pipeline import checkpoint
    from pipeline.analysis import emergence as em
    from pipeline.analysis.interp_report import write_emergence
    from pipeline.features.examples import FeatureConfig, read_features
    from pipeline.features.extract import build_features, target_for
    from pipeline.features.logit_effects import decoder_directions

    if not 0 < threshold <= 1 or clusters < 1:
        raise UserError(f"threshold={threshold} must be in (0, 1] and clusters={clusters} >= 1")
    s = Setup([ckpt], data_dir, eval_tokens)
    (d, method), = s.methods
    source = layer if layer is not None else min(i for j in method.splice.decomposition.layers
                                                 for i in method.splice.decomposition.sources(j))
    loaded = checkpoint.load(d)
    trajectory = em.trajectory(loaded, source, threshold, s.lm.d_model, progress)
    target = target_for(d, data_dir)
    build_features(s.lm, target, FeatureConfig(rows=rows, seed=seed))
    tensors, meta = read_features(target.features)
    dirs = decoder_directions(method.splice.decomposition, source, s.lm.d_model)
    coords, how = em.project_2d(dirs, seed)
    labels = em.kmeans(dirs, clusters, seed)
    center = meta["context_offsets"].index(0)
    freq = tensors[f"L{source}.frequency"]
    result = {"threshold": threshold, "source_layer": source, "trajectory": trajectory, "projection": how,
              "matching": "greedy maximum-cosine one-to-one matching of alive latents (mutual best pairs, round by round)",
              "clusters": em.cluster_tokens(labels, tensors[f"L{source}.top_ctx_tok"], center, freq, meta["tokens"])}
    from pipeline.core.io import write_json_atomic

    out = s.root / "emergence" / method.name
    write_json_atomic(out / "result.json", plain(result))
    for r in trajectory:
        print(f"emergence: {r['tokens_before']}->{r['tokens']} tokens: {r['matched']} matched, {r['born']} born, "
              f"{r['died']} died (alive {r['alive_before']}->{r['alive_after']})")
    _print(write_emergence(method.name, result, coords, freq.numpy(), labels.numpy(), s.report / "emergence" / method.name))


@stage
def judge_server(
    lm: str = typer.Option(defaults.LM, help="bundled chat model to serve"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port (0: any free one; the chosen URL is printed)"),
    data_dir: Path = typer.Option(Path(defaults.DATA_DIR), help="root of all stage outputs (models/)"),
):
    """Serve a bundled chat model as an OpenAI-compatible /v1/chat/completions endpoint (with logprobs)."""
    from pipeline.analysis.judge_server import serve

    serve(lm, data_dir, host, port)
