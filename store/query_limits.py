"""The default limits of a sandboxed query (``blens sql``, :mod:`blens.store.sandbox`), declared once.

A module of its own, with no imports, so that ``blens sql --help`` can show them without importing DuckDB.
"""

DEFAULT_TIMEOUT_S = 300.0  # a query running longer is stopped (--timeout)
DEFAULT_MEMORY_LIMIT = "2GB"  # DuckDB's memory limit for one query, and as much again for spilling (--memory-limit)
