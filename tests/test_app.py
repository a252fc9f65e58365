"""The Streamlit app: its flows under AppTest, its backend, and one upload in a real headless browser."""

from __future__ import annotations

import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from streamlit.testing.v1 import AppTest
from streamlit.testing.v1.element_tree import Block

from serving import app_backend as backend
from serving.testing import REPO, ServerProcess, free_port, png_bomb

APP = str(REPO / "serving" / "app.py")
CAPTIONS = ["Chest X-ray, PA view: no acute abnormality.", "Axial CT of the head showing a small haemorrhage.",
            "Sagittal MRI of the knee with a joint effusion.", "Transverse ultrasound of the thyroid: a small cyst."]
PATIENT = "DOE^JANE"
CHROMIUM = Path("/usr/bin/chromium")


def png(seed: int = 0, size: tuple[int, int] = (60, 48)) -> bytes:
    """A noisy greyscale PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def dicom(with_pixels: bool = True) -> bytes:
    """A small CT slice as DICOM bytes, with a patient name that must never be shown."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("scan.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT, "MRN-0042", "19700101"
    ds.InstitutionName, ds.StudyDescription = "St Example Hospital", "CT head for DOE JANE"
    ds.Modality, ds.BodyPartExamined = "CT", "HEAD"
    if with_pixels:
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 64, 64, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, -1024, 40, 400
        ds.PixelData = np.random.default_rng(3).integers(900, 1200, (64, 64), dtype=np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Tiny random CNN-GRU and GIT captioners: exported SavedModels and a run directory of .keras files."""
    import keras

    from export.saved_model import export_model
    from keras_models.registry import MODELS, build_captioner
    from pipelines.text import build_vocabulary, make_tokenizer, save_vocabulary

    root = tmp_path_factory.mktemp("app_models")
    vocabulary = build_vocabulary(CAPTIONS * 2, 150)
    tokenizer = make_tokenizer(vocabulary)
    run = root / "runs" / "20250101-000000"
    for name in MODELS:
        keras.utils.set_random_seed(0)
        model = build_captioner(name, "tiny", tokenizer, sequence_length=10)
        if name == "git":  # a random GIT often ends at once: make [SEP] unlikely so its captions have words
            bias = model.lm_head.bias
            bias.assign(bias.numpy() - 30.0 * (np.arange(bias.shape[0]) == tokenizer.end_token_id))
        export_model(model, root / "artifacts", name)
        (run / name).mkdir(parents=True)
        model.save(run / name / "model.keras")
    save_vocabulary(vocabulary, run)
    return {"root": root, "artifacts": root / "artifacts", "runs": root / "runs", "run": run}


@functools.lru_cache
def load_saved_model(path: str):
    """An exported version, loaded once per test session."""
    return tf.saved_model.load(path)


def served_caption(models: dict, name: str, data: bytes, signature: str = "serving_default") -> str:
    """What the exported model itself says for these bytes, as the app shows it."""
    version = backend.find_saved_models(models["artifacts"])[name].location
    out = load_saved_model(version).signatures[signature](images=tf.constant([data]))
    return out["captions"].numpy()[0].decode() or "(empty caption)"


@pytest.fixture
def env(monkeypatch, tmp_path):
    """Point the app at given folders (empty ones by default) and no server."""
    empty = tmp_path / "empty"
    empty.mkdir()

    def point(artifacts=empty, runs=empty, server="", run_dir=""):
        monkeypatch.setenv("MEDCAP_ARTIFACTS_DIR", str(artifacts))
        monkeypatch.setenv("MEDCAP_RUNS_DIR", str(runs))
        monkeypatch.setenv("MEDCAP_SERVER", server)
        monkeypatch.setenv("MEDCAP_RUN_DIR", str(run_dir))

    point()
    return point


def start_app() -> AppTest:
    """The app after its first run."""
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    assert not at.exception, at.exception
    return at


def upload(at: AppTest, name: str, data: bytes, mime: str = "application/octet-stream") -> AppTest:
    """Upload a file through the app's uploader and rerun."""
    at.file_uploader(key="upload").set_value((name, data, mime))
    at.run()
    assert not at.exception, at.exception
    return at


def everything_shown(at: AppTest) -> str:
    """The text of every element of the page (main and sidebar), protos included."""
    return "\n".join(str(node.proto) for node in at._tree if getattr(node, "proto", None) is not None)


def captions_shown(at: AppTest) -> list[str]:
    """The captions on the page (the boxes keyed caption_<model>), markdown escapes removed."""
    shown = []
    for node in at._tree:
        if isinstance(node, Block) and getattr(node, "proto", None) is not None and (node.key or "").startswith("caption_"):
            text = node.markdown[0].value
            shown.append("(empty caption)" if text == "_(empty caption)_" else re.sub(r"\\(.)", r"\1", text[2:-2]))
    return shown


# --- flows under AppTest --------------------------------------------------------------------------


def test_without_models_it_says_how_to_make_them(env):
    at = start_app()
    text = " ".join(i.value for i in at.info)
    assert "No captioning model was found" in text
    assert "python pipelines/train.py" in text
    assert "python -m export --model runs/<run> --base-dir" in text
    assert not at.error and not at.file_uploader


def test_example_is_captioned_by_both_models(env, models):
    env(artifacts=models["artifacts"], runs=models["runs"])
    at = start_app()
    assert at.radio(key="source").value == "saved_model"
    at.radio(key="image_mode").set_value("example").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    example = at.selectbox(key="example").value
    data = Path(example.path).read_bytes()
    headings = [m.value for m in at.markdown if m.value.startswith("#### ")]
    assert headings[:2] == ["#### CNN-GRU", "#### GIT"]
    assert captions_shown(at) == [served_caption(models, "cnn_gru", data), served_caption(models, "git", data)]
    assert len(at.metric) == 2
    assert any(m.value == f"**Published caption:** {backend.escape_markdown(example.caption)}" for m in at.markdown)
    assert any("CC BY" in c.value and "ncbi.nlm.nih.gov/pmc" in c.value for c in at.caption)
    assert [d.label for d in at.get("download_button")] == ["Download the result (JSON)"]
    # where each word looked: a word selector and an overlay per model
    assert [s.label for s in at.selectbox if s.key and s.key.startswith("word_")] == ["Word", "Word"]
    assert len(at.get("image")) >= 3  # the image and two overlays


def test_upload_png_and_beam_candidates(env, models):
    env(artifacts=models["artifacts"], runs=models["runs"])
    at = start_app()
    data = png(1)
    upload(at, "scan.png", data, "image/png")
    assert not at.error
    assert captions_shown(at) == [served_caption(models, n, data) for n in ("cnn_gru", "git")]
    at.radio(key="sampler").set_value("beam").run()
    assert captions_shown(at) == [served_caption(models, n, data, "beam_search") for n in ("cnn_gru", "git")]
    assert len(at.table) == 2  # the best beam beside the greedy caption, per model
    assert not any("beam width is fixed at 3" in c.value for c in at.caption)  # width 3 asked = exported
    at.slider(key="num_beams").set_value(4).run()
    assert any("beam width is fixed at 3" in c.value for c in at.caption)


def test_keras_source_lists_beams_and_honours_max_length(env, models):
    env(artifacts=models["artifacts"], runs=models["runs"])
    at = start_app()
    at.radio(key="source").set_value("keras")
    at.radio(key="sampler").set_value("beam")
    at.select_slider(key="max_length").set_value(8)
    upload(at, "scan.png", png(2), "image/png")
    assert not at.error, [e.value for e in at.error]
    shown = captions_shown(at)
    assert len(shown) == 2 and len(at.table) == 2
    for caption, table in zip(shown, at.table):
        rows = table.value
        assert rows.iloc[0]["caption"] == caption  # the best beam is the caption
        assert list(rows.iloc[:, 0]) == [f"beam {i + 1}" for i in range(len(rows))]
    assert any("beam search, width 3, at most 8 tokens" in c.value for c in at.caption)


@pytest.mark.parametrize("name, data, message", [
    ("empty.png", b"", "empty"),
    ("notes.png", b"these are notes, not an image", "not a PNG, JPEG or DICOM"),
    ("cut.png", png(4, (200, 200))[:300], "truncated or corrupt"),
    ("bomb.png", png_bomb(), "too large"),
    ("no_pixels.dcm", dicom(with_pixels=False), "no pixel data"),
])
def test_bad_upload_shows_an_error_and_the_app_keeps_working(env, models, name, data, message):
    env(artifacts=models["artifacts"], runs=models["runs"])
    at = start_app()
    upload(at, name, data)
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and message in errors[0], errors
    assert not captions_shown(at)
    good = png(5)
    upload(at, "good.png", good, "image/png")
    assert not at.error
    assert captions_shown(at) == [served_caption(models, n, good) for n in ("cnn_gru", "git")]


def test_upload_over_the_size_limit_is_refused(env, models, monkeypatch):
    env(artifacts=models["artifacts"], runs=models["runs"])
    monkeypatch.setenv("MEDCAP_MAX_UPLOAD_MB", "0.001")
    at = start_app()
    upload(at, "big.png", png(6, (200, 200)), "image/png")
    assert len(at.error) == 1 and "too large" in at.error[0].value and "limit" in at.error[0].value


def test_dicom_is_windowed_and_no_patient_field_is_shown(env, models):
    from pipelines.dicom import dicom_to_png

    env(artifacts=models["artifacts"], runs=models["runs"])
    at = start_app()
    data = dicom()
    upload(at, "scan.dcm", data)
    assert not at.error, [e.value for e in at.error]
    assert any(img.captions == ["DICOM, 64 x 64 px"] for img in at.get("image"))
    windowed = dicom_to_png(data)
    assert captions_shown(at) == [served_caption(models, n, windowed) for n in ("cnn_gru", "git")]
    assert at.json and json.loads(at.json[0].value)["Modality"] == "CT"
    page = everything_shown(at)
    for secret in ("DOE", "JANE", "MRN-0042", "19700101", "St Example"):
        assert secret not in page
    image = backend.prepare_upload(data)
    download = backend.result_json([backend.caption(backend.load_captioner(
        backend.find_saved_models(models["artifacts"])["git"]), image, backend.GenerationSettings())], image)
    assert "DOE" not in download and "JANE" not in download and "MRN" not in download


def test_odd_jpegs_upload_cmyk_as_it_is_and_an_exif_rotated_one_upright():
    cmyk, rotated, exif = io.BytesIO(), io.BytesIO(), Image.Exif()
    Image.new("CMYK", (30, 20), (0, 160, 255, 0)).save(cmyk, format="JPEG")  # once "truncated or corrupt"
    image = backend.prepare_upload(cmyk.getvalue())
    assert image.kind == "JPEG" and image.data == cmyk.getvalue() and (image.height, image.width) == (20, 30)
    exif[0x0112] = 8  # viewers rotate it 90 degrees counter-clockwise
    Image.new("L", (30, 20), 99).save(rotated, format="JPEG", exif=exif)
    image = backend.prepare_upload(rotated.getvalue())
    assert image.kind == "JPEG (EXIF orientation 8 applied: sent upright as PNG)" and image.data.startswith(b"\x89PNG")
    assert (image.height, image.width) == (30, 20)


def test_without_keras_models_attention_says_what_it_needs(env, models):
    env(artifacts=models["artifacts"])
    at = start_app()
    upload(at, "scan.png", png(7), "image/png")
    assert len(captions_shown(at)) == 2
    assert any("Attention maps need the trained `.keras` models" in i.value for i in at.info)


def test_server_source(env, models, tmp_path):
    config = REPO / "serving" / "config" / "models.config"
    args = ["--model_config_file", str(config), "--model_base_path_root", str(models["artifacts"])]
    with ServerProcess(args, tmp_path / "server.log") as server:
        env(server=server.grpc_address)
        at = start_app()
        assert at.radio(key="source").value == "server"
        data = png(8)
        upload(at, "scan.png", data, "image/png")
        assert not at.error, [e.value for e in at.error]
        assert captions_shown(at) == [served_caption(models, n, data) for n in ("cnn_gru", "git")]
        assert any("TF Serving server (gRPC), version 1" in c.value for c in at.caption)


def test_unreachable_server_is_reported(env):
    env(server=f"127.0.0.1:{free_port()}")
    at = start_app()
    assert any("cannot reach" in w.value for w in at.warning)
    assert any("No captioning model was found" in i.value for i in at.info)


# --- the backend on its own ----------------------------------------------------------------------


def test_latest_complete_version_is_found(tmp_path, models):
    base = tmp_path / "serving"
    shutil.copytree(models["artifacts"] / "git" / "1", base / "git" / "3")
    (base / "git" / "7").mkdir(parents=True)  # incomplete: no saved_model.pb
    (base / "git" / ".tmp-9-abc").mkdir()
    assert backend.find_saved_models(base)["git"].version == "3"
    assert backend.find_saved_models(tmp_path / "missing") == {}


def test_keras_beam_candidates_start_with_generate(models):
    captioner = backend.load_captioner(backend.find_keras_models(
        backend.AppSettings(runs_dir=str(models["runs"])))["git"])
    image = backend.prepare_upload(png(9))
    settings = backend.GenerationSettings("beam", 4, 9, True)
    result = backend.caption(captioner, image, settings)
    expected = captioner.model.generate(captioner.pixels(image.data), sampler="beam", num_beams=4, max_length=9)
    assert result.caption == expected[0] == result.candidates[0]["caption"]
    assert len({c["caption"] for c in result.candidates}) == len(result.candidates) <= 4
    record = json.loads(backend.result_json([result], image))["results"][0]
    assert record["model"] == "git" and record["settings"] == {"sampler": "beam", "num_beams": 4, "max_length": 9}
    assert record["caption"] == result.caption and record["score"] == pytest.approx(result.score)
    assert record["image"]["sha256"] == image.sha256


def test_examples_carry_their_licence():
    examples = backend.list_examples()
    assert len(examples) == 24
    assert all(e.caption and Path(e.path).is_file() and e.licence.startswith("CC") for e in examples)


# --- a real browser -------------------------------------------------------------------------------


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install -y chromium)")
def test_upload_in_a_headless_browser(models, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (never `playwright install`)")
    example = backend.list_examples()[2]  # a real MRI figure (CC BY) from pipelines/examples
    data = Path(example.path).read_bytes()
    image = tmp_path / "scan.jpg"
    image.write_bytes(data)
    expected = served_caption(models, "git", data)
    port = free_port()
    env = {**os.environ, "MEDCAP_ARTIFACTS_DIR": str(models["artifacts"]), "MEDCAP_RUNS_DIR": str(models["runs"]),
           "MEDCAP_SERVER": "", "MEDCAP_RUN_DIR": "", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true", "--server.port", str(port),
               "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none"]
    log = open(tmp_path / "streamlit.log", "wb")
    app = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    screenshot = tmp_path / "app.png"
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
                viewport={"width": 1400, "height": 1700},
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = browser.new_page()
            deadline = time.monotonic() + 60
            while True:  # streamlit needs a few seconds to open its port
                try:
                    page.goto(f"http://127.0.0.1:{port}/", timeout=10_000)
                    break
                except playwright.Error:
                    if time.monotonic() > deadline or app.poll() is not None:
                        raise
                    time.sleep(1)
            page.locator("input[type=file]").set_input_files(str(image), timeout=90_000)
            try:
                page.locator(".st-key-caption_git", has_text=expected).wait_for(timeout=150_000)
                overlays = page.get_by_text("attention over the image as the model frames it")
                overlays.nth(1).wait_for(timeout=120_000)  # both models' "where each word looked"
                page.locator("[data-testid=stStatusWidget]").wait_for(state="hidden", timeout=60_000)  # finished
                page.wait_for_timeout(1000)  # let the images paint
            finally:
                page.screenshot(path=str(screenshot), full_page=True)
                (tmp_path / "page.txt").write_text(page.inner_text("body"))
            texts = [page.locator(f".st-key-caption_{name}").inner_text().strip() for name in ("cnn_gru", "git")]
            browser.close()
    finally:
        app.terminate()
        app.wait(20)
        log.close()
    shutil.copy(screenshot, "/tmp/app_screenshot.png")
    assert texts == [served_caption(models, "cnn_gru", data), expected], (tmp_path / "streamlit.log").read_text()[-3000:]
