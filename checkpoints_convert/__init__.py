"""``python -m checkpoints_convert``: the converter's command-line alias. The converter itself is
:mod:`fkv_jax.convert` (import from there); ``fkv convert`` is the same command."""
