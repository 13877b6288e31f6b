"""The model side of ``fkv serve``: one loaded model, request validation, and the compiled samplers.

An :class:`Engine` is built once per server. It loads the model (the embedded toy-world model by default, or a
``--model-dir`` text-to-video folder) and keeps a bounded LRU of :class:`~fkv_jax.sampling.stream.Streamer` s,
one per distinct compiled :class:`~fkv_jax.serve.protocol.Settings` (each compiles its chunk step once, for the
server's fixed batch).

Requests from the page are checked by :meth:`Engine.validate` with the command line's own checks
(:mod:`fkv_jax.cli.common`), which raise :class:`~fkv_jax.serve.protocol.RequestError` with one line for the page
(empty or overlong prompt, a word the toy model does not know, an invalid option) before any work.
"""

from __future__ import annotations

import collections
import threading
import types
from typing import Any

import numpy as np

from fkv_jax.cli import UsageError
from fkv_jax.cli import common as C
from fkv_jax.serve.protocol import (
    BACKEND_CHOICES,
    MAX_PROMPT_CHARS,
    Request,
    RequestError,
    ServeConfig,
    Settings,
)


def _namespace(cfg: ServeConfig, **kw) -> types.SimpleNamespace:
    """An argparse-like namespace for the shared CLI checks (fkv_jax.cli.common)."""
    base = dict(
        checkpoint=None,
        model_preset=None,
        toy_weights=cfg.toy_weights,
        preset=None,
        frames_per_block=None,
        local_attn_size=None,
        sink_size=None,
        denoising_steps=None,
        policy=None,
        policy_opt=[],
        head_table=None,
        head_importance=None,
    )
    base.update(kw)
    return types.SimpleNamespace(**base)


class Engine:
    """One model, loaded once; validation; samplers per settings (bounded LRU)."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.kind = "model_dir" if cfg.model_dir is not None else "toy"
        self._lock = threading.Lock()
        self._streamers: collections.OrderedDict = collections.OrderedDict()
        self.compiles = 0  # streamers built (each compiles its chunk step on first use)
        if self.kind == "toy":
            self.model_cfg, _ = C.model_config(_namespace(cfg), "toy")
            self.presets = ("toy",)
        else:
            from fkv_jax.config import list_presets
            from fkv_jax.pipeline import ModelDir, PipelineError

            try:
                self.dir = ModelDir.check(cfg.model_dir)
            except PipelineError as e:
                raise UsageError(str(e)) from None
            self.model_cfg = self.dir.model_cfg
            self.presets = tuple(n for n in list_presets("samplers") if n not in C.TOY_SAMPLERS)
        self.params = self.graphdef = self.text_encoder = self.vae = self._toy_text = None

    # ---- loading (once) ----------------------------------------------------------------------------------
    def load(self) -> str:
        """Load the weights (and the text encoder / VAE of a model folder); returns a description."""
        from flax import nnx

        if self.kind == "toy":
            args = _namespace(self.cfg)
            cfg, model, self.text_encoder, what = C.load_model(args, "toy", progress=False)
            self.graphdef, self.params = nnx.split(model, nnx.Param)
            import jax

            # the toy text encoder, jitted once (toy_context builds a new jitted function per call)
            self._toy_text = jax.jit(lambda enc, ids: enc(ids))
            return what
        from fkv_jax.checkpoint import load_transformer
        from fkv_jax.text import TextEncoder
        from fkv_jax.vae import TAEHV, VAE

        source = self.cfg.checkpoint if self.cfg.checkpoint is not None else self.dir.path("transformer")
        _, model = load_transformer(source, None)
        self.graphdef, self.params = nnx.split(model, nnx.Param)
        self.text_encoder = TextEncoder.load(self.dir.path("text_encoder"), self.dir.path("tokenizer"))
        if self.cfg.decoder == "taehv":
            self.vae = TAEHV.load(self.dir.root / "taehv")
        else:
            self.vae = VAE.load(self.dir.path("vae"))
        return f"model folder {self.cfg.model_dir}" + (f" with {self.cfg.checkpoint}" if self.cfg.checkpoint else "")

    # ---- requests ----------------------------------------------------------------------------------------
    def defaults(self) -> dict:
        """What the page offers (choices and defaults)."""
        from fkv_jax.policies import POLICIES

        return {
            "model": "toy-world model" if self.kind == "toy" else f"model folder {self.cfg.model_dir.name}",
            "prompt": C.DEFAULT_PROMPT if self.kind == "toy" else "",
            "presets": list(self.presets),
            "policies": [""] + sorted(POLICIES),
            "backends": list(BACKEND_CHOICES),
            "frames": self.cfg.default_frames,
            "max_frames": self.cfg.max_frames,
            "frames_per_block": self.sampler_config(self.presets[0]).frames_per_block,
            "max_prompt_chars": MAX_PROMPT_CHARS,
            "fps": self.cfg.fps,
            "max_batch": self.cfg.max_batch,
            "decoder": self.cfg.decoder if self.kind != "toy" else "pixels",
        }

    def sampler_config(self, preset: str):
        args = _namespace(self.cfg, preset=None if self.kind == "toy" else preset)
        return C.sampler_config(args, "toy" if self.kind == "toy" else "checkpoint")

    def check_prompt(self, prompt: Any) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("empty prompt: type what the video should show")
        prompt = prompt.strip()
        if len(prompt) > MAX_PROMPT_CHARS:
            raise RequestError(f"prompt too long: {len(prompt)} characters, at most {MAX_PROMPT_CHARS}")
        if self.kind == "toy":
            try:
                C.check_toy_words([prompt], self.model_cfg)
            except UsageError as e:
                raise RequestError(str(e)) from None
        elif self.text_encoder is not None:  # the tokenizer truncates; a prompt that fills text_len may have lost words
            n = len(self.text_encoder.tokenizer.token_ids(prompt))
            limit = self.model_cfg.text_len
            if n >= limit:
                raise RequestError(f"prompt too long: at most {limit - 1} tokens (text_len={limit})")
        return prompt

    def validate(self, msg: dict) -> Request:
        """A start message from the page -> :class:`Request`, or :class:`RequestError` (one line)."""
        if not isinstance(msg, dict):
            raise RequestError("bad message: expected a JSON object")
        prompt = self.check_prompt(msg.get("prompt"))
        seed = _int(msg.get("seed", 0), "seed")
        if seed < 0 or seed >= 2**32:
            raise RequestError(f"seed must be in [0, 2^32), got {seed}")
        preset = msg.get("preset") or self.presets[0]
        if preset not in self.presets:
            raise RequestError(f"unknown preset {preset!r}; one of: {', '.join(self.presets)}")
        policy = msg.get("policy") or ""
        opts = msg.get("policy_opts") or ""
        if not isinstance(policy, str) or not isinstance(opts, str):
            raise RequestError("policy and policy options must be text")
        pairs = tuple(p.strip() for p in opts.replace(";", ",").split(",") if p.strip())
        backend = msg.get("backend") or "auto"
        if backend not in BACKEND_CHOICES:
            raise RequestError(f"unknown attention backend {backend!r}; one of: {', '.join(BACKEND_CHOICES)}")
        sc = self.sampler_config(preset)
        frames = _int(msg.get("frames", self.cfg.default_frames), "frames")
        c = sc.frames_per_block
        if frames < c or frames % c or frames > self.cfg.max_frames:
            raise RequestError(
                f"frames must be a multiple of the chunk size {c} between {c} and {self.cfg.max_frames}, got {frames}"
            )
        settings = Settings(preset, policy, pairs, backend, frames)
        try:  # policy, options and backend through the shared CLI checks (no compilation)
            self._policy(settings)
            C.check_backend(backend, self.model_cfg, self.latent_hw, "float32", None, c)
        except UsageError as e:
            raise RequestError(str(e).replace("--policy-opt", "policy option")) from None
        return Request(prompt, seed, settings)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return tuple(self.model_cfg.latent_hw)

    def _policy(self, s: Settings):
        if not s.policy:
            if s.policy_opts:
                raise UsageError("policy options need a policy")
            return None
        args = _namespace(self.cfg, policy=s.policy, policy_opt=list(s.policy_opts))
        return C.build_policy(args, self.model_cfg, "toy" if self.kind == "toy" else "checkpoint")

    # ---- samplers ----------------------------------------------------------------------------------------
    def streamer(self, s: Settings):
        """The :class:`Streamer` of these settings (built once, kept in a bounded LRU; compiles on first use).
        It is sized for ``max_frames`` (a global cache holds that many frames), so every video length shares it.
        Every policy is wrapped in a key meter; the plain cache is not (the re-cache needs it plain)."""
        from fkv_jax.sampling.rollout import Sampler
        from fkv_jax.sampling.stream import Streamer
        from fkv_jax.serve.meters import KeyMeter

        key = s.compiled
        with self._lock:
            if key in self._streamers:
                self._streamers.move_to_end(key)
                return self._streamers[key]
            policy = self._policy(s)
            sc = self.sampler_config(s.preset)
            sampler = Sampler(
                self.graphdef,
                self.model_cfg,
                sc,
                batch=self.cfg.max_batch,
                latent_hw=self.latent_hw,
                num_frames=self.cfg.max_frames,
                policy=None if policy is None else KeyMeter(inner=policy),
                attention_backend=s.backend,
            )
            sampler.check_length(s.frames)
            st = Streamer(sampler)
            self._streamers[key] = st
            self.compiles += 1
            while len(self._streamers) > self.cfg.max_samplers:
                self._streamers.popitem(last=False)
            return st

    def num_streamers(self) -> int:
        return len(self._streamers)

    # ---- text and pixels ---------------------------------------------------------------------------------
    def context(self, prompts: list[str]) -> np.ndarray:
        """[B, text_len, text_dim] float32."""
        if self.kind == "toy":
            from fkv_jax.toyworld.text import tokenize

            ids, _ = tokenize(list(prompts), self.text_encoder.text_len)  # validated words: no error here
            return np.asarray(self._toy_text(self.text_encoder, ids), np.float32)
        out = np.zeros((len(prompts), self.model_cfg.text_len, self.model_cfg.text_dim), np.float32)
        for i, p in enumerate(prompts):  # one prompt per call: one executable
            emb = self.text_encoder.encode([p])
            out[i, : emb.shape[1]] = emb[0, : self.model_cfg.text_len]
        return out

    def decoder(self):
        """``fn(x0 [B, C_blk, C, h, w], rows) -> uint8 [B, T, H, W, 3]`` for one batch (stateful for a VAE)."""
        if self.kind == "toy":
            from fkv_jax.toyworld.video import to_uint8

            return lambda x0: to_uint8(np.clip(np.asarray(x0), -1, 1), scale=1)
        from fkv_jax.video import to_uint8

        dec = self.vae.stream()
        return lambda x0: to_uint8(dec(x0))

    @property
    def video_scale(self) -> int:
        """Nearest-neighbour upscale of the mp4 (the shipped toy model's 24x24 frames become 192x192)."""
        return 8 if self.kind == "toy" else 1


def _int(value, name: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be an integer, got {value!r}") from None
