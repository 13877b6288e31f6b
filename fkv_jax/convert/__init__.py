"""PyTorch / safetensors / diffusers Wan2.1 checkpoints -> fkv_jax converted checkpoints.

Run ``fkv convert --help`` (or its alias ``python -m checkpoints_convert``). Python API::

    from fkv_jax.convert import convert, load_wan_state_dict, plan
    out = convert("self_forcing_dmd.pt", "ckpt/self_forcing", dtype="bfloat16")   # -> Path
    wan = load_wan_state_dict("model.safetensors")                              # {Wan name: np.ndarray}
    p = plan({name: shape, ...})                                                # shapes only: p.cfg, p.names

Modules: :mod:`readers` (files), :mod:`layouts` (names), :mod:`plan` (sizes + validation), :mod:`lora`,
:mod:`wan_keymap` (Wan name -> Flax param path), :mod:`convert` (orchestration); the command line is
:mod:`fkv_jax.cli.convert`;
:mod:`components` (VAE / UMT5 text encoder / whole model folder, with :mod:`vae_keymap` and :mod:`umt5_keymap`).
"""

from fkv_jax.convert.convert import convert, load_wan_state_dict
from fkv_jax.convert.errors import ConvertError
from fkv_jax.convert.lora import merge_lora, read_lora
from fkv_jax.convert.plan import Plan, plan
from fkv_jax.convert.readers import open_checkpoint

__all__ = [
    "ConvertError",
    "Plan",
    "convert",
    "load_wan_state_dict",
    "merge_lora",
    "open_checkpoint",
    "plan",
    "read_lora",
]
