"""`blens`: the front door. Each subcommand lives in blens/commands/<name>.py and registers itself."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="blens",
    help=(
        "Backward Lens warehouse: extract gradient spanning sets (inputs x_i and VJPs delta_i of every MLP "
        "matrix) for CounterFact prompts, project them through the logit lens, and query the result with SQL."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMANDS = ("extract", "sql", "warehouse", "edit", "sweep", "publish", "report", "serve")

for _name in COMMANDS:
    try:
        _mod = importlib.import_module(f"blens.commands.{_name}")
    except ModuleNotFoundError as _exc:  # a command module not written yet; never hide a real import bug
        if _exc.name != f"blens.commands.{_name}":
            raise
        continue
    _mod.register(app)


if __name__ == "__main__":
    app()
