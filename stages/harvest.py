"""`nnd harvest`: write MLP input/output activations of a model to a zarr store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer

from pipeline.core import defaults
from pipeline.core import paths
from pipeline.core.errors import UserError
from pipeline.core.layers import parse_layers
from pipeline.data.harvest import HarvestConfig, harvest as run_harvest
from stages.common import stage


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard '{text}' must look like I/N, e.g. 0/4") from None
    return i, n


@stage
def harvest(
    lm: str = typer.Option(defaults.LM, help="bundled model name or Hugging Face id"),
    data: str = typer.Option(defaults.DATA, help="bundled corpus, local .txt/.jsonl/.parquet path, or HF dataset id"),
    layers: str = typer.Option(defaults.LAYERS, help="layers, e.g. 0-3 or 0,2,5-7"),
    tokens: int = typer.Option(defaults.TOKENS, help="tokens (rows) to store, rounded up to whole sequences"),
    ctx: int = typer.Option(defaults.CTX, help="context length in tokens, BOS included"),
    split: str = typer.Option("train", help="train or eval"),
    dtype: str = typer.Option(defaults.DTYPE, help="float16 or float32"),
    compressor: str = typer.Option(defaults.COMPRESSOR, help="none or zstd"),
    data_dir: Path = typer.Option(Path(defaults.DATA_DIR), help="root of all stage outputs"),
    store: str = typer.Option(None, help="store location (path or fsspec URL) instead of the default under DATA_DIR"),
    shards: int = typer.Option(defaults.SHARDS, help="run this many local processes, each writing a disjoint part"),
    shard: str = typer.Option(None, help="run only shard I of N (I/N), e.g. one per machine on a shared filesystem"),
    text_field: str = typer.Option("text", help="text column of jsonl/parquet/HF data"),
    chunk_rows: int = typer.Option(defaults.CHUNK_ROWS, help="rows per chunk, rounded down to whole sequences"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    repair: bool = typer.Option(False, help="recompute exactly the chunks `nnd verify` finds damaged (settings from the store)"),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N (the model's forward; writes overlap it)"),
    model_dtype: str = typer.Option("float32", help="float32, or bfloat16 (GPU: faster; the activations differ)"),
):
    """Harvest MLP activations into data/harvest/<lm>/<data>/<split>-ctx<ctx>.zarr."""
    if shards < 1:
        raise UserError(f"SHARDS={shards} must be at least 1 (the number of harvest processes)")
    if repair:
        _repair(store or str(paths.store(data_dir, lm, data, split, ctx)), data_dir, text_field, progress)
        return
    if data == "toy":
        _harvest_toy(lm, layers, tokens, ctx, split, data_dir, store)
        return
    base = dict(lm=lm, data=data, split=split, layers=tuple(parse_layers(layers)), tokens=tokens, ctx=ctx,
                dtype=dtype, compressor=compressor, data_dir=data_dir, store=store, text_field=text_field,
                chunk_rows=chunk_rows, device=device, model_dtype=model_dtype)
    if shard is not None:
        i, n = _parse_shard(shard)
        summary = run_harvest(HarvestConfig(**base, shard=i, n_shards=n), progress=progress)
        print(summary.line())
        return
    if shards > 1:
        HarvestConfig(**base, shard=0, n_shards=shards)  # validate before spawning
        argv = ["harvest", "--lm", lm, "--data", data, "--layers", layers, "--tokens", str(tokens), "--ctx", str(ctx),
                "--split", split, "--dtype", dtype, "--compressor", compressor, "--data-dir", str(data_dir),
                "--text-field", text_field, "--chunk-rows", str(chunk_rows), "--progress" if progress else "--no-progress",
                "--device", device, "--model-dtype", model_dtype]
        if store:
            argv += ["--store", store]
        procs = [subprocess.Popen([sys.executable, "-m", "stages.cli", *argv, "--shard", f"{i}/{shards}"])
                 for i in range(shards)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise typer.Exit(max(codes))
        return
    summary = run_harvest(HarvestConfig(**base), progress=progress)
    print(summary.line())


def _repair(location: str, data_dir: Path, text_field: str, progress: bool) -> None:
    """Everything but the location comes from the store's manifest."""
    from pipeline.data.verify import repair_layers, verify

    before = verify(location)
    if before.ok:
        print(f"repair: {location} is intact ({before.chunks_checked} layer-chunks verified); nothing to do")
        return
    if before.half_created:
        raise UserError(f"{location} was never finished (no manifest); run the harvest command that created it")
    m, layers = repair_layers(location)
    if m.get("lm") == "toy":
        raise UserError(f"{location} is a toy store; delete it and run `nnd harvest --data toy` again")
    cfg = HarvestConfig(lm=m["lm"], data=m["data"], split=m["split"], layers=tuple(layers), tokens=int(m["n_rows"]),
                        ctx=int(m["ctx"]), dtype=m["dtype"], compressor=m["compressor"], data_dir=data_dir,
                        store=location, text_field=text_field, chunk_rows=int(m["chunk_rows"]),
                        model_dtype=m.get("model_dtype", "float32"))
    summary = run_harvest(cfg, progress=progress, repair=True)
    after = verify(location)
    if not after.ok:
        raise UserError(f"repair of {location} left {len(after.problems)} problems, e.g. {after.problems[0].line()}")
    print(f"repair: {len(before.problems)} problems fixed, {sum(summary.computed_chunks.values())} layer-chunks "
          f"recomputed -> {location}")


def _harvest_toy(lm: str, layers: str, tokens: int, ctx: int, split: str, data_dir: Path, store: str | None) -> None:
    """DATA=toy: the toy model of superposition, written through the same store writer."""
    from pipeline.data.harvest import store_path
    from pipeline.data.toy import ToyConfig, write_toy_store

    wanted = parse_layers(layers)
    location = store or str(store_path(data_dir, lm, "toy", split, ctx))
    st = write_toy_store(location, ToyConfig(n_layers=max(wanted) + 1, n_rows=tokens, ctx=ctx), split)
    print(f"harvest: toy store, {st.n_rows:,} rows, layers {st.layers} -> {location}")
