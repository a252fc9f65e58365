"""Export: versioned atomic SavedModels whose signatures match generate() and use only TF + TF Text ops."""

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from export.saved_model import export_model, next_version
from keras_models.registry import build_captioner
from pipelines.images import preprocess_images
from pipelines.text import build_vocabulary, make_tokenizer

TEXT_OPS = {"FastWordpieceTokenizeWithOffsets", "RegexSplitWithOffsets", "NormalizeUTF8", "CaseFoldUTF8"}
CAPTIONS = ["Chest X-ray, PA view: no acute abnormality.", "Axial CT of the head showing a small haemorrhage."] * 4


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 40), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module", params=["cnn_gru", "git"])
def exported(request, tmp_path_factory):
    """A tiny random captioner that never emits [SEP] (so captions are long), and its export."""
    tokenizer = make_tokenizer(build_vocabulary(CAPTIONS, 120))
    model = build_captioner(request.param, "tiny", tokenizer, sequence_length=12)
    head = model.layers[-1] if request.param == "cnn_gru" else model.lm_head
    bias = head.bias if hasattr(head, "bias") else None
    if bias is not None:
        bias.assign(bias.numpy() + np.where(np.arange(bias.shape[0]) == tokenizer.end_token_id, -30.0, 0.0))
    base = tmp_path_factory.mktemp("serving")
    path = export_model(model, base, request.param)
    return model, path


def test_signatures_match_generate(exported):
    model, path = exported
    images = [png(1), png(2), png(3)]
    expected = model.generate(preprocess_images(tf.constant(images), model.image_config).numpy(), return_details=True)
    served = tf.saved_model.load(str(path)).signatures["serving_default"](images=tf.constant(images))
    assert [c.decode() for c in served["captions"].numpy()] == expected["captions"]
    assert all(expected["captions"])  # non-trivial captions were compared
    np.testing.assert_allclose(served["scores"].numpy(), expected["scores"], atol=1e-4)
    beams = model.generate(preprocess_images(tf.constant(images), model.image_config).numpy(), sampler="beam")
    served_beams = tf.saved_model.load(str(path)).signatures["beam_search"](images=tf.constant(images))
    assert [c.decode() for c in served_beams["captions"].numpy()] == beams


def test_loads_in_a_process_with_only_tensorflow_and_text(exported):
    model, path = exported
    images = [png(5), png(6)]
    expected = model.generate(preprocess_images(tf.constant(images), model.image_config).numpy())
    script = textwrap.dedent(f"""
        import json, sys
        import tensorflow as tf, tensorflow_text  # noqa: F401
        sig = tf.saved_model.load({str(path)!r}).signatures["serving_default"]
        out = sig(images=tf.constant([open(p, "rb").read() for p in sys.argv[1:]]))
        own = [m for m in sys.modules if m.split(".")[0] in ("keras_models", "pipelines", "export", "serving")]
        print(json.dumps({{"captions": [c.decode() for c in out["captions"].numpy()], "own_modules": own}}))
    """)
    files = []
    for i, data in enumerate(images):
        f = path.parent.parent / f"img{i}.png"
        f.write_bytes(data)
        files.append(str(f))
    result = subprocess.run([sys.executable, "-c", script, *files], capture_output=True, text=True, cwd="/",
                            env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["own_modules"] == [] and out["captions"] == expected


def test_graph_uses_only_core_and_tensorflow_text_ops(exported):
    """What TF Serving can load: every op is TensorFlow's own, or TensorFlow Text's (which it links)."""
    _, path = exported
    script = textwrap.dedent(f"""
        import json
        import tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2
        from tensorflow.python.framework import op_def_registry
        saved = saved_model_pb2.SavedModel.FromString(open({str(path / "saved_model.pb")!r}, "rb").read())
        graph = saved.meta_graphs[0].graph_def
        ops = {{n.op for n in graph.node}} | {{n.op for f in graph.library.function for n in f.node_def}}
        ops -= {{f.signature.name for f in graph.library.function}}
        not_core = sorted(op for op in ops if op_def_registry.get(op) is None)
        import tensorflow_text  # registers its ops
        unknown = sorted(op for op in not_core if op_def_registry.get(op) is None)
        print(json.dumps({{"not_core": not_core, "unknown": unknown}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"}, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["unknown"] == []
    assert "TFText>FastWordpieceDetokenize" in out["not_core"]  # detokenization runs in the graph
    assert all(op.startswith("TFText>") or op in TEXT_OPS for op in out["not_core"]), out["not_core"]


def test_bad_bytes_are_invalid_argument_and_odd_good_ones_caption(exported):
    _, path = exported
    sig = tf.saved_model.load(str(path)).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="Not a PNG or JPEG"):
        sig(images=tf.constant([png(1), b"not an image"]))
    cmyk = io.BytesIO()  # a print figure: libjpeg reads it as RGB, and as grey by way of RGB
    Image.new("CMYK", (40, 30), (0, 160, 255, 0)).save(cmyk, format="JPEG")
    assert len(sig(images=tf.constant([cmyk.getvalue()]))["captions"].numpy()) == 1
    wide = io.BytesIO()
    Image.new("L", (4000, 20), 200).save(wide, format="PNG")  # 200:1: at 32 px its short side is 0.16 px
    assert len(sig(images=tf.constant([wide.getvalue()]))["captions"].numpy()) == 1


def test_export_cli_says_when_a_version_is_taken(exported, tmp_path):
    from export.__main__ import main

    model, path = exported
    model.save(tmp_path / "model.keras")
    with pytest.raises(SystemExit, match="exists; choose another --version"):
        main(["--model", str(tmp_path / "model.keras"), "--base-dir", str(path.parent.parent), "--name",
              path.parent.name, "--version", "1"])


def test_versions_are_atomic_and_increasing(exported, tmp_path):
    model, path = exported
    assert path.name == "1" and (path / "saved_model.pb").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]
    assert next_version(path.parent) == 2
    (path.parent / "not-a-version").mkdir()
    assert next_version(path.parent) == 2
    with pytest.raises(FileExistsError):
        export_model(model, path.parent.parent, path.parent.name, version=1)
    info = json.loads((path / "assets.extra" / "medcap.json").read_text())
    assert info["image_config"] == model.image_config
