"""The command line's one error boundary: what a user sees when a command fails.

Every typer app of the command line is built with :class:`ErrorBoundary` as its click group class (see
:func:`mlmscope.app.cli.make_app`). A failing command prints one line, ``error: <message>``, and exits with status 1;
an interrupt exits with 130 and says that finished work is kept. :class:`~mlmscope.MlmscopeError` is the base of
every error raised for a user to read; any other exception is unexpected, and its message is shown the same way
(set ``MLMSCOPE_DEBUG=1`` to see its traceback instead).
"""

from __future__ import annotations

import os
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from ..checkpoints.errors import MlmscopeError

console = Console(stderr=True)


class UserError(MlmscopeError):
    """A problem with the command line itself (options that contradict each other, a malformed value)."""


#: Set to any non-empty value to let unexpected exceptions through with their traceback.
DEBUG_ENV = "MLMSCOPE_DEBUG"


def print_error(message: str) -> None:
    """One red ``error:`` line on stderr, unwrapped at any terminal width."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def error_message(e: BaseException) -> str:
    """The line shown for ``e``: its message (or its class name when it has none)."""
    return str(e) or type(e).__name__


class ErrorBoundary(TyperGroup):
    """Click group that turns any error raised by a (sub)command into one message and an exit status."""

    def invoke(self, ctx: Any) -> Any:  # typer's (vendored click) Context; typer does not export its class
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # typer's own (its click exceptions derive from TyperException): usage errors and exit codes
        except KeyboardInterrupt:
            print_error("interrupted (finished checkpoints and results are kept; rerun with --resume to go on)")
            raise typer.Exit(130) from None
        except MlmscopeError as e:
            print_error(error_message(e))
            raise typer.Exit(1) from None
        except Exception as e:
            if os.environ.get(DEBUG_ENV):
                raise
            print_error(error_message(e))
            raise typer.Exit(1) from None
