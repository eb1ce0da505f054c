"""Make safety: no user value reaches a shell unchecked, parsing writes nothing, clean-data deletes
only what the pipeline wrote; and paths.py names checkpoints exactly as the method registry does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from pipeline.core import paths


def run_make(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# what issue 15 reported, with {probe} standing for the file a successful injection would create
INJECTIONS = [
    "LAYERS=0-3`touch {probe}`",
    "K=32$$(touch {probe})",
    "K=32$(shell touch {probe})",
    "MODEL=topk;touch {probe}",
    "COMPRESSOR=none;touch {probe};#",
    "PARETO_MODELS=topk,$(shell touch {probe})",
    "PARETO_K=8;touch {probe}",
    "EPOCHS=1$(touch {probe})",
    "LR=1e-3;touch {probe}",
    "LM=tiny-llama;touch {probe}",
    "DATA=bbc`touch {probe}`",
    "DATA_DIR=d;touch {probe}",
    "CKPT=x;touch {probe}",
    "OUT=x|touch {probe}",
    "NND=true;touch {probe};",
    "PYTHON=python3;touch {probe};",
    "KIND=../../x$(touch {probe})",
    "WANDB=offline&&touch {probe}",
    "TOKENS=1 $(shell touch {probe})",
    "LM=a\ntouch {probe}",
    # features / interventions (issue 10)
    "FEATURE=1;touch {probe}",
    "VALUE=1$(touch {probe})",
    "OP=ablate`touch {probe}`",
    "POSITIONS=1$(shell touch {probe})",
]
INVOCATIONS = [["help"], ["-n", "help"], ["-n", "harvest"], ["-q", "pareto"], ["-n", "train"], ["evaluate"],
               ["clean-data"], ["-n", "demo"]]


@pytest.mark.parametrize("injection", INJECTIONS)
def test_an_injected_value_runs_no_command_and_writes_nothing(tmp_path, injection):
    probe = tmp_path / "probe"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "keep").write_text("")
    before = {p.name for p in REPO.iterdir()}
    name = injection.split("=", 1)[0]
    value = injection.format(probe=probe)
    for invocation in INVOCATIONS:
        args = [*invocation, value] + ([f"DATA_DIR={data_dir}"] if name != "DATA_DIR" else [])
        proc = run_make(REPO, *args)
        assert proc.returncode != 0, (args, proc.stdout)
        assert f"{name}=" in proc.stderr and "not allowed" in proc.stderr, (args, proc.stderr)
        assert not probe.exists(), args
    assert snapshot(data_dir) == {"keep"}
    assert {p.name for p in REPO.iterdir()} <= before | {".pytest_cache"}


def test_the_teams_probe(tmp_path):
    probe = tmp_path / "probe"
    proc = run_make(REPO, "-n", "help", f"K=32$$(touch {probe})")
    assert proc.returncode == 2 and "K='32$$(touch" in proc.stderr and not probe.exists()


def test_a_hostile_prompt_is_never_expanded(tmp_path):
    """PROMPT is free text with no character class: parsing, help and previews never expand it."""
    probe = tmp_path / "probe"
    hostile = f"a $(shell touch {probe}1) `touch {probe}2` $$(touch {probe}3) \"x' ; touch {probe}4"
    for args in (["help"], ["-n", "generate", "CKPT=x", "FEATURE=1"], ["-n", "features", "CKPT=x"], ["-n", "demo"]):
        proc = run_make(REPO, *args, f"PROMPT={hostile}", f"DATA_DIR={tmp_path / 'data'}",
                        f"INSTALLED={tmp_path / 'installed'}")
        assert proc.returncode in (0, 1), (args, proc.stderr)
        assert not list(tmp_path.glob("probe*")) and not (tmp_path / "data").exists(), args


@pytest.mark.parametrize("value, message", [
    ("KIND=../../x", "KIND='../../x' is not allowed"),
    ("MODEL=nosuch", "unknown nosuch"),
    ("PARETO_MODELS=topk,bogus", "unknown bogus"),
    ("LAYERS=3-1", "LAYERS='3-1' is malformed"),
    ("K=0", "positive integers"),
    ("LM=../x", "LM='../x'"),
    ("DATA_DIR=/", "filesystem root"),
    ("DATA_DIR=", "DATA_DIR is empty"),
    ("LM=a b", "LM='a b' is not allowed"),
])
def test_a_bad_value_stops_make_before_any_rule(tmp_path, value, message):
    data_dir = tmp_path / "data"
    before = {p.name for p in REPO.iterdir()}
    goal = "train" if value.startswith(("MODEL", "K=", "KIND")) else "pareto"
    for flags in ([], ["-n"], ["-q"]):
        args = [*flags, goal, value] + ([f"DATA_DIR={data_dir}"] if not value.startswith("DATA_DIR") else [])
        proc = run_make(REPO, *args, "LM=tiny-llama" if not value.startswith("LM") else "CTX=32")
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
    assert not data_dir.exists() and not Path("/stamps").exists()
    assert {p.name for p in REPO.iterdir()} <= before | {".pytest_cache"}


def test_parsing_previewing_and_querying_write_nothing(tmp_path):
    data_dir = tmp_path / "data"  # does not exist: any write would create it
    common = [f"DATA_DIR={data_dir}", "LM=tiny-llama", "CTX=32", f"INSTALLED={tmp_path / 'installed'}"]
    for args in (["help"], ["-n", "harvest"], ["-q", "harvest"], ["-n", "train", "MODEL=clt", "LAYERS=0,2,3"],
                 ["-q", "train"], ["-n", "pareto"], ["-q", "pareto"], ["-n", "report"], ["-n", "clean-data"],
                 ["-n", "verify"], ["-n", "export", "CKPT=x"], ["-n", "evaluate", "CKPT=x"]):
        proc = run_make(REPO, *args, *common)
        assert proc.returncode in (0, 1), (args, proc.stderr)
        assert not data_dir.exists(), args
    preview = run_make(REPO, "-n", "train", "MODEL=clt", "K=8", "LAYERS=0,2,5", *common).stdout
    assert "train --model clt --k 8 --kind transcoder --layers 0,2,5" in preview
    assert "/clt/clt-batchtopk-k8-L0_2_5/done" in preview  # the path nnd train writes (issue 9)
    verify = run_make(REPO, "-n", "verify", *common).stdout
    assert f"verify --lm tiny-llama --data bbc --ctx 32 --data-dir {data_dir}" in verify
    export = run_make(REPO, "-n", "export", "CKPT=a/clt-x", *common).stdout
    assert "export --format circuit-tracer --ckpt 'a/clt-x' --out 'a/clt-x.circuit-tracer'" in export


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """The Makefile and the stdlib modules it runs, in a scratch repository (clean-data is tested here)."""
    root = tmp_path / "repo"
    (root / "pipeline" / "core").mkdir(parents=True)
    shutil.copy(REPO / "Makefile", root / "Makefile")
    shutil.copy(REPO / "pipeline" / "__init__.py", root / "pipeline")
    for name in ("__init__", "paths", "defaults", "layers", "errors"):
        shutil.copy(REPO / "pipeline" / "core" / f"{name}.py", root / "pipeline" / "core")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "README.md").write_text("readme\n")
    return root


def test_clean_data_refuses_a_folder_that_is_not_a_data_folder(repo_copy, tmp_path):
    before = snapshot(repo_copy)
    gitty = tmp_path / "project"
    (gitty / ".git").mkdir(parents=True)
    for value in ("DATA_DIR=", "DATA_DIR=.", f"DATA_DIR={repo_copy}", "DATA_DIR=/", f"DATA_DIR={gitty}",
                  "DATA_DIR=pipeline/..", "DATA_DIR=~"):
        proc = run_make(repo_copy, "clean-data", value)
        assert proc.returncode != 0, (value, proc.stdout)
        assert snapshot(repo_copy) == before, value
    assert (gitty / ".git").is_dir()


def test_clean_data_deletes_only_what_the_pipeline_wrote(repo_copy, tmp_path):
    models = tmp_path / "models_cache"
    (models / "tiny").mkdir(parents=True)
    data = repo_copy / "data"
    for entry in ("harvest/x/y.zarr", "train/a/b", "eval/c", "stamps/harvest", "reports/r"):
        (data / entry).mkdir(parents=True)
        (data / entry / "f").write_text("")
    (data / "models").symlink_to(models, target_is_directory=True)
    (data / "README.md").write_text("")
    (data / "notes.txt").write_text("mine")
    (data / "mine").mkdir()
    proc = run_make(repo_copy, "clean-data", "DATA_DIR=data")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in data.iterdir()) == ["README.md", "mine", "notes.txt"]
    assert (models / "tiny").is_dir()  # a linked model cache is unlinked, not emptied


def test_paths_names_every_checkpoint_as_the_registry_does(tmp_path):
    """The Makefile gets checkpoint paths from paths.py (stdlib only), the train stage from the
    method specs: they must agree for every MODEL name, per-layer and CLT, contiguous or not."""
    from pipeline.methods import REGISTRY
    from pipeline.methods.base import TrainRequest

    class Store:
        d_model = 8
        manifest = {"lm": "tiny-llama"}

    def tiny_mlp(layer):
        import torch
        from pipeline.data.models import MLPWeights

        return MLPWeights(torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 16), "silu")

    assert set(paths.MODELS) == set(REGISTRY.models())
    for model, spec in REGISTRY.models().items():
        for layers in ([0, 1, 2, 3], [0, 2, 5], [1]):
            kinds = ("transcoder", "sae") if spec.name == "transcoder" else ("transcoder",)
            for kind in kinds:
                inits = ("random", "rkcnn") if spec.name in ("transcoder", "skip", "matryoshka") else ("random",)
                for init in inits:
                    request = TrainRequest(store=Store(), models=(model,), ks=(4, 16), layers=tuple(layers), n_latents=64,
                                           seed=0, kind=kind, out=lambda group, name: tmp_path / group / name, init=init,
                                           mlp_weights=tiny_mlp)  # SPD decomposes the MLP weights
                    written = [job.out_dir.relative_to(tmp_path) for job in spec.jobs(request)]
                    named = [Path(g) / n for k in (4, 16) for g, n in paths.checkpoint_names(model, k, layers, kind, init)]
                    assert sorted(written) == sorted(named), (model, layers, kind, init)


def test_the_defaults_module_runs_without_the_venv():
    """`python3 -m pipeline.core.defaults` / `paths` must work before .venv exists: standard library only."""
    code = ("import sys, pipeline.core.defaults, pipeline.core.paths; "
            "bad = [m for m in ('torch', 'numpy', 'typer', 'zarr') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_a_local_corpus_gets_the_store_name_python_gives_it(tmp_path):
    """DATA=<absolute path>: Make's paths are paths.py's (local-<name>-<hash>), not a Make re-derivation."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n")
    data_dir = tmp_path / "data"
    key = paths.data_key(str(corpus))
    assert key.startswith("local-corpus.txt-") or key.startswith("local-corpus")
    preview = run_make(REPO, "-n", "train", f"DATA={corpus}", "LM=tiny-llama", "CTX=32", "LAYERS=0,2", "MODEL=topk,clt",
                       "K=4", f"DATA_DIR={data_dir}").stdout
    assert f"{data_dir}/train/tiny-llama/{key}/ctx32/transcoder/topk-k4-L2/done" in preview
    assert f"{data_dir}/train/tiny-llama/{key}/ctx32/clt/clt-batchtopk-k4-L0_2/done" in preview
    assert f"{data_dir}/stamps/harvest/tiny-llama/{key}/ctx32.done" in preview
    assert not data_dir.exists()


def test_the_checks_cannot_be_replaced_from_the_command_line(tmp_path):
    probe = tmp_path / "probe"
    for extra in (["check=", "check_text="], ["USER_VARIABLES=K check", "check="], ["c.INTS=$ ( ) s h e l t o u c"]):
        proc = run_make(REPO, "-n", "help", *extra, f"K=$(shell touch {probe})")
        assert proc.returncode == 2 and "K='$(shell touch" in proc.stderr and not probe.exists(), (extra, proc.stderr)
    # an internal name (a stamp, an option list) is refused, so no path or recipe can be replaced
    for name in ("HARVEST_STAMP", "TRAIN_OPTS", "S_ALL_DONE"):
        proc = run_make(REPO, "-n", "pareto", f"{name}=x;touch {probe}", f"DATA_DIR={tmp_path / 'data'}")
        assert proc.returncode == 2 and f"{name} is not a variable of this Makefile" in proc.stderr
    assert not probe.exists() and not (tmp_path / "data").exists()
