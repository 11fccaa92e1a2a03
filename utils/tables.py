"""A method's own tables in the paper's report (utils/report.py): which runs form which row.

Table 1 compares every method; a method whose paper has further tables (BMKP's ablation and
lambda sweep) declares them as PaperTable entries in its PAPER_TABLES, so the report needs no
knowledge of any method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

# A row of a table: (sort key, label, key of the paper's numbers or None).
RowKey = tuple[Hashable, str, Hashable]


@dataclass(frozen=True)
class PaperTable:
    name: str  # the file name and the key of the paper's numbers (e.g. "table2")
    title: str
    row_header: str
    # The row a run belongs to, from its protocol (the options that define the experiment);
    # None: not in this table.
    row: Callable[[dict], RowKey | None]
    # Whether the table is worth printing, given the sort keys of the rows present per dataset.
    shown: Callable[[dict[str, set]], bool]
    paper_memory_column: bool = False
