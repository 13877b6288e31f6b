"""The UMT5 tokenizer, loaded from the user's ``google/umt5-xxl`` folder.

Upstream (Wan's ``HuggingfaceTokenizer(name='google/umt5-xxl', seq_len=512, clean='whitespace')``) cleans each
prompt (``ftfy.fix_text`` when available, HTML entities unescaped twice, whitespace runs collapsed to one
space, stripped), tokenizes it with the special tokens added (T5 appends ``</s>``), truncates to ``text_len``
tokens (the ``</s>`` stays last) and pads with ``<pad>`` to ``text_len``; the mask is 1 on the real tokens.

Files, in order of preference: ``tokenizer.json`` (read with the ``tokenizers`` library: the fast tokenizer
``AutoTokenizer`` uses) or ``spiece.model`` (``sentencepiece``). Neither needs ``transformers``.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
EOS_TOKEN, PAD_TOKEN = "</s>", "<pad>"
DEFAULT_EOS_ID, DEFAULT_PAD_ID = 1, 0  # T5 / UMT5 vocabularies


class TokenizerError(ValueError):
    """The tokenizer folder is missing, incomplete or unreadable."""


def find_tokenizer_file(folder: str | Path) -> Path:
    """The file the tokenizer will be read from; a :class:`TokenizerError` naming what is missing otherwise.

    Cheap (no parsing): used to validate inputs before any heavy work.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(
            f"tokenizer folder {folder} does not exist (it is the google/umt5-xxl folder of the Wan2.1 download)"
        )
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            return folder / name
    raise TokenizerError(
        f"tokenizer folder {folder} has neither {' nor '.join(TOKENIZER_FILES)} (copy the "
        "google/umt5-xxl folder of the Wan2.1 download)"
    )


def clean_prompt(text: str) -> str:
    """Upstream's ``clean='whitespace'``: fix text (ftfy, if installed), unescape HTML twice, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5Tokenizer:
    """``tok(prompts) -> (ids int32 [B, text_len], mask int32 [B, text_len])``."""

    def __init__(self, folder: str | Path, text_len: int = 512):
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        self.text_len = text_len
        self.file = find_tokenizer_file(folder)
        try:
            if self.file.name == "tokenizer.json":
                self._encode, eos, pad = _load_tokenizers(self.file)
            else:
                self._encode, eos, pad = _load_sentencepiece(self.file)
        except TokenizerError:
            raise
        except Exception as e:  # noqa: BLE001 - both libraries raise their own types for a bad file
            raise TokenizerError(f"cannot read tokenizer {self.file}: {type(e).__name__}: {e}") from None
        self.eos_id = DEFAULT_EOS_ID if eos is None else eos
        self.pad_id = DEFAULT_PAD_ID if pad is None else pad

    def token_ids(self, prompt: str) -> list[int]:
        """One prompt's ids with ``</s>`` appended and truncated to ``text_len`` (no padding)."""
        ids = list(self._encode(clean_prompt(prompt)))
        return ids[: self.text_len - 1] + [self.eos_id]

    def __call__(self, prompts: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = np.full((len(prompts), self.text_len), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), self.text_len), np.int32)
        for i, p in enumerate(prompts):
            row = self.token_ids(p)
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask


def _load_tokenizers(file: Path):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TokenizerError(f"reading {file} needs the `tokenizers` package (pip install tokenizers)") from None
    tok = Tokenizer.from_file(str(file))
    tok.no_truncation()
    tok.no_padding()

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    return encode, tok.token_to_id(EOS_TOKEN), tok.token_to_id(PAD_TOKEN)


def _load_sentencepiece(file: Path):
    try:
        import sentencepiece as spm
    except ImportError:
        raise TokenizerError(
            f"reading {file} needs the `sentencepiece` package (pip install sentencepiece), or "
            "put tokenizer.json beside it"
        ) from None
    sp = spm.SentencePieceProcessor(model_file=str(file))

    def lookup(piece: str):
        i = sp.piece_to_id(piece)
        return None if i == sp.unk_id() and piece != sp.id_to_piece(sp.unk_id()) else i

    def encode(text: str) -> list[int]:
        return sp.encode(text, out_type=int)

    return encode, lookup(EOS_TOKEN), lookup(PAD_TOKEN)
