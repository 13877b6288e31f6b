"""Train the toy-world model: flow matching with teacher forcing on block-causal masks.

    python -m fkv_jax.toyworld.train --out runs/toyworld --export runs/toyworld/export  # 32x32, patch 8
    python -m fkv_jax.toyworld.train --out runs/toyworld --export runs/toyworld/export --resume  # after a stop

The shipped weights (docs/toyworld.md "The shipped model") are two runs: ``--frame-size 24 --patch 4 --steps
2000 --lr 1e-3 --warmup 100 --history-noise 0.1`` from scratch, then ``--init`` that export with ``--steps 250
--lr 3e-4 --warmup 20 --history-noise 0.1 --self-history 0.5``.

Objective (Wan / Self Forcing conventions, reference sections 2.11, 4.4, 4.6):

* a clip of ``F`` frames (blocks of 3) is fed as ``[clean frames | noisy frames]``; RoPE positions are the
  same absolute frame indices for both halves; clean frames get timestep 0;
* noisy block j has its own level: a table index ``u ~ U{0..999}`` of the shift-3 training table gives
  ``sigma`` and ``t = 1000 sigma``; ``x_t = (1 - sigma) x0 + sigma eps``;
* the model (the same :class:`CausalWanModel` modules as inference, with a block-causal teacher-forcing
  attention closure) predicts the clean frames (``prediction="x0"``, the default; loss ``mean((out - x0)^2)``)
  or the flow (``"flow"``; loss ``mean((v - (eps - x0))^2)``) over the noisy half;
* the clean history gets a little Gaussian noise (std up to ``history_noise``, still labelled t = 0) so the
  rollout tolerates its own imperfect frames;
* with ``self_history`` > 0, that fraction of clips has its history after the first block replaced by the
  model's own stop-gradient x0 prediction (:func:`self_history`), a one-pass stand-in for training on rollouts.

The text encoder (:mod:`fkv_jax.toyworld.text`) is trained jointly. Data for step ``k`` is drawn from
``numpy.random.default_rng((seed, k))`` and the noise from ``fold_in(key(seed), k)``, so a resumed run
equals an uninterrupted one. Checkpoints are Orbax (``ocp.CheckpointManager``) under ``OUT/ckpt``; the
exported weights are ``EXPORT/params.npz`` (EMA params, flat ``model/...`` and ``text/...`` keys) plus
``EXPORT/config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fkv_jax.config import ModelConfig
from fkv_jax.model.build import init_model
from fkv_jax.model.embeddings import patchify, timestep_sinusoid, unpatchify
from fkv_jax.model.rope import chunk_cos_sin, make_rope_tables
from fkv_jax.model.transformer import CausalWanModel
from fkv_jax.sampling.scheduler import training_table
from fkv_jax.toyworld.attention import teacher_forcing_attention
from fkv_jax.toyworld.text import ToyTextEncoder, init_text_encoder, tokenize
from fkv_jax.toyworld.weights import flatten
from fkv_jax.toyworld.world import WorldConfig, make_batch, world_for

TOY_DIR = Path(__file__).resolve().parent
MODEL_JSON = TOY_DIR / "toy_model.json"


def toy_model_config() -> ModelConfig:
    """The shipped toy preset (``fkv_jax/toyworld/toy_model.json``)."""
    return ModelConfig.from_dict(json.loads(MODEL_JSON.read_text()))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1600
    batch: int = 8
    frames: int = 15  # frames per training clip (a multiple of frames_per_block)
    frames_per_block: int = 3
    lr: float = 1e-3
    warmup: int = 100
    end_lr_frac: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    shift: float = 3.0  # shift of the table the noise levels are drawn from (uniform index)
    history_noise: float = 0.03  # max std of the noise added to the clean history
    seed: int = 0
    ckpt_every: int = 100
    eval_every: int = 100
    # "x0": the model outputs the clean frames (loss on x0); "flow": it outputs v = eps - x0 (Wan's convention).
    # x0 because an 8x8x3 patch (192 values) is as wide as the model: predicting the noise-dominated flow
    # through a linear head of that rank left residual noise in the samples
    prediction: str = "x0"
    init: str = ""  # start from exported weights (a directory with params.npz) instead of a random init
    # fraction of clips whose history (every block after the first) is the model's own x0 prediction from a
    # first, gradient-free pass instead of the true frames: a one-pass stand-in for training on rollouts
    self_history: float = 0.0


# ---- parameters ----------------------------------------------------------------------------------------


def init_params(cfg: ModelConfig, seed: int = 0):
    """(graphdefs, params): params = {"model": pure dict, "text": pure dict}.

    The transformer starts from the repo's host-side init with adaLN-Zero style zeros (block modulation,
    time projection and output head), so every block starts as the identity and the output as zero.
    """
    model = init_model(cfg, seed=seed)
    gm, sm = nnx.split(model, nnx.Param)
    pm = nnx.to_pure_dict(sm)
    pm["blocks"]["modulation"] = jnp.zeros_like(pm["blocks"]["modulation"])
    for k in ("kernel", "bias"):
        pm["time_projection"][k] = jnp.zeros_like(pm["time_projection"][k])
        pm["head"]["head"][k] = jnp.zeros_like(pm["head"]["head"][k])
    enc = init_text_encoder(cfg.text_dim, cfg.text_len, seed=seed)
    gt, st = nnx.split(enc, nnx.Param)
    return (gm, gt), {"model": pm, "text": nnx.to_pure_dict(st)}


def merge(graphdefs, params) -> tuple[CausalWanModel, ToyTextEncoder]:
    gm, gt = graphdefs
    return nnx.merge(gm, nnx.State(params["model"])), nnx.merge(gt, nnx.State(params["text"]))


# ---- the training forward ------------------------------------------------------------------------------


def forward_teacher_forcing(
    model: CausalWanModel,
    context: jax.Array,
    x_clean: jax.Array,
    x_noisy: jax.Array,
    t_noisy: jax.Array,
    rope,
    frames_per_block: int,
) -> jax.Array:
    """Model output (x0 or flow, see ``TrainConfig.prediction``) of the noisy frames given the clean ones.

    x_clean, x_noisy: [B, F, C, H, W]; t_noisy: [B, F] timesteps (float, 0..1000); context [B, L, text_dim].
    Returns the output [B, F, C, H, W] of the noisy half.
    """
    cfg = model.cfg
    b, f, c, hh, ww = x_clean.shape
    _, ph, pw = cfg.patch_size
    gh, gw = cfg.grid_hw((hh, ww))
    t_tok = gh * gw
    x = jnp.concatenate([x_clean, x_noisy], axis=1)  # [B, 2F, ...]
    t = jnp.concatenate([jnp.zeros_like(t_noisy), t_noisy], axis=1)  # [B, 2F]
    tokens = model.patch_embedding(patchify(x, (ph, pw)))  # [B, 2F*T, D]
    e, e0 = model.embed_time(timestep_sinusoid(t, cfg.freq_dim))
    frame_pos = jnp.concatenate([jnp.arange(f), jnp.arange(f)]).astype(jnp.int32)
    cos, sin = chunk_cos_sin(rope, frame_pos)
    ctx_k, ctx_v = model.context_kv(context)
    nblk = f // frames_per_block

    gdef, state = nnx.split(model.blocks)

    def layer(xs, st, ck, cv):
        blk = nnx.merge(gdef, st)
        q, k, v = blk.qkv(xs, e0, cos, sin)
        return blk.finish(xs, teacher_forcing_attention(q, k, v, nblk), e0, ck, cv)

    def body(xs, inp):
        return layer(xs, *inp), None

    tokens, _ = jax.lax.scan(body, tokens, (state, ctx_k, ctx_v))
    out = model.head(tokens[:, f * t_tok :], e[:, f:], f)
    return unpatchify(out, f, (gh, gw), (ph, pw), cfg.out_dim)


def self_history(
    model: CausalWanModel,
    context: jax.Array,
    frames: jax.Array,
    x_clean: jax.Array,
    sigma: jax.Array,
    t: jax.Array,
    eps: jax.Array,
    use: jax.Array,
    rope,
    tc: TrainConfig,
) -> jax.Array:
    """The clean history with the model's own frames in it (``TrainConfig.self_history``).

    For the clips where ``use`` [B] is set, every frame after the first block is replaced by the model's x0
    prediction of it (no gradient) from ``x_t = (1 - sigma) x0 + sigma eps`` given the true history; the first
    block stays true, as the given frames of a rollout do. The loss still asks for the true frames, so the model
    learns to go on from, and repair, frames like its own. frames, x_clean, eps: [B, F, C, H, W]; sigma, t: [B, F].
    """
    f = frames.shape[1]
    s = sigma[:, :, None, None, None]
    x_t = (1 - s) * frames + s * eps
    out = forward_teacher_forcing(model, context, x_clean, x_t, t, rope, tc.frames_per_block)
    pred = jax.lax.stop_gradient(out if tc.prediction == "x0" else x_t - s * out)  # x0 estimate
    keep = ~use[:, None] | (jnp.arange(f) < tc.frames_per_block)[None, :]  # [B, F]
    return jnp.where(keep[:, :, None, None, None], x_clean, pred)


def make_loss_fn(graphdefs, cfg: ModelConfig, tc: TrainConfig):
    rope = make_rope_tables(cfg.head_dim, cfg.grid_hw(cfg.latent_hw), cfg.rope_max_frames)
    sig_table, t_table = (jnp.asarray(a) for a in training_table(tc.shift))
    nblk = tc.frames // tc.frames_per_block

    def draw(key, b):  # -> int [B, nblk]: one training-table index per block
        return jax.random.randint(key, (b, nblk), 0, sig_table.shape[0])

    def levels(idx):  # int [B, nblk] -> sigma, t: [B, F] (every frame of a block at its block's level)
        idx = jnp.repeat(idx, tc.frames_per_block, axis=1)
        return sig_table[idx], t_table[idx]

    def loss_fn(params, frames, ids, key, idx=None):
        """frames [B, F, 3, H, W] clean; ids [B, L]; idx: optional int [B, nblk] table indices (eval)."""
        model, enc = merge(graphdefs, params)
        b = frames.shape[0]
        k1, k2, k3, k4 = jax.random.split(key, 4)
        sig, t = levels(draw(k1, b) if idx is None else idx)
        sigma = sig[:, :, None, None, None]
        eps = jax.random.normal(k2, frames.shape)
        x_noisy = (1 - sigma) * frames + sigma * eps
        hist_std = tc.history_noise * jax.random.uniform(k3, (b, 1, 1, 1, 1))
        x_clean = frames + hist_std * jax.random.normal(k4, frames.shape)
        context = enc(ids)
        if tc.self_history > 0:
            k5, k6, k7 = jax.random.split(jax.random.fold_in(key, 1), 3)
            sig1, t1 = levels(draw(k5, b))
            use = jax.random.uniform(k7, (b,)) < tc.self_history  # [B]
            x_clean = self_history(
                model, context, frames, x_clean, sig1, t1, jax.random.normal(k6, frames.shape), use, rope, tc
            )
        out = forward_teacher_forcing(model, context, x_clean, x_noisy, t, rope, tc.frames_per_block)
        target = frames if tc.prediction == "x0" else eps - frames
        return jnp.mean(jnp.square(out - target))

    return loss_fn


def make_optimizer(tc: TrainConfig):
    sched = optax.warmup_cosine_decay_schedule(
        0.0, tc.lr, tc.warmup, max(tc.steps, tc.warmup + 1), end_value=tc.lr * tc.end_lr_frac
    )
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip), optax.adamw(sched, b1=0.9, b2=0.99, weight_decay=tc.weight_decay)
    )


def make_train_step(graphdefs, cfg: ModelConfig, tc: TrainConfig):
    loss_fn = make_loss_fn(graphdefs, cfg, tc)
    tx = make_optimizer(tc)

    def train_step(state, frames, ids):
        step = state["step"]
        key = jax.random.fold_in(jax.random.key(tc.seed), step)
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], frames, ids, key)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        d = jnp.minimum(tc.ema_decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], params)
        return {"params": params, "ema": ema, "opt": opt, "step": step + 1}, loss

    def eval_loss(params, frames, ids, idx):
        return loss_fn(params, frames, ids, jax.random.key(1234), idx)

    return tx, jax.jit(train_step, donate_argnums=(0,)), jax.jit(eval_loss)


# ---- data ------------------------------------------------------------------------------------------------


def batch_for_step(tc: TrainConfig, cfg: ModelConfig, step: int, world: WorldConfig | None = None):
    world = world_for(cfg.latent_hw) if world is None else world  # the world scaled to the model's frames
    frames, prompts = make_batch(np.random.default_rng((tc.seed, step)), tc.batch, tc.frames, world)
    ids, _ = tokenize(prompts, cfg.text_len)
    return frames, ids


def eval_batch(tc: TrainConfig, cfg: ModelConfig, n: int = 8):
    """A fixed held-out batch (its own seed) with fixed noise levels spread over the table."""
    frames, prompts = make_batch(np.random.default_rng(987654321), n, tc.frames, world_for(cfg.latent_hw))
    ids, _ = tokenize(prompts, cfg.text_len)
    nblk = tc.frames // tc.frames_per_block
    idx = (np.arange(n * nblk).reshape(n, nblk) * 997) % 1000
    return frames, ids, idx.astype(np.int32)


class Prefetcher:
    """Builds the batches of steps start..stop-1 on a thread, a few steps ahead."""

    def __init__(self, fn, start: int, stop: int, depth: int = 3):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.t = threading.Thread(target=self._run, args=(fn, start, stop), daemon=True)
        self.t.start()

    def _run(self, fn, start, stop):
        for s in range(start, stop):
            self.q.put((s, fn(s)))

    def get(self):
        return self.q.get()


# ---- export / load ----------------------------------------------------------------------------------------


def export_weights(
    path: Path, params: dict, cfg: ModelConfig, tc: TrainConfig, extra: dict, dtype: str = "float16"
) -> Path:
    """Write ``params.npz`` (stored as ``dtype``: float16 keeps the shipped file under 10 MB; loading casts
    back to float32) and ``config.json`` (model config, training config, ``extra``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "params.tmp.npz"
    flat = {k: np.asarray(v).astype(dtype) for k, v in flatten(jax.device_get(params)).items()}
    np.savez_compressed(tmp, **flat)
    os.replace(tmp, path / "params.npz")
    meta = {
        "format": "fkv_jax.toyworld",
        "format_version": 1,
        "stored_dtype": dtype,
        "model": cfg.to_dict(),
        "world": dataclasses.asdict(world_for(cfg.latent_hw)),
        "train": dataclasses.asdict(tc),
        **extra,
    }
    (path / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_run_params(
    out: str | Path, step: int | None = None, which: str = "ema", cfg: ModelConfig | None = None
) -> tuple[int, dict]:
    """(step, params) of a training run's checkpoint (``which`` = "ema" or "params"), for looking at a run."""
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(Path(out).resolve() / "ckpt", options=ocp.CheckpointManagerOptions(read_only=True))
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {out}")
    _, params = init_params(cfg or toy_model_config())
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, params)
    r = mgr.restore(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(item={which: target}, partial_restore=True))
    )
    return step, r.state[which]


# ---- the loop ------------------------------------------------------------------------------------------------


def train(
    tc: TrainConfig,
    out: Path,
    *,
    resume: bool = False,
    export: Path | None = None,
    progress: bool = True,
    cfg: ModelConfig | None = None,
    stop_after: int | None = None,
) -> dict:
    """Run (or continue) a training run; returns a summary dict (final losses, wall time).

    ``stop_after=k`` stops (with a checkpoint) once step k is done, as an interruption would; ``resume=True``
    continues from the latest checkpoint in ``out``.
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    cfg = cfg or toy_model_config()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    graphdefs, params = init_params(cfg, tc.seed)
    if tc.init:
        from fkv_jax.toyworld.weights import load_params

        init_cfg, loaded = load_params(tc.init)
        if init_cfg != cfg:
            raise SystemExit(f"--init {tc.init} holds a different model config: {init_cfg} vs {cfg}")
        params = jax.tree.map(lambda ref, x: jnp.asarray(x, ref.dtype), params, loaded)
    tx, train_step, eval_loss = make_train_step(graphdefs, cfg, tc)
    state = {"params": params, "ema": jax.tree.map(jnp.copy, params), "opt": tx.init(params), "step": jnp.int32(0)}
    mgr = ocp.CheckpointManager(out / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    log_path = out / "log.jsonl"
    wall_before = cpu_before = 0.0
    latest = mgr.latest_step()
    if latest is not None and not resume:
        raise SystemExit(f"{out} already has checkpoints (step {latest}); pass --resume or another --out")
    if resume and latest is not None:
        meta = mgr.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        saved = {**dataclasses.asdict(TrainConfig()), **meta["train"]}  # fields newer than the run: defaults
        if json.loads(json.dumps(saved)) != json.loads(json.dumps(dataclasses.asdict(tc))):
            raise SystemExit(
                f"--resume with a different training config: saved {meta['train']}, now {dataclasses.asdict(tc)}"
            )
        if "model" in meta and meta["model"] != json.loads(json.dumps(cfg.to_dict())):
            raise SystemExit(f"--resume with a different model config: saved {meta['model']}, now {cfg.to_dict()}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = mgr.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
        wall_before = float(meta["wall_seconds"])
        cpu_before = float(meta.get("cpu_seconds", 0.0))
        if log_path.exists():  # drop log lines written after the checkpoint
            lines = [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["step"] <= latest]
            log_path.write_text("".join(ln + "\n" for ln in lines))
    start = int(state["step"])
    ev_frames, ev_ids, ev_idx = eval_batch(tc, cfg)

    def save(step, wall):
        meta = {"train": dataclasses.asdict(tc), "model": cfg.to_dict(), "wall_seconds": wall, "cpu_seconds": cpu()}
        mgr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    stop = tc.steps if stop_after is None else min(stop_after, tc.steps)
    pf = Prefetcher(lambda s: batch_for_step(tc, cfg, s), start, stop)
    bar = tqdm(
        range(start, stop),
        initial=start,
        total=tc.steps,
        desc="train",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=2.0,
    )
    t0 = time.perf_counter()
    c0 = time.process_time()

    def cpu():  # CPU seconds of this run (all threads, every stint of a resumed run)
        return cpu_before + time.process_time() - c0

    window: list[float] = []
    last = {}
    with open(log_path, "a") as log:
        for _ in bar:
            s, (frames, ids) = pf.get()
            state, loss = train_step(state, frames, ids)
            window.append(float(loss))
            done = s + 1
            bar.set_postfix(loss=f"{np.mean(window[-20:]):.4f}")
            is_last = done == tc.steps
            if done % tc.eval_every == 0 or is_last:
                last = {
                    "step": done,
                    "train_loss": float(np.mean(window)),
                    "eval_loss": float(eval_loss(state["params"], ev_frames, ev_ids, ev_idx)),
                    "eval_loss_ema": float(eval_loss(state["ema"], ev_frames, ev_ids, ev_idx)),
                    "wall_seconds": wall_before + time.perf_counter() - t0,
                    "cpu_seconds": cpu(),
                }
                log.write(json.dumps(last) + "\n")
                log.flush()
                window = []
                bar.write(
                    f"step {done}: train {last['train_loss']:.4f}  eval {last['eval_loss']:.4f}  "
                    f"eval(ema) {last['eval_loss_ema']:.4f}  {last['wall_seconds']:.0f}s"
                )
            if done % tc.ckpt_every == 0 or is_last or done == stop:
                save(done, wall_before + time.perf_counter() - t0)
    mgr.wait_until_finished()
    wall = wall_before + time.perf_counter() - t0
    summary = {
        "steps": int(state["step"]),
        "wall_seconds": wall,
        "cpu_seconds": cpu(),
        **{k: v for k, v in last.items() if k not in ("wall_seconds", "cpu_seconds")},
    }
    if export is not None and int(state["step"]) == tc.steps:
        export_weights(export, state["ema"], cfg, tc, {"summary": summary})
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m fkv_jax.toyworld.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--out", type=Path, default=Path("runs/toyworld"), help="run directory (checkpoints, log)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--export", type=Path, help="write the final EMA weights here (params.npz + config.json)")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--batch", type=int, default=TrainConfig.batch)
    p.add_argument("--frames", type=int, default=TrainConfig.frames)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    p.add_argument(
        "--history-noise",
        type=float,
        default=TrainConfig.history_noise,
        help="max std of the Gaussian noise added to the clean history frames (drawn per clip), so the rollout "
        "tolerates its own imperfect frames",
    )
    p.add_argument(
        "--prediction",
        choices=("x0", "flow"),
        default=TrainConfig.prediction,
        help="what the model learns to output: x0 (the clean frames, default) or flow (v = eps - x0); "
        "recorded in the exported config.json, which the samplers read",
    )
    p.add_argument(
        "--self-history",
        type=float,
        default=TrainConfig.self_history,
        help="fraction of clips (0-1) whose history after the first block is the model's own x0 prediction "
        "(a gradient-free first pass) instead of the true frames; costs one more forward per step",
    )
    p.add_argument("--init", default="", help="start from exported weights (DIR with params.npz), e.g. a first stage")
    base = toy_model_config()
    p.add_argument(
        "--frame-size",
        type=int,
        default=base.latent_hw[0],
        help="square frame side in pixels (default from toy_model.json); the world (gap, sprite size, speeds) "
        "scales with it, so durations in frames stay the same",
    )
    p.add_argument(
        "--patch", type=int, default=base.patch_size[1], help="spatial patch side (default from toy_model.json)"
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    tc = TrainConfig(
        steps=a.steps,
        seed=a.seed,
        batch=a.batch,
        frames=a.frames,
        lr=a.lr,
        warmup=a.warmup,
        history_noise=a.history_noise,
        prediction=a.prediction,
        self_history=a.self_history,
        init=str(Path(a.init).resolve()) if a.init else "",
    )
    if not 0.0 <= a.self_history <= 1.0:
        p.error(f"--self-history {a.self_history} must be between 0 and 1")
    if a.frame_size % a.patch or a.frame_size < 8:
        p.error(f"--frame-size {a.frame_size} must be >= 8 and a multiple of --patch {a.patch}")
    cfg = dataclasses.replace(base, latent_hw=(a.frame_size, a.frame_size), patch_size=(1, a.patch, a.patch))
    summary = train(tc, a.out, resume=a.resume, export=a.export, progress=not a.no_progress, cfg=cfg)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
