"""`blens publish`: the warehouse as a Hugging Face dataset (Parquet per table + dataset card)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from . import options
from ._common import err_console, fail

VectorDtype = Literal["float32", "float16"]


def publish(
    warehouse: options.Warehouse = options.WAREHOUSE,
    out: Path = typer.Option(..., "--out", metavar="DIR",
                             help="Output directory (created; an earlier publish output is replaced)."),
    push: Optional[str] = typer.Option(None, "--push", metavar="REPO_ID",
                                       help="Also upload to the Hugging Face Hub as this dataset repo "
                                            "(needs a token: HF_TOKEN or `hf auth login`)."),
    vector_dtype: VectorDtype = typer.Option("float32", "--vector-dtype", metavar=options.choices(VectorDtype),
                                             help="Element type of the vectors table's vectors."),
    private: bool = typer.Option(False, "--private", help="Create the Hub repo as private (with --push)."),
) -> None:
    """Write the warehouse as a Hugging Face dataset: one Parquet file per table under data/<table>/ and a
    dataset card README.md (configs, provenance, how it was made, limitations, schema, statistics, citation).
    Load a table with datasets.load_dataset(OUT, "projections", split="train").

    Example: blens publish --warehouse warehouse --out hf-dataset [--push user/backward-lens-smollm2]
    """
    from blens.publish.dataset import PublishError, publish as do_publish, push as do_push

    try:
        result = do_publish(warehouse, out, vector_dtype=vector_dtype, repo_id=push)
    except PublishError as exc:
        fail(str(exc))
    rows = ", ".join(f"{name} {s.num_rows:,}" for name, s in result.splits.items())
    err_console.print(f"wrote {result.out} ({rows}); card: {result.card}", highlight=False, soft_wrap=True)
    if push:
        try:
            url = do_push(result, push, private=private or None)
        except PublishError as exc:
            fail(str(exc), code=1)
        err_console.print(f"pushed to {url}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("publish")(publish)
