"""Scriptorium model and training library (PyTorch only; never imports Dagster)."""
