"""The ``blens`` command line. Importing it caps glibc's malloc arenas before any thread starts
(see extract/allocator.py: without the cap, peak RSS of ``blens extract`` jumped by gigabytes at random)."""

from extract.allocator import limit_malloc_arenas

limit_malloc_arenas()
