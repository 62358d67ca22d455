"""The run layer: every extraction and editing run goes plan -> compute -> commit.

- **Plan** (``extract.plan_extract``, ``edit.plan_edit``): read the records once (``source``), ask the
  warehouse once which results it holds, compute every result key once, and resolve the config into concrete
  values (a frozen job object). The config object stops here: below the plan, functions get values.
- **Compute** is the model side, ``blens.extract`` and ``blens.edit``: pure functions from prompts to Arrow
  tables, which import nothing from ``blens.store``.
- **Commit** (``commit.Committer``) is the only writer: the run's registration, its result batches and its
  error rows, in order, optionally on one background thread owned by the run.

The Prefect flows (``blens.flows``) are a thin shell over these functions; tests call them without Prefect.
"""
