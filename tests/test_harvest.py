import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_nnd, tree_bytes
from pipeline.core.errors import UserError
from pipeline.core.layers import parse_layers
from pipeline.data.harvest import HarvestConfig, capture, harvest, store_path, token_table
from pipeline.data.models import load_lm
from pipeline.data.store import HarvestStore, Root, writer_lock

# Small chunks so a few thousand tokens make many chunks.
SMALL = dict(lm="tiny-llama", data="bbc", ctx=32, chunk_rows=256)


def _direct_mlp_io(lm, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MLP input and output of one layer from plain PyTorch hooks on the HF module."""
    got = {}
    handle = lm.hf_model.model.layers[layer].mlp.register_forward_hook(
        lambda mod, inp, out: got.update(x=inp[0].detach(), y=out.detach()))
    with torch.inference_mode():
        lm.hf_model(ids)
    handle.remove()
    return got["x"], got["y"]


def test_tiny_store_layout_values_and_stats(data_dir):
    cfg = HarvestConfig(**SMALL, layers=(0, 2), tokens=3000, data_dir=data_dir)
    summary = harvest(cfg, progress=False)
    st = HarvestStore.open(cfg.location, layers=[0, 2], hooks=["mlp_in", "mlp_out"])
    m = st.manifest
    assert m["complete"] and m["layers"] == [0, 2]
    assert st.n_rows == 3007 and st.chunk_rows == 248 and st.n_chunks == 13  # 97 windows of 31 rows
    assert summary.computed_chunks == {0: 13, 2: 13}
    assert m["hooks"]["mlp_in"] == "blocks.{layer}.mlp.hook_in"
    assert m["lm_weights_sha256"] and m["config_hash"] and m["code_version"]

    lm = load_lm("tiny-llama", data_dir)
    table = token_table(lm, "bbc", "train", 32, st.n_rows)
    tokens, doc, pos = (st.rows(n) for n in ("tokens", "doc", "pos"))
    np.testing.assert_array_equal(tokens, table.rows()[0])
    assert pos.min() == 1 and pos.max() == 31 and (tokens != lm.bos_token_id).all()
    assert (np.diff(doc) >= 0).all()

    # stored rows equal a direct forward hook, BOS dropped, sequence-major
    ids = torch.from_numpy(table.ids[8:12]).long()  # windows 8..11 straddle chunks 0 and 1
    x, y = _direct_mlp_io(lm, ids, layer=2)
    rows = slice(8 * 31, 12 * 31)
    np.testing.assert_allclose(st.array(2, "mlp_in")[rows], x[:, 1:].reshape(-1, 64).numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(st.array(2, "mlp_out")[rows], y[:, 1:].reshape(-1, 64).numpy(), rtol=2e-3, atol=2e-3)
    # the raw chunk file is the zarr chunk
    np.testing.assert_array_equal(st.read_chunk(2, "mlp_out", 12), st.array(2, "mlp_out")[12 * 248:])

    stored = st.array(0, "mlp_out")[:].astype(np.float64)
    stats = st.stats(0, "mlp_out")
    np.testing.assert_allclose(stats["mean"], stored.mean(0), rtol=1e-5, atol=1e-6)
    assert stats["mean_sq_norm"] == pytest.approx((stored ** 2).sum(1).mean(), rel=1e-5)
    assert stats["n"] == st.n_rows


def test_forward_stops_after_the_last_needed_layer(data_dir):
    lm = load_lm("tiny-llama", data_dir)
    ran = []
    handles = [lm.hf_model.model.layers[i].register_forward_hook(lambda *a, i=i: ran.append(i)) for i in range(4)]
    handles.append(lm.hf_model.lm_head.register_forward_hook(lambda *a: ran.append("unembed")))
    acts = capture(lm, torch.randint(3, 200, (2, 16)), {0: ("mlp_in",), 1: ("mlp_in", "mlp_out")})
    for h in handles:
        h.remove()
    assert ran == [0]  # block 1 raised inside, after its MLP; nothing later ran
    assert set(acts) >= {(0, "mlp_in"), (1, "mlp_in"), (1, "mlp_out")}


def test_growth_computes_only_missing_chunks_and_layers(data_dir):
    base = dict(**SMALL, data_dir=data_dir)
    first = harvest(HarvestConfig(**base, layers=(0, 1), tokens=2000), progress=False)
    assert first.computed_chunks == {0: 9, 1: 9}  # 2015 rows -> 9 chunks of 248
    chunk0 = Path(HarvestStore.open(HarvestConfig(**base).location).chunk_file(0, "mlp_in", 0))
    before = chunk0.stat().st_mtime_ns
    again = harvest(HarvestConfig(**base, layers=(0, 1), tokens=2000), progress=False)
    assert again.computed_chunks == {}
    more_layers = harvest(HarvestConfig(**base, layers=(0, 1, 2), tokens=2000), progress=False)
    assert more_layers.computed_chunks == {2: 9}
    more_tokens = harvest(HarvestConfig(**base, layers=(0, 1, 2), tokens=4000), progress=False)
    # 4030 rows -> 17 chunks; chunk 8 was partial (31 of 248 rows) and is redone
    assert more_tokens.computed_chunks == {0: 9, 1: 9, 2: 9}
    assert chunk0.stat().st_mtime_ns == before
    st = HarvestStore.open(HarvestConfig(**base).location, layers=[0, 1, 2])
    assert st.n_rows == 4030
    # identical to a store harvested at the larger size in one go
    fresh = harvest(HarvestConfig(**base, layers=(0, 1, 2), tokens=4000, store=str(data_dir / "fresh.zarr")), progress=False)
    np.testing.assert_array_equal(st.array(1, "mlp_out")[:], HarvestStore.open(fresh.location).array(1, "mlp_out")[:])


def _cli_args(data_dir, tokens, *extra):
    return ["harvest", "--lm", "tiny-llama", "--data", "bbc", "--layers", "0-3", "--tokens", str(tokens),
            "--ctx", "32", "--chunk-rows", "256", "--data-dir", str(data_dir), "--no-progress", *extra]


def test_kill_9_then_resume_gives_a_byte_identical_store(data_dir, tmp_path):
    tokens = 30_000
    run_nnd(*_cli_args(data_dir, tokens, "--store", str(tmp_path / "reference.zarr")))
    location = store_path(data_dir, "tiny-llama", "bbc", "train", 32)
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", *_cli_args(data_dir, tokens)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = list((location / "progress").rglob("*.json")) if (location / "progress").exists() else []
        if len(done) >= 40:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "harvest finished before it could be killed; raise the token count"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(UserError, match="incomplete"):
        HarvestStore.open(location, layers=[0])
    out = run_nnd(*_cli_args(data_dir, tokens))
    assert "layer-chunks computed" in out.stdout
    computed = int(out.stdout.split("complete, ")[1].split(" layer-chunks")[0])
    assert 0 < computed < 4 * 122  # resumed, not restarted
    assert tree_bytes(location) == tree_bytes(tmp_path / "reference.zarr")


def test_two_shards_equal_one_process_also_through_a_file_url(data_dir, tmp_path):
    args = _cli_args(data_dir, 6000)
    run_nnd(*args, "--store", str(tmp_path / "single.zarr"))
    run_nnd(*args, "--store", str(tmp_path / "local-shards.zarr"), "--shards", "2")
    url = f"file://{tmp_path / 'url-shards.zarr'}"
    for i in (1, 0):  # as two machines would, in any order
        run_nnd(*args, "--store", url, "--shard", f"{i}/2")
    reference = tree_bytes(tmp_path / "single.zarr")
    assert HarvestStore.open(tmp_path / "single.zarr", layers=[0, 1, 2, 3]).n_rows == 6014
    assert tree_bytes(tmp_path / "local-shards.zarr") == reference
    assert tree_bytes(tmp_path / "url-shards.zarr") == reference


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("flags, fragments", [
    (["--lm", "no-such model"], ["unknown LM"]),
    (["--data", "no_such_corpus"], ["unknown DATA"]),
    (["--layers", "0-9"], ["outside tiny-llama", "0-3"]),
    (["--layers", "3-1"], ["malformed"]),
    (["--tokens", "50000000"], ["larger than the train split"]),
])
def test_bad_input_is_one_clear_line(data_dir, flags, fragments):
    args = _cli_args(data_dir, 1000)
    for flag, value in zip(flags[::2], flags[1::2]):
        args[args.index(flag) + 1] = value
    _assert_one_line_error(run_nnd(*args, check=False), *fragments)


def test_unwritable_data_dir(data_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = run_nnd(*_cli_args(data_dir, 1000, "--store", str(blocker / "store.zarr")), check=False)
    _assert_one_line_error(proc, "cannot write")


def test_store_of_another_corpus_is_refused_and_left_intact(data_dir):
    run_nnd(*_cli_args(data_dir, 1000))
    location = store_path(data_dir, "tiny-llama", "bbc", "train", 32)
    before = tree_bytes(location)
    args = _cli_args(data_dir, 1000, "--store", str(location))
    args[args.index("--data") + 1] = "sotu"
    _assert_one_line_error(run_nnd(*args, check=False), "data='bbc'", "another model or corpus")
    assert tree_bytes(location) == before


def test_a_second_harvest_of_the_same_store_is_refused(data_dir):
    location = store_path(data_dir, "tiny-llama", "bbc", "train", 32)
    location.parent.mkdir(parents=True)
    with writer_lock(Root(location), run_id="someone-else", shard=0, n_shards=1):
        proc = run_nnd(*_cli_args(data_dir, 1000), check=False)
    _assert_one_line_error(proc, "another harvest", f"(pid {os.getpid()} on host", "is writing")
    assert not (location / "zarr.json").exists()


def test_non_finite_activations_fail_loudly(data_dir):
    from pipeline.data.store import check_finite

    bad = np.ones((4, 3), dtype=np.float16)
    bad[2, 1] = np.inf
    with pytest.raises(UserError, match="layer 5 mlp_out, chunk 7.*float32"):
        check_finite(bad, 5, "mlp_out", 7, "float16")
    too_big = np.full((2, 2), 1e6, dtype=np.float32)  # fits fp32, overflows fp16
    with pytest.raises(UserError, match="overflow float16"):
        check_finite(too_big, 0, "mlp_in", 0, "float16")
    check_finite(too_big, 0, "mlp_in", 0, "float32")


def test_parse_layers():
    assert parse_layers("0-3") == [0, 1, 2, 3]
    assert parse_layers("5,0-1,3") == [0, 1, 3, 5]
    for bad in ("", "a", "1-", "3-1", "1,,2"):
        with pytest.raises(UserError):
            parse_layers(bad)


@pytest.mark.slow
def test_smollm2_smoke_matches_a_direct_forward_hook(smol_data_dir):
    cfg = HarvestConfig(lm="smollm2-135m", data="bbc", layers=(0, 3), tokens=2000, ctx=128, chunk_rows=1024,
                        data_dir=smol_data_dir)
    harvest(cfg, progress=False)
    st = HarvestStore.open(cfg.location, layers=[0, 3])
    assert st.d_model == 576 and st.manifest["d_mlp"] == 1536 and st.n_rows == 2032
    lm = load_lm("smollm2-135m", smol_data_dir)
    ids = torch.from_numpy(token_table(lm, "bbc", "train", 128, st.n_rows).ids[:4]).long()
    x, y = _direct_mlp_io(lm, ids, layer=3)
    want_in = x[:, 1:].reshape(-1, 576).numpy()
    want_out = y[:, 1:].reshape(-1, 576).numpy()
    got_in = st.array(3, "mlp_in")[: 4 * 127].astype(np.float32)
    got_out = st.array(3, "mlp_out")[: 4 * 127].astype(np.float32)
    # fp16 keeps 11 significant bits: relative error <= 2^-11 per element
    np.testing.assert_allclose(got_in, want_in, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-3, atol=1e-2)
