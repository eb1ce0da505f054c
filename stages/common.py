"""What every stage does at its edge: quiet third-party chatter, turn UserError into one line."""

from __future__ import annotations

import functools
import os
import sys

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
