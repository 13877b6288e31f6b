"""PyTorch / safetensors / diffusers Wan2.1 checkpoints -> fkv_jax converted checkpoints.

Run ``python -m checkpoints_convert --help``. Python API::

    from checkpoints_convert import convert, load_wan_state_dict, plan
    out = convert("self_forcing_dmd.pt", "ckpt/self_forcing", dtype="bfloat16")   # -> Path
    wan = load_wan_state_dict("model.safetensors")                              # {Wan name: np.ndarray}
    p = plan({name: shape, ...})                                                # shapes only: p.cfg, p.names

Modules: :mod:`readers` (files), :mod:`layouts` (names), :mod:`plan` (sizes + validation), :mod:`lora`,
:mod:`wan_keymap` (Wan name -> Flax param path), :mod:`convert` (orchestration), ``__main__`` (CLI);
:mod:`components` (VAE / UMT5 text encoder / whole model folder, with :mod:`vae_keymap` and :mod:`umt5_keymap`).
"""

from checkpoints_convert.convert import convert, load_wan_state_dict
from checkpoints_convert.errors import ConvertError
from checkpoints_convert.lora import merge_lora, read_lora
from checkpoints_convert.plan import Plan, plan
from checkpoints_convert.readers import open_checkpoint

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
