"""Adapters that let the engines of the field find and run vlm-fusion models (vLLM, lmms-eval).

Each is found by its engine through an entry point in `pyproject.toml`, imports its engine lazily and holds no model
math: what it needs to know about a model, the model or its processor answers.
"""
