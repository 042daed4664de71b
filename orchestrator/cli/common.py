"""What every `orch` command shares: the app, its options, and user errors as one line.

A command parses its arguments, makes one call into orchestrator.api, and prints what it returns. The API
and everything heavy (torch, SQLAlchemy, MLflow) are imported inside the commands, so `orch --help` answers
at once. An error a user can fix prints one line with the fix and exits 2, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup


def usage_errors() -> tuple[type, type | tuple]:
    """typer's own parse errors (a missing argument, an unknown option), to show as one line too."""
    try:  # typer >= 0.2x carries its own copy of click
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:
        from click.exceptions import UsageError

        NoArgsIsHelpError = ()  # noqa: N806
    return UsageError, NoArgsIsHelpError


def user_message(exc: BaseException) -> str | None:
    usage, no_args_help = usage_errors()
    if isinstance(exc, usage) and not isinstance(exc, no_args_help):
        command = ["orch", *(exc.ctx.command_path.split()[1:] if exc.ctx is not None else [])]
        return f"{exc.format_message()} (see `{' '.join(command)} --help`)"
    if "orchestrator.api" in sys.modules:  # no API call yet: no error of the API's either
        return sys.modules["orchestrator.api"].user_message(exc)
    return None


class Commands(TyperGroup):
    """Every `orch` command: a user error that surfaces anywhere inside one (a database file found damaged
    mid-command, a server gone, a spec or data error past the command's own checks) ends as one line with
    exit 2; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = user_message(exc)
            if message is None:
                raise
            fail(message)


KINDS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH"}


def _conventional(display_type_rich):
    """Help as click tools show it: a flag shows no type, a value its kind in capitals (TEXT, INTEGER,
    FLOAT), a list its kind and "..." — where typer 0.29 prints Python's `<bool>` or `<list[str]>`."""

    def shown(self, ctx):
        if getattr(self, "is_flag", False):
            return None
        label = display_type_rich(self, ctx)
        if not (isinstance(label, str) and label.startswith("<") and label.endswith(">")):
            return label
        kind = label[1:-1]
        listed = kind.startswith("list[")
        kind = kind[5:-1] if listed else kind
        return KINDS.get(kind, kind.upper()) + ("..." if listed else "")

    return shown


for _param in ("TyperOption", "TyperArgument"):
    _cls = getattr(typer.core, _param, None)
    if _cls is not None and hasattr(_cls, "display_type_rich"):  # other typer versions: their own help
        _cls.display_type_rich = _conventional(_cls.display_type_rich)


# -h as well as --help on every command; help text as markdown, so a docstring's line breaks do not split
# its sentences; `orch --install-completion` installs shell completion (bash, zsh, fish, PowerShell).
app = typer.Typer(
    help="Queue, train and compare GPT-2 pre-training interventions.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
    cls=Commands,
)

DbOpt = Annotated[Optional[str], typer.Option("--db", help="SQLAlchemy URL (default $ORCH_DB or sqlite:///results.db)")]
MlflowOpt = Annotated[
    Optional[str], typer.Option("--mlflow", help="MLflow tracking URI (default $ORCH_MLFLOW or sqlite:///mlflow.db)")
]
NoMlflowOpt = Annotated[bool, typer.Option("--no-mlflow", help="do not track in MLflow")]
NoCheckDataOpt = Annotated[
    bool, typer.Option("--no-check-data", help="do not check data.path here (the data lives only on the worker nodes)")
]
AlphaOpt = Annotated[float, typer.Option(help="significance level of the verdicts")]
CorrectionOpt = Annotated[
    str,
    typer.Option(
        help="across a board's interventions: holm (no false verdict on the board, 1 − α of the time), "
        "bh (Benjamini–Hochberg: at most α of the verdicts false, on average) or none"
    ),
]
SesoiOpt = Annotated[
    Optional[str],
    typer.Option(
        help="smallest improvement that matters, in nats (e.g. 0.01), or auto (the baseline's σ): arms shown "
        "within ± it are equivalent; default: the experiment's sesoi"
    ),
]


def parse_sesoi(value: str | None) -> float | str | None:
    """--sesoi: a number of nats or "auto"; the API refuses what is neither, with the fix."""
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        fail(f"--sesoi must be a positive number of nats (e.g. 0.01) or auto, not {value!r}")


def fail(message: str) -> None:
    """Print `error: message` as one line (a multi-line message is joined) and exit 2."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()] or ["failed"]
    text = lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")
    if "://" in text or "password" in text.lower():  # no password of any URL in it, whatever raised it
        from orchestrator.dberrors import redact

        text = redact(text)
    typer.secho(f"error: {text}", fg="red", err=True)
    raise typer.Exit(2)


def call(function, *args, **kwargs):
    """Call an API function; an input it refuses (ValueError, with the fix in its message) is one line."""
    try:
        return function(*args, **kwargs)
    except ValueError as exc:
        fail(str(exc))


def check_format(value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fail(f"--format must be {', '.join(choices[:-1])} or {choices[-1]}, not {value!r}")


def parse_sets(items: list[str]) -> dict:
    """--set key=value pairs as a dict; values parse as JSON (numbers, true/false, null), else strings."""
    from trainer.presets import parse_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--set expects key=value (e.g. --set optim.lr=1e-3), got {item!r}")
        out[key.strip()] = parse_value(value)
    return out
