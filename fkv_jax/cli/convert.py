"""``fkv convert`` (alias ``python -m checkpoints_convert``): PyTorch / safetensors / diffusers -> fkv_jax."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fkv_jax.convert.components import KINDS, convert_any, convert_model_dir
from fkv_jax.convert.errors import ConvertError
from fkv_jax.cli import Parser, UsageError, run_cli
from fkv_jax.cli import common as C

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
  Wan2.1 VAE (Wan2.1_VAE.pth, or a diffusers AutoencoderKLWan folder / .safetensors) and the UMT5 text
      encoder (models_t5_umt5-xxl-enc-bf16.pth, or Hugging Face UMT5EncoderModel .safetensors) are detected
      from their tensor names (--kind transformer|vae|umt5 overrides) and converted to DIR/config.json +
      DIR/params/ as well (fkv_jax.vae.VAE.load / fkv_jax.text.TextEncoder.load). UMT5 heads come from the
      position-bias tables (--num-heads is checked against them).
  A whole model folder: --wan-dir WAN2.1_DOWNLOAD --generator GEN.pt --output DIR writes DIR/transformer,
      DIR/vae, DIR/text_encoder and DIR/tokenizer (a copy of google/umt5-xxl), what
      `fkv generate --model-dir DIR "a prompt"` reads.
  TAEHV, the tiny preview decoder (madebyollin/taehv: taew2_1.pth or .safetensors): --taehv PATH converts its
      decoder (the encoder's tensors are skipped) to DIR/config.json + DIR/params/ (fkv_jax.vae.TAEHV.load).
      When --output is a model folder made by --wan-dir, it goes to DIR/taehv/ inside it; with --wan-dir
      and --generator it is added to the folder being built.

Sizes (dim, ffn_dim, layers, text_dim, freq_dim, in/out channels, patch) are read from tensor shapes;
the head count and text length cannot be: they come from --num-heads/--text-len, --preset or a config.json
(all stated values must agree), else num_heads = dim // 128 and text_len = 512. A config whose sizes all
equal a shipped preset's is recorded as that preset (name, default latent size). Every tensor is checked
by name and shape; nothing is written unless the whole conversion succeeds.
"""

EPILOG = """\
examples:
  fkv convert --input self_forcing_dmd.pt --output ckpt/self_forcing --dtype bfloat16
  fkv convert --input longlive_base.pt --lora lora.pt --output ckpt/longlive
  fkv convert --input Wan2.1-T2V-1.3B-Diffusers/transformer --output ckpt/wan --preset wan2.1-t2v-1.3b
  fkv convert --input Wan2.1-T2V-1.3B/Wan2.1_VAE.pth --output ckpt/vae
  fkv convert --wan-dir Wan2.1-T2V-1.3B --generator self_forcing_dmd.pt --output models/self_forcing
  fkv convert --taehv taew2_1.pth --output models/self_forcing        # adds models/self_forcing/taehv
  fkv convert --taehv taew2_1.pth --output ckpt/taehv                 # a TAEHV directory on its own

exit codes: 0 success, 2 bad input or options (one 'error: ...' message on stderr)
"""


def build_parser(prog: str = "fkv convert") -> Parser:
    ap = Parser(
        prog=prog,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--input", metavar="PATH", help=".pt, .pth, .safetensors, .safetensors.index.json or a directory")
    ap.add_argument("--kind", choices=KINDS, help="what --input holds (default: detected from its tensor names)")
    ap.add_argument(
        "--wan-dir", metavar="DIR", help="the Wan2.1-T2V-1.3B download: with --generator, builds a whole model folder"
    )
    ap.add_argument(
        "--generator", metavar="PATH", help="with --wan-dir: the causal transformer (e.g. self_forcing_dmd.pt)"
    )
    ap.add_argument(
        "--taehv",
        metavar="PATH",
        help="TAEHV preview decoder (taew2_1.pth / .safetensors): alone, into a model folder, or with --wan-dir",
    )
    ap.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="output checkpoint directory (must not exist, or be empty; for --taehv it may be a model folder)",
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
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing fkv_jax checkpoint at --output")
    return ap


def check_args(args) -> None:
    """Every flag value and path, before any tensor is read."""
    for flag, value in (("--num-heads", args.num_heads), ("--text-len", args.text_len)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a positive integer, got {value}")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise UsageError(f"--lora-alpha must be positive, got {args.lora_alpha:g}")
    if args.lora_alpha is not None and args.lora is None:
        raise UsageError("--lora-alpha goes with --lora PATH")
    for flag, value in (
        ("--input", args.input),
        ("--wan-dir", args.wan_dir),
        ("--generator", args.generator),
        ("--lora", args.lora),
        ("--taehv", args.taehv),
    ):
        if value is not None and not os.path.exists(value):
            raise UsageError(f"{flag} not found: {value}")
    if args.wan_dir is not None and not os.path.isdir(args.wan_dir):
        raise UsageError(f"--wan-dir {args.wan_dir} is not a directory (the Wan2.1-T2V-1.3B download)")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} exists and is a file; the output is a directory")
    C.check_output_dir(out, "--output")


def run_args(args) -> None:
    """Dispatch parsed arguments: a whole model folder (--wan-dir), a VAE / text encoder, or a transformer."""
    check_args(args)
    progress = not getattr(args, "no_progress", False)
    if args.taehv is not None:
        _run_taehv(args, progress)
        return
    if (args.input is None) == (args.wan_dir is None):
        raise ConvertError(
            "give either --input PATH (one checkpoint) or --wan-dir DIR --generator PATH (a model folder)"
        )
    if args.wan_dir is not None:
        if args.generator is None:
            raise ConvertError("--wan-dir needs --generator PATH (the causal transformer, e.g. self_forcing_dmd.pt)")
        if args.kind is not None:
            raise ConvertError("--kind applies to --input, not to --wan-dir")
    common = _transformer_options(args, progress)
    if args.wan_dir is not None:
        convert_model_dir(args.wan_dir, args.generator, args.output, **common)
        return
    if args.generator is not None:
        raise ConvertError("--generator goes with --wan-dir; for one checkpoint use --input")
    convert_any(args.input, args.output, kind=args.kind, **common)


def _transformer_options(args, progress: bool) -> dict:
    """The options of a transformer / model-folder conversion, as the command line gives them."""
    return dict(
        key=args.key,
        num_heads=args.num_heads,
        text_len=args.text_len,
        dtype=args.dtype,
        lora=args.lora,
        lora_alpha=args.lora_alpha,
        preset=args.preset,
        overwrite=args.overwrite,
        progress=progress,
        log=print,
    )


def _run_taehv(args, progress: bool) -> None:
    """--taehv: the TAEHV decoder alone (into --output, or --output/taehv of a model folder), or beside --wan-dir."""
    from fkv_jax.convert.taehv import convert_taehv, open_taehv

    if args.input is not None:
        raise ConvertError("--taehv and --input convert different files: run `fkv convert` once for each")
    if args.kind is not None:
        raise ConvertError("--kind applies to --input, not to --taehv")
    if args.wan_dir is None:
        given = [
            flag
            for flag, value in (
                ("--generator", args.generator),
                ("--num-heads", args.num_heads),
                ("--text-len", args.text_len),
                ("--lora", args.lora),
                ("--lora-alpha", args.lora_alpha),
                ("--preset", args.preset),
            )
            if value is not None
        ]
        if given:
            raise ConvertError(f"{', '.join(given)} do not apply to --taehv (they describe a transformer)")
        convert_taehv(args.taehv, args.output, key=args.key, dtype=args.dtype, overwrite=args.overwrite, log=print)
        return
    if args.generator is None:
        raise ConvertError("--wan-dir needs --generator PATH (the causal transformer, e.g. self_forcing_dmd.pt)")
    open_taehv(args.taehv)  # checked (shapes only) before the model folder is built
    convert_model_dir(args.wan_dir, args.generator, args.output, **_transformer_options(args, progress))
    convert_taehv(args.taehv, args.output, dtype=args.dtype, log=print)


def main(argv: list[str] | None = None, prog: str = "fkv convert") -> int:
    """Run the converter; returns the process exit code (0 ok, 2 bad input, 130 interrupted: nothing written)."""
    return run_cli(lambda: build_parser(prog), run_args, argv, errors=(ConvertError,))
