"""The life of a blens process, in one place: how it starts, how it is interrupted, how it ends.

Each module holds one concept and imports only the standard library when it is imported (Prefect and rich
are imported inside the functions that need them), so every command, `blens --help` included, can use them:

* :mod:`.signals`   SIGINT / SIGTERM become :class:`~.signals.Interrupted` in the main thread; the exit
                    watchdog; the unraisable hook; the record of the signal that arrived (``termination_kept``).
* :mod:`.guard`     ``run_guarded``, the top-level guard of the CLI: a :class:`blens.errors.UserError` is one
                    line and exit 2, an interrupt is one line and exit 128 + signal, a bug keeps its traceback.
* :mod:`.children`  no child process outlives us (``PR_SET_PDEATHSIG``).
* :mod:`.prefect`   the Prefect environment of our processes: quiet logs, the ephemeral API server armed to die
                    with us, Prefect's in-flow SIGTERM handler made quiet.
* :mod:`.ending`    the process's end: a normal exit's steps (threads, ``atexit``, flushed streams), without
                    the interpreter teardown that costs ~0.9 s once torch is loaded.
* :mod:`.flow_run`  a flow-run process that `blens serve` started: it dies with it, and ends itself when the
                    Prefect server is gone.

The user-facing error base class lives in :mod:`blens.errors`, beside no code at all, so that every domain
package can subclass it without importing any of this.
"""
