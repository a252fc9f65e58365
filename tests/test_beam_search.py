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
    cache = (ops.zeros_like(prompt[:, 0]),)
    return sampler(toy_next(), ops.convert_to_tensor(prompt), cache=cache, index=1,
                   mask=ops.convert_to_tensor(mask), stop_token_ids=stop)


def prompts():
    prompt = np.zeros((3, LENGTH), "int32")
    prompt[:, 0] = [1, 2, 5]
    prompt[1, 1:3] = [7, 4]  # a longer prompt: its tokens are kept, not sampled
    return prompt


@pytest.mark.parametrize("return_all_beams", [False, True])
@pytest.mark.parametrize("stop,temperature", [(None, 1.0), ((3,), 1.0), ((3,), 0.7)])
def test_same_beams_and_scores_as_keras_hub(return_all_beams, stop, temperature):
    prompt = prompts()
    mask = prompt > 0
    settings = dict(num_beams=3, return_all_beams=return_all_beams, temperature=temperature)
    ours = search(BeamSampler(**settings), prompt, mask, stop)
    theirs = search(keras_hub.samplers.BeamSampler(**settings), prompt, mask, stop)
    for a, b in zip(keras.tree.flatten(ours), keras.tree.flatten(theirs)):
        np.testing.assert_allclose(ops.convert_to_numpy(a), ops.convert_to_numpy(b), rtol=1e-6)
    ids = ops.convert_to_numpy(keras.tree.flatten(ours)[0])
    first = ids[..., 0] if ids.ndim == 2 else ids[:, 0, 0]
    assert (first == [1, 2, 5]).all() and (ids[1, ..., 1:3] == [7, 4]).all()  # prompts kept
    if return_all_beams:  # best first, and the beams differ
        scores = ops.convert_to_numpy(ours[1])
        assert (np.diff(scores, axis=1) <= 0).all() and len({tuple(b) for b in ids[0]}) == 3


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="compiled graphs: TensorFlow")
@pytest.mark.parametrize("jit_compile,batch", [(True, 3), (False, None)])  # None: the SavedModel's dynamic batch
def test_same_beams_compiled(jit_compile, batch):
    import tensorflow as tf

    spec = [tf.TensorSpec([batch, LENGTH], tf.int32)]
    run = {name: tf.function(lambda p, s=sampler: search(s, p, p > 0, (3,)), input_signature=spec,
                             jit_compile=jit_compile)
           for name, sampler in [("ours", BeamSampler(num_beams=4)),
                                 ("keras_hub", keras_hub.samplers.BeamSampler(num_beams=4))]}
    np.testing.assert_array_equal(run["ours"](prompts()).numpy(), run["keras_hub"](prompts()).numpy())


def test_serializable_and_picked_by_name():
    from keras_models.captioner import get_sampler

    sampler = get_sampler("beam", num_beams=5)
    assert isinstance(sampler, BeamSampler) and sampler.num_beams == 5
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sampler))
    assert type(restored) is BeamSampler and restored.num_beams == 5


def test_compile_with_beam_by_name_uses_ours():
    from keras_models.git import build_git_captioner
    from pipelines.text import SPECIAL_TOKENS, make_tokenizer

    model = build_git_captioner("tiny", make_tokenizer(SPECIAL_TOKENS + ["w"]))
    model.compile(sampler="beam")
    assert type(model.sampler) is BeamSampler and model.sampler.num_beams == 5  # keras-hub's default width


def test_the_search_stops_once_every_beam_has_ended():
    """Every row's best token is the stop token: the loop ends once each beam has it (eagerly: steps counted).

    At the first step only an image's first beam is live, so its second beam takes the runner-up token and
    picks the stop token one step later.
    """
    steps = []

    def step(prompt, cache, index):
        steps.append(int(index))
        logits = ops.one_hot(ops.full((ops.shape(prompt)[0],), 3), VOCAB) * 10.0  # token 3 far ahead
        return logits, None, cache

    prompt = np.zeros((2, LENGTH), "int32")
    prompt[:, 0] = 1
    BeamSampler(num_beams=2)(step, ops.convert_to_tensor(prompt), cache=(ops.zeros((2,)),), index=1,
                             mask=ops.convert_to_tensor(prompt > 0), stop_token_ids=(4, 3))
    assert steps == [1, 2]
    steps.clear()
    BeamSampler(num_beams=2)(step, ops.convert_to_tensor(prompt), cache=(ops.zeros((2,)),), index=1,
                             mask=ops.convert_to_tensor(prompt > 0), stop_token_ids=(4,))
    assert steps == list(range(1, LENGTH))  # never stopped: every position filled
