"""Jobs, the weekly re-evaluation schedule, and the condition that keeps the report in step with the adapter."""

import dagster as dg

EVALUATION_GROUP = "evaluation"

# A new adapter (or new evaluation rows) re-runs the fine-tuned summaries and then the report, once the
# adapter's blocking checks have passed; one run of the whole graph satisfies it without a second run.
follows_new_adapter = (
    dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
).with_label("follows a new adapter")

# Both jobs run in process, the default `Definitions` sets (phi2_assets/definitions.py).
phi2_pipeline = dg.define_asset_job(
    "phi2_pipeline",
    selection=dg.AssetSelection.all(),
    description="The whole graph in one run: data, training, evaluation, release (champion and export).",
)

evaluation_job = dg.define_asset_job(
    "evaluation_job",
    selection=dg.AssetSelection.groups(EVALUATION_GROUP),
    description=(
        "Evaluation only: summaries of the base model and of the current adapter, template comparison, ROUGE report."
    ),
)

weekly_reevaluation = dg.ScheduleDefinition(
    name="weekly_reevaluation",
    job=evaluation_job,
    cron_schedule="0 6 * * 1",  # Mondays 06:00 UTC
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Regenerates both sets of summaries and the ROUGE report against the current adapter.",
)

evaluation_follows_adapter = dg.AutomationConditionSensorDefinition(
    "evaluation_follows_adapter",
    target=dg.AssetSelection.groups(EVALUATION_GROUP),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Materializes evaluation assets whose automation condition says they lag their inputs.",
)
