"""What every stage does at its edge: quiet third-party chatter, turn UserError into one line."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import typer

from pipeline.core.errors import UserError


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
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(2) from None

    return run


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
