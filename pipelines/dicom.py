"""DICOM -> 8-bit PNG for the captioner, without ever exposing who the patient is.

The model reads only PNG and JPEG, so the client turns a DICOM file into PNG bytes here:
modality rescale (slope/intercept), then the VOI LUT or window centre/width (min/max of the
frame when the file has neither), MONOCHROME1 inverted, the middle frame of a multi-frame
image, colour kept as RGB (YBR converted). Compressed pixel data is decoded by pydicom (RLE, baseline JPEG)
and the handlers medcap installs beside it: GDCM (JPEG Lossless, JPEG-LS, JPEG 2000), pylibjpeg-openjpeg (HTJ2K).

Privacy: only the PNG pixels leave the machine. Patient-identifying fields are never logged,
printed, put in exception messages or returned: errors carry only technical facts (transfer
syntax, pixel layout), `safe_metadata` returns a whitelist of technical fields, and
`strip_identifiers` removes the identifying attributes of the DICOM basic de-identification
profile (PS3.15 Annex E) from a copy of a dataset. Text burned into the pixels themselves
cannot be removed here; such files set BurnedInAnnotation = YES, which is logged as a warning.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.valuerep import VR
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder

logger = logging.getLogger(__name__)

MAX_PIXELS = 50_000_000  # per frame, as pipelines.images allows
PREAMBLE_LENGTH = 128
MAGIC = b"DICM"
_VRS = {vr.value.encode() for vr in VR if len(vr.value) == 2}
PYDICOM_LOGGERS = ("pydicom", "pydicom.pixels.decoders.base", "pydicom.pixels.utils")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# Technical, non-identifying fields `safe_metadata` may return (StudyDescription and the like are
# free text that can name a patient, so they are not here).
SAFE_FIELDS = (
    "Modality", "BodyPartExamined", "ViewPosition", "ImageLaterality", "Rows", "Columns",
    "NumberOfFrames", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
    "PixelRepresentation", "PixelSpacing", "ImagerPixelSpacing", "SliceThickness", "RescaleSlope",
    "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth", "VOILUTFunction",
)

# The main attributes the DICOM basic application level confidentiality profile (PS3.15 Table
# E.1-1) removes. All person names (VR PN), dates and times (DA, DT, TM) and private tags go too,
# and instance UIDs are replaced.
IDENTIFYING_KEYWORDS = (
    # patient
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime",
    "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "PatientAddress",
    "PatientTelephoneNumbers", "PatientMotherBirthName", "PatientBirthName", "OtherPatientIDs",
    "OtherPatientNames", "OtherPatientIDsSequence", "PatientComments", "PatientReligiousPreference",
    "PatientState", "PatientInsurancePlanCodeSequence", "PatientPrimaryLanguageCodeSequence",
    "MedicalRecordLocator", "MilitaryRank", "BranchOfService", "EthnicGroup", "Occupation",
    "AdditionalPatientHistory", "MedicalAlerts", "Allergies", "LastMenstrualDate", "SpecialNeeds",
    "PregnancyStatus", "SmokingStatus", "CountryOfResidence", "RegionOfResidence",
    "ResponsiblePerson", "ResponsibleOrganization", "CurrentPatientLocation", "PatientInstitutionResidence",
    "ReferencedPatientSequence", "ReferencedPatientPhotoSequence",
    # study / visit
    "AccessionNumber", "StudyID", "AdmissionID", "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence", "StudyDescription", "SeriesDescription", "ImageComments",
    "RequestedProcedureDescription", "PerformedProcedureStepDescription", "PerformedProcedureStepID",
    "RequestAttributesSequence", "RequestedProcedureID", "ScheduledProcedureStepID",
    "ReasonForStudy", "RequestingService", "ContentSequence", "DerivationDescription",
    "StudyComments", "RequestedProcedureComments", "ImagingServiceRequestComments",
    "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
    "ScheduledProcedureStepDescription", "AcquisitionComments", "FrameComments", "TextComments",
    # dates and times
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime",
    "AcquisitionTime", "ContentTime", "AcquisitionDateTime", "InstanceCreationDate",
    "InstanceCreationTime",
    # institution, staff and device
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "InstitutionCodeSequence", "ReferringPhysicianName", "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers", "ReferringPhysicianIdentificationSequence",
    "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence", "PerformingPhysicianName",
    "PerformingPhysicianIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "OperatorsName",
    "OperatorIdentificationSequence", "RequestingPhysician", "ScheduledPerformingPhysicianName",
    "StationName", "ScheduledStationName", "PerformedStationName", "PerformedLocation",
    "ScheduledProcedureStepLocation", "DeviceSerialNumber", "ProtocolName", "ContentCreatorName",
    "VerifyingObserverName", "PersonName",
)
_DROP_VRS = ("PN", "DA", "DT", "TM")
DEIDENTIFICATION_METHOD = "medcap: PS3.15 E.1-1 basic profile, UIDs replaced"  # LO: 64 chars max


class DicomError(ValueError):
    """A DICOM file that cannot become a PNG; the message holds technical facts only."""


def _drop_record(record: logging.LogRecord) -> bool:
    """A logging filter that drops every record."""
    return False


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence pydicom's warnings and log records, which may quote element values (a patient's name)."""
    loggers = [logging.getLogger(name) for name in PYDICOM_LOGGERS]
    for each in loggers:
        each.addFilter(_drop_record)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for each in loggers:
            each.removeFilter(_drop_record)


# --- reading -----------------------------------------------------------------------------------


def is_dicom(data: bytes) -> bool:
    """True for DICOM bytes: 'DICM' at offset 128, or a dataset written without the preamble."""
    head = bytes(data[: PREAMBLE_LENGTH + 4])
    return head[PREAMBLE_LENGTH:] == MAGIC or _starts_with_element(head, len(data))


def _starts_with_element(head: bytes, size: int) -> bool:
    """True when `head` opens with a plausible group 0002 or 0008 element (explicit or implicit VR)."""
    if len(head) < 8 or int.from_bytes(head[:2], "little") not in (0x0002, 0x0008):
        return False
    if head[4:6] in _VRS:
        return True
    return int.from_bytes(head[4:8], "little") <= size - 8  # implicit VR: a 4-byte length that fits


def _read(data: bytes | str | Path) -> Dataset:
    """Parse DICOM bytes or a file into a Dataset."""
    raw = Path(data).read_bytes() if isinstance(data, (str, Path)) else bytes(data)
    if not raw:
        raise DicomError("Not a DICOM file: the input is empty.")
    if not is_dicom(raw[: 64 * 1024]):
        raise DicomError("Not a DICOM file: no 'DICM' marker at byte 128 and no DICOM header at the start.")
    try:
        ds = pydicom.dcmread(io.BytesIO(raw), force=True)
        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        _ensure_transfer_syntax(ds)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types; its messages may quote values
        raise DicomError(f"Not a readable DICOM file ({type(e).__name__} while parsing).") from None
    return ds


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Fill in the transfer syntax of a dataset written without file meta information."""
    if ds.file_meta.get("TransferSyntaxUID"):
        return
    implicit, little = getattr(ds, "original_encoding", None) or (True, True)
    if implicit is None or implicit:
        ds.file_meta.TransferSyntaxUID = dicom_uid.ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian if little else dicom_uid.ExplicitVRBigEndian


# --- pixels ------------------------------------------------------------------------------------


def _check_decodable(ds: Dataset) -> None:
    """Raise DicomError when there is no pixel data, it is empty, or no installed handler decodes it."""
    if "PixelData" not in ds:
        other = [k for k in PIXEL_KEYWORDS[1:] if k in ds]
        extra = f" (it has {other[0]}, which is not supported)" if other else ""
        raise DicomError(f"The DICOM file has no pixel data (0x7FE0,0x0010){extra}: nothing to caption.")
    frames = _frame_count(ds)
    if not ds.PixelData or not ds.get("Rows") or not ds.get("Columns") or frames < 1:
        raise DicomError(f"The DICOM image is empty: {ds.get('Rows', 0)} rows x "
                         f"{ds.get('Columns', 0)} columns x {frames} frames, "
                         f"{len(ds.PixelData or b'')} bytes of pixel data.")
    if int(ds.Rows) * int(ds.Columns) > MAX_PIXELS:
        raise DicomError(f"The DICOM image is too large: {ds.Rows}x{ds.Columns} pixels per frame, "
                         f"over the {MAX_PIXELS:,}-pixel limit.")
    syntax = dicom_uid.UID(ds.file_meta.TransferSyntaxUID)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomError(f"Unsupported transfer syntax {syntax} ({syntax.name}): pydicom has no pixel-data "
                         "decoder for it; convert the file to an uncompressed syntax first.") from None
    if not decoder.is_available:
        raise DicomError(
            f"Cannot decode transfer syntax {syntax} ({syntax.name}): no pixel-data handler for it is "
            f"installed. Install one of: {'; '.join(decoder.missing_dependencies)} "
            "(pip install python-gdcm pylibjpeg pylibjpeg-openjpeg, as medcap's setup.py does, decodes JPEG "
            "Lossless, JPEG-LS and JPEG 2000)."
        )


def _frame_count(ds: Dataset) -> int:
    """NumberOfFrames, 1 when absent; DicomError when it is not a whole number (its value is not quoted)."""
    value = ds.get("NumberOfFrames")
    try:
        return 1 if value in (None, "") else int(value)
    except (TypeError, ValueError):
        raise DicomError("NumberOfFrames (0028,0008) is not a whole number.") from None


def _frame(ds: Dataset) -> np.ndarray:
    """The pixels of the only frame, or of the middle one of a multi-frame image (RGB if colour)."""
    frames = _frame_count(ds)
    syntax = dicom_uid.UID(ds.file_meta.TransferSyntaxUID)
    try:
        ds.pixel_array_options(index=frames // 2 if frames > 1 else None, as_rgb=True)
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - pydicom raises many types; report them uniformly
        raise DicomError(f"Could not decode the pixel data ({syntax.name}, {ds.get('Rows')}x"
                         f"{ds.get('Columns')}, {frames} frames): {type(e).__name__}.") from None
    if arr.size == 0:
        raise DicomError("The DICOM image is empty: its frame has no pixels.")
    return arr


def _unit_range(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto [0, 1], clipping; a flat image becomes 0."""
    if not np.isfinite([low, high]).all() or high <= low:
        return np.zeros(arr.shape, np.float64)
    return np.clip((arr.astype(np.float64) - low) / (high - low), 0.0, 1.0)


def _voi_output_range(ds: Dataset) -> tuple[float, float] | None:
    """The value range apply_voi_lut maps onto (VOI LUT depth or window y-range); None without VOI."""
    item = (ds.get("VOILUTSequence") or [None])[0]
    if item is not None and item.get("LUTDescriptor") and item.get("LUTData") is not None:
        return 0.0, float(2 ** int(item.LUTDescriptor[2]) - 1)
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    with np.errstate(over="ignore"):
        low, high = apply_voi_lut(np.array([-1e30, 1e30]), ds)  # both ends of the output range
    return float(low), float(high)


def _greyscale(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Monochrome pixels -> [0, 1]: rescale, VOI LUT or window (else frame min/max), MONOCHROME1 inverted."""
    values = apply_modality_lut(arr, ds)
    try:
        output_range = _voi_output_range(ds)
        if output_range is not None:
            if ds.get("VOILUTSequence") and not np.issubdtype(values.dtype, np.integer):
                values = np.rint(values).astype(np.int64)  # a VOI LUT is indexed by integers
            values = apply_voi_lut(values, ds)
    except (ValueError, NotImplementedError, AttributeError, IndexError, TypeError) as e:
        logger.warning("Ignoring an invalid VOI LUT/window (%s); using the frame's min/max.", type(e).__name__)
        output_range, values = None, apply_modality_lut(arr, ds)
    low, high = output_range or (float(np.min(values)), float(np.max(values)))
    unit = _unit_range(values, low, high)
    return 1.0 - unit if ds.get("PhotometricInterpretation") == "MONOCHROME1" else unit


def _colour(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Colour or palette pixels -> RGB in [0, 1] (pydicom already converted YBR to RGB)."""
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        return arr.astype(np.float64) / (255.0 if arr.dtype == np.uint8 else 65535.0)
    bits = int(ds.get("BitsStored") or 8)
    return _unit_range(arr, 0.0, float(2**bits - 1))


def _to_png(unit: np.ndarray) -> bytes:
    """[0, 1] greyscale [H, W] or RGB [H, W, 3] -> 8-bit PNG bytes (no metadata)."""
    pixels = np.round(unit * 255.0).astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # uint8 [H, W] -> L, [H, W, 3] -> RGB
    return buffer.getvalue()


@_quiet()
def dicom_to_png(data: bytes | str | Path) -> bytes:
    """One DICOM image (bytes or file) -> 8-bit PNG bytes of its (middle) frame, display-ready."""
    ds = _read(data)
    try:
        _check_decodable(ds)
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            logger.warning("This DICOM image has burned-in annotations: text in its pixels may identify the patient.")
        arr = _frame(ds)
        is_colour = int(ds.get("SamplesPerPixel") or 1) > 1 or ds.get("PhotometricInterpretation") == "PALETTE COLOR"
        unit = _colour(arr, ds) if is_colour else _greyscale(arr, ds)
        logger.debug("DICOM -> PNG: %s", safe_metadata(ds))
        return _to_png(unit)
    except DicomError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed field (RescaleSlope "abc"): its value may name a patient
        raise DicomError(f"The DICOM file has a malformed pixel-related field ({type(e).__name__} while "
                         "converting its pixels).") from None


# --- privacy -----------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A pydicom value as a JSON-friendly Python value."""
    if isinstance(value, (MultiValue, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return None
    for kind in (int, float):
        if isinstance(value, kind):
            return kind(value)
    return str(value)


@_quiet()
def safe_metadata(ds: Dataset) -> dict[str, Any]:
    """Only the whitelisted technical fields (SAFE_FIELDS) plus the transfer syntax; nothing about the patient."""
    meta = {k: _plain(ds.get(k)) for k in SAFE_FIELDS if ds.get(k) not in (None, "")}
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    if syntax:
        meta["TransferSyntaxUID"] = str(syntax)
        meta["TransferSyntax"] = dicom_uid.UID(syntax).name
    return meta


def _identifying(elem: pydicom.DataElement) -> bool:
    """True for an element the de-identification removes."""
    overlay_comment = elem.tag.group in range(0x6000, 0x6100, 2) and elem.tag.element == 0x4000
    return elem.keyword in IDENTIFYING_KEYWORDS or elem.VR in _DROP_VRS or overlay_comment


def _replace_uid(value: str, mapping: dict[str, str]) -> str:
    """A fresh UID for an instance UID (same input -> same output), standard UIDs kept."""
    if value in dicom_uid.UID_dictionary:
        return value
    return mapping.setdefault(value, dicom_uid.generate_uid())


def _scrub(ds: Dataset, mapping: dict[str, str]) -> None:
    """Remove identifying elements and replace instance UIDs in `ds` and its sequences, in place."""
    for elem in list(ds):
        if _identifying(elem):
            del ds[elem.tag]
        elif elem.VR == "SQ":
            for item in elem.value:
                _scrub(item, mapping)
        elif elem.VR == "UI" and elem.value:
            values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
            new = [_replace_uid(str(v), mapping) for v in values]
            elem.value = new if isinstance(elem.value, MultiValue) else new[0]


@_quiet()
def strip_identifiers(ds: Dataset) -> Dataset:
    """A copy of `ds` without patient, staff, institution, date and private data; instance UIDs replaced."""
    clean = copy.deepcopy(ds)
    clean.remove_private_tags()
    mapping: dict[str, str] = {}
    _scrub(clean, mapping)
    meta = getattr(clean, "file_meta", None)
    if meta is not None and meta.get("MediaStorageSOPInstanceUID"):
        meta.MediaStorageSOPInstanceUID = _replace_uid(str(meta.MediaStorageSOPInstanceUID), mapping)
    clean.PatientIdentityRemoved = "YES"
    clean.DeidentificationMethod = DEIDENTIFICATION_METHOD
    return clean
