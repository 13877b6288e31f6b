"""Command line: ``python -m checkpoints_convert --input PATH --output DIR [options]`` (also ``fkv-convert``)."""

from __future__ import annotations

import argparse
import sys

from checkpoints_convert.convert import convert
from checkpoints_convert.errors import ConvertError

DESCRIPTION = """\
Convert a Wan2.1 (T2V) causal-DiT checkpoint into an fkv_jax checkpoint directory
(DIR/config.json + DIR/params/, an Orbax checkpoint), loaded with fkv_jax.load_transformer(DIR).

Input formats (--input):
  Self Forcing / CausVid / LongLive .pt (.pth, .ckpt)
      torch.save dict; the generator is taken from 'generator_ema', else 'generator', else 'model',
      else the file is a raw state dict. --key NAME picks another entry. Wrapper prefixes
      (model., module., _fsdp_wrapped_module., _checkpoint_wrapped_module., diffusion_model., _orig_mod.)
      are stripped. Needs PyTorch.
  Original Wan .safetensors
      one file, a sharded checkpoint's *.safetensors.index.json (weight_map), or a directory holding
      either. A Wan config.json beside the weights supplies num_heads / text_len.
  diffusers WanTransformer3DModel
      the transformer/ folder (config.json + diffusion_pytorch_model.safetensors), a pipeline folder
      holding transformer/, or the .safetensors file; detected from its names (attn1/attn2/
      scale_shift_table/condition_embedder) and mapped back to Wan names. Its config.json gives the
      head count.
  bf16/fp16 tensors are read and upcast to float32 before conversion.

Sizes (dim, ffn_dim, layers, text_dim, freq_dim, in/out channels, patch) are read from tensor shapes;
the head count and text length cannot be: they come from --num-heads/--text-len, --preset or a config.json
(all stated values must agree), else num_heads = dim // 128 and text_len = 512. A config whose sizes all
equal a shipped preset's is recorded as that preset (name, default latent size). Every tensor is checked
by name and shape; nothing is written unless the whole conversion succeeds.
"""

EPILOG = """\
examples:
  python -m checkpoints_convert --input self_forcing_dmd.pt --output ckpt/self_forcing --dtype bfloat16
  python -m checkpoints_convert --input longlive_base.pt --lora lora.pt --output ckpt/longlive
  python -m checkpoints_convert --input Wan2.1-T2V-1.3B-Diffusers/transformer --output ckpt/wan --preset wan2.1-t2v-1.3b

exit codes: 0 success, 2 bad input or options (one 'error: ...' message on stderr)
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m checkpoints_convert",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--input", required=True, metavar="PATH", help=".pt, .safetensors, .safetensors.index.json or a directory"
    )
    ap.add_argument(
        "--output", required=True, metavar="DIR", help="output checkpoint directory (must not exist, or be empty)"
    )
    ap.add_argument(
        "--num-heads", type=int, metavar="N", help="attention heads (default: config.json, preset, else dim // 128)"
    )
    ap.add_argument("--text-len", type=int, metavar="N", help="text tokens the model attends to (default: 512)")
    ap.add_argument(
        "--key", metavar="NAME", help="top-level entry of a .pt to convert (default: generator_ema > generator > model)"
    )
    ap.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="stored parameter dtype (default float32)"
    )
    ap.add_argument(
        "--lora",
        metavar="PATH",
        help="LongLive PEFT lora.pt (raw or under 'generator_lora') merged as W += (alpha/r) B A in float32",
    )
    ap.add_argument(
        "--lora-alpha", type=float, metavar="A", help="LoRA alpha (default: the rank, i.e. scale 1 as in LongLive)"
    )
    ap.add_argument(
        "--preset",
        metavar="NAME",
        help="model preset (wan2.1-t2v-1.3b, tiny, ...): supplies num_heads and text_len; checked against the tensors",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace an existing fkv_jax checkpoint at --output")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the converter; returns the process exit code (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        convert(
            args.input,
            args.output,
            num_heads=args.num_heads,
            text_len=args.text_len,
            key=args.key,
            dtype=args.dtype,
            lora=args.lora,
            lora_alpha=args.lora_alpha,
            preset=args.preset,
            overwrite=args.overwrite,
            progress=True,
            log=print,
        )
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
