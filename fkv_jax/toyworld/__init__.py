"""Toy-world testbed: a procedural sprite world and a small causal Wan trained on it (same model, cache and
sampler code as the real checkpoints), so that generation quality can be measured against known truth.

* :mod:`fkv_jax.toyworld.world`: the simulator (frames + ground truth, prompts);
* :mod:`fkv_jax.toyworld.text`: closed-vocabulary tokenizer and the learned text encoder;
* :mod:`fkv_jax.toyworld.train`: ``python -m fkv_jax.toyworld.train`` (teacher-forcing flow matching);
* :mod:`fkv_jax.toyworld.model`: ``load_toy_model``, ``toy_context``, ``generate_video`` (the shipped weights);
* :mod:`fkv_jax.toyworld.analysis`, :mod:`fkv_jax.toyworld.video`: reading frames back, mp4 / png output.

``python -m fkv_jax.generate "a red circle and a blue square" --frames 24`` makes a video with it (the default model).
"""

from fkv_jax.toyworld.world import COLOUR_NAMES, SHAPES, Episode, Scene, Sprite, WorldConfig, make_episode, simulate

__all__ = [
    "COLOUR_NAMES",
    "SHAPES",
    "Episode",
    "Scene",
    "Sprite",
    "WorldConfig",
    "make_episode",
    "simulate",
    "load_toy_model",
    "toy_context",
    "generate_video",
    "save_video",
]


def __getattr__(name):  # the model side imports jax/flax: load it on first use
    if name in ("load_toy_model", "toy_context", "generate_video", "save_video", "toy_sampler_config"):
        from fkv_jax.toyworld import model

        return getattr(model, name)
    raise AttributeError(name)
