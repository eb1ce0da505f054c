"""The loader: coverage, alignment, determinism, resume, ranks, raw vs zarr reads, bad data."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.errors import UserError
from pipeline.data.loader import ActivationLoader, LoaderConfig
from pipeline.data.store import HarvestStore, StoreWriter, chunk_rows_for

CTX = 9  # 8 rows per sequence
CHUNK_ROWS = 64

pytestmark = pytest.mark.usefixtures("one_thread")


def write_store(path: Path, n_rows: int = 1000, d: int = 4, layers=(0, 1), compressor: str = "none",
                lm: str = "test-lm", token_offset: int = 0) -> HarvestStore:
    """A real store whose row r holds (r // 1000, r % 1000, layer, hook id) in every array."""
    identity = {"lm": lm, "lm_weights_sha256": lm, "data": "ids", "split": "train", "ctx": CTX,
                "bos_token_id": None, "separator_token_id": None, "dtype": "float16", "compressor": compressor,
                "chunk_rows": chunk_rows_for(CTX, CHUNK_ROWS)}
    writer = StoreWriter(path, identity, {"mlp_in": "in.{layer}", "mlp_out": "out.{layer}"}, d_model=d,
                         n_layers=max(layers) + 1, d_mlp=d)
    n_rows -= n_rows % (CTX - 1)
    rows = np.arange(n_rows)
    writer.prepare(n_rows, list(layers), ((rows + token_offset).astype(np.int32), (rows // 8).astype(np.int32),
                                          (1 + rows % 8).astype(np.int32)))
    for layer in layers:
        for c in range(writer.n_chunks):
            r = rows[c * writer.chunk_rows : (c + 1) * writer.chunk_rows]
            values = {}
            for h, hook in enumerate(("mlp_in", "mlp_out")):
                x = np.zeros((len(r), d), np.float16)
                x[:, 0], x[:, 1], x[:, 2], x[:, 3] = r // 1000, r % 1000, layer, h
                values[hook] = x
            writer.write_chunk(layer, c, values)
    writer.finalize()
    return HarvestStore.open(path)


def row_ids(t: torch.Tensor) -> np.ndarray:
    a = t.float().numpy()
    return (a[:, 0] * 1000 + a[:, 1]).astype(np.int64)


def take(loader: ActivationLoader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


KEYS = [(0, "mlp_in"), (1, "mlp_out")]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> HarvestStore:
    return write_store(tmp_path_factory.mktemp("st") / "s.zarr")


def test_one_epoch_serves_every_row_once_aligned_and_shuffled(store):
    batch = 50
    loader = ActivationLoader(store, KEYS, LoaderConfig(batch_size=batch, buffer_chunks=3, seed=1))
    n_batches = store.n_rows // batch
    batches = take(loader, n_batches)
    ids = np.concatenate([row_ids(b[(0, "mlp_in")]) for b in batches])
    assert len(ids) == n_batches * batch
    assert len(np.unique(ids)) == len(ids)  # no row twice within the epoch
    assert set(ids) <= set(range(store.n_rows))
    for b in batches:  # same row in every array; layer and hook as asked
        np.testing.assert_array_equal(row_ids(b[(0, "mlp_in")]), row_ids(b[(1, "mlp_out")]))
        assert (b[(1, "mlp_out")][:, 2] == 1).all() and (b[(1, "mlp_out")][:, 3] == 1).all()
        assert b[(0, "mlp_in")].dtype == torch.float16
    assert not np.all(np.diff(ids) > 0)  # shuffled
    # the shuffle mixes rows across chunks within a batch
    assert len({i // store.chunk_rows for i in row_ids(batches[0][(0, "mlp_in")])}) > 1


def test_epochs_continue_past_the_end_and_reuse_warns(store):
    loader = ActivationLoader(store, KEYS, LoaderConfig(batch_size=128, seed=0))
    per_epoch = store.n_rows // 128
    batches = take(loader, per_epoch * 2 + 3)
    ids = np.concatenate([row_ids(b[(0, "mlp_in")]) for b in batches])
    assert len(ids) == 128 * (per_epoch * 2 + 3)
    assert np.bincount(ids).max() >= 2
    with pytest.warns(UserWarning, match="reuses"):
        loader.warn_if_reused(store.n_rows * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.warn_if_reused(store.n_rows)


def test_deterministic_per_seed(store):
    def ids(seed):
        loader = ActivationLoader(store, KEYS, LoaderConfig(batch_size=64, seed=seed))
        return np.concatenate([row_ids(b[(0, "mlp_in")]) for b in take(loader, 20)])

    np.testing.assert_array_equal(ids(3), ids(3))
    assert not np.array_equal(ids(3), ids(4))


def test_resume_mid_epoch_continues_the_same_stream(store):
    cfg = LoaderConfig(batch_size=70, seed=5)
    full = [row_ids(b[(0, "mlp_in")]) for b in take(ActivationLoader(store, KEYS, cfg), 30)]
    first = ActivationLoader(store, KEYS, cfg)
    take(first, 17)  # stops mid-epoch, mid-group
    state = first.state_dict()
    second = ActivationLoader(store, KEYS, cfg)
    second.load_state_dict(state)
    rest = [row_ids(b[(0, "mlp_in")]) for b in take(second, 13)]
    for a, b in zip(full[17:], rest):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(UserError, match="seed"):
        ActivationLoader(store, KEYS, LoaderConfig(batch_size=70, seed=6)).load_state_dict(state)


def test_ranks_read_disjoint_chunks_covering_the_store(store):
    seen = []
    for rank in range(2):
        loader = ActivationLoader(store, KEYS, LoaderConfig(batch_size=8, seed=2, rank=rank, world_size=2))
        n = loader.rows_per_epoch // 8
        seen.append(set(np.concatenate([row_ids(b[(0, "mlp_in")]) for b in take(loader, n)])))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == store.n_rows


def test_raw_file_reads_equal_zarr_reads_and_compressed_falls_back(store, tmp_path):
    loader = ActivationLoader(store, KEYS, LoaderConfig(batch_size=8))
    last = store.n_chunks - 1  # partial last chunk included
    for chunk in (0, last):
        assert store.chunk_file(0, "mlp_in", chunk).exists()
        raw = np.empty((store.rows_in_chunk(chunk), store.d_model), np.float16)
        loader._read_chunk_into((0, "mlp_in"), chunk, raw)
        np.testing.assert_array_equal(raw, store.array(0, "mlp_in")[chunk * store.chunk_rows : chunk * store.chunk_rows + len(raw)])
    zstd = write_store(tmp_path / "z.zarr", compressor="zstd")
    assert zstd.chunk_file(0, "mlp_in", 0) is None
    a = take(ActivationLoader(store, KEYS, LoaderConfig(batch_size=64, seed=9)), 5)
    b = take(ActivationLoader(zstd, KEYS, LoaderConfig(batch_size=64, seed=9)), 5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x[(1, "mlp_out")], y[(1, "mlp_out")])


def test_non_finite_chunk_is_named(tmp_path):
    st = write_store(tmp_path / "nan.zarr", n_rows=300, layers=(0,))
    path = st.chunk_file(0, "mlp_out", 2)
    data = np.fromfile(path, dtype="<f2")
    data[7] = np.nan
    data.tofile(path)
    loader = ActivationLoader(st, [(0, "mlp_in"), (0, "mlp_out")], LoaderConfig(batch_size=32))
    with pytest.raises(UserError, match=r"layer 0 mlp_out, chunk 2"):
        take(loader, 100)


def test_stores_from_different_models_or_tokens_are_refused(store, tmp_path):
    other_lm = write_store(tmp_path / "o.zarr", lm="other-lm")
    with pytest.raises(UserError, match="differ in lm"):
        ActivationLoader(store, KEYS, LoaderConfig(), sources={(1, "mlp_out"): other_lm})
    other_tokens = write_store(tmp_path / "t.zarr", token_offset=1)
    with pytest.raises(UserError, match="different token"):
        ActivationLoader(store, KEYS, LoaderConfig(), sources={(1, "mlp_out"): other_tokens})
    same = write_store(tmp_path / "same.zarr")
    loader = ActivationLoader(store, KEYS, LoaderConfig(batch_size=16), sources={(1, "mlp_out"): same})
    b = take(loader, 1)[0]
    np.testing.assert_array_equal(row_ids(b[(0, "mlp_in")]), row_ids(b[(1, "mlp_out")]))


def test_bad_requests(store):
    with pytest.raises(UserError, match="layer 5"):
        ActivationLoader(store, [(5, "mlp_in")], LoaderConfig())
    with pytest.raises(UserError, match="no hook"):
        ActivationLoader(store, [(0, "resid")], LoaderConfig())
    with pytest.raises(UserError, match="batch size"):
        LoaderConfig(batch_size=0)
