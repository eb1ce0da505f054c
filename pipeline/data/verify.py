"""``nnd verify`` and ``nnd harvest --repair``: find and forget damaged parts of a harvest store.

Checked: the manifest (present, consistent with the arrays), the row arrays
(``tokens``, ``doc``, ``pos``) against the row-range hashes the manifest
records, and every written chunk of every layer and hook: its file (present,
full size), its checksum (recorded in its completion record at write time) and
that its values are finite. ``forget_damaged`` removes the completion records
(and files) of damaged chunks so the harvest recomputes exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.errors import UserError
from pipeline.data import integrity
from pipeline.data.loader import all_finite
from pipeline.data.store import ArraySpec, HarvestStore, Root, StoreWriter, half_created


@dataclass(frozen=True)
class Problem:
    what: str
    layer: int | None = None  # None: the manifest or a row array
    hook: str | None = None
    chunk: int | None = None  # None with a layer: the whole layer

    def line(self) -> str:
        where = "" if self.layer is None else f"layer {self.layer}" + (f" {self.hook}" if self.hook else "")
        where += "" if self.chunk is None else f" chunk {self.chunk}"
        return f"{where}: {self.what}" if where else self.what


@dataclass
class Report:
    location: str
    problems: list[Problem] = field(default_factory=list)
    chunks_checked: int = 0
    chunks_pending: int = 0  # not harvested yet (an unfinished layer): not damage
    half_created: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(location: str) -> Report:
    root = Root(location)
    report = Report(str(location))
    if not root.exists("zarr.json"):
        raise UserError(f"no harvest store at {location}; nothing to verify (check LM, DATA, CTX and DATA_DIR)")
    if half_created(root):
        report.half_created = True
        report.problems.append(Problem("its creation was interrupted (no manifest); the same harvest command recreates it"))
        return report
    st = HarvestStore.open(location)
    report.problems += _check_rows(st)
    present = StoreWriter.present_layers(st.group)
    for layer in sorted(set(present) | set(st.layers)):
        if layer not in present:
            report.problems.append(Problem("marked complete in the manifest but its arrays are missing", layer))
            continue
        _check_layer(st, layer, report)
    return report


def _check_rows(st: HarvestStore) -> list[Problem]:
    problems = []
    try:
        rows = tuple(st.rows(name) for name in integrity.ROW_ARRAYS)
    except Exception as e:  # a missing or torn row array: any reader error means damage
        return [Problem(f"the row arrays (tokens, doc, pos) cannot be read ({e.__class__.__name__})")]
    if any(len(r) != st.n_rows for r in rows):
        return [Problem(f"the row arrays hold {[len(r) for r in rows]} rows, the manifest says {st.n_rows}")]
    for r in st.manifest.get("row_ranges") or []:
        if integrity.rows_sha256(rows, r["start"], r["stop"]) != r["sha256"]:
            problems.append(Problem(f"rows {r['start']}-{r['stop'] - 1} of tokens/doc/pos do not match their recorded hash"))
    return problems


def _check_layer(st: HarvestStore, layer: int, report: Report) -> None:
    for hook in st.manifest["hooks"]:
        shape = st.array(layer, hook).shape
        if shape != (st.n_rows, st.d_model):
            report.problems.append(Problem(f"array shape {shape}, expected {(st.n_rows, st.d_model)}", layer, hook))
            return
    for c in range(st.n_chunks):
        record = st.record(layer, c)
        if record is None:
            if layer in st.layers:
                report.problems.append(Problem("completion record missing in a complete layer", layer, None, c))
            else:
                report.chunks_pending += 1
            continue
        report.chunks_checked += 1
        for hook in st.manifest["hooks"]:
            problem = _check_chunk(st, layer, hook, c, record)
            if problem:
                report.problems.append(Problem(problem, layer, hook, c))


def _check_chunk(st: HarvestStore, layer: int, hook: str, c: int, record: dict) -> str | None:
    damage = st.chunk_damage(layer, hook, c)
    if damage:
        return damage
    try:
        data = st.read_chunk(layer, hook, c)
    except integrity.StoreDamage:  # a torn compressed chunk
        return "unreadable (its compressed data is damaged)"
    if not all_finite(data):
        return "non-finite values (NaN/inf)"
    want = (record.get("sha256") or {}).get(hook)
    if want and integrity.chunk_sha256(data, st.manifest["dtype"]) != want:
        return "checksum mismatch (the data changed after it was written)"
    return None


def forget_damaged(location: str, report: Report) -> bool:
    """Remove the records (and files) of damaged chunks so they are recomputed; True if the
    row arrays must be rewritten."""
    st = HarvestStore.open(location)
    root = st.root
    rewrite_rows = False
    for p in report.problems:
        if p.layer is None:
            rewrite_rows = rewrite_rows or "row arrays" in p.what or "tokens/doc/pos" in p.what
            continue
        chunks = range(st.n_chunks) if p.chunk is None else [p.chunk]
        for c in chunks:
            for path in [root.join("progress", str(p.layer), f"{c}.json")] + [
                    root.join(ArraySpec(p.layer, h).key, "c", str(c)) for h in st.manifest["hooks"]]:
                if root.fs.exists(path):
                    root.fs.rm(path, recursive=True)
    return rewrite_rows


def repair_layers(location: str) -> tuple[dict, list[int]]:
    """The manifest and the layers a repair covers: every layer with arrays or marked complete."""
    st = HarvestStore.open(location)
    return st.manifest, sorted(set(StoreWriter.present_layers(st.group)) | set(st.layers))
