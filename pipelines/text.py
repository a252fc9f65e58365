"""Caption text: normalisation, the WordPiece vocabulary and the tokenizer (written once)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Iterable

import keras_hub

from keras_models.preprocessor import CaptionTokenizer

# BERT-uncased special tokens, so a BERT vocabulary (e.g. microsoft/git-base's) can stand in.
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]
VOCAB_FILENAME = "vocab.txt"


def normalize_caption(caption: str) -> str:
    """One caption as the models learn it: NFC unicode, single spaces, no surrounding quotes."""
    text = unicodedata.normalize("NFC", str(caption))
    text = re.sub(r"\s+", " ", text).strip().strip('"').strip()
    return text


def build_vocabulary(captions: Iterable[str], vocabulary_size: int = 4000) -> list[str]:
    """Train a lowercase WordPiece vocabulary on captions; specials first ([PAD] = 0)."""
    import tensorflow as tf  # keras-hub's trainer takes a tf.data.Dataset

    captions = [normalize_caption(c) for c in captions]
    if not any(captions):
        raise ValueError("Cannot build a vocabulary from no captions.")
    data = tf.data.Dataset.from_tensor_slices(captions).batch(1024)
    vocab = keras_hub.tokenizers.compute_word_piece_vocabulary(
        data, vocabulary_size, lowercase=True, reserved_tokens=SPECIAL_TOKENS
    )
    # Every single character stays reachable, so nothing but true junk becomes [UNK]. Tokens holding
    # whitespace (from exotic spaces in real captions) can never be produced and would not survive vocab.txt.
    return [t for t in vocab if t in SPECIAL_TOKENS or (t.removeprefix("##") and not any(c.isspace() for c in t))]


def make_tokenizer(vocabulary: list[str] | str | Path) -> CaptionTokenizer:
    """The one tokenizer: keras-hub's BERT WordPiece (lowercase) over `vocabulary`, detokenizing to tidy text."""
    if isinstance(vocabulary, (str, Path)):
        vocabulary = load_vocabulary(vocabulary)
    missing = [t for t in SPECIAL_TOKENS if t not in vocabulary]
    if missing:
        raise ValueError(f"Vocabulary lacks the special tokens {missing}.")
    return CaptionTokenizer(vocabulary=list(vocabulary), lowercase=True)


def save_vocabulary(vocabulary: list[str], path: str | Path) -> Path:
    """Write one token per line (`vocab.txt`, the BERT format)."""
    path = Path(path)
    if path.is_dir():
        path = path / VOCAB_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{t}\n" for t in vocabulary), encoding="utf-8")
    return path


def load_vocabulary(path: str | Path) -> list[str]:
    """Read a `vocab.txt` (a file, or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / VOCAB_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"No vocabulary at {path}.")
    # One token per "\n"-ended line, as BERT's vocab.txt (str.splitlines would also split on exotic separators).
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]
