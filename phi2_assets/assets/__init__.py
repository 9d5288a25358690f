"""Assets by stage: `data`, `training`, `evaluation`. Thin wrappers over `phi2_assets.ml`."""
