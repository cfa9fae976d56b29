"""What every command group shares: the app factory (help style, one-line errors), the two
consoles, and the translation of command-line flags into config overrides.

Kept light on purpose: ``freezeframe`` is the main module of spawned decode workers, so
nothing here (or in the command modules' top level) imports torch or a stage's heavy code.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from pipeline.errors import FreezeframeError

console = Console(stderr=True)  # progress, logs, errors
out = Console()  # results (tables, summaries): what a script would capture

DEBUG_ENV = "FREEZEFRAME_DEBUG"


def debug_requested(ctx: typer.Context | None = None) -> bool:
    """True if ``--debug`` (root option) or ``FREEZEFRAME_DEBUG`` (not "", "0", "false", "no") asks for tracebacks."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return True
    return bool(ctx is not None and ctx.find_root().params.get("debug"))


def print_error(err: BaseException | str) -> None:
    """The project's error line on stderr: ``error: <message>`` (never wrapped; a
    :class:`~pipeline.errors.ManifestError` keeps its list of problems on the lines below)."""
    console.print(Text("error: ", style="bold red") + Text(str(err)), soft_wrap=True, highlight=False)


def path_error_message(err: OSError) -> str | None:
    """One line for an error about a path the user gave (permission denied, missing folder,
    disk full, ...): ``None`` when the error names no file (then it is a bug, shown in full)."""
    if err.filename is None:
        return None
    what = err.strerror or type(err).__name__
    other = f" -> {err.filename2}" if err.filename2 else ""
    return f"{what}: {err.filename}{other} (check the path and its permissions; --debug shows the traceback)"


class AppGroup(TyperGroup):
    """A command group that turns a :class:`FreezeframeError` raised by any of its commands,
    or an :class:`OSError` about a named path, into :func:`print_error` and exit status 2,
    unless :func:`debug_requested`."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FreezeframeError as e:
            if debug_requested(ctx):
                raise
            print_error(e)
            raise typer.Exit(2) from None
        except OSError as e:
            msg = path_error_message(e)
            if msg is None or debug_requested(ctx):
                raise
            print_error(msg)
            raise typer.Exit(2) from None


def new_app(help: str, *, cls: type[AppGroup] = AppGroup, **kwargs: Any) -> typer.Typer:
    """A typer app in the project's style: plain help text (square brackets survive, no rich
    markup), defaults shown, flags shown as flags, errors as one line (:class:`AppGroup`)."""
    return typer.Typer(
        help=help,
        cls=cls,
        rich_markup_mode=None,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        context_settings={"show_default": True, "max_content_width": 100},
        **kwargs,
    )


def flag_overrides(**flags: object) -> list[str]:
    """Turn CLI flags that were given (not None) into dotted ``key=value`` overrides
    (the syntax of :func:`pipeline.config.parse_overrides`); paths and other values become
    quoted strings."""
    overrides = []
    for key, value in flags.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        overrides.append(f"{key}={text}")
    return overrides


def config_option(cls: type, key: str, help: str, *param_decls: str) -> Any:
    """An option that overrides config field ``key`` of ``cls`` when given (value None when
    left out, see :func:`flag_overrides`); its help shows the dataclass default."""
    return typer.Option(None, *param_decls, help=help, show_default=config_default(cls, key))


def config_default(cls: type, dotted: str) -> str:
    """The default of a (nested) dataclass field as help text, e.g. ``config_default(TrainConfig,
    "optim.epochs") == "800"``; ``None`` reads "none". Options whose value is None on the
    command line fall back to the config files, then to these defaults."""
    obj: Any = cls()
    for part in dotted.split("."):
        obj = getattr(obj, part)
    if obj is None:
        return "none"
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if dataclasses.is_dataclass(obj):
        raise ValueError(f"{dotted} is a config section, not a field")
    return str(obj)


#: ``--storage-option KEY=VALUE`` of the commands that open a store (remote stores only)
STORAGE_OPTION = typer.Option([], "--storage-option", metavar="KEY=VALUE", show_default=False,
                              help="fsspec option of an s3:// / gs:// store (repeatable; e.g. endpoint_url=http://"
                              "minio:9000, anon=true); the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) "
                              "fills in the rest.")


def storage_options(pairs: list[str]) -> dict[str, Any] | None:
    """``--storage-option`` pairs as a dict (values parsed like ``--set``: ``true`` is a bool,
    dotted keys nest), None when none were given."""
    from pipeline.config import parse_overrides

    return parse_overrides(pairs) if pairs else None
