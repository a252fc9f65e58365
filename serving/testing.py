"""Small stand-ins for tests and load measurements: a fake captioner SavedModel, images, a server process.

The fake captioner has the exported models' interface (signatures `serving_default` and
`beam_search`, input `images`: string [batch], outputs `captions`: string and `scores`:
float32) and runs the real `pipelines.images.preprocess_images`, so bad bytes fail exactly as
in the real models. Its caption tells what it received: "<tag> mean=<pixel mean> bytes=<length>".
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

IMAGE_CONFIG = {"image_size": 8, "channels": 1, "resize": "stretch", "mean": [0.0], "std": [1.0]}
REPO = Path(__file__).resolve().parents[1]


def write_fake_captioner(base_dir: str | Path, name: str, version: int, tag: str | None = None) -> Path:
    """Export a fake captioner to `base_dir/name/version` atomically (temp dir, then rename)."""
    import tensorflow as tf

    from pipelines.images import preprocess_images

    tag = tag or f"v{version}"

    def caption(images: tf.Tensor, suffix: str) -> dict:
        pixels = preprocess_images(images, IMAGE_CONFIG)
        mean = tf.reduce_mean(pixels, axis=[1, 2, 3])
        text = tf.strings.join([f"{tag}{suffix} mean=", tf.strings.as_string(mean, precision=4), " bytes=",
                                tf.strings.as_string(tf.strings.length(images))])
        return {"captions": text, "scores": mean}

    module = tf.Module()
    spec = [tf.TensorSpec([None], tf.string, name="images")]
    module.greedy = tf.function(lambda images: caption(images, ""), input_signature=spec)
    module.beam = tf.function(lambda images: caption(images, " beam"), input_signature=spec)
    model_dir = Path(base_dir) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    tf.saved_model.save(module, str(tmp), signatures={
        "serving_default": module.greedy.get_concrete_function(),
        "beam_search": module.beam.get_concrete_function(),
    })
    target = model_dir / str(version)
    os.rename(tmp, target)
    return target


def copy_version(source: Path, base_dir: str | Path, name: str, version: int) -> Path:
    """Copy an exported version directory to another model/version, atomically."""
    model_dir = Path(base_dir) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    shutil.copytree(source, tmp)
    target = model_dir / str(version)
    os.rename(tmp, target)
    return target


def write_broken_version(base_dir: str | Path, name: str, version: int) -> Path:
    """A version directory whose saved_model.pb is garbage."""
    target = Path(base_dir) / name / str(version)
    target.mkdir(parents=True)
    (target / "saved_model.pb").write_bytes(b"\x08\x01this is not a SavedModel\xff\xff\xff")
    return target


def png_bytes(value: int = 128, size: tuple[int, int] = (16, 16), mode: str = "L") -> bytes:
    """A flat PNG image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size, value).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(value: int = 128, size: tuple[int, int] = (16, 16)) -> bytes:
    """A flat greyscale JPEG image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, format="JPEG")
    return buffer.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb, refused from the header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m serving.server ...` in a subprocess with its log in a file; a context manager."""

    def __init__(self, args: list[str], log_path: str | Path, grpc_port: int | None = None,
                 rest_port: int | None = None):
        self.grpc_port = grpc_port or free_port()
        self.rest_port = rest_port or free_port()
        self.args = ["--port", str(self.grpc_port), "--rest_api_port", str(self.rest_port), *args]
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def start(self) -> "ServerProcess":
        """Launch without waiting."""
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "serving.server", *self.args], cwd=REPO, env=env,
                                            stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        """Block until the REST port answers (the server opens its ports once the models are loaded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.rest_port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log(self) -> str:
        """Everything the server wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "ServerProcess":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
