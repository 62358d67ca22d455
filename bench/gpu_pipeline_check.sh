#!/usr/bin/env bash
# The real extraction job (plan_run, background commits, DuckLake commits) on CUDA against the same job on
# CPU: bench/gpu_pipeline_check.py; docs/gpu.md. Needs torch, transformers, pyarrow, numpy, duckdb (+ the
# duckdb-ext-ducklake/sqlite wheels) and pydantic; no prefect, no datasets, no network. Python and the
# import mapping as in bench/gpu_check.sh (which this calls), with blens.store and blens.queries mapped too.
#
#   bash bench/gpu_pipeline_check.sh --tokenizer DIR --data counterfact-edit-1k.json
#   bash bench/gpu_pipeline_check.sh ... --candidate-device cpu      # a rehearsal without a GPU
exec bash "$(dirname "${BASH_SOURCE[0]}")/gpu_check.sh" --pipeline "$@"
