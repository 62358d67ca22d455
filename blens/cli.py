"""`blens`: the front door. Each subcommand lives in blens/commands/<name>.py and registers itself."""

from __future__ import annotations

import importlib

import typer

from blens.commands import _help


class _Blens(typer.Typer):
    """The app, called through one guard (``run_guarded``): user errors print one line and exit 2, SIGINT /
    SIGTERM exit cleanly in one line; only bugs show a traceback. A subclass so that both entry points,
    the ``blens`` script (``blens.cli:main``) and ``python -m blens.cli``, go through it. Every command it
    registers renders its help through :mod:`blens.commands._help`."""

    def __call__(self, *args, **kwargs):
        from blens.lifecycle.guard import run_guarded

        return run_guarded(super().__call__, *args, **kwargs)

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or _help.Command, **kwargs)


app = _Blens(
    name="blens",
    help=(
        "Backward Lens warehouse: extract gradient spanning sets (inputs x_i and VJPs delta_i of every MLP "
        "matrix) for CounterFact prompts, project them through the logit lens, and query the result with SQL."
    ),
    cls=_help.Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        import blens

        print(f"blens {blens.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version of blens and exit."),
) -> None:
    pass

COMMANDS = ("extract", "sql", "warehouse", "edit", "sweep", "publish", "report", "serve")

for _name in COMMANDS:
    importlib.import_module(f"blens.commands.{_name}").register(app)


def main() -> None:
    """The process entry point (the `blens` script, ``python -m blens.cli``): the app, then, once torch is
    loaded, an end without the interpreter's ~0.9 s teardown (:mod:`blens.lifecycle.ending`), with the status
    the app exits with (0, 2 for a user error, 128 + signal after an interrupt's line). A bug's traceback
    (an exception other than SystemExit) still ends the ordinary way."""
    import sys

    try:
        app()
        code = 0
    except SystemExit as exc:
        if "torch" not in sys.modules:
            raise
        from blens.lifecycle.ending import exit_code

        code = exit_code(exc)
    if "torch" in sys.modules:
        from blens.lifecycle.ending import end_process

        end_process(code)


if __name__ == "__main__":
    main()
