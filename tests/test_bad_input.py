"""Bad input through the real CLI (issue #15, item 9): each case exits non-zero with one
`error:` line and no traceback, and leaves DATA_DIR byte for byte as it was; or it has a
documented sensible behaviour, asserted here (a damaged checkpoint is retrained by `train`).
"""

from __future__ import annotations

import shutil

import pytest

from pipeline import checkpoint
from pipeline.core import io
from pipeline.core.errors import UserError
from test_reliability import TINY, checksum, nnd, one_error_line, toy_ckpt, toy_dir, train_args

pytestmark = pytest.mark.usefixtures("one_thread")


# ----- 9. bad input through the CLI: one line, non-zero, DATA_DIR unchanged --------------------

HARVEST_CASES = [
    (["--ctx", "100000"], ["CTX=100000", "maximum of 512 positions"]),
    (["--ctx", "600"], ["CTX=600", "maximum of 512"]),
    (["--shards", "0"], ["SHARDS=0"]),
    (["--layers", "0-999"], ["LAYERS 4-999 outside tiny-llama"]),
    (["--chunk-rows", "0"], ["CHUNK_ROWS=0"]),
    (["--tokens", "0"], ["TOKENS=0"]),
]


@pytest.mark.parametrize("flags, fragments", HARVEST_CASES, ids=[" ".join(c[0]) for c in HARVEST_CASES])
def test_bad_harvest_input(data_dir, flags, fragments):
    args = ["harvest", *TINY, "--data", "bbc", "--layers", "0", "--tokens", 500, "--data-dir", data_dir]
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    before = checksum(data_dir)
    line = one_error_line(nnd(*args), *fragments)
    assert len(line) < 300
    assert checksum(data_dir) == before


def test_bad_train_input_and_damaged_checkpoints(tmp_path):
    data_dir = toy_dir(tmp_path)
    before = checksum(data_dir)
    one_error_line(nnd(*train_args(data_dir), "--latents", "-5"), "LATENTS=-5")
    assert checksum(data_dir) == before
    assert nnd(*train_args(data_dir)).code == 0
    ckpt = toy_ckpt(data_dir)
    weights = (ckpt / "weights.safetensors").read_bytes()
    (ckpt / "weights.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(UserError, match="damaged"):
        checkpoint.load(ckpt)
    (ckpt / "weights.safetensors").write_bytes(weights)
    for garbage in ("not json {", "[1, 2]", '{"family": "transcoder", "config": 7}', '{"metadata": 5}'):
        (ckpt / "config.json").write_text(garbage)
        with pytest.raises(UserError, match="delete it and train it again|not a checkpoint config|unreadable|unknown method"):
            checkpoint.load(ckpt)
    r = nnd(*train_args(data_dir))  # a damaged checkpoint is stale: train replaces it (documented)
    assert r.code == 0 and "trained 1 dictionary" in r.stdout, r.stderr
    assert checkpoint.load(ckpt).module is not None


def test_unknown_store_for_verify_is_one_line(data_dir):
    before = checksum(data_dir)
    one_error_line(nnd("verify", "--lm", "tiny-llama", "--data", "bbc", "--ctx", 32, "--data-dir", data_dir),
                   "no harvest store")
    one_error_line(nnd("harvest", "--repair", "--lm", "tiny-llama", "--data", "bbc", "--ctx", 32, "--data-dir", data_dir),
                   "no harvest store")
    assert checksum(data_dir) == before


def test_harvest_and_train_check_free_space_before_the_work(data_dir, tmp_path, monkeypatch):
    toy = toy_dir(tmp_path)
    before, toy_before = checksum(data_dir), checksum(toy)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    one_error_line(nnd("harvest", *TINY, "--data", "bbc", "--layers", "0", "--tokens", 500, "--data-dir", data_dir),
                   "not enough free space for the harvest store", "MB needed")
    one_error_line(nnd(*train_args(toy)), "not enough free space", "MB needed")
    monkeypatch.setattr(io, "_read_only", lambda folder: True)
    one_error_line(nnd(*train_args(toy)), "is not writable")
    assert checksum(data_dir) == before and checksum(toy) == toy_before
