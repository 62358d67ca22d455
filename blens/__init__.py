"""The ``blens`` command line. Importing the ``extract`` package first caps glibc's malloc arenas before any
thread starts (see extract/allocator.py: without the cap, peak RSS of ``blens extract`` jumped by gigabytes)."""

import extract  # noqa: F401  (its import applies the cap)
