"""The BMKP paper's Tables 2 (ablation), 3 (lambda) and 4 (retained-energy threshold) as report
tables (utils/tables.py)."""
from __future__ import annotations

from utils.tables import PaperTable, RowKey

# Table 2's rows, in the paper's order: (no_basis_update, no retraining) -> row.
ABLATIONS = {(True, False): (0, "without basis updating", "no_basis_update"),
             (False, True): (1, "without retraining", "no_retraining"),
             (True, True): (2, "without basis updating or retraining", None),
             (False, False): (3, "full", "full")}


def _ablation(protocol: dict) -> tuple[bool, bool]:
    return bool(protocol.get("no_basis_update")), protocol.get("retrain_epochs") == 0


def ablation_row(protocol: dict) -> RowKey:
    return ABLATIONS[_ablation(protocol)]


def lambda_row(protocol: dict) -> RowKey | None:
    """Full BMKP runs by lambda (ablation runs are not part of the sweep)."""
    if any(_ablation(protocol)) or "lambd" not in protocol:
        return None
    lam = float(protocol["lambd"])
    return lam, f"lambda = {lam:g}", lam


def threshold_row(protocol: dict) -> RowKey | None:
    """Full BMKP runs by the later tasks' retained-energy threshold (--threshold)."""
    if any(_ablation(protocol)) or "threshold" not in protocol:
        return None
    level = float(protocol["threshold"])
    return level, f"threshold = {level:g}", level


PAPER_TABLES = (
    PaperTable("table2", "Table 2: BMKP ablation", "BMKP", ablation_row,
               shown=lambda keys: any(k != ABLATIONS[False, False][0]
                                      for ks in keys.values() for k in ks)),
    PaperTable("table3", "Table 3: BMKP, effect of lambda", "lambda", lambda_row,
               shown=lambda keys: any(len(ks) > 1 for ks in keys.values()),
               paper_memory_column=True),
    PaperTable("table4", "Table 4: BMKP, effect of the retained-energy threshold", "threshold",
               threshold_row, shown=lambda keys: any(len(ks) > 1 for ks in keys.values()),
               paper_memory_column=True),
)
