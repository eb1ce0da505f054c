"""Round-trip errors of our exports as the real sae-lens and circuit-tracer compute them, on trained checkpoints.

Two steps in two environments (the store needs zarr, which the side environment lacks):

    .venv/bin/python bench/bench_interop.py rows --store STORE --out rows.safetensors
    .venv-interop/bin/python bench/bench_interop.py measure --rows rows.safetensors --train TRAIN_GROUP_DIR \
        --data-dir DATA_DIR [--k 32] [--work /tmp/x]

``rows`` saves the last chunk's mlp_in / mlp_out rows of every stored layer. ``measure`` exports
each per-layer checkpoint at K to SAELens and, per variant, the layer set to circuit-tracer (padded
to the model's depth), and the CLT at K, loads them with sae-lens / circuit-tracer, and compares
latents and outputs with ours on those rows: max |ours - theirs| and the relative error
||ours - theirs|| / ||ours|| (Frobenius), plus the padded exports' apparent and allocated size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

CLT_ROWS = 64


def dump_rows(store_path: Path, out: Path) -> None:
    from safetensors.torch import save_file

    from pipeline.data.store import HarvestStore

    store = HarvestStore.open(store_path)
    last = store.n_chunks - 1
    tensors = {f"{hook}_{layer}": torch.from_numpy(store.read_chunk(layer, hook, last).astype("float32"))
               for layer in store.layers for hook in ("mlp_in", "mlp_out")}
    save_file(tensors, out)
    print(f"rows: {out} ({len(tensors)} arrays of {next(iter(tensors.values())).shape[0]} rows)")


def errors(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    diff = (ours - theirs).abs()
    return {"max_abs": float(diff.max()), "rel": float(diff.norm() / ours.norm().clamp_min(1e-30)),
            "firing_agree": float(((ours > 0) == (theirs > 0)).float().mean())}


def disk(folder: Path) -> dict:
    files = [p for p in folder.glob("*.safetensors")]
    return {"apparent_mb": sum(p.stat().st_size for p in files) / 2**20,
            "allocated_mb": sum(p.stat().st_blocks * 512 for p in files) / 2**20}


def measure(args) -> dict:
    from safetensors.torch import load_file

    from pipeline import checkpoint
    from pipeline.core.errors import UserError
    from pipeline.export import export_saelens
    from pipeline.export.circuit_tracer import write_circuit_tracer

    torch.set_num_threads(1)
    rows = load_file(args.rows)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_interop_"))
    transcoders = sorted((args.train / "transcoder").glob(f"*-k{args.k}-L*"))
    results = {"saelens": {}, "circuit_tracer_set": {}, "circuit_tracer_clt": {}}
    lm = checkpoint.load(transcoders[0]).metadata["lm"]
    depth = json.loads((Path(args.data_dir) / "models" / lm / "config.json").read_text())["num_hidden_layers"]

    from sae_lens import SAE

    by_variant: dict[str, list] = {}
    for path in transcoders:
        loaded = checkpoint.load(path)
        m = loaded.module
        by_variant.setdefault(m.cfg.variant, []).append(loaded)
        x = rows[f"{m.cfg.input_hook}_{m.cfg.layer}"]
        try:
            out = export_saelens([loaded], work / "saelens" / path.name)
        except UserError as e:
            results["saelens"][path.name] = {"refused": str(e)}
            continue
        sae = SAE.load_from_disk(out, device="cpu")
        with torch.no_grad():
            acts = m.encode(x)
            results["saelens"][path.name] = {"latents": errors(acts, sae.encode(x)),
                                             "output": errors(m.reconstruct(acts, x), sae(x))}

    from circuit_tracer.utils.hf_utils import load_transcoders
    import yaml

    for variant, loaded in by_variant.items():
        name = f"{variant}-k{args.k}"
        try:
            out = write_circuit_tracer(loaded, work / "ct" / name, depth=depth)
        except UserError as e:
            results["circuit_tracer_set"][name] = {"refused": str(e)}
            continue
        ts = load_transcoders(yaml.safe_load((out / "config.yaml").read_text()), device=torch.device("cpu"),
                              dtype=torch.float32)
        per = {}
        with torch.no_grad():
            for c in loaded:
                layer, m = c.module.cfg.layer, c.module
                x = rows[f"mlp_in_{layer}"]
                acts = m.encode(x)
                theirs = ts[layer].encode(x)
                per[layer] = {"latents": errors(acts, theirs), "output": errors(m.reconstruct(acts, x), ts[layer].decode(theirs, x))}
        results["circuit_tracer_set"][name] = {"layers": per, "n_files": ts.n_layers, **disk(out)}

    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    for path in sorted((args.train / "clt").glob(f"*-k{args.k}-L*")):
        loaded = checkpoint.load(path)
        clt = loaded.module
        out = write_circuit_tracer(loaded, work / "ct" / path.name, depth=depth)
        ct = load_clt(str(out), feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out",
                      device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=True)
        n = rows["mlp_in_0"].shape[0]
        x = torch.zeros(depth, n, clt.cfg.d_in)
        for layer in clt.cfg.layers:
            x[layer] = rows[f"mlp_in_{layer}"]
        per = {}
        with torch.no_grad():
            acts = ct.encode(x)
            # circuit-tracer's CLT decode gathers each active latent's decoder over every later layer
            # ([active, depth - p, d]): ~16 GB for these rows at once, so in slices of CLT_ROWS
            got = torch.cat([ct.forward(x[:, i:i + CLT_ROWS]) for i in range(0, n, CLT_ROWS)], dim=1)
            want = clt({l: x[l] for l in clt.cfg.layers})
            for layer in clt.cfg.layers:
                per[layer] = {"latents": errors(clt.encode_layer(layer, x[layer]), acts[layer]),
                              "output": errors(want[layer], got[layer])}
        results["circuit_tracer_clt"][path.name] = {"layers": per, "n_files": ct.n_layers, **disk(out)}
    return results


def summary(results: dict) -> str:
    lines = ["| format | dictionary | latents max abs | latents rel | output max abs | output rel |", "|---|---|---|---|---|---|"]
    for fmt, entries in results.items():
        for name, r in entries.items():
            if "refused" in r:
                lines.append(f"| {fmt} | {name} | refused: {r['refused'][:60]}... | | | |")
                continue
            parts = r["layers"].values() if "layers" in r else [r]
            worst = {(a, k): max(p[a][k] for p in parts) for a in ("latents", "output") for k in ("max_abs", "rel")}
            lines.append(f"| {fmt} | {name} | {worst['latents', 'max_abs']:.2e} | {worst['latents', 'rel']:.2e} | "
                         f"{worst['output', 'max_abs']:.2e} | {worst['output', 'rel']:.2e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rows")
    r.add_argument("--store", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    m = sub.add_parser("measure")
    m.add_argument("--rows", type=Path, required=True)
    m.add_argument("--train", type=Path, required=True, help="<data>/train/<lm>/<data>/ctx<N> (holds transcoder/ and clt/)")
    m.add_argument("--data-dir", type=Path, required=True)
    m.add_argument("--k", type=int, default=32)
    m.add_argument("--work", type=Path, default=None)
    m.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.cmd == "rows":
        dump_rows(args.store, args.out)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = measure(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(summary(results))


if __name__ == "__main__":
    main()
