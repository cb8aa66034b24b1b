"""Prefect blocks for dfm-prefect (registered through the prefect.collections entry point)."""
