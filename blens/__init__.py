"""The ``blens`` command line, and the notebook API: ``blens.load(model)`` (see :mod:`blens.api`).

Importing ``blens`` stays cheap (the CLI imports it on every call): ``__version__``, ``load`` and the API's
classes are resolved on first use, which is when torch and transformers get imported.
"""

_API = ("load", "Lens", "Result", "Results", "RecordInvalid")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("backward-lens-warehouse")
        except PackageNotFoundError:  # a source tree that was never installed
            return "0+unknown"
    raise AttributeError(f"module 'blens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
