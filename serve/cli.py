"""The root ``resserve`` command.

It starts without torch: the training commands live in ``resserve.train.cli``, which imports
torch only inside the commands, and are added only where the train package is installed.
"""

import sys

import typer

from resserve.serve.errors import ResserveError

app = typer.Typer(
    name="resserve",
    help="Train the lecture's residual networks on MNIST, export them, and serve digit "
    "classification over gRPC.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
bench_app = typer.Typer(help="Benchmarks: print a table (and JSON) against a baseline measured in the same run.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _add_training_commands() -> None:
    try:
        from resserve.train import cli as train_cli
    except ImportError:  # a serving-only install without the train package
        return
    train_cli.register(app, bench_app)


_add_training_commands()


def main() -> None:
    """Console entry point: expected failures become one line on stderr and a non-zero exit."""
    try:
        app()
    except ResserveError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
