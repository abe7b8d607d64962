"""The root ``resserve`` command, assembled from the command groups that are installed.

Each side of the project registers its commands through the ``resserve.commands`` entry point
(pyproject.toml): ``resserve.serve.cli:register`` (serve, classify, health, bench serve) and
``resserve.train.cli:register`` (data, train, eval, export, experiment, bench train/model).
This module imports neither side: it starts without torch, and serve/ never imports train/.
"""

from __future__ import annotations

import os
import platform
import signal
import sys
import threading
from importlib import metadata
from importlib.metadata import entry_points
from typing import Annotated


def _interrupted_while_loading(signum: int, frame: object) -> None:
    """Ctrl-C while the modules below load (a third of a second, before ``main`` catches it): the
    line and exit code of any interrupted command, not a traceback of the import it cut short."""
    sys.stderr.write("interrupted\n")
    raise SystemExit(130)


# Only Python's own KeyboardInterrupt handler is replaced (a command a script started in its
# background ignores SIGINT, and keeps ignoring it), and only until the imports below are done.
_QUIET_WHILE_LOADING = (threading.current_thread() is threading.main_thread()
                        and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
if _QUIET_WHILE_LOADING:
    signal.signal(signal.SIGINT, _interrupted_while_loading)

# Before the first import of grpc, which reads it: resserve never forks a process that uses gRPC,
# and without this gRPC core logs "skipping fork() handlers" whenever a library it loads forks.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def _serves() -> bool:
    """Whether this process is ``resserve serve`` (its workers inherit what it sets below), rather
    than a command that is a client of servers, or none."""
    return next((arg for arg in sys.argv[1:] if not arg.startswith("-")), "") == "serve"


# gRPC core's own log lines on stderr: in a server errors only (not "I1202 ... Handshake failed"
# for each client whose TLS connection failed); in the other commands none, as their one line says
# what failed (gRPC core wrote four lines of its own beside it for a proxy refusing the connection)
os.environ.setdefault("GRPC_VERBOSITY", "ERROR" if _serves() else "NONE")

import typer  # noqa: E402

from resserve.serve.errors import ResserveError  # noqa: E402

if _QUIET_WHILE_LOADING:
    signal.signal(signal.SIGINT, signal.default_int_handler)

COMMAND_GROUPS = "resserve.commands"
# what `resserve --version` reports beside resserve: the packages that decide how it serves and trains
RUNTIME_PACKAGES = ("grpcio", "onnxruntime", "onnxruntime-gpu", "openvino", "torch", "aiohttp", "numpy")
# Plain help (click's layout): typer's rich panels print flags as "--json <bool>", which reads as
# an option that takes a value. Every command group uses this.
HELP_STYLE = None


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="resserve",
        help="Train the lecture's residual networks on MNIST, export them, and serve digit "
        "classification over gRPC and HTTP.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=HELP_STYLE,
    )
    app.callback()(_root_options)
    bench_app = typer.Typer(help="Benchmarks: print a table (and JSON) against a baseline measured in the same run.",
                            no_args_is_help=True, rich_markup_mode=HELP_STYLE)
    app.add_typer(bench_app, name="bench")
    for group in sorted(entry_points(group=COMMAND_GROUPS), key=lambda ep: ep.name):
        group.load()(app, bench_app)
    return app


def _show_version(asked: bool) -> None:
    """--version: resserve's version, then what else decides how it runs: Python, the platform and
    the runtimes installed (read from their packages' metadata, so nothing heavy is imported)."""
    if not asked:
        return
    from resserve.serve import __version__

    installed = []
    for package in RUNTIME_PACKAGES:
        try:
            installed.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    typer.echo(f"resserve {__version__} (Python {platform.python_version()} on {platform.system()} "
               f"{platform.machine()})\n{', '.join(installed)}")
    raise typer.Exit()


def _root_options(
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_show_version,
        help="Print the versions of resserve, Python and the runtimes installed (for a bug report), and exit.")] = False,
) -> None:
    """The root command's own options (the app's help says what resserve is)."""


class Terminated(BaseException):
    """SIGTERM: what ``docker stop``, Kubernetes and batch schedulers send before they kill a
    process. Raised where the command is, as Ctrl-C's KeyboardInterrupt is (and like it, not an
    ``Exception``), so that the command stops the same way: ``resserve train`` saves its finished
    epochs, export and every atomic write remove their temporary files. Not a KeyboardInterrupt:
    typer would turn that into a silent exit 130. (``resserve serve`` handles SIGTERM itself: it
    drains.)"""


TERMINATED_EXIT_CODE = 128 + signal.SIGTERM  # as a shell reports a process SIGTERM ended


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main() -> None:
    """Console entry point: expected failures become one line on stderr and a non-zero exit."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        build_app()()
    except ResserveError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Terminated:
        typer.echo("terminated", err=True)
        sys.exit(TERMINATED_EXIT_CODE)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
