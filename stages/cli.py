"""The `nnd` console script: one sub-command per pipeline stage."""

import typer

from stages import evaluate, export, harvest, train, verify
from stages import topics
from stages import features as features_stage
from stages import prefix as prefix_stage

app = typer.Typer(add_completion=False, no_args_is_help=True, help="nn-decompositions pipeline stages")


@app.callback()
def main() -> None:
    """Stages: harvest -> train -> evaluate/baselines -> report. `make help` lists the Make interface."""


app.command()(harvest.harvest)
app.command()(train.train)
app.command()(evaluate.evaluate)
app.command()(evaluate.baselines)
app.command()(evaluate.report)
app.command()(export.export)
app.command()(verify.verify)
# topic experiments (issue 11)
app.command()(topics.ablate_topics)
app.command()(topics.steer)
# ---- features (issue 10): look inside a dictionary ----
app.command()(features_stage.features)
app.command()(features_stage.dashboard)
app.command()(features_stage.intervene)
# more methods (issue 13): Matryoshka prefixes as narrower dictionaries
app.command()(prefix_stage.prefix)
# ---- interpretability scores and diagnostics (issue 12) ----
from stages import interp  # noqa: E402

app.command()(interp.autointerp)
app.command()(interp.faithfulness)
app.command()(interp.tail)
app.command()(interp.emergence)
app.command(name="judge-server")(interp.judge_server)

if __name__ == "__main__":
    app()
