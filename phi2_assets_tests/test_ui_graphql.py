"""The UI's view of the product, through the GraphQL API the UI itself calls, against a real webserver and daemon
(fixtures `dagster_ui` and `pipeline_run` in dagster_ui.py): every asset in its stage group with description,
kinds, owners and code version; a run of `phi2_pipeline` launched with `launchRun`; the ROUGE report read back.
"""

import re

from phi2_assets_tests.dagster_ui import PIPELINE_JOB

STAGE_GROUPS = {"data", "training", "evaluation", "release"}

ASSET_NODES = """
{
  assetNodes {
    assetKey { path } groupName description kinds opVersion pools jobNames
    owners { __typename ... on TeamAssetOwner { team } ... on UserAssetOwner { email } }
  }
}"""


def asset_properties(defs) -> dict[str, dict]:
    graph = defs.resolve_asset_graph()
    return {
        key.to_user_string(): {
            "group": node.group_name, "description": node.description, "kinds": node.kinds,
            "owners": node.owners, "code_version": node.code_version, "pools": node.pools,
        }
        for key in graph.materializable_asset_keys
        for node in [graph.get(key)]
    }


def test_every_asset_has_stage_group_description_kinds_owners_code_version(defs):
    assets = asset_properties(defs)
    missing = {
        name: [field for field in ("description", "kinds", "owners", "code_version") if not props[field]]
        for name, props in assets.items()
    }
    missing = {name: fields for name, fields in missing.items() if fields}
    assert not missing, f"assets the UI would show without these: {missing}"
    assert {props["group"] for props in assets.values()} == STAGE_GROUPS
    assert {"lora_adapter", "rouge_report"} <= set(assets)
    assert assets["lora_adapter"]["group"] == "training" and assets["rouge_report"]["group"] == "evaluation"


def test_gpu_steps_share_the_gpu_pool(defs):
    pools = {name: props["pools"] for name, props in asset_properties(defs).items() if props["pools"]}
    assert "lora_adapter" in pools, "training must take the GPU slot"
    assert set().union(*pools.values()) == {"gpu"}, pools


def test_webserver_shows_every_asset_as_defined(dagster_ui, defs):
    nodes = {"/".join(node["assetKey"]["path"]): node for node in dagster_ui.graphql(ASSET_NODES)["assetNodes"]}
    defined = asset_properties(defs)
    assert set(nodes) == set(defined)
    for name, props in defined.items():
        node = nodes[name]
        assert node["groupName"] == props["group"], name
        assert node["description"] == props["description"], name
        assert set(node["kinds"]) == set(props["kinds"]), name
        assert node["opVersion"] == props["code_version"], name
        assert len(node["owners"]) == len(props["owners"]), name
        assert set(node["pools"]) == set(props["pools"]), name
        assert PIPELINE_JOB in node["jobNames"], name


def test_pipeline_run_launched_through_graphql_succeeds_step_by_step(pipeline_run):
    assert pipeline_run["status"] == "SUCCESS"
    steps = {step["stepKey"]: step["status"] for step in pipeline_run["stepStats"]}
    assert {"lora_adapter", "finetuned_summaries", "rouge_report"} <= set(steps)
    assert set(steps.values()) == {"SUCCESS"}, steps


def test_rouge_report_metadata_read_back_through_graphql(dagster_ui, pipeline_run):
    from phi2_assets.ml.reports import MODELS
    from phi2_assets.ml.scoring import ROUGE_TYPES

    run_id, entries = dagster_ui.latest_materialization(["rouge_report"])
    assert run_id == pipeline_run["runId"]
    for model in MODELS:
        for rouge_type in ROUGE_TYPES:
            entry = entries[f"{model}_{rouge_type}"]
            assert entry["__typename"] == "FloatMetadataEntry", entry
            assert 0.0 <= entry["floatValue"] <= 1.0, entry
    plots = [entry for entry in entries.values() if entry["__typename"] == "MarkdownMetadataEntry"
             and entry["mdStr"].startswith("![")]
    assert plots, "the report's plots travel as Markdown images"


def test_run_log_carries_training_and_generation_progress(dagster_ui, pipeline_run):
    messages = dagster_ui.run_messages(pipeline_run["runId"])

    def step_lines(step_key: str, pattern: str) -> list[str]:
        return [e["message"] for e in messages if e["stepKey"] == step_key and re.search(pattern, e["message"])]

    assert step_lines("lora_adapter", r"step \d+/\d+ +loss"), "training progress lines in the run log"
    assert step_lines("baseline_summaries", r"\d+/\d+ summaries"), "generation progress lines in the run log"
    assert step_lines("finetuned_summaries", r"\d+/\d+ summaries"), "generation progress lines in the run log"
