"""``fkv serve``: a FastAPI + uvicorn app that streams videos to the browser chunk by chunk (docs/serve.md).

* :mod:`fkv_jax.serve.protocol`: requests, settings, server options (the model side is
  :class:`fkv_jax.cli.serve_engine.Engine`: loading, validation, compiled samplers per settings);
* :mod:`fkv_jax.serve.scheduler`: sessions, the queue and the batch worker;
* :mod:`fkv_jax.serve.meters`: keys read per query (per head), the full-cache reference;
* :mod:`fkv_jax.serve.app`: the page, the WebSocket protocol, mp4 downloads.
"""
