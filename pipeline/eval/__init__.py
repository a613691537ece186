"""The evaluation report: benchmark loaders, scoring, judges, MLflow history and rendering.

Pure functions and loaders used by the ``evaluation_report`` asset's Pipes child
(``pipeline.child``); the model arithmetic itself lives in :mod:`llm_core.evaluate`.
"""
