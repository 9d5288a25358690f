"""The ML core: plain, typed functions with no Dagster import, so they run (and are benchmarked) anywhere."""
