"""`nnd ablate-topics`, `nnd steer`: the topic experiments on a labelled corpus (BBC by default)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pipeline.core import defaults
from pipeline.core.errors import UserError
from stages.common import cached, gathered, parse_ints, parse_numbers, stage

CKPT_HELP = "checkpoint directory, folder of checkpoints, or quoted glob (repeatable)"
LABEL_HELP = "label field of a local .jsonl/.parquet corpus (BBC brings its own topics)"


def _ns(text: str) -> list[int]:
    ns = sorted(set(parse_ints(text, "TOPIC_N")))
    if ns[0] <= 0:
        raise UserError(f"TOPIC_N='{text}' must hold positive numbers of units, e.g. 1,4,16,64")
    return ns


class Setup:
    """What both experiments share: the labelled documents, the model, each method's units and selection."""

    def __init__(self, ckpt, lm, data, ctx, eval_tokens, data_dir, text_field, label_field, topics, pool,
                 topic_tokens, neurons, progress):
        from pipeline.core import paths
        from pipeline.data import corpora
        from pipeline.eval.config import EvalConfig, load_model
        from pipeline.eval.methods import checkpoint_origin, load_checkpoints
        from pipeline.analysis.topics import POOLS, topic_names
        from pipeline.analysis.units import decomposition_units, neuron_units

        if pool not in POOLS:
            raise UserError(f"POOL={pool} must be one of {', '.join(POOLS)}")
        if topic_tokens <= 0:
            raise UserError(f"TOPIC_TOKENS={topic_tokens} must be a positive number of training rows")
        origin = checkpoint_origin(ckpt)
        self.cfg = EvalConfig(lm=lm or origin.get("lm", defaults.LM), data=data or origin.get("data", defaults.DATA),
                              ctx=ctx or origin.get("ctx", defaults.CTX), eval_tokens=eval_tokens, data_dir=data_dir,
                              text_field=text_field)
        cfg = self.cfg
        self.train_docs = corpora.labelled(cfg.data, "train", text_field, label_field)
        self.eval_docs = corpora.labelled(cfg.data, "eval", text_field, label_field)
        wanted = [t for t in (topics or "").split(",") if t]
        self.topics = topic_names([d.label for d in self.train_docs], wanted)
        self.label_field = label_field
        self.root = paths.analysis_dir(data_dir, cfg.lm, cfg.data, cfg.ctx)
        self.lm = load_model(cfg)
        methods = load_checkpoints(self.lm, ckpt)
        self.units = [decomposition_units(m) for m in methods]
        if neurons:  # each method's own layers: a transcoder at layer 3 against layer 3's neurons
            baselines = {}
            for u in self.units:
                baselines.setdefault(u.layers, neuron_units(self.lm, u.layers))
            self.units += list(baselines.values())
        self.pool, self.topic_tokens, self.progress = pool, topic_tokens, progress

    def selections(self):
        from pipeline.core import paths
        from pipeline.data.store import HarvestStore
        from pipeline.analysis.topics import cached_selection, select_units

        cfg = self.cfg
        location = paths.store(cfg.data_dir, cfg.lm, cfg.data, "train", cfg.ctx)
        layers = sorted({l for u in self.units for l in u.layers})
        store = HarvestStore.open(location, layers=layers, hooks=sorted({u.input_hook for u in self.units}))
        if store.manifest.get("lm_weights_sha256") != self.lm.weights_sha256:
            raise UserError(f"the training store {location} was harvested from other weights than {cfg.lm}; "
                            f"the topic selection reads the store of the evaluated model (harvest it again)")
        labels = [d.label for d in self.train_docs]
        self.params = {"store": store.content_hash, "pool": self.pool, "rows": min(self.topic_tokens, store.n_rows),
                       "topics": self.topics, "label_field": self.label_field}
        out = []
        for units in self.units:
            identity = {"units": units.identity, "name": units.name, **self.params}
            sel = cached_selection(self.root / units.name, identity, lambda u=units: select_units(
                u, store, labels, self.topics, self.topic_tokens, self.pool, self.progress))
            out.append((units, sel, identity))
        return out


def _flat(by_method: dict) -> list:
    return [row for rows in by_method.values() for row in rows]


COMMON = dict(
    lm=typer.Option(None, help="target model (default: the one the checkpoint was trained on)"),
    data=typer.Option(None, help="labelled corpus (default: the checkpoint's; BBC has topics)"),
    ctx=typer.Option(None, help="context length (default: the checkpoint's)"),
)


@stage
def ablate_topics(
    ckpt: List[Path] = typer.Option(..., help=CKPT_HELP),
    n: str = typer.Option(defaults.TOPIC_N, help="numbers of top-AUROC units ablated per topic (comma list)"),
    topics: str = typer.Option(defaults.TOPICS, help="topics to ablate (comma list; empty: all)"),
    pool: str = typer.Option(defaults.POOL, help="per-document activation: mean or max over its tokens"),
    topic_tokens: int = typer.Option(defaults.TOPIC_TOKENS, help="training-store rows read to select the units"),
    eval_tokens: int = typer.Option(defaults.EVAL_TOKENS, help="held-out tokens, rounded up to whole windows"),
    neurons: bool = typer.Option(True, help="also run the neuron baseline on each method's layers"),
    seed: int = typer.Option(defaults.SEED, help="seed of the random-units control"),
    lm: Optional[str] = COMMON["lm"], data: Optional[str] = COMMON["data"], ctx: Optional[int] = COMMON["ctx"],
    text_field: str = typer.Option("text", help="text field of a local .jsonl/.parquet corpus"),
    label_field: Optional[str] = typer.Option(None, help=LABEL_HELP),
    data_dir: Path = typer.Option(Path(defaults.DATA_DIR), help="root of all stage outputs"),
    out_dir: Optional[Path] = typer.Option(None, help="table and plot folder (default: <analysis>/ablate-t<eval-tokens>/report)"),
    progress: bool = typer.Option(True, help="show progress bars"),
):
    """Zero each topic's top-n units (error added back) on held-out documents: ΔCE on the topic vs the others."""
    from pipeline.core.hashing import canonical_hash
    from pipeline.analysis.report import write_ablation
    from pipeline.analysis.topics import ablate_topics as run, rows_from_json, rows_to_json, topic_eval

    ns = _ns(n)
    s = Setup(ckpt, lm, data, ctx, eval_tokens, data_dir, text_field, label_field, topics, pool, topic_tokens,
              neurons, progress)
    ev = topic_eval(s.lm, s.cfg, [d.label for d in s.eval_docs], s.topics, progress)
    folder = s.root / f"ablate-t{eval_tokens}"
    read = 0
    selections = s.selections()
    params = {**s.params, "n": ns, "seed": seed, "lm_weights_sha256": s.lm.weights_sha256,
              "eval_tokens": canonical_hash(ev.tokens.tolist())}
    for units, sel, sel_identity in selections:
        read = sel.rows
        _, hit = cached(folder / units.name / "ablation.json", sel_identity, params,
                        lambda: run(s.lm, ev, units, sel, ns, seed, progress),
                        key="rows", to_json=rows_to_json, from_json=rows_from_json)
        print(f"ablate-topics: {units.name}: {'cached' if hit else 'done'}")
    rows = _flat(gathered(folder, "ablation.json", params, [u.name for u, _, _ in selections], "rows", rows_from_json))
    caption = (f"{s.cfg.lm} · {s.cfg.data} · ctx {s.cfg.ctx} · {ev.tokens.shape[0]} held-out windows, topics in turn "
               f"({eval_tokens} tokens) · units chosen by AUROC of the {pool} activation per document over "
               f"{read} training rows")
    for path in write_ablation(rows, out_dir or folder / "report", caption):
        print(path)


@stage
def steer(
    ckpt: List[Path] = typer.Option(..., help=CKPT_HELP),
    alphas: str = typer.Option(defaults.ALPHAS, help="steering strengths α, in units of the unit's max |activation|"),
    mode: str = typer.Option(defaults.STEER_MODE, help="add (α·max added at every position) or clamp (set to α·max)"),
    prompts: int = typer.Option(defaults.PROMPTS, help="how many of the fixed neutral prompts"),
    new_tokens: int = typer.Option(defaults.NEW_TOKENS, help="greedy tokens generated per prompt"),
    concept: float = typer.Option(defaults.CONCEPT, help="the concept score whose first α is reported"),
    topics: str = typer.Option(defaults.TOPICS, help="topics to steer toward (comma list; empty: all)"),
    pool: str = typer.Option(defaults.POOL, help="per-document activation of the selection: mean or max"),
    topic_tokens: int = typer.Option(defaults.TOPIC_TOKENS, help="training-store rows read to select the units"),
    neurons: bool = typer.Option(True, help="also steer with the neuron baseline on each method's layers"),
    lm: Optional[str] = COMMON["lm"], data: Optional[str] = COMMON["data"], ctx: Optional[int] = COMMON["ctx"],
    text_field: str = typer.Option("text", help="text field of a local .jsonl/.parquet corpus"),
    label_field: Optional[str] = typer.Option(None, help=LABEL_HELP),
    data_dir: Path = typer.Option(Path(defaults.DATA_DIR), help="root of all stage outputs"),
    out_dir: Optional[Path] = typer.Option(None, help="table and plot folder (default: <analysis>/steer/report)"),
    progress: bool = typer.Option(True, help="show progress bars"),
):
    """Steer greedy generations from neutral prompts with each topic's top unit; concept vs fluency per α."""
    from pipeline.core import paths
    from pipeline.analysis.classifier import trained
    from pipeline.analysis.report import write_steering
    from pipeline.analysis.steering import MODES, NEUTRAL_PROMPTS, check_alphas, rows_from_json, rows_to_json
    from pipeline.analysis.steering import steer as run

    sweep = check_alphas(parse_numbers(alphas, "ALPHAS", float, "0,2,4,8"))
    if mode not in MODES:
        raise UserError(f"STEER_MODE={mode} must be one of {', '.join(MODES)}")
    if not 1 <= prompts <= len(NEUTRAL_PROMPTS):
        raise UserError(f"PROMPTS={prompts} must be in 1..{len(NEUTRAL_PROMPTS)} (the fixed neutral prompts)")
    if new_tokens <= 0:
        raise UserError(f"NEW_TOKENS={new_tokens} must be positive")
    if not 0 < concept < 1:
        raise UserError(f"CONCEPT={concept} must be a probability between 0 and 1")
    s = Setup(ckpt, lm, data, ctx, defaults.EVAL_TOKENS, data_dir, text_field, label_field, topics, pool,
              topic_tokens, neurons, progress)
    clf = trained(paths.topic_classifier(data_dir, s.cfg.data), s.train_docs, s.eval_docs,
                  {"data": s.cfg.data, "text_field": text_field, "label_field": label_field})
    print(f"steer: topic classifier: held-out accuracy {clf.heldout_accuracy:.3f} on {clf.heldout_docs} documents "
          f"(trained on {clf.train_docs}; chance {1 / len(clf.topics):.2f})")
    chosen = list(NEUTRAL_PROMPTS[:prompts])
    folder = s.root / "steer"
    selections = s.selections()
    params = {**s.params, "alphas": sweep, "mode": mode, "prompts": chosen, "new_tokens": new_tokens,
              "classifier": clf.heldout_accuracy}
    for units, sel, sel_identity in selections:
        _, hit = cached(folder / units.name / f"{mode}.json", sel_identity, params,
                        lambda: run(s.lm, units, sel, clf, sweep, mode, chosen, new_tokens, progress),
                        key="rows", to_json=rows_to_json, from_json=rows_from_json)
        print(f"steer: {units.name}: {'cached' if hit else 'done'}")
    rows = _flat(gathered(folder, f"{mode}.json", params, [u.name for u, _, _ in selections], "rows", rows_from_json))
    caption = (f"{s.cfg.lm} · {s.cfg.data} · {mode} α·max|act| of each topic's top-AUROC unit · {prompts} neutral "
               f"prompts × {new_tokens} greedy tokens · classifier held-out accuracy {clf.heldout_accuracy:.3f}")
    for path in write_steering(rows, out_dir or folder / "report", caption, concept):
        print(path)
