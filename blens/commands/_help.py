"""How `blens ... --help` reads: paragraphs reflowed to the terminal, no Python type names.

Typer's rich help keeps every line break of a docstring (so a sentence broke wherever the source line
ended), labels every flag ``<bool>`` although a flag takes no value, and an argument ``<str>``. Commands
and the group are built from the classes below (``blens/cli.py`` makes them the default), so each command's docstring stays
written at source width and each option declares only its help text and metavar.
"""

from __future__ import annotations

import inspect

import typer.core


def reflow(text: str | None) -> str | None:
    """Join the lines of each paragraph (paragraphs are separated by a blank line) so the terminal wraps
    them; a paragraph starting with ``\\b`` keeps its line breaks (click's convention)."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)


def _without_type_labels(params):
    """No ``<bool>`` beside a flag (it takes no value) and no ``<str>`` beside an argument that names itself
    (``QUERY``): the type column shows what to type, never a Python type name."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # an option's type column shows its metavar: nothing
        elif param.param_type_name == "argument" and param.metavar:
            param.display_type_rich = lambda ctx: None  # an argument's column shows its type; its name is the metavar
    return params


class Command(typer.core.TyperCommand):
    def __init__(self, *args, help: str | None = None, **kwargs) -> None:  # noqa: A002 - click's name
        super().__init__(*args, help=reflow(help), **kwargs)

    def get_params(self, ctx):
        return _without_type_labels(super().get_params(ctx))


class Group(typer.core.TyperGroup):
    def __init__(self, *args, help: str | None = None, **kwargs) -> None:  # noqa: A002
        super().__init__(*args, help=reflow(help), **kwargs)

    def get_params(self, ctx):
        return _without_type_labels(super().get_params(ctx))
