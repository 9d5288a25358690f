"""Dagster assets that fine-tune Phi-2 with QLoRA on XSum and evaluate it with ROUGE."""
