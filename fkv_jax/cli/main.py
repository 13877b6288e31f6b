"""fkv: one command, one subcommand per job; `fkv SUBCOMMAND --help` lists its options.

Every subcommand ends the same way: a bad command line or bad input is one `error: ...` line on stderr and
exit code 2, found before any heavy work and leaving nothing written; Ctrl-C is 130.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv, prog=...), one-line help)
SUBCOMMANDS = {
    "generate": ("fkv_jax.cli.generate", "generate videos (toy model, --checkpoint, --model-preset, --model-dir)"),
    "convert": (
        "fkv_jax.cli.convert",
        "convert a PyTorch / safetensors / diffusers checkpoint, or a whole model folder",
    ),
    "decode": ("fkv_jax.cli.decode", "decode saved latents with the Wan2.1 VAE into mp4 / .npy"),
    "profile": ("fkv_jax.cli.profile", "profile attention heads: Forcing-KV head table, per-head importance"),
    "eval": ("fkv_jax.cli.eval", "compare KV selection policies with the full cache on the toy world"),
    "bench": (
        "fkv_jax.cli.bench",
        "benchmarks: attention, attention_share, rollout, long_rollout, policies, toy_samples, ...",
    ),
    "aot": ("fkv_jax.cli.aot", "compile the chunk step ahead of time for a TPU / GPU target from this host"),
    "serve": ("fkv_jax.cli.serve", "serve a web page that streams videos chunk by chunk, with live prompt switching"),
}

USAGE = (
    "usage: fkv {"
    + ",".join(SUBCOMMANDS)
    + "} ...\n\n"
    + __doc__.split("\n\n")[0]
    + "\n\nsubcommands:\n"
    + "\n".join(f"  {name:<10}{help_}" for name, (_, help_) in SUBCOMMANDS.items())
    + "\n\nexamples:\n  fkv generate                       # the toy model -> outputs/*.mp4, under a minute on a CPU\n"
    '  fkv generate "a green triangle and a cyan cross" --seeds 0,1,2\n'
    "  fkv generate --policy forcing_kv\n  fkv convert --input self_forcing_dmd.pt --output ckpt/sf\n"
)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        from difflib import get_close_matches

        near = get_close_matches(name, SUBCOMMANDS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        print(f"error: unknown subcommand {name!r}{hint}; one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest, prog=f"fkv {name}")


if __name__ == "__main__":
    sys.exit(main())
