"""The champion adapter: the best fine-tuned ROUGE-L so far for a profile and a set of evaluation rows.

A report's candidate replaces the champion only when it scores a higher ROUGE-L on the very same rows (ids and
references); the champions of every row set live in one JSON file per profile, rewritten atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from phi2_assets.ml.atomic import atomic_path

DECIDING_METRIC = "rougeL"


@dataclasses.dataclass(frozen=True)
class Champion:
    """The `champion_adapter` value: the champion after this decision, and how the decision went."""

    adapter_path: str
    report_path: str
    rows_key: str
    samples: int
    rougeL: float
    finetuned: dict[str, float]
    baseline: dict[str, float]
    challenger_path: str
    challenger_rougeL: float
    previous_rougeL: float | None
    challenger_won: bool

    @property
    def margin(self) -> float | None:
        """How far the challenger's ROUGE-L lies above (or below) the champion it met; None for the first one."""
        return None if self.previous_rougeL is None else self.challenger_rougeL - self.previous_rougeL


def rows_key(per_sample: list[dict]) -> str:
    """A short hash of the evaluated rows: their ids and references, in order."""
    digest = hashlib.sha256()
    for row in per_sample:
        digest.update(json.dumps([row["id"], row["reference"]]).encode())
    return digest.hexdigest()[:16]


def candidate_from_report(report_dir: Path) -> dict:
    """The adapter a report evaluated and its figures, from the report's `evaluation_results.json`."""
    results = json.loads((Path(report_dir) / "evaluation_results.json").read_text())
    means = {model: {name: figure["mean"] for name, figure in results["rouge"][model].items()}
             for model in ("baseline", "finetuned")}
    return {
        "adapter_path": results["adapter"], "report_path": str(report_dir), "rows_key": rows_key(results["per_sample"]),
        "samples": results["samples"], "rougeL": means["finetuned"][DECIDING_METRIC],
        "finetuned": means["finetuned"], "baseline": means["baseline"],
    }


def decide(store: Path, report_dir: Path) -> Champion:
    """Meet the report's adapter with the champion of its rows in `store`; the winner is written back."""
    candidate = candidate_from_report(report_dir)
    champions = json.loads(Path(store).read_text()) if Path(store).is_file() else {}
    previous = champions.get(candidate["rows_key"])
    won = previous is None or candidate["rougeL"] > previous["rougeL"]
    if won:
        champions[candidate["rows_key"]] = candidate
        with atomic_path(Path(store)) as staging:
            staging.write_text(json.dumps(champions, indent=2))
    current = candidate if won else previous
    return Champion(
        **current, challenger_path=candidate["adapter_path"], challenger_rougeL=candidate["rougeL"],
        previous_rougeL=None if previous is None else previous["rougeL"], challenger_won=won,
    )
