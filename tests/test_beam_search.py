"""Our row-gathering BeamSampler against keras-hub's, on a decoder whose logits depend on its cache."""

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

from keras_models.beam_search import BeamSampler

VOCAB, LENGTH = 11, 9


def toy_next():
    """A step whose logits depend on each row's whole history through its cache (a running hash).

    A sampler that reordered the cache wrongly would see other logits at later steps.
    """
    table = ops.convert_to_tensor(np.random.default_rng(0).standard_normal((97, VOCAB)).astype("float32") * 3)

    def next(prompt, cache, index):
        rows = ops.shape(prompt)[0]
        last = ops.reshape(ops.slice(prompt, [0, index - 1], [rows, 1]), (-1,))
        history = (cache[0] * 31 + last) % 97
        return ops.take(table, history, axis=0), None, (history,)

    return next


def search(sampler, prompt, mask, stop=None):
    cache = (ops.zeros((prompt.shape[0],), "int32"),)
    return sampler(toy_next(), ops.convert_to_tensor(prompt), cache=cache, index=1,
                   mask=ops.convert_to_tensor(mask), stop_token_ids=stop)


@pytest.mark.parametrize("return_all_beams", [False, True])
@pytest.mark.parametrize("stop", [None, (3,)])
def test_same_beams_and_scores_as_keras_hub(return_all_beams, stop):
    prompt = np.zeros((3, LENGTH), "int32")
    prompt[:, 0] = [1, 2, 5]
    prompt[1, 1:3] = [7, 4]  # a longer prompt: its tokens are kept, not sampled
    mask = prompt > 0
    ours = search(BeamSampler(num_beams=3, return_all_beams=return_all_beams), prompt, mask, stop)
    theirs = search(keras_hub.samplers.BeamSampler(num_beams=3, return_all_beams=return_all_beams), prompt, mask, stop)
    for a, b in zip(keras.tree.flatten(ours), keras.tree.flatten(theirs)):
        np.testing.assert_allclose(ops.convert_to_numpy(a), ops.convert_to_numpy(b), rtol=1e-6)
    ids = ops.convert_to_numpy(keras.tree.flatten(ours)[0])
    first = ids[..., 0] if ids.ndim == 2 else ids[:, 0, 0]
    assert (first == [1, 2, 5]).all() and (ids[1, ..., 1:3] == [7, 4]).all()  # prompts kept
    if return_all_beams:  # best first, and the beams differ
        scores = ops.convert_to_numpy(ours[1])
        assert (np.diff(scores, axis=1) <= 0).all() and len({tuple(b) for b in ids[0]}) == 3


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="XLA-compiled loop: TensorFlow")
def test_same_beams_compiled_with_xla():
    import tensorflow as tf

    prompt = np.zeros((2, LENGTH), "int32")
    prompt[:, 0] = [1, 2]
    run = {name: tf.function(lambda p, s=sampler: search(s, p, p > 0), jit_compile=True)
           for name, sampler in [("ours", BeamSampler(num_beams=4)),
                                 ("keras_hub", keras_hub.samplers.BeamSampler(num_beams=4))]}
    np.testing.assert_array_equal(run["ours"](prompt).numpy(), run["keras_hub"](prompt).numpy())


def test_serializable_and_picked_by_name():
    from keras_models.captioner import get_sampler

    sampler = get_sampler("beam", num_beams=5)
    assert isinstance(sampler, BeamSampler) and sampler.num_beams == 5
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sampler))
    assert type(restored) is BeamSampler and restored.num_beams == 5
