"""Tables (Markdown) and figures of the interpretability scores and diagnostics (issue 12)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.io import write_text_atomic
from pipeline.eval.report import save_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ms(v: dict | None, digits: int = 3) -> str:
    if not v:
        return "–"
    se = v.get("se")
    return f"{v['mean']:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and np.isfinite(se) else "")


# ----- autointerp -------------------------------------------------------------------------------

SETS = ("method", "method-shuffled", "tokens", "tokens-shuffled")


def write_autointerp(results: dict[str, dict], out_dir: Path) -> list[Path]:
    """``results``: method name -> autointerp result. Markdown table + detection/fuzzing bar chart."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Automated interpretability", "",
             "Detection and fuzzing: AUROC of the judge's log P(Yes) - log P(No) per latent (mean ± s.e. over latents), "
             "balanced accuracy of its own decision (> 0). Intruder: accuracy against chance 1/(k+1). Controls: the "
             "method's latents with shuffled explanations, token-identity latents with their true and shuffled "
             "explanations.", "",
             "| method | judge | latents | detection AUROC | detection bal. acc. | fuzzing AUROC | fuzzing bal. acc. | "
             "intruder acc. (chance) | shuffled: det. AUROC | tokens: det. AUROC | tokens shuffled: det. AUROC | "
             "tokens: intruder acc. | judge tells true from shuffled? |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        s = {k: v["summary"] for k, v in r["sets"].items()}
        m = s["method"]
        meaningful = r["verdict"].get("judge_discriminates")
        flag = "" if meaningful else " (not meaningful)"
        lines.append(f"| {name} | {r['judge']} | {m['n']} | {_ms(m['detection_auroc'])}{flag} | {_ms(m['detection_bacc'])} | "
                     f"{_ms(m['fuzzing_auroc'])}{flag} | {_ms(m['fuzzing_bacc'])} | {_ms(m['intruder_accuracy'])} "
                     f"({r['chance_intruder']:.2f}) | {_ms(s['method-shuffled']['detection_auroc'])} | "
                     f"{_ms(s.get('tokens', {}).get('detection_auroc'))} | "
                     f"{_ms(s.get('tokens-shuffled', {}).get('detection_auroc'))} | "
                     f"{_ms(s.get('tokens', {}).get('intruder_accuracy'))} | {'yes' if meaningful else 'no'} |")
    lines += ["", "## Verdicts", ""] + [f"- **{n}**: {r['verdict']['statement']}" for n, r in results.items()]
    lines += ["", "## Explanations (first 10 per method)", ""]
    for name, r in results.items():
        lines.append(f"- **{name}**: " + "; ".join(f"{l['latent']}: {l['explanation']} (det. {l['detection']['auroc']:.2f})"
                                                  for l in r["sets"]["method"]["latents"][:10]))
    md = out_dir / "autointerp.md"
    write_text_atomic(md, "\n".join(lines) + "\n")
    return [md, *_autointerp_plot(results, out_dir)]


def _autointerp_plot(results: dict[str, dict], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    names = list(results)
    width = 0.8 / len(SETS)
    for ax, score in zip(axes, ("detection_auroc", "fuzzing_auroc")):
        for k, set_name in enumerate(SETS):
            vals = [results[n]["sets"].get(set_name, {}).get("summary", {}).get(score) for n in names]
            mean = [v["mean"] if v else np.nan for v in vals]
            se = [v["se"] if v and v["se"] is not None and np.isfinite(v["se"]) else 0 for v in vals]
            ax.bar(np.arange(len(names)) + (k - 1.5) * width, mean, width, yerr=se, label=set_name, capsize=2)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(score.replace("_", " "))
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out_dir, "autointerp")


# ----- faithfulness -------------------------------------------------------------------------------

def write_faithfulness(results: dict[str, dict], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Faithfulness", "", "Jacobian cosine of the replacement vs the true MLP at real inputs (per token, "
             "averaged; mode in the table), and how often the top next-token log-prob increase agrees between "
             "ablating a latent and removing its decoder direction from the true MLP output.", "",
             "| method | layer | Jacobian cosine | neuron baseline (same k) | tokens | mode |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        for layer, v in r["layers"].items():
            j = v["jacobian_cosine"]
            lines.append(f"| {name} | {layer} | {_ms(j)} | {_ms(v.get('neurons_jacobian_cosine'))} | {j['tokens']} | "
                         f"{j['mode']} |")
    lines += ["", "| method | draws | top-increase agreement | mean corr. of log-prob changes |", "|---|---|---|---|"]
    for name, r in results.items():
        e = r["feature_effects"]
        agree = None if e["top_increase_agreement"] is None else {"mean": e["top_increase_agreement"], "se": e["se"]}
        corr = e["logprob_change_correlation"]
        lines.append(f"| {name} | {e['draws']} | {_ms(agree)} | {'–' if corr is None else f'{corr:.3f}'} |")
    md = out_dir / "faithfulness.md"
    write_text_atomic(md, "\n".join(lines) + "\n")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        layers = sorted(int(l) for l in r["layers"])
        vals = [r["layers"][str(l)]["jacobian_cosine"] for l in layers]
        ax.errorbar(layers, [v["mean"] for v in vals], yerr=[v["se"] for v in vals], marker="o", label=name, capsize=2)
    ax.set_xlabel("layer")
    ax.set_ylabel("Jacobian cosine (replacement vs MLP)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return [md, *save_figure(fig, out_dir, "faithfulness")]


# ----- tail ---------------------------------------------------------------------------------------

def write_tail(result: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# The activation tail", "",
             f"Massive rows: MLP-output norm above {result.get('massive_factor')} x the layer's median (the "
             "evaluation's threshold). FVU split: each class's squared error over the one total variance (the parts "
             "sum to the FVU). ΔCE split: only massive rows replaced, only ordinary rows replaced, and the "
             "interaction (total minus both), summing to the total ΔCE.", ""]
    for layer, entry in result["layers"].items():
        m = entry["massive"]
        lines += [f"## Layer {layer}", "",
                  f"{m['massive']} of {m['rows']} rows massive ({100 * m['massive_fraction']:.2f}%), carrying "
                  f"{100 * m['massive_variance_share']:.1f}% of the variance (threshold {m['threshold']:.1f}).", ""]
        if m.get("tokens"):
            lines.append("- tokens: " + ", ".join(f"{t['token']!r} {t['massive']}/{t['of_occurrences']}" for t in m["tokens"]))
            lines.append("- positions: " + ", ".join(f"{p['position']} ({p['massive']})" for p in m["positions"]))
            lines.append("- dims (share of massive power): " + ", ".join(
                f"{d['dim']} ({100 * d['share_of_massive_power']:.1f}%, mean {d['mean_massive']:+.1f} vs "
                f"{d['mean_ordinary']:+.2f})" for d in m["dims"][:6]))
        lines += ["", "| method | FVU | massive part | ordinary part | FVU within massive | within ordinary | ΔCE | "
                  "massive only | ordinary only | interaction |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in entry["methods"].items():
            f, d = r["fvu"], r["dce"]
            lines.append(f"| {name} | {f['fvu']:.4f} | {f['fvu_massive']:.4f} | {f['fvu_ordinary']:.4f} | "
                         f"{f['fvu_within_massive']:.4f} | {f['fvu_within_ordinary']:.4f} | {d['dce']:.4f} | "
                         f"{d['dce_massive_only']:.4f} | {d['dce_ordinary_only']:.4f} | {d['dce_interaction']:+.4f} |")
        lines.append("")
    md = out_dir / "tail.md"
    write_text_atomic(md, "\n".join(lines) + "\n")
    return [md, *_tail_plot(result, out_dir)]


def _tail_plot(result: dict, out_dir: Path) -> list[Path]:
    plt = _pyplot()
    layers = list(result["layers"])
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3.6), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        entry = result["layers"][layer]
        for name, r in entry["methods"].items():
            b = [x for x in r["buckets"] if x["relative_error"] is not None]
            ax.plot([np.sqrt(x["lo"] * x["hi"]) for x in b], [x["relative_error"] for x in b], marker=".", label=name)
        ax.axvline(entry["massive"]["threshold"], color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("row norm |y| (bucket)")
        ax.set_title(f"layer {layer}")
    axes[0][0].set_ylabel("relative error |y - ŷ|² / |y|²")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, out_dir, "tail_error_by_norm")


# ----- emergence ----------------------------------------------------------------------------------

def write_emergence(name: str, result: dict, coords: np.ndarray, frequency: np.ndarray, labels: np.ndarray,
                    out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    rows = result["trajectory"]
    t = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(t, [r["matched"] for r in rows], marker="o", label="matched (kept)")
    ax.plot(t, [r["born"] for r in rows], marker="^", label="born")
    ax.plot(t, [r["died"] for r in rows], marker="v", label="died")
    ax.plot(t, [r["alive_after"] for r in rows], ls=":", label="alive")
    ax.set_yscale("symlog", linthresh=10)  # thousands kept, a handful born or dying
    ax.set_xlabel("training tokens")
    ax.set_ylabel("latents (symlog)")
    ax.set_title(f"{name}\nalive latents matched across snapshots at cosine ≥ {result['threshold']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = save_figure(fig, out_dir, "emergence")
    fig, ax = plt.subplots(figsize=(6, 5))
    logf = np.log10(np.clip(frequency, 1e-7, None))
    sc = ax.scatter(coords[:, 0], coords[:, 1], c=logf, s=3, cmap="viridis")
    fig.colorbar(sc, ax=ax, label="log10 firing frequency")
    for c in np.unique(labels):
        centre = coords[labels == c].mean(0)
        ax.annotate(str(c), centre, fontsize=8, weight="bold")
    ax.set_title(f"{name}\ndecoder directions, {result['projection'].split(' (')[0]}; numbers: k-means clusters", fontsize=9)
    fig.tight_layout()
    paths += save_figure(fig, out_dir, "decoder_map")
    lines = [f"# Emergence: {name}", "", f"Matching: {result['matching']}", "",
             "| tokens | alive before | alive after | matched | born | died | mean matched cosine |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mc = r["mean_matched_cosine"]
        lines.append(f"| {r['tokens']} | {r['alive_before']} | {r['alive_after']} | {r['matched']} | {r['born']} | "
                     f"{r['died']} | {'–' if mc is None else f'{mc:.3f}'} |")
    lines += ["", f"## Clusters (k-means on final decoder directions; map: {result['projection']})", "",
              "| cluster | latents | mean log10 freq | top tokens (count over top contexts) |", "|---|---|---|---|"]
    for c in result["clusters"]:
        f = c["mean_log10_frequency"]
        lines.append(f"| {c['cluster']} | {c['latents']} | {'–' if f is None else f'{f:.2f}'} | "
                     + ", ".join(f"{t!r} {n}" for t, n in c["top_tokens"]) + " |")
    md = out_dir / "emergence.md"
    write_text_atomic(md, "\n".join(lines) + "\n")
    return [md, *paths]
