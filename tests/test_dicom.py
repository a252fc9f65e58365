"""DICOM -> PNG: windowing, inversion, frames, colour, clear errors, and no patient data anywhere."""

from __future__ import annotations

import io
import logging
import types
import warnings

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space, get_decoder

from pipelines.dicom import DicomError, dicom_to_png, is_dicom, safe_metadata, strip_identifiers

NAME, PATIENT_ID, INSTITUTION = "DOE^JANE", "PID93518274", "St Elsewhere Hospital"
SECRETS = (NAME, "DOE", "JANE", PATIENT_ID, INSTITUTION, "19700101", "Dr^Who", "SecretVendorNote")


def _dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", syntax: str = uid.ExplicitVRLittleEndian,
             **attrs) -> FileDataset:
    """A CT-like DICOM dataset holding `pixels` ([frames,] rows, cols[, 3]) and identifying fields."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset("test.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid.generate_uid(), uid.generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID, "19700101"
    ds.PatientSex, ds.InstitutionName, ds.ReferringPhysicianName = "F", INSTITUTION, "Dr^Who"
    ds.StudyDate, ds.StudyDescription, ds.Modality = "20240102", f"CT head for {NAME}", "CT"
    ds.private_block(0x0011, "ACME", create=True).add_new(0x01, "LO", "SecretVendorNote")
    colour = pixels.shape[-1] == 3 and photometric != "MONOCHROME2" and photometric != "MONOCHROME1"
    frames = pixels.shape[0] if pixels.ndim == (4 if colour else 3) else 1
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3 if colour else 1), photometric
    if colour:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, min(bits, 12), min(bits, 12) - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _bytes(ds: Dataset, file_format: bool = True) -> bytes:
    """The dataset written as a DICOM file (or as a bare dataset without preamble)."""
    buffer = io.BytesIO()
    if file_format:
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    else:
        pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)
    return buffer.getvalue()


def _png(data: bytes) -> np.ndarray:
    """Decode PNG bytes to an array, checking they are a PNG."""
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return np.asarray(Image.open(io.BytesIO(data)))


def _assert_private(*texts: str | bytes) -> None:
    """No identifying value appears in any of `texts`."""
    for text in texts:
        for secret in SECRETS:
            needle = secret.encode() if isinstance(text, bytes) else secret
            assert needle not in text, f"{secret!r} leaked"


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


def _ct(**attrs) -> FileDataset:
    """12-bit CT, HU = 2 * stored - 1024, window 40/400: HU -1000, -160, 40, 240, 1000, -200."""
    hu = np.array([[-1000, -160, 40], [240, 1000, -200]])
    stored = ((hu + 1024) // 2).astype(np.uint16)
    defaults = dict(RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    return _dataset(stored, **{**defaults, **attrs})


def test_ct_rescale_then_window(logs):
    data = _bytes(_ct())
    png = dicom_to_png(data)
    pixels = _png(png)
    assert pixels.shape == (2, 3) and pixels.dtype == np.uint8
    # LINEAR window 40/400: HU <= -160 -> 0, HU > 239 -> 255, centre -> mid-grey.
    assert pixels[0, 0] == 0 and pixels[0, 1] == 0 and pixels[1, 2] == 0
    assert pixels[1, 0] == 255 and pixels[1, 1] == 255
    assert 127 <= pixels[0, 2] <= 128
    _assert_private(png, logs.text)


def test_no_window_uses_frame_min_max():
    ds = _ct()
    del ds.WindowCenter, ds.WindowWidth
    pixels = _png(dicom_to_png(_bytes(ds)))
    assert pixels[0, 0] == 0 and pixels[1, 1] == 255  # HU -1000 is the minimum, 1000 the maximum
    assert pixels[0, 2] == round((40 + 1000) / 2000 * 255)


def test_voi_lut_sequence_is_applied():
    ds = _ct()
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4, 0, 8])  # 4 entries from stored value 0, 8-bit output
    item.add_new("LUTData", "US", [0, 85, 170, 255])
    ds.VOILUTSequence = [item]
    del ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth
    ds.PixelData = np.array([[0, 1, 2], [3, 9, 0]], np.uint16).tobytes()
    assert _png(dicom_to_png(_bytes(ds))).tolist() == [[0, 85, 170], [255, 255, 0]]


def test_monochrome1_is_inverted():
    plain = _png(dicom_to_png(_bytes(_ct())))
    inverted = _png(dicom_to_png(_bytes(_ct(PhotometricInterpretation="MONOCHROME1"))))
    assert inverted[0, 0] == 255 and inverted[1, 0] == 0
    np.testing.assert_array_equal(inverted.astype(int), 255 - plain.astype(int))


def test_multiframe_takes_the_middle_frame():
    frames = np.stack([np.full((4, 5), v, np.uint16) for v in (200, 600, 1000)])
    ds = _dataset(frames, WindowCenter=500.5, WindowWidth=1000)  # maps stored 0..999 onto 0..255 linearly
    pixels = _png(dicom_to_png(_bytes(ds)))
    assert pixels.shape == (4, 5)
    expected = round(((600 - 500) / 999 + 0.5) * 255)
    assert np.all(np.abs(pixels.astype(int) - expected) <= 1)


def test_rgb_stays_rgb():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 128, 250
    ds = _dataset(rgb, photometric="RGB", BitsStored=8, HighBit=7)
    pixels = _png(dicom_to_png(_bytes(ds)))
    assert pixels.shape == (4, 6, 3)
    np.testing.assert_array_equal(pixels, rgb)


def test_ybr_becomes_rgb():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 60, 30
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ds = _dataset(ybr, photometric="YBR_FULL", BitsStored=8, HighBit=7)
    pixels = _png(dicom_to_png(_bytes(ds)))
    assert np.abs(pixels.astype(int) - rgb.astype(int)).max() <= 2


def test_file_paths_and_files_without_preamble(tmp_path):
    path = tmp_path / "ct.dcm"
    path.write_bytes(_bytes(_ct()))
    expected = dicom_to_png(path)
    assert dicom_to_png(str(path)) == expected
    bare = Dataset()
    bare.update(_ct())
    raw = _bytes(bare, file_format=False)
    assert raw[128:132] != b"DICM" and is_dicom(raw)
    assert dicom_to_png(raw) == expected


@pytest.mark.parametrize("data", [b"", b"hello, world" * 20, b"\x89PNG\r\n\x1a\n" + b"\0" * 200,
                                  b"\0" * 128 + b"DICX" + b"\0" * 64])
def test_not_a_dicom(data):
    assert not is_dicom(data)
    with pytest.raises(DicomError, match="Not a DICOM file"):
        dicom_to_png(data)


def test_is_dicom_on_a_real_file():
    assert is_dicom(_bytes(_ct()))


def test_missing_pixel_data(logs):
    ds = _ct()
    del ds.PixelData
    with pytest.raises(DicomError, match="no pixel data") as error:
        dicom_to_png(_bytes(ds))
    _assert_private(str(error.value), logs.text)


@pytest.mark.parametrize("attrs", [dict(Rows=0), dict(NumberOfFrames=0)])
def test_empty_image(attrs, logs):
    ds = _ct(**attrs)
    if "Rows" in attrs:
        ds.PixelData = b""
    with pytest.raises(DicomError, match="empty") as error:
        dicom_to_png(_bytes(ds))
    _assert_private(str(error.value), logs.text)


def test_oversized_frame_is_refused_before_decoding():
    ds = _ct()
    ds.Rows, ds.Columns = 10_000, 10_000  # claims 100 MP; the 12 bytes of pixel data are never decoded
    with pytest.raises(DicomError, match="too large"):
        dicom_to_png(_bytes(ds))


COMPRESSED = [uid.JPEGLSLossless, uid.HTJ2KLossless, uid.JPEGLosslessSV1, uid.JPEG2000Lossless]


@pytest.mark.parametrize("syntax", COMPRESSED, ids=lambda s: s.name)
def test_compressed_syntaxes_of_pacs_archives_decode_with_what_medcap_installs(syntax):
    assert get_decoder(syntax).is_available, get_decoder(syntax).missing_dependencies


def _gdcm_compressed(data: bytes, syntax: str, folder) -> bytes:
    """`data` (a DICOM file) with its pixels compressed by GDCM to `syntax`, as a PACS would store them."""
    import gdcm

    source, target = folder / "in.dcm", folder / "out.dcm"
    source.write_bytes(data)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return target.read_bytes()


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("syntax", [uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.JPEG2000Lossless, uid.RLELossless],
                         ids=lambda s: s.name)
def test_lossless_compressed_ct_gives_the_uncompressed_png(syntax, signed, tmp_path, logs):
    stored = np.random.default_rng(0).integers(0, 4096, (48, 40)) - (2048 if signed else 0)
    ds = _dataset(stored.astype(np.int16 if signed else np.uint16), RescaleSlope=1,
                  RescaleIntercept=0 if signed else -1024, WindowCenter=40, WindowWidth=400)
    ds.PixelRepresentation = int(signed)
    plain = _bytes(ds)
    if syntax == uid.RLELossless:  # pydicom's own encoder
        ds.compress(syntax)
        compressed = _bytes(ds)
    else:
        compressed = _gdcm_compressed(plain, syntax, tmp_path)
    assert pydicom.dcmread(io.BytesIO(compressed)).file_meta.TransferSyntaxUID == syntax
    expected = _png(dicom_to_png(plain))
    assert expected.std() > 0  # the window leaves more than one grey
    np.testing.assert_array_equal(_png(dicom_to_png(compressed)), expected)
    _assert_private(logs.text)


@pytest.mark.parametrize("syntax", COMPRESSED, ids=lambda s: s.name)
def test_compressed_without_a_handler(syntax, logs, monkeypatch):
    import pipelines.dicom

    missing = types.SimpleNamespace(is_available=False, missing_dependencies=["gdcm - requires gdcm>=3.0.10"])
    monkeypatch.setattr(pipelines.dicom, "get_decoder", lambda _: missing)  # as where no handler is installed
    ds = _ct()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 32])
    with pytest.raises(DicomError) as error:
        dicom_to_png(_bytes(ds))
    message = str(error.value)
    assert syntax in message and syntax.name in message and "gdcm" in message and "python-gdcm" in message
    _assert_private(message, logs.text)


def test_transfer_syntax_pydicom_cannot_decode_at_all():
    ds = _ct()
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
    ds.PixelData = encapsulate([b"\0" * 32])
    with pytest.raises(DicomError, match=f"Unsupported transfer syntax {uid.MPEG2MPML}"):
        dicom_to_png(_bytes(ds))


def test_corrupt_pixel_data_is_a_clear_error(logs):
    ds = _ct()
    ds.PixelData = ds.PixelData[:-4]  # shorter than rows x columns
    with pytest.raises(DicomError, match="Could not decode the pixel data") as error:
        dicom_to_png(_bytes(ds))
    _assert_private(str(error.value), logs.text)


def test_no_patient_data_in_output_logs_or_warnings(logs, recwarn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # An invalid DA: pydicom's own warning about it would quote the name.
        data = _bytes(_ct(BurnedInAnnotation="YES", PatientBirthDate=NAME))
    logs.clear()
    recwarn.clear()
    png = dicom_to_png(data)
    clean = strip_identifiers(pydicom.dcmread(io.BytesIO(data)))
    assert "burned-in" in logs.text
    _assert_private(png, _bytes(clean), logs.text, *(str(w.message) for w in recwarn))


def test_safe_metadata_is_technical_only():
    meta = safe_metadata(_ct())
    assert meta["Modality"] == "CT" and meta["Rows"] == 2 and meta["Columns"] == 3
    assert meta["WindowCenter"] == 40 and meta["TransferSyntaxUID"] == uid.ExplicitVRLittleEndian
    assert not {"PatientName", "PatientID", "StudyDescription", "InstitutionName"} & set(meta)
    _assert_private(repr(meta))


def test_strip_identifiers():
    original = _ct()
    clean = strip_identifiers(original)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "InstitutionName",
                    "ReferringPhysicianName", "StudyDate", "StudyDescription"):
        assert keyword not in clean
    assert not any(elem.tag.is_private for elem in clean)
    assert clean.StudyInstanceUID != original.StudyInstanceUID
    assert clean.SOPInstanceUID == clean.file_meta.MediaStorageSOPInstanceUID != original.SOPInstanceUID
    assert clean.SOPClassUID == uid.CTImageStorage and clean.PatientIdentityRemoved == "YES"
    assert original.PatientName == NAME  # the input is left alone
    data = _bytes(clean)
    _assert_private(data)
    assert _png(dicom_to_png(data)).tolist() == _png(dicom_to_png(_bytes(original))).tolist()


@pytest.mark.parametrize("field", ["NumberOfFrames", "RescaleSlope"])
def test_a_malformed_numeric_field_is_a_dicom_error_that_does_not_quote_it(field, logs):
    ds = _ct(**{field: "12345678"})  # then patched in the file's bytes: what a broken writer leaves
    data = _bytes(ds)
    assert data.count(b"12345678") == 1
    with pytest.raises(DicomError) as error:
        dicom_to_png(data.replace(b"12345678", NAME.encode()))
    _assert_private(str(error.value), logs.text)
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_every_listed_keyword_is_a_real_dicom_keyword():
    from pydicom.datadict import tag_for_keyword

    from pipelines.dicom import IDENTIFYING_KEYWORDS, SAFE_FIELDS

    assert [k for k in IDENTIFYING_KEYWORDS + SAFE_FIELDS if tag_for_keyword(k) is None] == []


def test_strip_identifiers_removes_comments_locations_and_order_numbers():
    ds = _ct(StudyComments=f"seen by {NAME}", CurrentPatientLocation="Ward 7, bed 3",
             PlacerOrderNumberImagingServiceRequest="ORD-553", FillerOrderNumberImagingServiceRequest="FIL-42")
    clean = strip_identifiers(ds)
    for keyword in ("StudyComments", "CurrentPatientLocation", "PlacerOrderNumberImagingServiceRequest",
                    "FillerOrderNumberImagingServiceRequest"):
        assert keyword not in clean
