"""Training logs: wandb (offline by default) and the training-curves PNG next to each checkpoint."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from pipeline.train.config import TrainConfig


class RunLogger:
    """One wandb run for a training pass; ``run_id`` lets a resumed pass continue its run."""

    def __init__(self, cfg: TrainConfig, name: str, run_dir: Path, run_config: dict, run_id: str | None = None):
        self.run = None
        if cfg.wandb == "disabled":
            return
        mode = cfg.wandb
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
            warnings.warn("WANDB=online but no wandb API key is configured; logging offline instead", stacklevel=2)
            mode = "offline"
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nn-decompositions"), mode=mode, dir=str(run_dir),
                              name=name[:120], config=run_config, id=run_id, resume="allow" if run_id else None,
                              settings=wandb.Settings(silent=True))

    def log(self, values: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text()


CURVE_PANELS = [("loss", "loss"), ("fvu", "FVU (all rows)"), ("fvu_normal", "FVU (non-massive rows)"),
                ("l0", "L0"), ("dead", "dead fraction"), ("aux", "AuxK loss"), ("lr", "learning rate")]


def plot_curves(history: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    tokens = [h["tokens"] for h in history]
    for ax, (key, label) in zip(axes.flat, CURVE_PANELS):
        ax.plot(tokens, [h.get(key, float("nan")) for h in history], marker="." if len(history) < 100 else None)
        ax.set_title(label)
        ax.set_xlabel("tokens")
        if key in ("loss", "fvu", "fvu_normal") and all(h.get(key, 0) > 0 for h in history):
            ax.set_yscale("log")
    axes.flat[-1].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
