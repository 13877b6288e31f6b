"""``fkv bench NAME [options]``: run one benchmark of fkv_jax/bench (each has its own ``--help``)."""

from __future__ import annotations

import importlib
import sys


BENCHES = {
    "attention": "attention backends side by side",
    "attention_share": "a chunk step's time split into attention and the rest",
    "rollout": "chunk-step throughput of the sampler",
    "long_rollout": "constant memory over long rolling videos",
    "policies": "KV selection policies: speed and resident KV",
    "toy_samples": "toy model samples against real episodes (docs/toyworld.md tables)",
    "decoders": "TAEHV preview decoder against the Wan2.1 VAE decode",
    "multihost": "data-parallel scaling over 1/2/4 local processes",
}


def main(argv=None, prog: str = "fkv bench") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            f"usage: {prog} NAME [options]\n\nbenchmarks:\n"
            + "\n".join(f"  {k:<16}{v}" for k, v in BENCHES.items())
            + f"\n\n`{prog} NAME --help` lists its options."
        )
        return 0 if argv else 2
    name = argv[0]

    if name not in BENCHES:
        print(f"error: unknown benchmark {name!r}; one of: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    return importlib.import_module(f"fkv_jax.bench.{name}").main(argv[1:])
