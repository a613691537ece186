"""Scriptorium Dagster code location and the data-stage processing code."""
