"""The evaluation report: zero-shot vs fine-tuned ROUGE, success rates, and the seed's file set on disk.

`compare` scores both summary tables on the same rows; `write_report` writes the directory in one atomic
rename, so a reader sees the whole report or the previous one, never half of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from phi2_assets.ml import plots
from phi2_assets.ml.atomic import atomic_path
from phi2_assets.ml.generate import STATUSES
from phi2_assets.ml.scoring import ROUGE_TYPES, MetricSummary, relative_improvement, score_pairs, summarize_scores

MODELS = {"baseline": "zero-shot", "finetuned": "fine-tuned"}
REPORT_FILES = (
    "evaluation_results.json", "training_metrics.json", "evaluation_analysis.md", "rouge_comparison.png",
    "generation_success_rate.png", "relative_improvement.png", "lora_efficiency.png",
)
PLOT_FILES = tuple(name for name in REPORT_FILES if name.endswith(".png"))
EXAMPLES = 3


@dataclasses.dataclass(frozen=True)
class Comparison:
    per_sample: pd.DataFrame  # id, reference, <model>_generated, <model>_status, <model>_<rouge type>
    scores: dict[str, dict[str, MetricSummary]]  # model -> rouge type -> mean and interval
    status_shares: dict[str, dict[str, float]]  # model -> status -> share of rows
    improvement: dict[str, float | None]  # rouge type -> relative improvement of the mean

    def means(self, model: str) -> dict[str, float]:
        return {name: summary.mean for name, summary in self.scores[model].items()}


@dataclasses.dataclass(frozen=True)
class RougeReport:
    """The `rouge_report` value: where the report lies and its headline figures."""

    path: str
    samples: int
    baseline: dict[str, float]
    finetuned: dict[str, float]
    baseline_success_rate: float
    finetuned_success_rate: float
    relative_improvement: dict[str, float | None]


def compare(baseline: pd.DataFrame, finetuned: pd.DataFrame) -> Comparison:
    """Score both summary tables (columns id, summary, generated, status) against the same references."""
    if baseline["id"].tolist() != finetuned["id"].tolist():
        raise ValueError("baseline and fine-tuned summaries cover different rows; both must come from evaluation_xsum")
    per_sample = pd.DataFrame({"id": baseline["id"], "reference": baseline["summary"]})
    scores, shares = {}, {}
    for model, frame in (("baseline", baseline), ("finetuned", finetuned)):
        rouge = score_pairs(frame["generated"].fillna("").tolist(), frame["summary"].tolist())
        per_sample[f"{model}_generated"] = frame["generated"].to_numpy()
        per_sample[f"{model}_status"] = frame["status"].to_numpy()
        for name in ROUGE_TYPES:
            per_sample[f"{model}_{name}"] = rouge[name].to_numpy()
        scores[model] = summarize_scores(rouge)
        shares[model] = {status: float((frame["status"] == status).mean()) if len(frame) else 0.0
                         for status in STATUSES}
    improvement = {name: relative_improvement(scores["baseline"][name].mean, scores["finetuned"][name].mean)
                   for name in ROUGE_TYPES}
    return Comparison(per_sample.reset_index(drop=True), scores, shares, improvement)


def report_plots(comparison: Comparison, training: Mapping[str, object]) -> dict[str, bytes]:
    """The four PNGs of the seed's report, by file name."""
    labels = {name: name.replace("rouge", "ROUGE-") for name in ROUGE_TYPES}
    means = {MODELS[m]: {labels[n]: s.mean for n, s in comparison.scores[m].items()} for m in MODELS}
    errors = {MODELS[m]: {labels[n]: (s.low, s.high) for n, s in comparison.scores[m].items()} for m in MODELS}
    improvement = {labels[n]: 100 * (value or 0.0) for n, value in comparison.improvement.items()}
    trainable = training.get("trainable_parameters") or 0
    total = training.get("total_parameters") or 0
    efficiency = {
        "parameters trained": 100 * trainable / total if total else 0.0,
        "ROUGE-1 gain": improvement[labels["rouge1"]],
        "ROUGE-L gain": improvement[labels["rougeL"]],
    }
    return {
        "rouge_comparison.png": plots.bars_png(means, "ROUGE F1: zero-shot vs fine-tuned (95% bootstrap CI)", "F1",
                                               errors),
        "generation_success_rate.png": plots.bars_png(
            {MODELS[m]: {s: 100 * comparison.status_shares[m][s] for s in STATUSES} for m in MODELS},
            "Generations by status", "% of rows",
        ),
        "relative_improvement.png": plots.bars_png({"fine-tuned vs zero-shot": improvement},
                                                   "Relative improvement of the mean", "%"),
        "lora_efficiency.png": plots.bars_png({"LoRA": efficiency}, f"What {trainable:,} trained parameters bought",
                                              "%"),
    }


def _results_json(comparison: Comparison, about: Mapping[str, object]) -> dict:
    return {
        **about,
        "samples": len(comparison.per_sample),
        "rouge": {m: {n: dataclasses.asdict(s) for n, s in comparison.scores[m].items()} for m in MODELS},
        "status_shares": comparison.status_shares,
        "relative_improvement": comparison.improvement,
        "per_sample": comparison.per_sample.to_dict(orient="records"),
    }


def _percent(value: float | None) -> str:
    return "n/a (baseline 0)" if value is None or not math.isfinite(value) else f"{100 * value:+.1f}%"


def analysis_markdown(comparison: Comparison, training: Mapping[str, object], about: Mapping[str, object]) -> str:
    """A reader's summary: the table, the training run, and the examples that moved most."""
    rows = [
        f"| {name} | {b.mean:.4f} [{b.low:.4f}, {b.high:.4f}] | {f.mean:.4f} [{f.low:.4f}, {f.high:.4f}]"
        f" | {_percent(comparison.improvement[name])} |"
        for name, b, f in ((n, comparison.scores["baseline"][n], comparison.scores["finetuned"][n])
                           for n in ROUGE_TYPES)
    ]
    per_sample = comparison.per_sample
    delta = per_sample["finetuned_rougeL"] - per_sample["baseline_rougeL"]
    lines = [
        "# Evaluation analysis", "",
        *(f"- {key}: {value}" for key, value in about.items()),
        f"- samples: {len(per_sample)} (the same rows for both models; empty or failed generations score 0)", "",
        "| ROUGE F1 | zero-shot [95% CI] | fine-tuned [95% CI] | relative change |", "|---|---|---|---|", *rows, "",
        "| status | zero-shot | fine-tuned |", "|---|---|---|",
        *(f"| {s} | {100 * comparison.status_shares['baseline'][s]:.1f}%"
          f" | {100 * comparison.status_shares['finetuned'][s]:.1f}% |" for s in STATUSES), "",
        "## Training", "",
        *(f"- {key}: {training[key]}" for key in ("base_model", "trainable_parameters", "total_parameters", "steps",
                                                  "eval_loss", "base_eval_loss", "train_seconds") if key in training),
    ]
    for title, chosen in (("Largest gains (ROUGE-L)", delta.nlargest(EXAMPLES).index),
                          ("Largest losses (ROUGE-L)", delta.nsmallest(EXAMPLES).index)):
        lines += ["", f"## {title}", ""]
        for index in chosen:
            row = per_sample.loc[index]
            lines += [
                f"- **{row['id']}** (ROUGE-L {row['baseline_rougeL']:.3f} → {row['finetuned_rougeL']:.3f})",
                f"  - reference: {row['reference']}",
                f"  - zero-shot: {row['baseline_generated'] or '(empty)'}",
                f"  - fine-tuned: {row['finetuned_generated'] or '(empty)'}",
            ]
    return "\n".join(lines) + "\n"


def write_report(directory: Path, comparison: Comparison, training: Mapping[str, object],
                 about: Mapping[str, object]) -> tuple[RougeReport, dict[str, bytes]]:
    """Write the seed's report files under `directory` at once; returns the record and the plots (for metadata)."""
    pngs = report_plots(comparison, training)
    with atomic_path(Path(directory)) as staging:
        staging.mkdir(parents=True)
        (staging / "evaluation_results.json").write_text(
            json.dumps(_results_json(comparison, about), indent=2, default=str))
        (staging / "training_metrics.json").write_text(json.dumps(dict(training), indent=2, default=str))
        (staging / "evaluation_analysis.md").write_text(analysis_markdown(comparison, training, about))
        for name, png in pngs.items():
            (staging / name).write_bytes(png)
    record = RougeReport(
        path=str(directory), samples=len(comparison.per_sample),
        baseline=comparison.means("baseline"), finetuned=comparison.means("finetuned"),
        baseline_success_rate=comparison.status_shares["baseline"]["ok"],
        finetuned_success_rate=comparison.status_shares["finetuned"]["ok"],
        relative_improvement=comparison.improvement,
    )
    return record, pngs
