"""``fkv serve`` in process: the chunk-at-a-time streamer (against rollout), the key meter, request validation and
the command line's error lines. The browser and load tests (a real server process) are in test_serve_browser.py."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from fkv_jax.cli.serve import main as serve_main
from fkv_jax.cli.serve_engine import Engine
from fkv_jax.serve.protocol import RequestError, ServeConfig

STEPS = (1000.0, 750.0, 500.0, 250.0)  # a 4-step toy sampler: the same program shape, a quarter of the compile


@pytest.fixture(scope="module")
def toy():
    from fkv_jax.toyworld.model import ToyModel, toy_sampler_config

    tm = ToyModel.load()
    return tm, toy_sampler_config(denoising_steps=STEPS)


def test_streamer_equals_rollout_and_switches_only_the_asked_rows(toy):
    """Stepping chunk by chunk gives rollout()'s video; a switch of row 0 at frame 6 gives that row exactly the
    LongLive re-cache rollout of the new prompt, while row 1 goes on as if nothing happened."""
    from fkv_jax.sampling.rollout import Sampler, rollout
    from fkv_jax.sampling.stream import Streamer, kv_bytes

    tm, sc = toy
    s = Sampler(tm.graphdef, tm.cfg, sc, batch=2, latent_hw=tm.cfg.latent_hw)
    ab = tm.context(["a red circle", "a blue square"])
    cc = tm.context(["a green cross", "a green cross"])
    hw = tm.cfg.latent_hw
    noise = np.random.default_rng(0).standard_normal((2, 9, 3, *hw), np.float32)
    plain = rollout(s, tm.params, [ab], noise).latents
    switched = rollout(s, tm.params, [ab, cc], noise, switch_frames=[6]).latents

    st = Streamer(s)
    state = st.begin(tm.params, ab)
    eps = np.zeros((st.num_steps - 1, 2, 3, 3, *hw), np.float32)
    out = []
    for blk in range(3):
        if blk == 2:
            state, recached = st.switch(tm.params, state, cc, [True, False])
            assert recached
            assert st.visible_frames(state) == 6
        res, state = st.step(tm.params, state, noise[:, 3 * blk : 3 * blk + 3], eps)
        out.append(np.asarray(res.x0))
    got = np.concatenate(out, axis=1)
    np.testing.assert_allclose(got[:, :6], plain[:, :6], atol=1e-5)
    np.testing.assert_allclose(got[0], switched[0], atol=1e-4)
    np.testing.assert_allclose(got[1], plain[1], atol=1e-5)
    assert np.abs(switched[0, 6:] - plain[0, 6:]).max() > 1e-2  # the switch changed row 0's video
    assert state.next_frame == 9 and state.recent.shape[1] == 9
    assert kv_bytes(state) == s.geom.kv_bytes()


def test_key_meter_counts_what_the_policy_reads(toy):
    """Forcing-KV on the toy model's shipped head table: the meter's keys per (row, layer, head) are at most the
    full cache's, some heads read fewer once the window has history, and the plain-cache count is exact."""
    from fkv_jax.cli import common as C
    from fkv_jax.sampling.rollout import Sampler
    from fkv_jax.sampling.stream import Streamer
    from fkv_jax.cli.serve_engine import _namespace
    from fkv_jax.serve.meters import KeyMeter, full_keys, keys_per_head

    tm, sc = toy
    policy = C.build_policy(_namespace(ServeConfig(), policy="forcing_kv"), tm.cfg, "toy")
    s = Sampler(tm.graphdef, tm.cfg, sc, batch=1, latent_hw=tm.cfg.latent_hw, policy=KeyMeter(inner=policy))
    st = Streamer(s)
    assert not st.can_recache  # a policy: a switch swaps the text K/V only
    state = st.begin(tm.params, tm.context(["a red circle"]))
    hw = tm.cfg.latent_hw
    noise = np.random.default_rng(1).standard_normal((1, 9, 3, *hw), np.float32)
    eps = np.zeros((st.num_steps - 1, 1, 3, 3, *hw), np.float32)
    t = s.geom.tokens_per_frame
    for blk in range(3):
        res, state = st.step(tm.params, state, noise[:, 3 * blk : 3 * blk + 3], eps)
        heads = keys_per_head(res.select_aux, tm.cfg.num_layers, tm.cfg.num_heads, 1)
        full = full_keys(sc, t, 3 * blk)
        assert heads.shape == (1, tm.cfg.num_layers, tm.cfg.num_heads)
        assert (heads <= full + 1e-3).all() and (heads >= 3 * t - 1e-3).all()  # at least its own chunk
    assert heads.min() < full  # static heads keep less than the window
    state, recached = st.switch(tm.params, state, tm.context(["a green cross"]), [True])
    assert not recached
    assert full_keys(sc, t, 0) == 3 * t and full_keys(sc, t, 30) == sc.local_attn_size * t


@pytest.fixture(scope="module")
def engine():
    return Engine(ServeConfig())  # config files only: validation needs no weights


@pytest.mark.parametrize(
    "msg, expect",
    [
        ({"prompt": ""}, "empty prompt"),
        ({"prompt": "   "}, "empty prompt"),
        ({"prompt": None}, "empty prompt"),
        ({"prompt": "a red circle " * 60}, "prompt too long"),
        ({"prompt": "a purple dog"}, "outside the toy vocabulary: ['dog', 'purple']"),
        ({"prompt": "a red circle", "seed": -1}, "seed must be in"),
        ({"prompt": "a red circle", "seed": "x"}, "seed must be an integer"),
        ({"prompt": "a red circle", "frames": 10}, "frames must be a multiple of the chunk size 3"),
        ({"prompt": "a red circle", "frames": 999}, "between 3 and 96"),
        ({"prompt": "a red circle", "preset": "self_forcing"}, "unknown preset 'self_forcing'"),
        ({"prompt": "a red circle", "policy": "nope"}, "unknown policy 'nope'"),
        ({"prompt": "a red circle", "policy_opts": "budget=3"}, "policy options need a policy"),
        ({"prompt": "a red circle", "policy": "forcing_kv", "policy_opts": "bogus"}, "KEY=VALUE"),
        ({"prompt": "a red circle", "backend": "cuda"}, "unknown attention backend 'cuda'"),
        ({"prompt": "a red circle", "backend": "pallas_tpu"}, "attention-backend"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_requests_are_one_line_for_the_page(engine, msg, expect):
    with pytest.raises(RequestError) as e:
        engine.validate(msg)
    assert expect in str(e.value) and "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_a_good_request_and_what_batches_together(engine):
    a = engine.validate({"prompt": " a red circle ", "seed": 3, "frames": 9})
    b = engine.validate({"prompt": "a blue square", "seed": 4, "frames": 9})
    c = engine.validate({"prompt": "a blue square", "frames": 12})
    assert a.prompt == "a red circle" and a.seed == 3
    assert a.settings == b.settings  # prompt and seed are per row
    assert a.settings != c.settings and a.settings.compiled == c.settings.compiled  # one compiled sampler
    d = engine.validate({"prompt": "a red circle", "policy": "forcing_kv", "policy_opts": "num_frame_patch=4"})
    assert d.settings.policy == "forcing_kv" and d.settings.policy_opts == ("num_frame_patch=4",)
    assert engine.defaults()["presets"] == ["toy"] and engine.defaults()["max_batch"] == 4


def test_loaded_engine_text_and_pixels(toy):
    """The engine's text context is the toy model's own (one jitted encoder), its pixels are uint8 frames."""
    from fkv_jax.toyworld.model import toy_context

    eng = Engine(ServeConfig())
    assert "toy-world" in eng.load()
    prompts = ["a red circle and a blue square", "a green cross with a pillar"]
    np.testing.assert_allclose(eng.context(prompts), toy_context(prompts, eng.text_encoder, eng.model_cfg), atol=1e-6)
    h, w = eng.model_cfg.latent_hw
    px = eng.decoder()(np.linspace(-2, 2, 2 * 3 * 3 * h * w, dtype=np.float32).reshape(2, 3, 3, h, w))
    assert px.dtype == np.uint8 and px.shape == (2, 3, h, w, 3) and px.min() == 0 and px.max() == 255
    assert eng.video_scale == 8


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["--port", "70000"], "--port must be in 0..65535"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--decoder", "nope"], "--decoder 'nope'"),
        (["--decoder", "taehv"], "--decoder applies to --model-dir"),
        (["--checkpoint", "somewhere"], "--checkpoint needs --model-dir"),
        (["--model-dir", "/nonexistent/model"], "does not exist"),
        (["--frames", "30", "--max-frames", "12"], "--frames 30 is more than --max-frames 12"),
        (["--fps", "0"], "--fps must be in"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_cli_bad_options_are_one_error_line(capsys, argv, expect):
    assert serve_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err


def test_cli_taehv_decoder_needs_the_folder_part(capsys, tmp_path):
    assert serve_main(["--model-dir", str(tmp_path), "--decoder", "taehv"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "taehv not found" in err[0] and "fkv convert --taehv" in err[0]


def test_cli_taken_port_is_an_error_before_loading(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert serve_main(["--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]


def test_fkv_lists_serve_and_its_help_explains(capsys):
    from fkv_jax.cli.main import main as fkv
    from fkv_jax.serve.__main__ import main as module_main

    assert fkv(["--help"]) == 0 and "serve" in capsys.readouterr().out
    assert fkv(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: fkv serve" in out and "Switch prompt now" in out and "127.0.0.1" in out
    assert module_main(["--help"]) == 0 and "usage: python -m fkv_jax.serve" in capsys.readouterr().out


def test_queue_positions_limit_and_leaving_the_queue(engine, tmp_path):
    """No worker running: the queue tells positions, refuses beyond --max-queue, and a stop or a disconnect takes
    a waiting stream out (the others move up)."""
    from fkv_jax.serve.scheduler import Scheduler, Stream

    sch = Scheduler(engine, max_queue=2, video_dir=tmp_path)
    inbox: dict[str, list] = {"a": [], "b": [], "c": []}
    req = engine.validate({"prompt": "a red circle", "frames": 3})
    a, b, c = (Stream(request=req, send=inbox[k].append) for k in "abc")
    sch.submit(a)
    sch.submit(b)
    assert inbox["a"][-1] == {"type": "queued", "position": 1, "running": 0} and inbox["b"][-1]["position"] == 2
    with pytest.raises(RequestError, match="the server is busy: 2 streams are waiting"):
        sch.submit(c)
    sch.switch(b, "a blue square")
    assert b.request.prompt == "a blue square"  # not started: it simply starts with the new prompt
    sch.stop(a)
    assert a.status == "stopped" and inbox["a"][-1]["type"] == "stopped" and inbox["b"][-1]["position"] == 1
    n = len(inbox["b"])
    sch.stop(b, disconnected=True)
    assert b.status == "cancelled" and len(inbox["b"]) == n  # nothing is sent to a client that is gone
    assert sch.stats()["queued"] == 0
    with pytest.raises(RequestError, match="no stream is running"):
        sch.switch(a, "a green cross")
    sch.close()
