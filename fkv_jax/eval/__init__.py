"""Evaluation harness: policies vs the full cache on the toy world (``python -m fkv_jax.eval``)."""
