"""The least time this machine needs to generate a GIT caption: its work at the machine's measured best rates.

`benchmarks.generation` compares our GIT with Hugging Face's; this module says how fast either could be.
Generation is an image encoder and a prefill over the image tokens (matrix products: bound by the
arithmetic rate) and then one decoding step per new token (for a batch of a few rows, bound by reading
every decoder and LM-head weight once a step). The floor is the FLOPs of the first at the best measured
matrix-product rate plus, per step, the longer of its FLOPs at that rate and its bytes (weights and the
key/value cache it reads; the image part once per image, as beams can share it) at the best measured
memory bandwidth. Softmax, layer norms, the sampler and every other op are left out, so an fp32
implementation that reads its weights from memory at every step cannot beat it on the machine measured.
Weights that stay in the processor's cache between steps (a small model's ~75 MB, partly, in a large L3)
could; so the floor is firm for git-base and an estimate for small.

Rates are measured with the framework at hand (TensorFlow, PyTorch or NumPy), the caller's threads:
the matrix product as the best of a few shapes like the models' own, the bandwidth as a matrix-vector
product over a 256 MiB matrix (far larger than any cache).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

# (m, k, n): a ViT-B feed-forward layer's two products over 8 images' tokens, a square one, a small model's
GEMM_SHAPES = ((1576, 768, 3072), (1576, 3072, 768), (2048, 2048, 2048), (394, 384, 1536))
GEMV_SHAPE = (4096, 16384)  # 256 MiB of float32
FLOAT_BYTES = 4


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def measure_rates(framework: str, repeats: int = 5) -> dict[str, float]:
    """{'flops_per_s', 'bytes_per_s'}: the best fp32 matrix-product rate and matrix-vector bandwidth of `framework`."""
    rng = np.random.default_rng(0)
    if framework == "tensorflow":
        import tensorflow as tf

        def product(a, b):
            a, b = tf.constant(a), tf.constant(b)
            return lambda: tf.matmul(a, b)  # eager ops on the CPU return when done
    elif framework == "torch":
        import torch

        def product(a, b):
            a, b = torch.from_numpy(a), torch.from_numpy(b)
            return lambda: torch.matmul(a, b)
    elif framework == "numpy":
        def product(a, b):
            return lambda: a @ b
    else:
        raise ValueError(f"unknown framework {framework!r}: tensorflow, torch or numpy")

    flops = 0.0
    for m, k, n in GEMM_SHAPES:
        a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
        flops = max(flops, 2 * m * k * n / _best_seconds(product(a, b), repeats))
    rows, columns = GEMV_SHAPE
    vector, matrix = rng.standard_normal((1, rows), dtype=np.float32), rng.standard_normal(GEMV_SHAPE, dtype=np.float32)
    bandwidth = rows * columns * FLOAT_BYTES / _best_seconds(product(vector, matrix), repeats)
    return {"flops_per_s": flops, "bytes_per_s": bandwidth}


def best_rates(*measured: dict[str, float]) -> dict[str, float]:
    """The best of several frameworks' rates, each figure on its own."""
    return {key: max(m[key] for m in measured) for key in ("flops_per_s", "bytes_per_s")}


def generation_work(dims: dict, batch: int, beams: int, new_tokens: int, channels: int = 3) -> dict:
    """FLOPs of encoding `batch` images once and the prefill over their tokens, then FLOPs and bytes of each step.

    `dims` holds `GitBackbone.get_config()`'s sizes. Beams share their image's encoding and prefill
    (as ours do); each of the `new_tokens - 1` steps after the prefill runs `batch * beams` rows.
    """
    d_v, f_v, layers_v = dims["vision_hidden_dim"], dims["vision_intermediate_dim"], dims["vision_num_layers"]
    d, f, layers, vocab = dims["hidden_dim"], dims["intermediate_dim"], dims["num_layers"], dims["vocabulary_size"]
    patches = (dims["image_size"] // dims["patch_size"]) ** 2
    image_tokens = patches + 1  # + the class token
    vision = (2 * patches * dims["patch_size"] ** 2 * channels * d_v
              + layers_v * (2 * image_tokens * (4 * d_v * d_v + 2 * d_v * f_v) + 4 * image_tokens ** 2 * d_v)
              + 2 * image_tokens * d_v * d)
    prefix = image_tokens + 1  # image tokens and [CLS]
    decoder_weights = layers * (4 * d * d + 2 * d * f)
    prefill = 2 * prefix * decoder_weights + layers * 4 * prefix ** 2 * d + 2 * d * vocab
    rows, steps = batch * beams, []
    for t in range(1, new_tokens):
        context = prefix + t  # keys and values each step attends to
        flops = rows * (2 * decoder_weights + layers * 4 * context * d + 2 * d * vocab)
        weight_bytes = (decoder_weights + d * vocab) * FLOAT_BYTES
        cache_bytes = (batch * prefix + rows * t) * layers * 2 * d * FLOAT_BYTES  # image keys/values per image
        steps.append((flops, weight_bytes + cache_bytes))
    return {"encode_flops": batch * (vision + prefill), "steps": steps}


def floor_seconds(work: dict, rates: dict[str, float]) -> float:
    """Seconds the `generation_work` needs at `rates` (see the module's docstring)."""
    flops_rate, bandwidth = rates["flops_per_s"], rates["bytes_per_s"]
    return work["encode_flops"] / flops_rate + sum(max(f / flops_rate, b / bandwidth) for f, b in work["steps"])
