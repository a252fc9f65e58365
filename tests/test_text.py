"""Caption normalisation, vocabulary and the one tokenizer (BERT-uncased specials)."""

import numpy as np
import pytest

from keras_models.preprocessor import CaptionPreprocessor
from pipelines.text import (
    SPECIAL_TOKENS,
    build_vocabulary,
    load_vocabulary,
    make_tokenizer,
    normalize_caption,
    save_vocabulary,
)

CAPTIONS = [
    "Axial CT of the abdomen showing a large cyst in the left kidney (arrow).",
    "Chest X-ray, PA view: no acute abnormality.",
    "Sagittal T2-weighted MRI of the knee shows a small effusion.",
] * 10


@pytest.fixture(scope="module")
def vocabulary():
    return build_vocabulary(CAPTIONS, 300)


def test_normalize_caption():
    assert normalize_caption('  "Chest\n X-ray"  ') == "Chest X-ray"


def test_vocabulary_has_bert_specials_first(vocabulary):
    assert vocabulary[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    assert vocabulary[0] == "[PAD]"


def test_vocabulary_round_trips_through_vocab_txt(vocabulary, tmp_path):
    path = save_vocabulary(vocabulary, tmp_path)
    assert path.name == "vocab.txt"
    assert load_vocabulary(tmp_path) == vocabulary
    with pytest.raises(FileNotFoundError):
        load_vocabulary(tmp_path / "missing.txt")


def test_tokenizer_round_trip(vocabulary):
    tok = make_tokenizer(vocabulary)
    assert (tok.pad_token_id, tok.start_token_id, tok.end_token_id) == (0, 2, 3)
    ids = tok("Axial CT of the abdomen showing a large cyst")
    assert tok.detokenize(ids) == "axial ct of the abdomen showing a large cyst"
    assert tok.token_to_id("[UNK]") in list(np.asarray(tok("zzqx")))  # unseen letters become [UNK]


def test_detokenized_captions_read_as_text_in_python_and_in_the_graph():
    """WordPiece spaces out punctuation; CaptionTokenizer writes it back (the same in a SavedModel graph)."""
    import tensorflow as tf

    caption = "Portable AP chest X-ray, PA view: a 3.5 cm nodule (arrow) on PET/CT; see [1]!"
    tok = make_tokenizer(build_vocabulary([caption] * 20, 200))
    expected = "portable ap chest x-ray, pa view: a 3.5 cm nodule (arrow) on pet/ct; see [1]!"
    ids = np.asarray(tok(caption))
    assert tok.detokenize(ids) == expected
    assert tok.detokenize([ids.tolist(), ids[:4].tolist()]) == [expected, "portable ap chest x"]
    in_graph = tf.function(tok.detokenize, autograph=False)(tf.constant([ids]))
    assert [c.decode() for c in in_graph.numpy()] == [expected]
    continuation = next(i for i in range(tok.vocabulary_size())
                        if tok.id_to_token(i).startswith("##") and tok.id_to_token(i)[2:].isalpha())
    piece = tok.id_to_token(continuation)[2:]  # an undertrained model may start a caption with one
    starts_mid_word = [continuation, *ids[1:3].tolist()]  # "##xy ap chest"
    assert tok.detokenize(starts_mid_word) == piece + " ap chest"
    in_graph = tf.function(tok.detokenize, autograph=False)(tf.constant([starts_mid_word]))
    assert in_graph.numpy()[0].decode() == piece + " ap chest"


def test_vocabulary_without_specials_is_refused():
    with pytest.raises(ValueError, match="special tokens"):
        make_tokenizer(["a", "b"])


def test_preprocessor_teacher_forcing_shift(vocabulary):
    pre = CaptionPreprocessor(make_tokenizer(vocabulary), sequence_length=16)
    x, y, w = pre({"images": np.zeros((2, 4, 4, 1), "float32"), "captions": CAPTIONS[:2]})
    ids, mask = np.asarray(x["token_ids"]), np.asarray(x["padding_mask"])
    assert ids.shape == (2, 16) and (ids[:, 0] == 2).all()  # [CLS] first
    np.testing.assert_array_equal(np.asarray(y)[:, :-1], ids[:, 1:])  # next-token labels
    assert np.asarray(w).dtype == bool and mask.sum() >= np.asarray(w).sum()
    text = pre.generate_postprocess({"token_ids": ids, "padding_mask": mask})
    assert text[1] == "chest x-ray, pa view: no acute abnormality."


def test_generate_prompt_is_one_cls_per_image(vocabulary):
    pre = CaptionPreprocessor(make_tokenizer(vocabulary), sequence_length=8)
    out = pre.generate_preprocess({"images": np.zeros((3, 4, 4, 1), "float32")}, sequence_length=6)
    ids, mask = np.asarray(out["token_ids"]), np.asarray(out["padding_mask"])
    assert ids.shape == (3, 6) and (ids[:, 0] == 2).all() and (ids[:, 1:] == 0).all()
    assert mask[:, 0].all() and not mask[:, 1:].any()


def test_real_caption_whitespace_never_becomes_a_token_and_vocab_txt_keeps_ids(tmp_path):
    # Real (ROCO) captions hold exotic spaces and separators, and an acute accent (U+00B4) that lowercasing
    # (NFD, accents dropped) turns into a bare space.
    odd = ["4\u00a0weeks after osteotomy", "a 3\u2009mm nodule", "left\u2028lobe", "T2\x1cweighted", "x\x85y", "the left Meckel\u00b4s cave"] * 5
    vocabulary = build_vocabulary(CAPTIONS + odd, 300)
    assert not [t for t in vocabulary if any(c.isspace() for c in t) or t in ("", "##")]
    save_vocabulary(vocabulary, tmp_path)
    assert load_vocabulary(tmp_path) == vocabulary  # same ids after a reload (resume, export)
