"""Everything the Streamlit app does that is not drawing: find models, read uploads, caption, explain.

Three ways to caption, all behind one `caption()` call that returns a `CaptionResult`:
- exported SavedModels (`{artifacts}/{name}/{version}/`, the latest version, loaded in-process),
- a TF Serving (or `serving.server`) address, over gRPC with `serving.client.CaptionClient`,
- the trained `.keras` models of a run (`runs/<latest>/{name}/model.keras`), which alone can change
  the maximum length or beam width, list every beam, and show where each word looked.

Paths come from environment variables (so tests and deployments point the app elsewhere):
MEDCAP_ARTIFACTS_DIR (default artifacts/serving), MEDCAP_RUNS_DIR (runs), MEDCAP_RUN_DIR (one run
directory or .keras file, overriding the latest run), MEDCAP_SERVER (host:port, empty = none),
MEDCAP_MAX_UPLOAD_MB (50). No Streamlit here, so all of it is testable on its own.

Privacy: a DICOM upload becomes PNG pixels here (`pipelines.dicom.dicom_to_png`); only
`safe_metadata` (technical fields) is returned, and upload file names are never kept.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipelines.images import JPEG_MAGIC, MAX_PIXELS, PNG_MAGIC

MODEL_NAMES = ("cnn_gru", "git")
MODEL_TITLES = {"cnn_gru": "CNN-GRU", "git": "GIT"}
SOURCES = {"saved_model": "Exported SavedModels", "server": "TF Serving server (gRPC)", "keras": "Keras models (.keras)"}
SIGNATURES = {"greedy": "serving_default", "beam": "beam_search"}
DISPLAY_SIZE = 320  # pixels of the attention overlays

HOW_TO = """\
**No captioning model was found**, neither exported SavedModels in `{artifacts}`{server_part} nor
trained `.keras` models under `{runs}`. Make one from the repository root:

```bash
python pipelines/train.py
python -m export --model runs/<run> --base-dir {artifacts}
```

`pipelines/train.py` prints its run directory (`runs/<run>`); the export writes
`{artifacts}/cnn_gru/1/` and `{artifacts}/git/1/`. Then reload this page. To use a running server
instead, start it with `python -m serving.server --model_config_file serving/config/models.config
--model_base_path_root {artifacts} --port 8500 --rest_api_port 8501` and enter `localhost:8500`.
"""


class UploadError(ValueError):
    """An upload that cannot be captioned; the message says why in plain words."""


# --- settings and discovery --------------------------------------------------------------------


@dataclass
class AppSettings:
    """Where the app looks for models, from the environment."""

    artifacts_dir: str = "artifacts/serving"
    runs_dir: str = "runs"
    run_dir: str = ""
    server: str = ""
    max_upload_mb: float = 50.0

    @classmethod
    def from_env(cls) -> "AppSettings":
        """Settings from MEDCAP_* environment variables, defaults otherwise."""
        env = os.environ
        return cls(
            artifacts_dir=env.get("MEDCAP_ARTIFACTS_DIR", cls.artifacts_dir),
            runs_dir=env.get("MEDCAP_RUNS_DIR", cls.runs_dir),
            run_dir=env.get("MEDCAP_RUN_DIR", ""),
            server=env.get("MEDCAP_SERVER", ""),
            max_upload_mb=float(env.get("MEDCAP_MAX_UPLOAD_MB", cls.max_upload_mb)),
        )


@dataclass(frozen=True)
class ModelRef:
    """One captioner somewhere: `kind` is saved_model | server | keras; `location` a path or host:port."""

    name: str
    kind: str
    location: str
    version: str

    @property
    def title(self) -> str:
        """Display name, e.g. 'GIT'."""
        return MODEL_TITLES.get(self.name, self.name)


def _ordered(names) -> list[str]:
    """Known model names first (CNN-GRU, GIT), then any others alphabetically."""
    return [n for n in MODEL_NAMES if n in names] + sorted(set(names) - set(MODEL_NAMES))


def find_saved_models(base_dir: str | Path) -> dict[str, ModelRef]:
    """The latest complete integer version of every model under a TF Serving base path."""
    base = Path(base_dir)
    found = {}
    for model_dir in sorted(base.glob("*")) if base.is_dir() else []:
        versions = [int(p.name) for p in model_dir.glob("*") if p.name.isdigit() and (p / "saved_model.pb").is_file()]
        if versions:
            version = max(versions)
            found[model_dir.name] = ModelRef(model_dir.name, "saved_model", str(model_dir / str(version)), str(version))
    return {name: found[name] for name in _ordered(found)}


def find_run_dir(runs_dir: str | Path) -> Path | None:
    """The latest run directory (by name, which is a timestamp) holding at least one */model.keras."""
    root = Path(runs_dir)
    runs = sorted(p for p in root.glob("*") if p.is_dir() and any(p.glob("*/model.keras"))) if root.is_dir() else []
    return runs[-1] if runs else None


def find_keras_models(settings: AppSettings) -> dict[str, ModelRef]:
    """`.keras` models: MEDCAP_RUN_DIR (a run directory or one .keras file) or the latest run under runs_dir."""
    path = Path(settings.run_dir) if settings.run_dir else find_run_dir(settings.runs_dir)
    if path is None or not path.exists():
        return {}
    files = [path] if path.suffix == ".keras" else sorted(path.glob("*/model.keras"))
    found = {}
    for file in files:
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(file.stat().st_mtime))
        found[file.parent.name] = ModelRef(file.parent.name, "keras", str(file), f"{file.parent.parent.name} ({stamp})")
    return {name: found[name] for name in _ordered(found)}


def find_server_models(address: str, names=MODEL_NAMES, timeout: float = 3.0) -> tuple[dict[str, ModelRef], str]:
    """Models a gRPC server has AVAILABLE, and what is wrong when it has none ('' otherwise)."""
    from serving.client import CaptionClient, CaptionError

    found, problems = {}, []
    for name in names:
        with CaptionClient(address, name, timeout=timeout, retries=0) as client:
            try:
                states = client.status()
            except CaptionError as e:
                problems.append(f"{name}: {e}")
                continue
        available = [s["version"] for s in states if s["state"] == "AVAILABLE"]
        if available:
            found[name] = ModelRef(name, "server", address, str(max(available)))
    if not found and problems and all("UNAVAILABLE" in p or "DEADLINE" in p for p in problems):
        return found, f"cannot reach {address} ({problems[0]})"
    if not found:
        return found, f"{address} serves no available version of {' or '.join(names)}"
    return found, ""


# --- uploads and examples ----------------------------------------------------------------------


@dataclass
class PreparedImage:
    """An image ready to caption: PNG/JPEG bytes (DICOM already windowed to PNG) and what to show beside it."""

    data: bytes
    kind: str  # "PNG" | "JPEG" | "DICOM"
    metadata: dict = field(default_factory=dict)  # technical DICOM fields only
    height: int = 0
    width: int = 0

    @property
    def sha256(self) -> str:
        """Fingerprint of the captioned bytes (stands in for the file name, which may name a patient)."""
        return hashlib.sha256(self.data).hexdigest()


def image_error_message(error: Exception) -> str:
    """A TensorFlow decode error as one plain sentence."""
    text = str(error)
    if "Summarized data: b'" in text:
        return text.split("Summarized data: b'", 1)[1].split("'", 1)[0]
    for fmt in ("PNG", "JPEG"):
        if f"Invalid {fmt}" in text or (fmt == "JPEG" and "jpeg::" in text):
            return f"The {fmt} image is truncated or corrupt: it does not decode."
    return f"The image cannot be decoded ({type(error).__name__})."


def _dicom_metadata(data: bytes) -> dict:
    """Technical DICOM fields only (`pipelines.dicom.safe_metadata`), read without the pixels."""
    import pydicom

    from pipelines.dicom import safe_metadata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    return safe_metadata(ds)


def prepare_upload(data: bytes, max_upload_mb: float = 50.0) -> PreparedImage:
    """Checked upload -> PreparedImage; UploadError (a plain message) for empty, oversized, non-image,
    truncated or pixel-less files."""
    from pipelines.dicom import DicomError, dicom_to_png, is_dicom
    from pipelines.jpeg_for_model import readable_by_the_model

    if not data:
        raise UploadError("The file is empty (0 bytes).")
    if len(data) > max_upload_mb * 1024 * 1024:
        raise UploadError(f"The file is too large: {len(data) / 2**20:.1f} MB, over the {max_upload_mb:g} MB limit.")
    metadata = {}
    if data.startswith(PNG_MAGIC):
        kind = "PNG"
    elif data.startswith(JPEG_MAGIC):
        kind = "JPEG"
        data, rotation = readable_by_the_model(data)  # EXIF-rotated: the upright PNG a viewer shows
        if rotation:
            kind = f"JPEG (EXIF orientation {rotation} applied: sent upright as PNG)"
    elif is_dicom(data):
        try:
            png = dicom_to_png(data)  # rescale, window / VOI LUT, MONOCHROME1 inverted
        except DicomError as e:  # technical facts only, never patient fields
            raise UploadError(f"DICOM: {e}") from None
        kind, metadata, data = "DICOM", _dicom_metadata(data), png
    else:
        raise UploadError("This is not a PNG, JPEG or DICOM file.")
    height, width = check_decodes(data)
    return PreparedImage(data, kind, metadata, height, width)


def check_decodes(data: bytes) -> tuple[int, int]:
    """(height, width) after a full checked decode with the models' own decoder; UploadError otherwise."""
    import tensorflow as tf

    from pipelines.images import decode_image

    try:
        image = decode_image(tf.constant(data), channels=1, max_pixels=MAX_PIXELS)
    except tf.errors.InvalidArgumentError as e:
        raise UploadError(image_error_message(e)) from None
    return int(image.shape[0]), int(image.shape[1])


@dataclass(frozen=True)
class Example:
    """A bundled real image with its published caption and its licence line."""

    id: str
    path: str
    caption: str
    licence: str


def list_examples(root: str | Path | None = None) -> list[Example]:
    """The bundled ROCO examples (`pipelines/examples`), valid split first, with licence lines."""
    from pipelines.rocov2 import EXAMPLES_DIR, list_splits, read_split

    root = Path(root or EXAMPLES_DIR)
    licences = {}
    licence_file = root / "license_information.csv"
    if licence_file.is_file():
        with open(licence_file, newline="", encoding="utf-8") as f:
            licences = {row["ID"]: row for row in csv.DictReader(f)}
    examples = []
    for split in sorted(list_splits(root), key=lambda s: s != "valid"):
        records, _ = read_split(root, split, check_images=False, progress=False)
        for record in records:
            examples.append(Example(record.id, record.image_path, record.caption, licence_line(licences.get(record.id))))
    return examples


def licence_line(row: dict | None) -> str:
    """'Figure PMC.._x.jpg, CC BY, from PMC article PMC... via ROCO (Pelka et al., 2018)' for a licence row."""
    if not row:
        return "Licence unknown: see pipelines/examples/license_information.csv."
    article = row["PMC_image"].split("_", 1)[0]
    return (f"{row['Licence']}: figure {row['PMC_image']} of https://www.ncbi.nlm.nih.gov/pmc/articles/{article}/ "
            "(image and caption belong to the article's authors), via the ROCO dataset (Pelka et al., 2018).")


# --- captioning ----------------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    """How to caption: `max_length` and free beam widths apply to the Keras path only."""

    sampler: str = "greedy"  # greedy | beam
    num_beams: int = 3
    max_length: int | None = None
    show_candidates: bool = False


@dataclass
class CaptionResult:
    """One model's answer for one image. `candidates`: [{label, caption, score}], best first."""

    model: str
    source: str
    version: str
    caption: str
    score: float | None
    settings: dict
    candidates: list[dict] = field(default_factory=list)
    token_ids: list[int] | None = None  # the generated ids (Keras path), for attention maps
    notes: list[str] = field(default_factory=list)

    def to_json(self, image: PreparedImage | None = None) -> dict:
        """The downloadable record: caption, model, version, settings, score (no file name, no patient data)."""
        record = {k: v for k, v in asdict(self).items() if k not in ("token_ids", "notes")}
        record["per_token_probability"] = per_token_probability(self.score)
        if image is not None:
            record["image"] = {"kind": image.kind, "sha256": image.sha256, "height": image.height,
                               "width": image.width}
        return record


def describe_settings(settings: dict) -> str:
    """'beam search, width 3, at most 16 tokens' from a result's settings."""
    parts = ["greedy" if settings.get("sampler") == "greedy" else "beam search"]
    if settings.get("sampler") == "beam" and settings.get("num_beams"):
        parts.append(f"width {settings['num_beams']}")
    if settings.get("max_length"):
        parts.append(f"at most {settings['max_length']} tokens")
    return ", ".join(parts)


def escape_markdown(text: str) -> str:
    """Model text shown verbatim in Streamlit markdown (no accidental emphasis, links or headings)."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$:])", r"\\\1", text)


def per_token_probability(score: float | None) -> float | None:
    """exp(mean log-probability per token): the geometric-mean confidence per word piece, 0..1."""
    return None if score is None else float(np.exp(score))


class SavedModelCaptioner:
    """An exported SavedModel version, loaded in this process."""

    def __init__(self, ref: ModelRef):
        import tensorflow as tf

        import tensorflow_text  # noqa: F401  (registers the WordPiece ops the signatures use)

        self.ref = ref
        self.loaded = tf.saved_model.load(ref.location)
        info_file = Path(ref.location) / "assets.extra" / "medcap.json"
        self.info = json.loads(info_file.read_text()) if info_file.is_file() else {}

    def run(self, data: bytes, sampler: str) -> tuple[str, float]:
        """(caption, score) from the greedy or beam signature."""
        import tensorflow as tf

        out = self.loaded.signatures[SIGNATURES[sampler]](images=tf.constant([data]))
        return out["captions"].numpy()[0].decode("utf-8"), float(out["scores"].numpy()[0])


class ServerCaptioner:
    """A model behind a TF Serving compatible gRPC address."""

    def __init__(self, ref: ModelRef, timeout: float = 30.0):
        self.ref, self.timeout, self.info = ref, timeout, {}

    def run(self, data: bytes, sampler: str) -> tuple[str, float]:
        """(caption, score) from the server's greedy or beam signature."""
        from serving.client import CaptionClient

        with CaptionClient(self.ref.location, self.ref.name, signature=SIGNATURES[sampler], timeout=self.timeout,
                           retries=1) as client:
            answer = client.caption([data])[0]
        return answer["caption"], answer["score"]


class KerasCaptioner:
    """A trained `.keras` captioner: free generation settings, every beam, attention maps."""

    def __init__(self, ref: ModelRef):
        import keras

        import keras_models  # noqa: F401  (registers the medcap layers)

        self.ref = ref
        with warnings.catch_warnings():  # an optimizer saved before its first step is not worth a warning here
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            self.model = keras.saving.load_model(ref.location)
        self.lock = threading.Lock()  # generate() swaps samplers on the model: one caller at a time

    def pixels(self, data: bytes) -> np.ndarray:
        """The model's input [1, S, S, C] from encoded bytes (the one image function)."""
        import tensorflow as tf

        from pipelines.images import preprocess_images

        return preprocess_images(tf.constant([data]), self.model.image_config).numpy()

    def generate(self, data: bytes, settings: GenerationSettings) -> dict:
        """`generate()` details for one image, plus `candidates` (every beam) when asked for."""
        pixels = self.pixels(data)
        with self.lock:
            out = self.model.generate(pixels, max_length=settings.max_length, sampler=settings.sampler,
                                      num_beams=settings.num_beams, return_details=True)
            beams = []
            if settings.sampler == "beam" and settings.show_candidates:
                beams = beam_candidates(self.model, pixels, settings.num_beams, settings.max_length)
        return {"caption": out["captions"][0], "score": float(out["scores"][0]),
                "token_ids": [int(t) for t in out["token_ids"][0]], "candidates": beams}


def beam_candidates(model, pixels: np.ndarray, num_beams: int, max_length: int | None = None) -> list[dict]:
    """The distinct beams of beam search for one image [1, S, S, C], best first: [{label, caption, score}].

    Runs the captioner's own `generate_step` with a BeamSampler that keeps all beams; each beam
    is scored as `generate()` scores captions (mean log-probability per generated token).
    """
    from keras import ops

    from keras_models.beam_search import BeamSampler
    from keras_models.captioner import as_text, generated_mask

    class KeepAllBeams(BeamSampler):
        """Beam search that remembers every beam (best first) and returns the best, as generate_step expects."""

        def __call__(self, *args, **kwargs):
            prompts, _ = super().__call__(*args, **kwargs)
            self.beams = prompts
            return prompts[:, 0]

    sampler, previous = KeepAllBeams(num_beams=num_beams, return_all_beams=True), getattr(model, "sampler", None)
    stop = (model.preprocessor.tokenizer.end_token_id,)
    inputs = model.preprocessor.generate_preprocess({"images": pixels}, sequence_length=max_length)
    model.sampler = sampler  # read by generate_step; run eagerly so the beams are concrete
    try:
        model.generate_step(inputs, stop_token_ids=stop, score=False)  # every beam is scored below
    finally:
        model.sampler = previous
    token_ids = sampler.beams[0]
    prompt_mask = ops.repeat(ops.convert_to_tensor(inputs["padding_mask"]), num_beams, axis=0)
    mask = generated_mask(token_ids, prompt_mask, stop)
    images = ops.repeat(ops.convert_to_tensor(pixels), num_beams, axis=0)
    log_probs = ops.convert_to_numpy(model.token_log_probs({"images": images, "token_ids": token_ids,
                                                            "padding_mask": mask}))
    counts = np.maximum(ops.convert_to_numpy(mask)[:, 1:].sum(-1), 1)
    captions = model.preprocessor.generate_postprocess({"token_ids": ops.convert_to_numpy(token_ids),
                                                        "padding_mask": ops.convert_to_numpy(mask)})
    captions = [as_text(c) for c in np.atleast_1d(ops.convert_to_numpy(captions))]
    distinct = {}  # beams that differ only after [SEP] read the same: keep the first (best) of each
    for c, s in zip(captions, log_probs.sum(-1) / counts):
        distinct.setdefault(c, float(s))
    return [{"label": f"beam {i + 1}", "caption": c, "score": s} for i, (c, s) in enumerate(distinct.items())]


def load_captioner(ref: ModelRef):
    """The captioner object for a model reference."""
    return {"saved_model": SavedModelCaptioner, "server": ServerCaptioner, "keras": KerasCaptioner}[ref.kind](ref)


def caption(captioner, image: PreparedImage, settings: GenerationSettings) -> CaptionResult:
    """Caption one image with any captioner; what each source cannot do is said in `notes`."""
    ref = captioner.ref
    used = {"sampler": settings.sampler}
    if isinstance(captioner, KerasCaptioner):
        used.update(num_beams=settings.num_beams if settings.sampler == "beam" else None,
                    max_length=settings.max_length or captioner.model.preprocessor.sequence_length)
        out = captioner.generate(image.data, settings)
        return CaptionResult(ref.name, ref.kind, ref.version, out["caption"], out["score"], used,
                             out["candidates"], out["token_ids"])
    notes = []
    if settings.max_length:
        notes.append("Maximum length applies to the Keras models only; the exported model uses the length "
                     "fixed at export.")
    if settings.sampler == "beam":
        width = captioner.info.get("num_beams")
        used["num_beams"] = width
        if width and settings.num_beams != width:
            notes.append(f"This exported model's beam width is fixed at {width} (set at export with --num-beams); "
                         "other widths need the Keras model.")
    text, score = captioner.run(image.data, settings.sampler)
    candidates = []
    if settings.sampler == "beam":  # a SavedModel returns only the best beam: show greedy beside it
        greedy_text, greedy_score = captioner.run(image.data, "greedy")
        candidates = [{"label": "beam_search (best beam)", "caption": text, "score": score},
                      {"label": "serving_default (greedy)", "caption": greedy_text, "score": greedy_score}]
    return CaptionResult(ref.name, ref.kind, ref.version, text, score, used, candidates, None, notes)


# --- where each word looked ----------------------------------------------------------------------


def caption_token_ids(model, text: str) -> list[int]:
    """[CLS] + the tokenized caption + [SEP] with a Keras model's own tokenizer."""
    tokenizer = model.preprocessor.tokenizer
    ids = [int(t) for t in np.asarray(tokenizer(text)).reshape(-1)]
    limit = max(model.preprocessor.sequence_length - 2, 1)
    return [tokenizer.start_token_id, *ids[:limit], tokenizer.end_token_id]


def word_attention(captioner: KerasCaptioner, image: PreparedImage, result: CaptionResult) -> list[tuple[str, np.ndarray]]:
    """[(word, map [h, w])] for a caption: the generated ids, or the caption re-read by the Keras model."""
    from serving.attention import word_maps

    model = captioner.model
    token_ids = result.token_ids or caption_token_ids(model, result.caption)
    with captioner.lock:
        return word_maps(model, captioner.pixels(image.data)[0], token_ids)


def model_view(image: PreparedImage, image_config: dict, size: int = DISPLAY_SIZE) -> np.ndarray:
    """The image as the model frames it (same resize mode), at `size` pixels, uint8 RGB."""
    from pipelines.images import load_image

    config = {**image_config, "image_size": size, "channels": 3}
    return np.round(load_image(image.data, config).numpy() * 255).astype(np.uint8)


def overlay(view: np.ndarray, attention: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Heat map of an attention grid [h, w], upsampled smoothly and blended over an RGB view."""
    from matplotlib import colormaps
    from PIL import Image

    grid = attention / max(float(attention.max()), 1e-9)
    heat = Image.fromarray(np.round(grid * 255).astype(np.uint8)).resize(view.shape[1::-1], Image.BILINEAR)
    colours = colormaps["inferno"](np.asarray(heat) / 255.0)[..., :3] * 255
    return np.round((1 - alpha) * view + alpha * colours).astype(np.uint8)


def result_json(results: list[CaptionResult], image: PreparedImage, example: Example | None = None) -> str:
    """The JSON a person downloads: every model's caption, version, settings and score."""
    record = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "results": [r.to_json(image) for r in results],
              "note": "Research prototype: machine-generated captions, not a diagnosis."}
    if example is not None:
        record["example"] = {"id": example.id, "published_caption": example.caption, "licence": example.licence}
    return json.dumps(record, indent=2, ensure_ascii=False)
