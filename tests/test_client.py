"""serving.client end to end against serving.server: PNG, JPEG and DICOM files (no patient data ever
leaves the machine), bad files reported one by one, retries only on UNAVAILABLE, and TLS."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.dataset import FileDataset, FileMetaDataset

from pipelines.dicom import dicom_to_png
from serving import client as client_cli
from serving.client import CaptionClient, CaptionError, format_table
from serving.testing import REPO, ServerProcess, free_port, jpeg_bytes, png_bytes, write_fake_captioner

PATIENT = "DOE^JANE"
SECRETS = ("DOE", "JANE", "PID-55501", "Mercy General")


def write_dicom(path: Path, pixels: bool = True) -> Path:
    """A 16-bit CT-like DICOM file full of identifying fields."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.InstitutionName = PATIENT, "PID-55501", "Mercy General"
    ds.StudyDescription, ds.Modality = f"CT chest for {PATIENT}", "CT"
    if pixels:
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 16).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("client-models")
    write_fake_captioner(root, "git", 1)
    return root


@pytest.fixture(scope="module")
def server(models, tmp_path_factory) -> ServerProcess:
    log = tmp_path_factory.mktemp("client-server") / "server.log"
    with ServerProcess(["--model_name", "git", "--model_base_path", str(models / "git")], log) as process:
        yield process


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    paths = {"png": tmp_path / "chest.png", "jpeg": tmp_path / "knee.jpg", "dicom": tmp_path / "head.dcm"}
    paths["png"].write_bytes(png_bytes(200, (20, 12)))
    paths["jpeg"].write_bytes(jpeg_bytes(30, (12, 20)))
    write_dicom(paths["dicom"])
    return paths


def test_cli_captions_png_jpeg_and_dicom_and_no_patient_data_leaves(server, files, capsys):
    paths = [str(files[k]) for k in ("png", "jpeg", "dicom")]
    assert client_cli.main(["--server", server.grpc_address, "--model", "git", "--batch-size", "2", *paths]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].split() == ["file", "caption", "score"] and len(lines) == 4
    assert len({line.index("v1 mean=") for line in lines[1:]}) == 1, "captions are aligned in one column"
    png_from_dicom = dicom_to_png(files["dicom"])
    assert f"bytes={len(png_from_dicom)}" in lines[3], "the server received exactly the PNG made from the DICOM"
    assert not any(s.encode() in png_from_dicom for s in SECRETS)
    for text in (out.out, out.err, server.log()):
        assert not any(secret in text for secret in SECRETS)

    assert client_cli.main(["--server", server.grpc_address, "--model", "git", "--json",
                            "--signature", "beam_search", *paths]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in rows] == paths
    assert all(r["error"] is None and r["caption"].startswith("v1 beam mean=") for r in rows)
    assert rows[0]["score"] == pytest.approx(200 / 255, abs=1e-3)


def test_bad_files_are_reported_one_by_one(server, files, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    write_dicom(tmp_path / "empty.dcm", pixels=False)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # passes the client, not the server
    paths = [files["png"], tmp_path / "notes.txt", tmp_path / "corrupt.png", tmp_path / "empty.dcm",
             files["jpeg"], tmp_path / "missing.png"]
    with CaptionClient(server.grpc_address, "git", batch_size=8) as client:
        results = client.caption_files(paths)
    by_name = {Path(r["file"]).name: r for r in results}
    assert by_name["chest.png"]["caption"].startswith("v1 ") and by_name["knee.jpg"]["error"] is None
    assert "not a PNG, JPEG or DICOM" in by_name["notes.txt"]["error"]
    assert "INVALID_ARGUMENT" in by_name["corrupt.png"]["error"]
    assert "no pixel data" in by_name["empty.dcm"]["error"]
    assert "cannot read" in by_name["missing.png"]["error"]

    assert client_cli.main(["--server", server.grpc_address, "--model", "git", *map(str, paths)]) == 1
    out = capsys.readouterr().out
    assert out.count("ERROR: ") == 4 and not any(secret in out for secret in SECRETS)


def test_an_exif_rotated_jpeg_is_sent_as_the_upright_png_a_viewer_shows(tmp_path):
    from PIL import Image

    path, exif = tmp_path / "phone_photo.jpg", Image.Exif()
    exif[0x0112] = 6
    Image.new("L", (20, 12), 99).save(path, format="JPEG", exif=exif)
    sent = client_cli.read_image(path)
    assert sent.startswith(b"\x89PNG") and Image.open(io.BytesIO(sent)).size == (12, 20)
    (tmp_path / "rgb.jpg").write_bytes(jpeg_bytes(30, (12, 20)))
    assert client_cli.read_image(tmp_path / "rgb.jpg") == (tmp_path / "rgb.jpg").read_bytes()  # as it is


def test_python_api_status_metadata_and_errors_without_retry(server):
    with CaptionClient(server.grpc_address, "git") as client:
        assert client.status() == [{"version": 1, "state": "AVAILABLE", "error_code": "OK", "error_message": ""}]
        metadata = client.metadata()
        assert metadata["version"] == 1
        assert metadata["signatures"]["serving_default"]["inputs"] == {"images": {"dtype": "string", "shape": [-1]}}
        assert set(metadata["signatures"]) == {"serving_default", "beam_search"}
        answers = client.caption([png_bytes(0), jpeg_bytes(255)] * 5)  # 10 images in batches of 8 and 2
        assert len(answers) == 10 and answers[1]["score"] == pytest.approx(1.0, abs=1e-3)
        with pytest.raises(CaptionError) as bad:
            client.caption([b"junk"])
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and client.attempts == 1
    with CaptionClient(server.grpc_address, "nope") as client:
        with pytest.raises(CaptionError) as missing:
            client.caption([png_bytes()])
        assert missing.value.code == grpc.StatusCode.NOT_FOUND and client.attempts == 1


def test_format_table_aligns_columns():
    table = format_table([{"file": "a.png", "caption": "one", "score": -0.5, "error": None},
                          {"file": "long_name.dcm", "caption": None, "score": None, "error": "DICOM: no pixels"}])
    lines = table.splitlines()
    assert lines[1].index("one") == lines[2].index("ERROR: DICOM") == lines[0].index("caption")
    assert lines[1].endswith("-0.500") and lines[2].endswith("no pixels")


def test_client_never_starts_tensorflow():
    code = ("import sys, serving.client\n"
            "assert 'tensorflow.python' not in sys.modules, 'TensorFlow was imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_retries_on_unavailable_until_the_server_is_up(models, tmp_path, caplog):
    port = free_port()
    with CaptionClient(f"127.0.0.1:{port}", "git", retries=2, backoff=0.05) as client:
        with pytest.raises(CaptionError) as down:
            client.caption([png_bytes()])
        assert down.value.code == grpc.StatusCode.UNAVAILABLE and client.attempts == 3

    server = ServerProcess(["--model_name", "git", "--model_base_path", str(models / "git")], tmp_path / "late.log",
                           grpc_port=port).start()  # not waiting: the client's first calls find no server
    try:
        with caplog.at_level(logging.WARNING, logger="serving.client"):
            with CaptionClient(server.grpc_address, "git", retries=40, backoff=0.25, max_backoff=1.0,
                               timeout=10) as client:
                answer = client.caption([png_bytes()])
        assert answer[0]["caption"].startswith("v1 ") and client.attempts > 1
        assert "UNAVAILABLE" in caplog.text and "retry 1 of 40" in caplog.text
    finally:
        assert server.stop() == 0


def _text_proto_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of ASCII PEM is a valid text-format string literal


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_tls(models, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    ssl_config = tmp_path / "ssl.config"
    ssl_config.write_text(f"server_key: {_text_proto_string(key.read_text())}\n"
                          f"server_cert: {_text_proto_string(cert.read_text())}\n")
    args = ["--model_name", "git", "--model_base_path", str(models / "git"), "--ssl_config_file", str(ssl_config)]
    with ServerProcess(args, tmp_path / "tls.log") as server:
        address = f"localhost:{server.grpc_port}"
        with CaptionClient(address, "git", root_certificates=cert.read_bytes()) as client:
            assert client.caption([png_bytes()])[0]["caption"].startswith("v1 ")
        with CaptionClient(address, "git", retries=0, timeout=5) as plain:
            with pytest.raises(CaptionError) as refused:
                plain.caption([png_bytes()])
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert "(TLS)" in server.log()
