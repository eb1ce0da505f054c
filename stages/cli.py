"""The `nnd` console script: one sub-command per pipeline stage."""

import typer

from stages import harvest

app = typer.Typer(add_completion=False, no_args_is_help=True, help="nn-decompositions pipeline stages")


@app.callback()
def main() -> None:
    """Stages: harvest -> train -> evaluate -> report. `make help` lists the Make interface."""


app.command()(harvest.harvest)

if __name__ == "__main__":
    app()
