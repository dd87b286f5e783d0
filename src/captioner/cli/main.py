"""The `captioner` command."""

from __future__ import annotations

import typer

from captioner import __version__
from captioner.cli import data_commands, ground_command, inference_commands, serve, train_command
from captioner.cli.common import CaptionerGroup

app = typer.Typer(
    name="captioner",
    help="Image captioning: prepare data, extract features, train, caption, evaluate, serve.",
    cls=CaptionerGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"captioner {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    pass


app.command("prepare")(data_commands.prepare_cmd)
app.command("vocab-sample")(data_commands.vocab_sample_cmd)
app.command("features")(data_commands.features_cmd)
app.add_typer(data_commands.preview_app, name="preview")
app.command("train")(train_command.train_cmd)
app.command("scst")(train_command.scst_cmd)
app.command("average")(train_command.average_cmd)
app.command("ensemble")(train_command.ensemble_cmd)
app.command("ground")(ground_command.ground_cmd)
serve.register(app)
inference_commands.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
