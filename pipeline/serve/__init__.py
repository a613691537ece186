"""Serving a trained model: ``scriptorium serve`` (OpenAI-compatible API + chat page) and
``scriptorium push`` (upload a Hugging Face folder to the Hub). Imports nothing heavy here."""
