"""The README's table of tables cannot drift from the one schema declaration (store/schema.py): every table is
listed with exactly its columns, in order, and the schema version the README names is the code's."""

from __future__ import annotations

import re
from pathlib import Path

from blens.store.schema import SCHEMA_VERSION, TABLES

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_rows() -> dict[str, list[str]]:
    """`name` -> its columns, from the README's '| table / view | columns | ... |' table."""
    text = README.read_text()
    start = text.index("| table / view | columns |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = [c.strip() for c in cells[1].split(",")]
    return rows


def test_every_table_is_listed_with_its_columns():
    rows = readme_rows()
    for name, schema in TABLES.items():
        assert name in rows, f"README's table list misses {name}"
        assert rows[name] == [f.name for f in schema if f.name != "batch_id"], name


def test_the_readme_names_the_schema_version_of_the_code():
    versions = set(re.findall(r"\(version (\d+)\)", README.read_text()))
    assert versions == {str(SCHEMA_VERSION)}
