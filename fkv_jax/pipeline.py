"""Text -> mp4, end to end: UMT5 encode -> AR rollout (with LongLive prompt switches) -> streaming VAE decode -> mp4.

A model folder (``fkv convert --wan-dir WAN2.1_DOWNLOAD --generator GEN.pt --output DIR``)::

    DIR/transformer/    converted causal DiT          DIR/vae/         converted Wan2.1 VAE
    DIR/text_encoder/   converted UMT5 encoder        DIR/tokenizer/   the google/umt5-xxl tokenizer files

Order of work (and of memory): every input is checked first (model folder, prompts, output folder, schedule);
then all prompts are encoded and the text encoder is dropped (UMT5-XXL is the largest part); then the
transformer and the VAE are loaded once for all videos. Each chunk the sampler emits is decoded at once
(the VAE's feature cache carries over between chunks) and its frames are appended to the mp4, so an
interrupted run leaves a playable file with everything generated so far.

Python API::

    from fkv_jax.pipeline import TextToVideo
    t2v = TextToVideo("models/self_forcing", num_frames=21)
    t2v.generate(["a corgi surfing a wave"], ["out/corgi.mp4"], seeds=[0])
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")
# decoders of the latents: the Wan2.1 VAE (DIR/vae/), or the TAEHV preview decoder (optional DIR/taehv/)
DECODERS = ("wan", "taehv")


class PipelineError(ValueError):
    """Bad input for the text-to-video pipeline (reported before any heavy work)."""


# ---- the model folder ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelDir:
    """A checked model folder: every component present and of the right kind, sizes consistent."""

    root: Path
    model_cfg: Any  # fkv_jax.config.ModelConfig
    model_dtype: str  # the transformer's stored dtype
    vae_cfg: Any  # fkv_jax.vae.VAEConfig
    text_cfg: Any  # fkv_jax.text.UMT5Config
    tokenizer_file: Path
    taehv_cfg: Any = None  # fkv_jax.vae.TAEHVConfig of the optional DIR/taehv/ preview decoder, or None

    def path(self, component: str) -> Path:
        return self.root / component

    def require_decoder(self, decoder: str) -> None:
        """A :class:`PipelineError` unless the folder holds ``decoder`` (one of :data:`DECODERS`)."""
        if decoder not in DECODERS:
            raise PipelineError(f"--decoder {decoder!r}: one of {', '.join(DECODERS)}")
        if decoder == "taehv" and self.taehv_cfg is None:
            raise PipelineError(
                f"--decoder taehv: {self.root}/taehv not found; add it with "
                f"`fkv convert --taehv taew2_1.pth --output {self.root}`"
            )

    @classmethod
    def check(cls, root: str | Path) -> "ModelDir":
        """Read only the config files (cheap); a :class:`PipelineError` names the first problem found."""
        from fkv_jax.checkpoint import CheckpointError, read_info
        from fkv_jax.text import TokenizerError, find_tokenizer_file, read_text_encoder_config
        from fkv_jax.vae import read_taehv_config, read_vae_config

        root = Path(root)
        if not root.is_dir():
            raise PipelineError(
                f"--model-dir {root} does not exist (build it with `fkv convert --wan-dir "
                "WAN2.1_DOWNLOAD --generator GEN.pt --output DIR`)"
            )
        missing = [c for c in COMPONENTS if not (root / c).is_dir()]
        if missing:
            raise PipelineError(
                f"--model-dir {root} lacks {', '.join(m + '/' for m in missing)} (build the folder with "
                "`fkv convert --wan-dir WAN2.1_DOWNLOAD --generator GEN.pt --output DIR`)"
            )
        try:
            info = read_info(root / "transformer")
            model_cfg = info.cfg
            vae_cfg = read_vae_config(root / "vae")
            text_cfg = read_text_encoder_config(root / "text_encoder")
            tok = find_tokenizer_file(root / "tokenizer")
            taehv_cfg = read_taehv_config(root / "taehv") if (root / "taehv").is_dir() else None
        except (CheckpointError, TokenizerError) as e:
            raise PipelineError(str(e)) from None
        if text_cfg.dim != model_cfg.text_dim:
            raise PipelineError(
                f"the text encoder's width {text_cfg.dim} is not the transformer's text_dim {model_cfg.text_dim}"
            )
        if vae_cfg.z_dim != model_cfg.out_dim:
            raise PipelineError(f"the VAE's z_dim {vae_cfg.z_dim} is not the transformer's out_dim {model_cfg.out_dim}")
        if taehv_cfg is not None and taehv_cfg.z_dim != model_cfg.out_dim:
            raise PipelineError(
                f"the TAEHV decoder's z_dim {taehv_cfg.z_dim} is not the transformer's out_dim {model_cfg.out_dim}"
            )
        return cls(root, model_cfg, info.dtype, vae_cfg, text_cfg, tok, taehv_cfg)


# ---- prompts and schedules ---------------------------------------------------------------------------------


def read_prompt_lines(path: str | Path, flag: str = "--prompts") -> list[str]:
    """The non-empty lines of a UTF-8 prompts file (one prompt per line)."""
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{flag} {path} is a directory; expected a text file, one prompt per line")
    if not path.is_file():
        raise PipelineError(f"{flag} not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PipelineError(f"cannot read {flag} {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PipelineError(
            f"{flag} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise PipelineError(f"{flag} file {path} has no prompts (it is empty)")
    return prompts


_START_KEYS = ("start_frame", "start", "frame")


def _segments_to_schedule(segments, where: str):
    from fkv_jax.sampling.recache import PromptSchedule

    prompts, starts = [], []
    for i, seg in enumerate(segments):
        if isinstance(seg, str):
            seg = {"prompt": seg}
        if not isinstance(seg, dict) or not isinstance(seg.get("prompt"), str) or not seg["prompt"].strip():
            raise PipelineError(f'{where}: segment {i} needs a non-empty "prompt" (got {seg!r})')
        start = next((seg[k] for k in _START_KEYS if k in seg), None)
        if i == 0 and start not in (None, 0):
            raise PipelineError(f"{where}: the first prompt starts at frame 0, not {start}")
        if i > 0 and not isinstance(start, int):
            raise PipelineError(f'{where}: segment {i} needs an integer "start_frame" (latent frame)')
        prompts.append(seg["prompt"].strip())
        if i > 0:
            starts.append(start)
    try:
        return PromptSchedule(tuple(prompts), tuple(starts))
    except ValueError as e:
        raise PipelineError(f"{where}: {e}") from None


def read_schedule_file(path: str | Path):
    """A prompt schedule from YAML / JSON (a list of ``{prompt, start_frame}`` or ``{prompts: [...],
    switch_frames: [...]}``) or JSONL (one ``{"prompt": ..., "start_frame": ...}`` per line)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"--schedule file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".jsonl":
            data = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ImportError:
        raise PipelineError(
            "reading a YAML schedule needs PyYAML (pip install pyyaml); or use .json / .jsonl"
        ) from None
    except Exception as e:  # noqa: BLE001 - json / yaml / OS errors are all bad input here
        raise PipelineError(f"cannot read --schedule {path}: {type(e).__name__}: {e}") from None
    if isinstance(data, dict) and "prompts" in data:
        prompts, frames = data.get("prompts"), data.get("switch_frames", [])
        if not isinstance(prompts, list) or not isinstance(frames, list):
            raise PipelineError(f"--schedule {path}: prompts and switch_frames must be lists")
        data = [
            {"prompt": p, **({"start_frame": frames[i - 1]} if 0 < i <= len(frames) else {})}
            for i, p in enumerate(prompts)
        ]
        if len(frames) != len(prompts) - 1:
            raise PipelineError(
                f"--schedule {path}: {len(prompts)} prompts need {len(prompts) - 1} switch_frames, got {len(frames)}"
            )
    if not isinstance(data, list) or not data:
        raise PipelineError(f"--schedule {path} holds no prompt segments")
    return _segments_to_schedule(data, f"--schedule {path}")


@dataclasses.dataclass(frozen=True)
class Job:
    """One video: its prompt schedule, its seed and where it goes."""

    schedule: Any  # PromptSchedule
    seed: int
    path: Path


# ---- the pipeline ------------------------------------------------------------------------------------------


class TextToVideo:
    """Prompts in, mp4 files out. See the module docstring; everything heavy is loaded lazily, once."""

    def __init__(
        self,
        model_dir: str | Path | ModelDir,
        sampler_cfg=None,
        *,
        num_frames: int = 21,
        latent_hw: tuple[int, int] | None = None,
        batch_size: int = 1,
        cache_frames: int | None = None,
        policy=None,
        attention_backend: str = "auto",
        global_sink: bool = True,
        fps: float = 16,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
        dtype: str | None = None,
        cache_dtype: str | None = None,
        rope_mode: str = "absolute",
        mesh=None,
        decoder: str = "wan",
    ):
        """``mesh``: a ``(data, model)`` device mesh (:func:`fkv_jax.parallel.make_mesh`; on several processes
        the global one): videos of a batch on ``data``, heads on ``model``; each process then decodes and writes
        only the videos it holds. ``rope_mode``: see :class:`~fkv_jax.sampling.rollout.Sampler`."""
        from fkv_jax.config import sampler_preset

        self.dir = model_dir if isinstance(model_dir, ModelDir) else ModelDir.check(model_dir)
        self.dir.require_decoder(decoder)
        self.decoder = decoder
        self.sampler_cfg = sampler_cfg if sampler_cfg is not None else sampler_preset("self_forcing")
        self.num_frames, self.batch_size, self.cache_frames = num_frames, batch_size, cache_frames
        self.latent_hw = tuple(latent_hw or self.dir.model_cfg.latent_hw)
        self.policy, self.backend, self.global_sink = policy, attention_backend, global_sink
        self.fps, self.progress = fps, progress
        # compute dtype: the stored one unless overridden (weights cast at load); the cache follows it by default
        self.dtype, self.cache_dtype = dtype or self.dir.model_dtype, cache_dtype
        self.log = log or (lambda s: print(s, file=sys.stderr))
        self.rope_mode, self.mesh = rope_mode, mesh
        self._params = None
        self._vae = None
        self.sampler = self._build_sampler()

    def _build_sampler(self):
        """The sampler, built on the abstract model (nothing loaded, nothing compiled): this checks the whole
        geometry (latent size, cache, policy, video length) before any heavy work."""
        from flax import nnx

        from fkv_jax.checkpoint import DTYPES
        from fkv_jax.model.build import abstract_model
        from fkv_jax.sampling.rollout import Sampler

        if self.batch_size < 1:
            raise PipelineError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise PipelineError(f"--dtype {self.dtype} is not one of {', '.join(DTYPES)}")
        graphdef = nnx.split(abstract_model(self.dir.model_cfg, DTYPES[self.dtype]), nnx.Param)[0]
        kw = dict(
            batch=self.batch_size,
            latent_hw=self.latent_hw,
            num_frames=self.num_frames,
            cache_frames=self.cache_frames,
            policy=self.policy,
            attention_backend=self.backend,
            cache_dtype=self.cache_dtype,
            rope_mode=self.rope_mode,
        )
        try:
            if self.mesh is not None:
                from fkv_jax.parallel import ShardedSampler

                sampler = ShardedSampler(graphdef, self.dir.model_cfg, self.sampler_cfg, mesh=self.mesh, **kw)
            else:
                sampler = Sampler(graphdef, self.dir.model_cfg, self.sampler_cfg, **kw)
            sampler.check_length(self.num_frames)
        except ValueError as e:
            raise PipelineError(str(e)) from None
        return sampler

    # -- text ---------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Every distinct prompt -> its embedding ``[tokens, text_dim]`` (trimmed to its length; zero-padded to
        text_len when used). Loads the text encoder, encodes, and frees it again."""
        from fkv_jax.text import TextEncoder

        unique = list(dict.fromkeys(prompts))
        t0 = time.perf_counter()
        enc = TextEncoder.load(self.dir.path("text_encoder"))
        from fkv_jax.text.tokenizer import UMT5Tokenizer

        tok = UMT5Tokenizer(self.dir.path("tokenizer"), self.dir.model_cfg.text_len)
        out = {}
        for p in unique:  # one prompt per call: one executable whatever the number of prompts
            ids, mask = tok([p])
            out[p] = enc.encode_ids(ids, mask)[0, : int(mask.sum())].copy()
        del enc
        gc.collect()
        self.log(
            f"text:   {len(unique)} prompt(s) encoded in {time.perf_counter() - t0:.1f} s "
            f"(UMT5 {self.dir.text_cfg.name}, text_len {self.dir.model_cfg.text_len}); encoder freed"
        )
        return out

    def _context(self, emb: dict[str, np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        cfg = self.dir.model_cfg
        ctx = np.zeros((len(prompts), cfg.text_len, cfg.text_dim), np.float32)
        for i, p in enumerate(prompts):
            ctx[i, : len(emb[p])] = emb[p]
        return ctx

    # -- models -------------------------------------------------------------------------------------------
    def params(self):
        """The transformer's parameters (loaded once; the sampler was built on the same graph)."""
        if self._params is None:
            from flax import nnx

            from fkv_jax.checkpoint import load_transformer

            t0 = time.perf_counter()
            _, model = load_transformer(self.dir.path("transformer"), self.dtype)
            graphdef, self._params = nnx.split(model, nnx.Param)
            assert graphdef == self.sampler._graphdef, (
                "the loaded model's graph is not the one the sampler was built on"
            )
            if self.mesh is not None:
                self._params = self.sampler.shard_params(self._params)
            self.log(f"model:  {self.dir.path('transformer')} loaded in {time.perf_counter() - t0:.1f} s")
        return self._params

    def vae(self):
        """The decoder of the latents (``decoder``): the Wan2.1 VAE or TAEHV, loaded once; both have
        ``.stream()``."""
        if self._vae is None:
            from fkv_jax.vae import TAEHV, VAE

            load = TAEHV.load if self.decoder == "taehv" else VAE.load
            self._vae = load(self.dir.path("taehv" if self.decoder == "taehv" else "vae"))
        return self._vae

    # -- videos -------------------------------------------------------------------------------------------
    def check_jobs(self, jobs: Sequence[Job]) -> None:
        """Every job fits the sampler (video length, switch frames shared by a batch); nothing is written."""
        if not jobs:
            raise PipelineError("nothing to generate")
        for job in jobs:
            try:
                job.schedule.check_length(self.num_frames)
            except ValueError as e:
                raise PipelineError(str(e)) from None
            if job.path.is_dir():
                raise PipelineError(f"output {job.path} is a directory")
        for start in range(0, len(jobs), self.batch_size):
            if len({j.schedule.switch_frames for j in jobs[start : start + self.batch_size]}) > 1:
                raise PipelineError("videos generated together must share their switch frames; use --batch-size 1")

    def run(
        self,
        jobs: Sequence[Job],
        *,
        save_latents: str | Path | None = None,
        rt=None,
        manifest: Path | None = None,
        entries: Sequence[dict] = (),
        out_dir: Path | None = None,
        policy_name: str | None = None,
        atomic: bool = False,
    ) -> list[Path]:
        """Generate every job (in batches of ``batch_size``); returns the mp4 paths.

        ``rt`` (:class:`fkv_jax.distributed.Runtime`): on several processes each writes the videos of the batch
        rows it holds. ``manifest``: JSON lines of finished videos, rewritten by process 0 after every batch
        (:mod:`fkv_jax.jobs`; ``entries`` are kept in it). ``atomic``: write each mp4 under a temporary name and
        rename it when complete (batch jobs); otherwise an interrupted video stays playable at its name."""
        from fkv_jax import jobs as J
        from fkv_jax.distributed import Runtime
        from fkv_jax.video import check_output_folder

        rt = rt or Runtime()
        self.check_jobs(jobs)
        for job in jobs:
            check_output_folder(job.path.parent)
        from tqdm.auto import tqdm

        with tqdm(
            total=3,
            desc="text encoder, transformer, VAE",
            unit="model",
            leave=False,
            disable=None if self.progress else True,
        ) as stages:
            emb = self.encode([p for job in jobs for p in job.schedule.prompts])
            stages.update(1)
            params = self.params()
            stages.update(1)
            vae = self.vae()
            stages.update(1)
        videos = [J.Video(i, j.schedule.prompts[0], j.seed, j.path, j) for i, j in enumerate(jobs)]

        def batch(k, group, n_real):
            return self._run_batch(
                group,
                n_real,
                emb,
                params,
                vae,
                first=k * self.batch_size,
                total=len(jobs),
                want=save_latents,
                rt=rt,
                atomic=atomic,
            )

        _, extras = J.run(
            videos,
            self.batch_size,
            batch,
            rt=rt,
            out_dir=Path(out_dir) if out_dir is not None else jobs[0].path.parent,
            manifest=manifest,
            entries=entries,
            policy=policy_name,
            log=self.log,
        )
        if save_latents is not None and rt.is_main:
            from fkv_jax.video import save_npy_atomic

            latents = np.concatenate(extras)
            save_npy_atomic(Path(save_latents), latents)
            self.log(f"latents: {save_latents} {list(latents.shape)} (model space, before the VAE's de-normalisation)")
        return [job.path for job in jobs]

    def _rows(self) -> list[int]:
        """Batch rows this process decodes and writes (all of them on one process)."""
        from fkv_jax.distributed import owned_rows

        if self.sampler.shardings is None:
            return list(range(self.batch_size))
        return owned_rows(self.sampler.shardings.chunk, self.batch_size)

    def _run_batch(self, vids, n_real: int, emb, params, vae, *, first: int, total: int, want, rt, atomic: bool):
        """One batch (``vids``: :class:`fkv_jax.jobs.Video`, padded to the batch size; rows below ``n_real`` are
        real). Returns (videos this process wrote, the batch's global latents on process 0 when ``want``)."""
        from tqdm.auto import tqdm

        from fkv_jax.distributed import gather_rows, host_local
        from fkv_jax.jobs import partial_path
        from fkv_jax.sampling.rollout import rollout
        from fkv_jax.video import VideoWriter

        sampler = self.sampler
        padded = [v.item for v in vids]
        cfg, c = self.dir.model_cfg, self.sampler_cfg.frames_per_block
        n = sampler.schedule.num_steps
        switch = padded[0].schedule.switch_frames  # shared by the batch (checked in run)
        segments = len(switch) + 1
        contexts = [self._context(emb, [j.schedule.prompts[s] for j in padded]) for s in range(segments)]
        shape = (cfg.in_dim, *self.latent_hw)
        noise = np.concatenate(
            [np.random.default_rng(j.seed).standard_normal((1, self.num_frames, *shape), np.float32) for j in padded]
        )

        def renoise(blk):
            return np.concatenate(
                [
                    np.random.default_rng((j.seed, blk)).standard_normal((n - 1, 1, c, *shape), np.float32)
                    for j in padded
                ],
                axis=1,
            )

        rows = self._rows()  # decoded here; the real ones are written
        mine = [r for r in rows if r < n_real]
        writers = {r: VideoWriter(partial_path(vids[r].path) if atomic else vids[r].path, fps=self.fps) for r in mine}
        decoder = vae.stream() if rows else None
        nblk = self.num_frames // c
        label = f"video {first + 1}" + (f"-{first + n_real}" if n_real > 1 else "") + f"/{total}"
        show = self.progress and rt.is_main
        bar = tqdm(total=nblk, desc=label, unit="chunk", disable=None if show else True, dynamic_ncols=True)
        t0, frames = time.perf_counter(), 0
        completed = False

        def on_chunk(blk, res):
            nonlocal frames
            if decoder is not None:
                video = decoder(host_local(res.x0)[rows])  # [rows, T', H, W, 3] in [-1, 1]
                for r, v in zip(rows, video):
                    if r in writers:
                        writers[r].write(v)
                frames += video.shape[1]
            bar.update(1)
            bar.set_postfix(frames=frames, fps=f"{frames / (time.perf_counter() - t0):.2f}")

        def on_switch(start_frame, seg, cache):
            bar.write(f"frame {start_frame}: prompt {seg + 1}/{segments} (KV re-cache, global_sink={self.global_sink})")

        try:
            lat = rollout(
                sampler,
                params,
                contexts,
                noise,
                switch_frames=switch,
                global_sink=self.global_sink,
                renoise=renoise,
                on_chunk=on_chunk,
                on_switch=on_switch,
            ).latents
            completed = True
        finally:
            bar.close()
            for w in writers.values():
                w.close()
            dt = time.perf_counter() - t0
            for r, w in writers.items():
                if completed and atomic:
                    os.replace(w.path, vids[r].path)
                state = "wrote" if completed else "interrupted; kept"
                self.log(
                    f"{state} {vids[r].path if completed else w.path} ({w.frames_written} frames, "
                    f"{w.frames_written / self.fps:.1f} s of video) in {dt:.1f} s"
                )
        written = [vids[r] for r in mine]
        if not want:
            return written, None
        if sampler.shardings is not None:
            lat = gather_rows(lat, sampler.shardings.chunk)
        return written, (lat[:n_real] if rt.is_main else None)

    def generate(
        self,
        prompts: Sequence[str],
        paths: Sequence[str | Path],
        seeds: Sequence[int] | None = None,
        switch_frames: Sequence[int] = (),
    ) -> list[Path]:
        """Convenience: one video per path. With ``switch_frames``, ``prompts`` is one video's schedule."""
        from fkv_jax.sampling.recache import PromptSchedule

        seeds = list(seeds) if seeds is not None else [0] * len(paths)
        if switch_frames:
            scheds = [PromptSchedule(tuple(prompts), tuple(switch_frames))] * len(paths)
        else:
            scheds = [PromptSchedule((p,)) for p in prompts]
        return self.run([Job(s, seed, Path(p)) for s, seed, p in zip(scheds, seeds, paths)])
