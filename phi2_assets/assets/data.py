"""The `data` group: raw XSum splits, cleaned splits, tokenized training data.
Splits are one asset each through multi-assets rather than static partitions: the job `phi2_pipeline` must
run the whole graph in one run (a partitioned asset needs one run per partition), "Materialize all" stays a
single click, and cleaning has to see every split at once to drop rows that leak between them. Their keys are
flat (`raw_xsum_train`, `cleaned_xsum_train`): the lineage graph labels a node by its key's last part.
"""


import dagster as dg
import datasets
import pandas as pd

from phi2_assets.code_versions import code_version
from phi2_assets.config import CleaningConfig, TokenizeConfig, to_settings
from phi2_assets.metadata import (
    dataset_metadata,
    flat_figures,
    png_markdown,
    table_markdown,
    table_metadata,
    token_metadata,
)
from phi2_assets.ml import plots, stats
from phi2_assets.ml.cleaning import CleaningSettings, audit_splits, clean_splits, word_counts
from phi2_assets.ml.sources import SPLITS
from phi2_assets.ml.tokenization import TokenizeSettings, token_stats, tokenize_dataset
from phi2_assets.profiles import PROFILE
from phi2_assets.resources import HUB_RETRY_POLICY, BaseModelResource, XsumSource, fail_without_retry
from phi2_assets.tracking import MlflowTracking

TRAINING_SPLITS = ("train", "validation")
OWNERS = ["team:ml-platform"]


def raw_key(split: str) -> dg.AssetKey:
    return dg.AssetKey(f"raw_xsum_{split}")


def cleaned_key(split: str) -> dg.AssetKey:
    return dg.AssetKey(f"cleaned_xsum_{split}")


@dg.multi_asset(
    outs={
        split: dg.AssetOut(
            key=raw_key(split),
            description=f"XSum {split} rows (id, document, summary) as the profile's source gives them.",
            kinds={"parquet", "pandas"},
            owners=OWNERS,
            code_version=code_version("phi2_assets.ml.sources"),
            is_required=False,
        )
        for split in SPLITS
    },
    group_name="data",
    retry_policy=HUB_RETRY_POLICY,
    can_subset=True,
)
def raw_xsum(context: dg.AssetExecutionContext, xsum_source: XsumSource):
    """Read the three XSum splits from the profile's source (packaged sample, the user's files, or the hub)."""
    with fail_without_retry():
        frames = xsum_source.load()
    for split in SPLITS:
        if split not in context.selected_output_names:
            continue
        frame = frames[split]
        yield dg.Output(
            frame,
            output_name=split,
            metadata={
                **table_metadata(frame),
                "source": xsum_source.describe(),
                "profile": PROFILE.name,
                **{
                    key: value for column, figures in stats.text_profile(frame).items()
                    for key, value in flat_figures(f"{column}_words", figures).items()
                },
                "preview": table_markdown(stats.preview(frame)),
            },
        )


@dg.multi_asset(
    ins={f"raw_{split}": dg.AssetIn(key=raw_key(split)) for split in SPLITS},
    outs={
        split: dg.AssetOut(
            key=cleaned_key(split),
            description=(
                f"XSum {split} rows with normalised text, boilerplate removed, bad, duplicate and leaked rows "
                "dropped, capped."
            ),
            kinds={"parquet", "pandas"},
            owners=OWNERS,
            code_version=code_version("phi2_assets.ml.cleaning"),
            is_required=False,
        )
        for split in SPLITS
    },
    group_name="data",
    can_subset=True,  # every split is cleaned (leakage needs them all); only the selected ones are stored
    check_specs=[dg.AssetCheckSpec("clean_and_disjoint", asset=cleaned_key(split), blocking=True) for split in SPLITS],
)
def cleaned_xsum(
    context: dg.AssetExecutionContext,
    config: CleaningConfig,
    mlflow_tracking: MlflowTracking,
    raw_train: pd.DataFrame,
    raw_validation: pd.DataFrame,
    raw_test: pd.DataFrame,
):
    """Clean all splits together: leakage between splits is only visible with every split in hand. The
    `clean_and_disjoint` check runs here for the same reason."""
    with fail_without_retry():
        settings = to_settings(CleaningSettings, config)
    tracked = mlflow_tracking.record(context, config)
    result = clean_splits({"train": raw_train, "validation": raw_validation, "test": raw_test}, settings)
    problems = audit_splits(result.frames)
    for split in SPLITS:
        if split not in context.selected_output_names:
            continue
        frame = result.frames[split]
        histogram = plots.histograms_png(
            {"document words": word_counts(frame["document"]), "summary words": word_counts(frame["summary"])},
            title=f"cleaned_xsum/{split}: length distribution",
            xlabel="words",
        )
        yield dg.Output(
            frame,
            output_name=split,
            metadata={
                **table_metadata(frame),
                "rows_in": result.rows_in[split],
                "rows_out": len(frame),
                **flat_figures("dropped", result.drops[split]),
                **stats.xsum_eda(frame),
                "length_histogram": png_markdown(histogram, "length histogram"),
                "preview": table_markdown(stats.preview(frame)),
                **tracked,
            },
        )
        yield dg.AssetCheckResult(
            asset_key=cleaned_key(split),
            check_name="clean_and_disjoint",
            passed=not problems[split],
            description="; ".join(problems[split]) or "no empty text, no duplicate ids, no id in another split",
            metadata={"rows": len(frame)},
        )


@dg.asset(
    ins={f"cleaned_{split}": dg.AssetIn(key=cleaned_key(split)) for split in TRAINING_SPLITS},
    group_name="data",
    kinds={"huggingface", "arrow"},
    owners=OWNERS,
    code_version=code_version("phi2_assets.ml.tokenization"),
    retry_policy=HUB_RETRY_POLICY,
)
def tokenized_xsum(
    context: dg.AssetExecutionContext,
    config: TokenizeConfig,
    base_model: BaseModelResource,
    mlflow_tracking: MlflowTracking,
    cleaned_train: pd.DataFrame,
    cleaned_validation: pd.DataFrame,
) -> dg.Output[datasets.DatasetDict]:
    """Train and validation as the trainer needs them: prompt + summary + EOS, loss on the summary only.

    The article is truncated so each sequence fits `max_length`; the summary never is.
    """
    with fail_without_retry():
        settings = to_settings(TokenizeSettings, config)
        tokenizer = base_model.tokenizer()
    splits, figures_by_split, metadata = {}, {}, {}
    for split, frame in (("train", cleaned_train), ("validation", cleaned_validation)):
        rows = datasets.Dataset.from_pandas(frame, preserve_index=False)
        splits[split], dropped = tokenize_dataset(rows, tokenizer, settings)
        figures_by_split[split] = token_stats(splits[split])
        metadata.update(token_metadata(split, figures_by_split[split], dropped))
    plot = plots.histograms_png(
        {"train sequence tokens": figures_by_split["train"].lengths},
        title="tokenized_xsum: sequence lengths",
        xlabel="tokens",
    )
    splits = datasets.DatasetDict(splits)
    return dg.Output(
        splits,
        metadata={
            **dataset_metadata(splits),
            **metadata,
            "template": settings.template,
            "max_length": settings.max_length,
            "tokenizer": base_model.name_or_path,
            "length_plot": png_markdown(plot, "sequence lengths"),
            **mlflow_tracking.record(context, config, metrics={
                f"tokenized_xsum.{name}": value for name, value in metadata.items() if name.startswith("train_")
            }),
        },
    )
