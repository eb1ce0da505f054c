"""What every stage does at its edge: quiet third-party chatter, turn UserError into one line, and
cache analysis results as JSON by what they were computed from."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable

import typer

from pipeline.core.errors import Interrupted, UserError


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def stage(fn):
    """Wrap a typer command: bad input prints `error: ...` and exits 2."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if os.environ.get("RANK", "0") == "0":  # the workers of a distributed run: one line, from rank 0
                print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(2) from None
        except Interrupted as e:
            print(f"interrupted: {e}", file=sys.stderr)
            raise typer.Exit(130) from None

    return run


def parse_numbers(text: str, what: str, kind: type = int, example: str = "8,16,32") -> list:
    """'8,16,32' -> [8, 16, 32] (``kind`` int or float), in the order given; anything else is one clear error."""
    noun = "integer" if kind is int else "number"
    try:
        values = [kind(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"{what}='{text}' must be a{'n' if kind is int else ''} {noun} or a comma list of {noun}s, "
                        f"e.g. {example}") from None
    if not values:
        raise UserError(f"{what} is empty; give at least one value, e.g. {what}={example}")
    return values


def parse_ints(text: str, what: str) -> list[int]:
    return parse_numbers(text, what, int)


# ----- results cached as JSON by (identity, params), shared by the analysis stages -----------------

def plain(obj):
    """``obj`` as plain JSON values (tensors, paths and numpy values converted), so saved and new compare equal."""
    import json

    from pipeline.eval.reference import json_default

    return json.loads(json.dumps(obj, default=json_default))


def cached(path: Path, identity: dict, params: dict, compute: Callable, force: bool = False, key: str = "result",
           to_json: Callable = plain, from_json: Callable = lambda v: v):
    """(value, was_cached): the value saved under ``key`` at ``path`` for exactly this identity and these
    params, else ``compute()`` saved there atomically. ``force`` recomputes."""
    import json

    from pipeline.core.io import write_json_atomic

    if path.exists() and not force:
        saved = json.loads(path.read_text())
        if saved.get("identity") == plain(identity) and saved.get("params") == plain(params):
            return from_json(saved[key]), True
    saved = to_json(compute())
    write_json_atomic(path, {"identity": plain(identity), "params": plain(params), key: saved})
    return from_json(saved), False  # the same form a cached read returns


def gathered(folder: Path, name: str, params: dict, first: list[str], key: str = "result",
             from_json: Callable = lambda v: v) -> dict:
    """Every method's value cached as ``folder/<method>/<name>`` with the same ``params``: the methods in
    ``first`` in that order, then the others (earlier runs' methods join the table and the plot)."""
    import json

    found = {}
    for path in sorted(folder.glob(f"*/{name}")):
        saved = json.loads(path.read_text())
        if saved.get("params") == plain(params):
            found[path.parent.name] = from_json(saved[key])
    return {m: found[m] for m in [*first, *sorted(set(found) - set(first))] if m in found}
