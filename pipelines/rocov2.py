"""ROCOv2 reader: captions CSV + image folder -> validated records, so bad data fails before training.

Layout: ``{root}/{split}_captions.csv`` (``ID,Caption``), images at ``{root}/{split}/{ID}.jpg``
or ``.png`` (an ID may already carry its extension), optional ``{root}/{split}_concepts.csv``
(``ID,CUIs``, ``;``-separated UMLS CUIs). Every row is checked: the image exists, is not empty,
is PNG or JPEG (all the model's TensorFlow decoder reads), is at most ``max_pixels`` by its header
(a decompression bomb is refused without decoding it) and decodes fully; the caption is non-empty
and the ID unique. Image results are cached per split, keyed by (path, size, mtime), so
re-validating an unchanged dataset is instant.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm.auto import tqdm

from pipelines.jpeg_for_model import exif_rotation

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).parent / "examples"
SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {"train": ("train",), "valid": ("valid", "validation", "val"), "test": ("test",)}
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg")
PROBLEM_KINDS = (
    "missing_image",
    "empty_file",
    "truncated_or_corrupt",
    "not_an_image",
    "exif_rotated",
    "too_large",
    "empty_caption",
    "duplicate_id",
)
PROBLEM_HELP = {
    "missing_image": "listed in the CSV but no <ID>.jpg/.png in the split folder",
    "empty_file": "the image file has 0 bytes",
    "truncated_or_corrupt": "the image does not decode fully (truncated download or corrupt data)",
    "not_an_image": "not a PNG or JPEG file; the model's decoder reads only PNG and JPEG "
    "(convert DICOM with pipelines.dicom.dicom_to_png, other formats to PNG)",
    "exif_rotated": "a JPEG whose EXIF orientation asks viewers to rotate or mirror it; TensorFlow's decoder "
    "does not, so the model would learn from pixels unlike what the caption describes (apply it with "
    "`mogrify -auto-orient FILE`)",
    "too_large": "more pixels than max_pixels by its header (refused undecoded: decompression-bomb guard)",
    "empty_caption": "the caption is empty",
    "duplicate_id": "the ID appears more than once in the CSV; the first row is kept",
}
CACHE_VERSION = 2  # 2: EXIF-rotated JPEGs are flagged
CACHE_ENV = "MEDCAP_CACHE_DIR"
_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}  # as pipelines.images sniffs them


class DatasetError(ValueError):
    """The dataset is unusable (strict validation failed, or its CSV is malformed)."""


class DatasetWarning(UserWarning):
    """Rows were skipped because they failed validation."""


@dataclass(frozen=True)
class Record:
    """One valid image-caption pair."""

    id: str
    image_path: str
    caption: str
    concepts: tuple[str, ...] = ()


@dataclass
class ValidationReport:
    """What validating one split found: problem kind -> IDs of the rows skipped for it."""

    split: str
    total: int
    valid: int
    problems: dict[str, list[str]] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)  # ID -> short reason, e.g. "GIF"
    source: str = ""

    @property
    def ok(self) -> bool:
        """True when no row had a problem."""
        return not any(self.problems.values())

    def summary(self, examples: int = 5) -> str:
        """Counts per problem kind with up to `examples` example IDs each."""
        where = f" at {self.source}" if self.source else ""
        lines = [f"ROCOv2 split '{self.split}'{where}: {self.total} rows, {self.valid} valid, "
                 f"{self.total - self.valid} skipped."]
        for kind in PROBLEM_KINDS:
            ids = self.problems.get(kind, [])
            if not ids:
                continue
            shown = ", ".join(_with_detail(i, self.details.get(i)) for i in ids[:examples])
            more = f", ... (+{len(ids) - examples} more)" if len(ids) > examples else ""
            lines.append(f"  {kind}: {len(ids)} ({PROBLEM_HELP[kind]}): {shown}{more}")
        return "\n".join(lines)


def _with_detail(record_id: str, detail: str | None) -> str:
    """`ID` or `ID (detail)`."""
    return f"{record_id} ({detail})" if detail else record_id


# --- CSV ---------------------------------------------------------------------------------------


def _split_names(split: str) -> tuple[str, ...]:
    """`split` first, then its aliases (valid/validation/val)."""
    for names in SPLIT_ALIASES.values():
        if split in names:
            return (split, *[n for n in names if n != split])
    return (split,)


def _find_existing(root: Path, names: tuple[str, ...], suffix: str) -> Path | None:
    """The first `root/{name}{suffix}` that exists."""
    for name in names:
        path = root / f"{name}{suffix}"
        if path.exists():
            return path
    return None


def list_splits(root: str | Path) -> list[str]:
    """The canonical splits (train, valid, test) whose captions CSV exists under `root`."""
    root = Path(root).expanduser()
    return [s for s in SPLITS if _find_existing(root, SPLIT_ALIASES[s], "_captions.csv")]


def _captions_csv(root: Path, split: str) -> Path:
    """The split's captions CSV, or FileNotFoundError naming what was expected and what exists."""
    found = _find_existing(root, _split_names(split), "_captions.csv")
    if found:
        return found
    expected = root / f"{split}_captions.csv"
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset folder {root} does not exist (expected {expected}).")
    existing = sorted(p.name for p in root.glob("*_captions.csv"))
    have = ", ".join(existing) if existing else "none (is this a ROCOv2 folder?)"
    raise FileNotFoundError(f"No captions CSV for split '{split}': expected {expected}. "
                            f"Split CSVs in {root}: {have}.")


def _read_table(path: Path, key: str, value_names: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """(line, key, value) rows of a CSV with a header naming `key` and one of `value_names`."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not UTF-8 text: {e}.") from None
    except csv.Error as e:
        raise DatasetError(f"{path} is not a readable CSV: {e}.") from None
    if not rows:
        raise DatasetError(f"{path} is empty: expected a header '{key},{value_names[0]}'.")
    header = [c.strip().lower() for c in rows[0][1]]
    value_col = next((header.index(v.lower()) for v in value_names if v.lower() in header), None)
    if key.lower() not in header or value_col is None:
        raise DatasetError(f"{path}: header {rows[0][1]} lacks the columns '{key},{value_names[0]}'.")
    key_col = header.index(key.lower())
    return [(n, _cell(row, key_col), _cell(row, value_col)) for n, row in rows[1:]]


def _cell(row: list[str], column: int) -> str:
    """The stripped cell, '' when the row is short."""
    return row[column].strip() if column < len(row) else ""


def _read_concepts(root: Path, split: str) -> dict[str, tuple[str, ...]]:
    """ID -> UMLS CUIs from the optional `{split}_concepts.csv`."""
    path = _find_existing(root, _split_names(split), "_concepts.csv")
    if path is None:
        return {}
    rows = _read_table(path, "ID", ("CUIs", "CUI", "Concepts"))
    return {rid: tuple(c.strip() for c in cuis.split(";") if c.strip()) for _, rid, cuis in rows}


# --- images ------------------------------------------------------------------------------------


def _image_dir(root: Path, split: str) -> Path:
    """The split's image folder (`valid/`, or an alias such as `validation/`)."""
    for name in _split_names(split):
        if (root / name).is_dir():
            return root / name
    return root / split


def _file_names(folder: Path) -> set[str]:
    """Names of the files in `folder` (one directory scan instead of a stat per row)."""
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries if e.is_file()}
    except OSError:
        return set()


def _image_path(folder: Path, names: set[str], record_id: str) -> Path | None:
    """`folder/ID` when the ID carries an extension, else `folder/ID.jpg|.png|.jpeg`; None if absent."""
    candidates = [record_id] if Path(record_id).suffix.lower() in IMAGE_EXTENSIONS else []
    candidates += [f"{record_id}{ext}" for ext in IMAGE_EXTENSIONS]
    candidates += [f"{record_id}{ext.upper()}" for ext in IMAGE_EXTENSIONS]
    return next((folder / c for c in candidates if c in names), None)


def _sniff(path: Path) -> str:
    """'PNG' or 'JPEG' by the magic bytes the model's decoder checks, else ''."""
    with open(path, "rb") as f:
        head = f.read(8)
    return next((fmt for magic, fmt in _MAGIC.items() if head.startswith(magic)), "")


def inspect_image(path: str | Path, max_pixels: int = 50_000_000) -> tuple[str | None, str]:
    """(problem kind or None, short detail) for one image file; never raises."""
    path, fmt = Path(path), ""
    try:
        if path.stat().st_size == 0:
            return "empty_file", ""
        fmt = _sniff(path)
        with Image.open(path) as image:
            if not fmt:
                return "not_an_image", f"{image.format or 'unknown'} file"
            width, height = image.size
            if width * height > max_pixels:
                return "too_large", f"{width}x{height}"
            if exif_rotation(image):
                return "exif_rotated", f"EXIF orientation {exif_rotation(image)}"
            image.load()
        return None, ""
    except FileNotFoundError:
        return "missing_image", ""
    except Image.DecompressionBombError as e:
        return "too_large", str(e).split(",")[0]
    except UnidentifiedImageError:
        return ("not_an_image", "unknown content") if not fmt else ("truncated_or_corrupt", "bad header")
    except Exception as e:  # noqa: BLE001 - one bad file must never stop validation
        return "truncated_or_corrupt", f"{type(e).__name__}: {e}"[:120]


# --- cache -------------------------------------------------------------------------------------


def _cache_home() -> Path:
    """Where caches go when the dataset folder is read-only: $MEDCAP_CACHE_DIR or ~/.cache/medcap."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medcap"


def _writable(folder: Path) -> bool:
    """True when `folder` is writable and not marked read-only (honoured even when running as root)."""
    try:
        mode = folder.stat().st_mode
    except OSError:
        return False
    return os.access(folder, os.W_OK) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def cache_path(root: str | Path, split: str) -> Path:
    """`{root}/.medcap_validation_{split}.json`, or a per-root file under ~/.cache/medcap if root is read-only."""
    root = Path(root).expanduser().absolute()
    if _writable(root):
        return root / f".medcap_validation_{split}.json"
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:16]
    return _cache_home() / f"validation_{digest}_{split}.json"


def _load_cache(path: Path, max_pixels: int) -> dict[str, list]:
    """Cached entries {relative path: [size, mtime_ns, problem, detail]}; {} if stale or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    fits = (data.get("version") == CACHE_VERSION and data.get("max_pixels") == max_pixels
            and isinstance(data.get("entries"), dict))
    return data["entries"] if fits else {}


def _save_cache(path: Path, root: Path, max_pixels: int, entries: dict[str, list]) -> None:
    """Write the cache atomically; a failure only costs speed next time."""
    data = {"version": CACHE_VERSION, "root": str(root), "max_pixels": max_pixels, "entries": entries}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError as e:
        logger.info("Could not write the validation cache %s: %s", path, e)


def _check_images(paths: list[Path], root: Path, split: str, max_pixels: int, workers: int | None,
                  progress: bool) -> dict[Path, tuple[str | None, str]]:
    """Problem (or None) and detail for each image, from the cache or a threaded check."""
    cache_file = cache_path(root, split)
    cached = _load_cache(cache_file, max_pixels)
    results: dict[Path, tuple[str | None, str]] = {}
    entries: dict[str, list] = {}
    todo: list[tuple[Path, str, int, int]] = []
    for path in paths:
        key = os.path.relpath(path, root)
        try:
            st = path.stat()
        except OSError:  # vanished since it was listed: inspect_image reports it
            todo.append((path, key, -1, -1))
            continue
        hit = cached.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            results[path] = (hit[2], hit[3])
            entries[key] = hit
        else:
            todo.append((path, key, st.st_size, st.st_mtime_ns))
    if todo:
        for (path, key, size, mtime), result in zip(todo, _run_checks([t[0] for t in todo], max_pixels,
                                                                       workers, progress, split)):
            results[path] = result
            entries[key] = [size, mtime, *result]
    if todo or len(entries) != len(cached):
        _save_cache(cache_file, root, max_pixels, entries)
    logger.info("Validated %d images of '%s' (%d from cache %s).", len(paths), split,
                len(paths) - len(todo), cache_file)
    return results


def _run_checks(paths: list[Path], max_pixels: int, workers: int | None, progress: bool,
                split: str) -> list[tuple[str | None, str]]:
    """`inspect_image` over `paths` in a thread pool (PIL decodes outside the GIL), with a progress bar."""
    workers = workers or min(16, (os.cpu_count() or 1) + 4)
    truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not load padded with grey
    try:
        with warnings.catch_warnings(), ThreadPoolExecutor(workers) as pool:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # size is judged by max_pixels
            jobs = pool.map(lambda p: inspect_image(p, max_pixels), paths)
            bar = tqdm(jobs, total=len(paths), desc=f"Checking {split} images", unit="img",
                       disable=not progress)
            return list(bar)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated


# --- the reader --------------------------------------------------------------------------------


def read_split(
    root: str | Path,
    split: str,
    *,
    strict: bool = False,
    max_pixels: int = 50_000_000,
    check_images: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[list[Record], ValidationReport]:
    """Read and validate one ROCOv2 split; return its valid records and the report of what was skipped."""
    root = Path(root).expanduser().absolute()
    rows = _read_table(_captions_csv(root, split), "ID", ("Caption",))
    concepts = _read_concepts(root, split)
    folder = _image_dir(root, split)
    report = ValidationReport(split=split, total=len(rows), valid=0, source=str(root))
    candidates = _row_candidates(rows, folder, report)
    checked: dict[Path, tuple[str | None, str]] = {}
    if check_images:
        checked = _check_images(sorted({p for _, _, p in candidates}), root, split, max_pixels,
                                workers, progress)
    records = []
    for record_id, caption, path in candidates:
        problem, detail = checked.get(path, (None, ""))
        if problem:
            _flag(report, problem, record_id, detail)
            continue
        cuis = concepts.get(record_id) or concepts.get(Path(record_id).stem, ())
        records.append(Record(record_id, str(path), caption, cuis))
    report.valid = len(records)
    _raise_or_warn(report, strict)
    return records, report


def _row_candidates(rows: list[tuple[int, str, str]], folder: Path,
                    report: ValidationReport) -> list[tuple[str, str, Path]]:
    """Rows that pass the CSV-level checks (unique ID, caption, image present) with their image path."""
    names = _file_names(folder)
    seen: set[str] = set()
    kept = []
    for line, record_id, caption in rows:
        if record_id in seen:
            _flag(report, "duplicate_id", record_id, f"line {line}")
            continue
        if record_id:
            seen.add(record_id)
        if not record_id:
            _flag(report, "missing_image", f"<line {line}>", "no ID")
        elif not caption:
            _flag(report, "empty_caption", record_id)
        elif (path := _image_path(folder, names, record_id)) is None:
            _flag(report, "missing_image", record_id)
        else:
            kept.append((record_id, caption, path))
    if report.problems.get("missing_image") and not folder.is_dir():
        report.details.setdefault(report.problems["missing_image"][0], f"no folder {folder}")
    return kept


def _flag(report: ValidationReport, kind: str, record_id: str, detail: str = "") -> None:
    """Record one problem row in the report."""
    report.problems.setdefault(kind, []).append(record_id)
    if detail:
        report.details.setdefault(record_id, detail)


def _raise_or_warn(report: ValidationReport, strict: bool) -> None:
    """Strict: raise DatasetError(summary) on any problem; otherwise warn with the summary."""
    if report.ok:
        logger.info("ROCOv2 '%s': all %d rows valid.", report.split, report.total)
        return
    if strict:
        raise DatasetError(report.summary())
    warnings.warn(report.summary(), DatasetWarning, stacklevel=3)
