"""Import a local Hugging Face `GitForCausalLM` checkpoint as a `GitCaptioner`.

    python -m keras_models.git.convert_hf --checkpoint PATH --out model.keras [--sequence-length N] [--vocab vocab.txt]

PATH holds `config.json`, `model.safetensors` (or `pytorch_model.bin`) and
`vocab.txt` (else pass `--vocab`). Every tensor is mapped; an unknown, missing
or wrongly shaped one stops the import with its name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from keras_models.git.git_backbone import GitBackbone
from keras_models.git.git_causal_lm import GitCaptioner
from keras_models.git.git_presets import CLIP_IMAGE_CONFIG, PRESETS
from keras_models.preprocessor import CaptionPreprocessor, CaptionTokenizer

# transformers' GitConfig / GitVisionConfig defaults, for keys a config.json leaves out.
TEXT_DEFAULTS = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    max_position_embeddings=1024,
    layer_norm_eps=1e-12,
    bos_token_id=101,
    eos_token_id=102,
)
VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=16,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


def backbone_kwargs(config: dict) -> dict:
    """`GitBackbone` kwargs from a Hugging Face GIT `config.json` dict."""
    text = {**TEXT_DEFAULTS, **config}
    vision = {**VISION_DEFAULTS, **(config.get("vision_config") or {})}
    if text.get("num_image_with_embedding"):
        raise ValueError("Video GIT checkpoints (num_image_with_embedding) are not supported.")
    if text.get("tie_word_embeddings"):
        raise ValueError("GIT checkpoints with tied word embeddings are not supported.")
    if text.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"Unsupported position_embedding_type {text['position_embedding_type']!r}.")
    image_size, patch_size = (_square(vision[k], k) for k in ("image_size", "patch_size"))
    return dict(
        vocabulary_size=text["vocab_size"],
        image_size=image_size,
        patch_size=patch_size,
        vision_hidden_dim=vision["hidden_size"],
        vision_num_layers=vision["num_hidden_layers"],
        vision_num_heads=vision["num_attention_heads"],
        vision_intermediate_dim=vision["intermediate_size"],
        hidden_dim=text["hidden_size"],
        num_layers=text["num_hidden_layers"],
        num_heads=text["num_attention_heads"],
        intermediate_dim=text["intermediate_size"],
        max_sequence_length=text["max_position_embeddings"],
        num_channels=vision["num_channels"],
        vision_activation=vision["hidden_act"],
        activation=text["hidden_act"],
        vision_layer_norm_epsilon=vision["layer_norm_eps"],
        layer_norm_epsilon=text["layer_norm_eps"],
        dropout=text["hidden_dropout_prob"],
    )


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"Only square {name} is supported, got {value}.")
        value = value[0]
    return int(value)


def load_state_dict(folder: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as float32 numpy arrays (safetensors preferred)."""
    if (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(k).float().numpy() for k in f.keys()}
    if (folder / "pytorch_model.bin").is_file():
        import torch

        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise FileNotFoundError(f"No model.safetensors or pytorch_model.bin in {folder}.")


# Hugging Face names of one transformer layer's parts, in the order of `_LAYER_PARTS`.
VISION_LAYER_NAMES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
    "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2",
)
TEXT_LAYER_NAMES = (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm",
)
# (attribute path in a keras-hub TransformerEncoder/Decoder, layout of its kernel or "norm")
_LAYER_PARTS = (
    ("_self_attention_layer._query_dense", "kernel"),
    ("_self_attention_layer._key_dense", "kernel"),
    ("_self_attention_layer._value_dense", "kernel"),
    ("_self_attention_layer._output_dense", "out_kernel"),
    ("_self_attention_layer_norm", "norm"),
    ("_feedforward_intermediate_dense", "kernel"),
    ("_feedforward_output_dense", "kernel"),
    ("_feedforward_layer_norm", "norm"),
)


def weight_map(model: GitCaptioner) -> dict:
    """Hugging Face tensor name -> (Keras variable, layout) for every weight of `model`."""
    backbone, names = model.backbone, {}

    def add(hf, layer, layout="kernel"):
        if layout == "norm":
            names[f"{hf}.weight"], names[f"{hf}.bias"] = (layer.gamma, "same"), (layer.beta, "same")
        else:
            names[f"{hf}.weight"], names[f"{hf}.bias"] = (layer.kernel, layout), (layer.bias, "bias")

    def transformer_layer(prefix, layer, hf_names):
        for hf, (path, layout) in zip(hf_names, _LAYER_PARTS):
            part = layer
            for attribute in path.split("."):
                part = getattr(part, attribute)
            add(f"{prefix}.{hf}", part, layout)

    vision, v = backbone.vision_encoder, "git.image_encoder.vision_model"
    names[f"{v}.embeddings.class_embedding"] = (vision.embedding.class_embedding, "same")
    names[f"{v}.embeddings.patch_embedding.weight"] = (vision.embedding.patch_embedding.kernel, "conv")
    names[f"{v}.embeddings.position_embedding.weight"] = (vision.embedding.position_embedding, "same")
    add(f"{v}.pre_layrnorm", vision.pre_layer_norm, "norm")
    for i, layer in enumerate(vision.encoder_layers):
        transformer_layer(f"{v}.encoder.layers.{i}", layer, VISION_LAYER_NAMES)
    add(f"{v}.post_layernorm", vision.post_layer_norm, "norm")

    add("git.visual_projection.visual_projection.0", backbone.image_projection)
    add("git.visual_projection.visual_projection.1", backbone.image_projection_norm, "norm")
    names["git.embeddings.word_embeddings.weight"] = (backbone.token_embedding.embeddings, "same")
    names["git.embeddings.position_embeddings.weight"] = (backbone.position_embedding.position_embeddings, "same")
    add("git.embeddings.LayerNorm", backbone.text_embedding_norm, "norm")
    for i, layer in enumerate(backbone.transformer_layers):
        transformer_layer(f"git.encoder.layer.{i}", layer, TEXT_LAYER_NAMES)
    add("output", model.lm_head)
    return names


def _hf_shape(shape: tuple, layout: str) -> tuple:
    """The shape the Hugging Face tensor for a Keras variable of `shape` must have."""
    if layout == "kernel":  # Keras (in, *out) <- torch Linear (out, in)
        return (int(np.prod(shape[1:])), shape[0])
    if layout == "out_kernel":  # Keras (*in, out) <- torch Linear (out, in)
        return (shape[-1], int(np.prod(shape[:-1])))
    if layout == "conv":  # Keras (kh, kw, in, out) <- torch Conv2d (out, in, kh, kw)
        return (shape[3], shape[2], shape[0], shape[1])
    if layout == "bias":
        return (int(np.prod(shape)),)
    return tuple(shape)


def _to_keras(array: np.ndarray, shape: tuple, layout: str) -> np.ndarray:
    if layout in ("kernel", "out_kernel"):
        array = array.T
    elif layout == "conv":
        array = array.transpose(2, 3, 1, 0)
    return array.reshape(shape)


def load_hf_weights(model: GitCaptioner, state_dict: dict[str, np.ndarray]) -> None:
    """Assign every checkpoint tensor to `model`; raise naming any unknown, missing or misshapen one."""
    names = weight_map(model)
    given = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    problems = [f"unknown: {k}" for k in sorted(set(given) - set(names))]
    problems += [f"missing: {k}" for k in sorted(set(names) - set(given))]
    for key in sorted(set(names) & set(given)):
        variable, layout = names[key]
        expected = _hf_shape(tuple(variable.shape), layout)
        if tuple(given[key].shape) != expected:
            problems.append(f"shape mismatch: {key} is {tuple(given[key].shape)}, expected {expected}")
    if problems:
        raise ValueError(f"Checkpoint does not match the model ({len(problems)} problems):\n  " + "\n  ".join(problems))
    for key, (variable, layout) in names.items():
        variable.assign(_to_keras(given[key], tuple(variable.shape), layout))


def convert_checkpoint(path: str | Path, vocab: str | Path | None = None, sequence_length: int | None = None) -> GitCaptioner:
    """A compiled `GitCaptioner` with a Hugging Face GIT checkpoint's weights, vocabulary and CLIP preprocessing."""
    folder = Path(path)
    config = json.loads((folder / "config.json").read_text())
    kwargs = backbone_kwargs(config)
    vocab = Path(vocab) if vocab else folder / "vocab.txt"
    if not vocab.is_file():
        raise FileNotFoundError(f"No vocabulary at {vocab}; pass --vocab.")
    tokenizer = CaptionTokenizer(vocabulary=str(vocab), lowercase=True)
    _check_tokenizer(tokenizer, {**TEXT_DEFAULTS, **config})
    sequence_length = sequence_length or min(PRESETS["base"]["sequence_length"], kwargs["max_sequence_length"])
    image_config = {**CLIP_IMAGE_CONFIG, "image_size": kwargs["image_size"], "channels": kwargs["num_channels"]}
    preprocessor = CaptionPreprocessor(tokenizer, sequence_length=sequence_length, image_config=image_config)
    model = GitCaptioner(backbone=GitBackbone(**kwargs), preprocessor=preprocessor)
    load_hf_weights(model, load_state_dict(folder))
    return model


def _check_tokenizer(tokenizer, config: dict) -> None:
    if tokenizer.vocabulary_size() != config["vocab_size"]:
        raise ValueError(f"Vocabulary has {tokenizer.vocabulary_size()} tokens; the model has {config['vocab_size']}.")
    ids = {"bos_token_id": tokenizer.start_token_id, "eos_token_id": tokenizer.end_token_id}
    for key, token_id in ids.items():
        expected = config.get(key)
        if expected is not None and token_id not in (expected if isinstance(expected, list) else [expected]):
            raise ValueError(f"config {key}={expected} but the vocabulary puts it at {token_id}.")


def main(argv: list[str] | None = None) -> None:
    """Command line: convert and save a `.keras` file."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="folder with config.json and the weights")
    p.add_argument("--out", required=True, help="where to write the .keras model")
    p.add_argument("--vocab", help="vocab.txt when the checkpoint folder has none")
    p.add_argument("--sequence-length", type=int, help="caption length in tokens (default 40)")
    args = p.parse_args(argv)
    model = convert_checkpoint(args.checkpoint, vocab=args.vocab, sequence_length=args.sequence_length)
    model.save(args.out)
    print(f"Saved {args.out}: {model.count_params():,} parameters, image_config {model.image_config}")


if __name__ == "__main__":
    main()
