"""Text encoding: the UMT5 encoder (Flax NNX) and its tokenizer.

from fkv_jax.text import TextEncoder, encode_token_ids
enc = TextEncoder.load("DIR/text_encoder", "DIR/tokenizer")     # converted by `python -m checkpoints_convert`
ctx = enc.encode(["a cat surfing a wave"])                       # [1, 512, 4096] float32, zero past the prompt
out = encode_token_ids("DIR/text_encoder", ids, mask)            # the encoder on given ids / mask
"""

from fkv_jax.text.encoder import (
    FORMAT,
    TextEncoder,
    encode_token_ids,
    load_text_encoder,
    read_text_encoder_config,
    save_text_encoder,
)
from fkv_jax.text.tokenizer import TokenizerError, UMT5Tokenizer, clean_prompt, find_tokenizer_file
from fkv_jax.text.umt5 import UMT5Config, UMT5Encoder, relative_position_buckets

__all__ = [
    "FORMAT",
    "TextEncoder",
    "TokenizerError",
    "UMT5Config",
    "UMT5Encoder",
    "UMT5Tokenizer",
    "clean_prompt",
    "encode_token_ids",
    "find_tokenizer_file",
    "load_text_encoder",
    "read_text_encoder_config",
    "relative_position_buckets",
    "save_text_encoder",
]
