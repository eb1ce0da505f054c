"""The Make layer: stale-only re-runs, counted by what each run executed."""

import inspect
import re
import subprocess
import sys

from conftest import REPO

from pipeline.core import defaults


def make(data_dir, *args, dry=False, query=False):
    stamp = data_dir / "installed"
    stamp.touch()
    cmd = ["make", "--no-print-directory", *(["-n"] if dry else []), *(["-q"] if query else []), *args,
           f"DATA_DIR={data_dir}", "LM=tiny-llama", "CTX=32", "CHUNK_ROWS=256",
           f"INSTALLED={stamp}", f"NND={sys.executable} -m stages.cli"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)


def computed(proc) -> int:
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"(\d+) layer-chunks computed", proc.stdout)
    return int(m.group(1)) if m else 0


def ran(proc, stage: str) -> list[str]:
    """The `nnd <stage>` command lines a make run executed (Make echoes each before running it)."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if re.search(rf"stages\.cli {stage}\b", line)]


def test_make_harvest_is_cached_and_grows_incrementally(data_dir):
    assert computed(make(data_dir, "harvest", "LAYERS=0-1", "TOKENS=2000")) == 2 * 9
    assert make(data_dir, "harvest", "LAYERS=0-1", "TOKENS=2000", query=True).returncode == 0
    again = make(data_dir, "harvest", "LAYERS=0-1", "TOKENS=2000")
    assert "nnd" not in again.stdout and "stages.cli" not in again.stdout and computed(again) == 0

    preview = make(data_dir, "harvest", "LAYERS=0-2", "TOKENS=2000", dry=True)
    assert "harvest --lm tiny-llama" in preview.stdout and "--layers 0-2" in preview.stdout
    assert make(data_dir, "harvest", "LAYERS=0-2", "TOKENS=2000", query=True).returncode == 1

    assert computed(make(data_dir, "harvest", "LAYERS=0-2", "TOKENS=2000")) == 9  # only layer 2
    # 4030 rows -> 17 chunks: 8 new ones and the formerly partial one, for each of 3 layers
    assert computed(make(data_dir, "harvest", "LAYERS=0-2", "TOKENS=4000")) == 3 * 9
    assert make(data_dir, "harvest", "LAYERS=0-2", "TOKENS=4000", query=True).returncode == 0
    assert (data_dir / "stamps" / "harvest").is_dir() and not (REPO / "stamps").exists()


PARETO = ["LAYERS=0,2", "TOKENS=2000", "LATENTS=64", "BATCH_SIZE=256", "EVAL_TOKENS=310", "WANDB=disabled",
          "PARETO_MODELS=skip-topk,clt"]


def test_make_pareto_runs_only_the_stale_evaluations(data_dir):
    """LAYERS=0,2 names the CLT ...-L0_2 (the Makefile asks paths.py, so it finds it); adding a K
    trains, evaluates and baselines only that K; `make -q` agrees with what a run would do."""
    first = make(data_dir, "pareto", "PARETO_K=4", *PARETO)
    assert len(ran(first, "harvest")) == 1 and len(ran(first, "train")) == 1
    assert "trained 3 dictionaries" in first.stdout  # a skip transcoder on each of 2 layers, one CLT
    assert sorted(re.search(r"--out \S+/(\S+)/metrics.json", line).group(1) for line in ran(first, "evaluate")) == \
        ["clt-k4", "skip-topk-k4"]
    assert (data_dir / "train/tiny-llama/bbc/ctx32/clt/clt-batchtopk-k4-L0_2/done").exists()
    assert len(ran(first, "baselines")) == 1 and len(ran(first, "report")) == 1
    assert re.findall(r"evaluate: neurons-k(\d+)", first.stdout) == ["4"]
    eval_dir = data_dir / "eval/tiny-llama/bbc/ctx32-t310"
    assert (eval_dir / "neurons-k4-L0_2" / "metrics.json").exists() and (eval_dir / "report" / "table.md").exists()

    assert make(data_dir, "pareto", "PARETO_K=4", *PARETO, query=True).returncode == 0
    again = make(data_dir, "pareto", "PARETO_K=4", *PARETO)
    assert again.returncode == 0 and "stages.cli" not in again.stdout, again.stdout

    assert make(data_dir, "pareto", "PARETO_K=4,8", *PARETO, query=True).returncode == 1
    grown = make(data_dir, "pareto", "PARETO_K=4,8", *PARETO)
    assert not ran(grown, "harvest") and len(ran(grown, "train")) == 1
    assert "trained 3 dictionaries, 3 already up to date" in grown.stdout
    assert sorted(re.search(r"--out \S+/(\S+)/metrics.json", line).group(1) for line in ran(grown, "evaluate")) == \
        ["clt-k8", "skip-topk-k8"]  # the K=4 evaluations are not re-run
    assert len(ran(grown, "baselines")) == 1
    assert re.findall(r"evaluate: neurons-k(\d+)", grown.stdout) == ["8"]  # the neuron baseline at the new K only
    assert len(ran(grown, "report")) == 1
    assert make(data_dir, "pareto", "PARETO_K=4,8", *PARETO, query=True).returncode == 0

    # a training parameter: every checkpoint of the sweep retrains, so every evaluation re-runs
    assert make(data_dir, "pareto", "PARETO_K=4,8", *PARETO, "SEED=1", query=True).returncode == 1
    # dropping a method: nothing to do, the report does not change either
    fewer = [a if not a.startswith("PARETO_MODELS=") else "PARETO_MODELS=clt" for a in PARETO]
    assert make(data_dir, "pareto", "PARETO_K=4,8", *fewer, query=True).returncode == 0


def test_make_train_is_stale_only_per_checkpoint(data_dir):
    common = ["LAYERS=0-1", "TOKENS=2000", "LATENTS=64", "BATCH_SIZE=256", "WANDB=disabled", "MODEL=topk"]
    first = make(data_dir, "train", "K=4", *common)
    assert len(ran(first, "harvest")) == 1 and "trained 2 dictionaries" in first.stdout
    assert make(data_dir, "train", "K=4", *common, query=True).returncode == 0
    assert "stages.cli" not in make(data_dir, "train", "K=4", *common).stdout
    grown = make(data_dir, "train", "K=4,8", *common)
    assert not ran(grown, "harvest") and "trained 2 dictionaries, 2 already up to date" in grown.stdout
    assert make(data_dir, "train", "K=4,8", *common, query=True).returncode == 0
    assert make(data_dir, "train", "K=4,8", *common, "EPOCHS=2", query=True).returncode == 1


def _typer_default(func, name):
    return inspect.signature(func).parameters[name].default.default


def test_make_and_the_cli_share_one_default_per_variable():
    from stages.evaluate import baselines, evaluate
    from stages.harvest import harvest
    from stages.train import train

    assert defaults.EPOCHS == _typer_default(train, "epochs") and defaults.TOKENS == _typer_default(harvest, "tokens")
    for name, func in [("LM", harvest), ("DATA", harvest), ("LAYERS", harvest), ("CTX", harvest), ("DTYPE", harvest),
                       ("COMPRESSOR", harvest), ("CHUNK_ROWS", harvest), ("SHARDS", harvest), ("MODEL", train),
                       ("K", train), ("KIND", train), ("LATENTS", train), ("SEED", train), ("BATCH_SIZE", train),
                       ("LM", train), ("EVAL_TOKENS", evaluate), ("PARETO_K", baselines)]:
        param = {"PARETO_K": "k"}.get(name, name.lower())
        assert _typer_default(func, param) == getattr(defaults, name), (name, func.__name__)
    # and Make's values are the same words: `make help` lists each variable with its current value
    shown = subprocess.run(["make", "--no-print-directory", "help"], cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    table = dict(re.findall(r"^  ([A-Z_]+) +(\S+)", shown.stdout, re.M))
    for name, (value, _) in defaults.MAKE_VARS.items():
        assert table[name] == (value or "(default)"), name
    assert "pareto" in shown.stdout and "verify" in shown.stdout and "export" in shown.stdout
