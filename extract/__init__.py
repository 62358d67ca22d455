"""Models, hooks, the logit lens and the extraction job (torch). Importing the package caps glibc's
malloc arenas before torch starts its threads (see extract/allocator.py)."""

from .allocator import limit_malloc_arenas

limit_malloc_arenas()
