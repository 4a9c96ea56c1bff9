"""Every public name of ``siss_fast`` (its ``__all__``) has a row in the README's API table."""

import re
from pathlib import Path

import siss_fast


def test_every_public_name_is_in_the_api_table():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("## API", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    names = [row.split(" | ")[0] for row in rows]  # the first cell: the name(s) a row documents
    missing = [name for name in siss_fast.__all__ if not any(re.search(rf"\b{re.escape(name)}\b", cell)
                                                             for cell in names)]
    assert not missing, f"public names without a row in the README's API table: {missing}"
