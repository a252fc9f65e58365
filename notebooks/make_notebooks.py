"""Write the notebooks from the cells below (outputs cleared): `python notebooks/make_notebooks.py`.

Edit a notebook here, not in Jupyter, so the three stay consistent and reviewable as Python.
Every notebook starts with the same parameter cell: FAST (tiny settings, what CI runs; the
environment variable MEDCAP_NOTEBOOK_FAST=0 turns it off), where outputs go, and which real
sample to read (../shared/data/roco-ccby when present, else the bundled pipelines/examples).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

PARAMETERS = '''\
# Parameters: FAST = tiny settings that run in about a minute on 2 CPU cores (what CI runs).
# Set FAST = False (or MEDCAP_NOTEBOOK_FAST=0) for the real thing: the 18,000-image synthetic set and CPU presets.
import os
from pathlib import Path

FAST = os.environ.get("MEDCAP_NOTEBOOK_FAST", "1") != "0"
REPO = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "setup.py").is_file())
OUT = Path(os.environ.get("MEDCAP_NOTEBOOK_OUT", REPO / "runs" / "notebooks"))  # runs/ is not committed
SHARED_SAMPLE = REPO.parent / "shared" / "data" / "roco-ccby"
REAL_SAMPLE = Path(os.environ.get("MEDCAP_REAL_SAMPLE", SHARED_SAMPLE if SHARED_SAMPLE.is_dir() else
                                  REPO / "pipelines" / "examples"))
OUT.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
print(f"FAST={FAST}  outputs: {OUT}  real sample: {REAL_SAMPLE}")'''

SYNTHETIC = '''\
from pipelines.synthetic import ensure_dataset

if FAST:  # a tiny set of its own, so the shared 18,000-image cache is never replaced
    SYNTHETIC_DIR = ensure_dataset(OUT / "synthetic-tiny", workers=1, n_train=96, n_valid=24, n_test=24,
                                   image_size=128, seed=0)
else:  # the set pipelines/train.py uses by default (rendered once into its cache, under a minute)
    from pipelines.train import DEFAULT_CACHE
    from pipelines.training import synthetic_dataset
    SYNTHETIC_DIR = synthetic_dataset(DEFAULT_CACHE)
print(SYNTHETIC_DIR)'''


def notebook(title: str, intro: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook: title and intro, the parameter cell, then (kind, source) cells."""
    nb = new_notebook()
    nb.cells = [new_markdown_cell(f"# {title}\n\n{intro}"), new_code_cell(PARAMETERS)]
    nb.cells += [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
    for index, cell in enumerate(nb.cells):  # stable ids: regenerating changes only cells edited in place
        cell.id = f"cell-{index}"
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    return nb


DATA_EXPLORATION = notebook(
    "01 Data exploration: synthetic and real captions",
    "What the models learn from: the synthetic radiology set (captions determined by what is drawn) and the "
    "real ROCO sample (published figure captions). Caption lengths, the modality mix read by "
    "`pipelines.findings.parse_findings`, which clinical fields captions state, and example images.",
    [
        ("md", "## The two datasets\nBoth are in ROCOv2's layout and read by the same validating reader, "
               "`pipelines.rocov2.read_split`."),
        ("code", SYNTHETIC),
        ("code", '''\
from pipelines.rocov2 import list_splits, read_split

synthetic = {s: read_split(SYNTHETIC_DIR, s, progress=False)[0] for s in list_splits(SYNTHETIC_DIR)}
# FAST skips the per-image decode check (and its cache file) on the real sample: it only reads the CSVs.
real = {s: read_split(REAL_SAMPLE, s, check_images=not FAST, progress=False)[0] for s in list_splits(REAL_SAMPLE)}
for name, splits in (("synthetic", synthetic), ("real", real)):
    print(name, {s: len(r) for s, r in splits.items()})
synthetic_records = [r for records in synthetic.values() for r in records]
real_records = [r for records in real.values() for r in records]
print("\\nsynthetic:", synthetic_records[0].caption, "\\nreal:     ", real_records[0].caption)'''),
        ("md", "## Caption lengths\nIn words and in WordPiece tokens of a vocabulary learned from the synthetic "
               "training captions (what `pipelines/train.py` does), which bounds `sequence_length`."),
        ("code", '''\
import matplotlib.pyplot as plt
import numpy as np

from pipelines.text import build_vocabulary, make_tokenizer, normalize_caption

tokenizer = make_tokenizer(build_vocabulary([r.caption for r in synthetic["train"]], 500 if FAST else 2000))
lengths = {}
for name, records in (("synthetic", synthetic_records), ("real", real_records)):
    captions = [normalize_caption(r.caption) for r in records]
    words = np.array([len(c.split()) for c in captions])
    ids = tokenizer(captions)
    tokens = np.array([len(t) for t in (ids.to_list() if hasattr(ids, "to_list") else ids)])
    lengths[name] = (words, tokens)
    print(f"{name:9s}: words median {np.median(words):.0f} (95th pct {np.percentile(words, 95):.0f}), "
          f"tokens median {np.median(tokens):.0f} (95th pct {np.percentile(tokens, 95):.0f})")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for ax, index, unit in ((axes[0], 0, "words"), (axes[1], 1, "WordPiece tokens (synthetic vocabulary)")):
    for name, values in lengths.items():
        ax.hist(values[index], bins=30, alpha=0.6, density=True, label=name)
    ax.set_xlabel(unit)
    ax.set_ylabel("share of captions")
    ax.legend()
fig.suptitle("Caption lengths")
fig.tight_layout()'''),
        ("md", "## Modality mix and stated fields\n`parse_findings` reads modality, region, view, finding, "
               "laterality and size from any caption; a field it cannot find is None. Real captions often state "
               "only the modality: that is why field accuracy counts only fields the reference states."),
        ("code", '''\
import pandas as pd

from pipelines.findings import FIELDS, parse_findings

parsed = {name: pd.DataFrame([parse_findings(r.caption) for r in records])
          for name, records in (("synthetic", synthetic_records), ("real", real_records))}
modalities = pd.DataFrame({name: df["modality"].fillna("(not stated)").value_counts(normalize=True)
                           for name, df in parsed.items()}).fillna(0).sort_values("real", ascending=False)
stated = pd.DataFrame({name: df[list(FIELDS)].notna().mean() for name, df in parsed.items()})

fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
(100 * modalities).plot.bar(ax=axes[0], rot=30, title="Modality mix (% of captions)")
(100 * stated).plot.bar(ax=axes[1], rot=0, title="Captions stating each field (%)")
fig.tight_layout()
(100 * modalities).round(1)'''),
        ("code", '''\
pd.DataFrame({name: df["region"].value_counts().head(8) for name, df in parsed.items()}).fillna(0).astype(int)'''),
        ("md", "## Example images\nSynthetic images with their captions, then real figures (with their "
               "published captions; licences in `license_information.csv`)."),
        ("code", '''\
import textwrap

from PIL import Image


def show(records, title, n=6):
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.6))
    for ax, record in zip(axes, records[:n]):
        ax.imshow(Image.open(record.image_path).convert("L"), cmap="gray")
        ax.set_title(textwrap.fill(record.caption, 32)[:160], fontsize=7)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()


show(synthetic["train"], "Synthetic")
show(real_records, "Real (ROCO, CC BY)")'''),
        ("code", '''\
licences = pd.read_csv(REAL_SAMPLE / "license_information.csv")
licences["Licence"].value_counts()'''),
    ],
)

TRAIN_AND_COMPARE = notebook(
    "02 Train and compare CNN-GRU and GIT",
    "Both captioners trained by the project's own job (`pipelines/train.py`) on the synthetic set, then compared "
    "with the word-overlap metrics (BLEU, ROUGE, CIDEr) and clinical field accuracy. FAST trains the `tiny` "
    "presets for two epochs on 96 images: the numbers only show that the pipeline runs, not what the models "
    "can do; use FAST = False for real ones.",
    [
        ("code", SYNTHETIC),
        ("md", "## Train\nOne call to `pipelines/train.py`: vocabulary, both models, evaluation on the test split, "
               "plots and `report.md` in a run directory."),
        ("code", '''\
import json

from pipelines.train import main as train

RUNS = OUT / "runs"
args = ["--dataset", str(SYNTHETIC_DIR), "--out", str(RUNS), "--model", "all"]
if FAST:
    args += ["--preset", "tiny", "--epochs", "2", "--batch-size", "16", "--vocab-size", "300", "--sequence-length", "24"]
train(args)
RUN = sorted(p for p in RUNS.glob("*") if (p / "summary.json").is_file())[-1]
summary = json.loads((RUN / "summary.json").read_text())
print(RUN)'''),
        ("md", "## Compare\nThe metrics each model's evaluation wrote (`{model}/metrics.json`), side by side."),
        ("code", '''\
import pandas as pd

from pipelines.report import FIELD_ORDER, METRIC_ORDER

models = summary["models"]
words = pd.DataFrame({m: {k: r["metrics"]["caption_metrics"].get(k) for k in METRIC_ORDER} for m, r in models.items()})
fields = pd.DataFrame({m: {f: r["metrics"]["fields"][f]["accuracy"] for f in FIELD_ORDER} for m, r in models.items()})
cost = pd.DataFrame({m: {"parameters": r["parameters"], "epochs": r["epochs_run"], "train seconds": r["train_seconds"],
                         "images/s captioning": r["metrics"]["images_per_second"]} for m, r in models.items()})
display(words.round(4), (100 * fields).round(1), cost)'''),
        ("code", '''\
%matplotlib inline
# (pipelines.plots selects the Agg backend for scripts; this brings inline figures back)
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
words.drop(index=[m for m in METRIC_ORDER if words.loc[m].isna().all()]).plot.bar(ax=axes[0], rot=0,
                                                                                    title="Word overlap (test)")
(100 * fields).plot.bar(ax=axes[1], rot=20, title="Clinical field accuracy (%)", ylim=(0, 105))
fig.tight_layout()'''),
        ("md", "## Training curves and the run's own plots"),
        ("code", '''\
from IPython.display import Image as Picture, display

for name in models:
    display(Picture(filename=str(RUN / name / "curves.png")))
display(Picture(filename=str(RUN / "field_accuracy.png")))'''),
        ("md", "## Greedy against beam search\nThe same test images captioned by each trained model both ways "
               "(`pipelines.evaluate_lib.predict_captions`)."),
        ("code", '''\
import keras

import keras_models  # noqa: F401  (registers the medcap layers)
from pipelines.evaluate_lib import predict_captions
from pipelines.metrics import field_accuracy, imageclef_preprocess, rouge1_f
from pipelines.rocov2 import read_split

test_records = read_split(SYNTHETIC_DIR, "test", progress=False)[0][: 16 if FAST else 200]
references = [r.caption for r in test_records]
rows = {}
for name in models:
    model = keras.saving.load_model(RUN / name / "model.keras")
    for sampler in ("greedy", "beam"):
        captions = predict_captions(model, test_records, sampler=sampler, num_beams=3)["captions"]
        fields = field_accuracy(references, captions)
        rouge = [rouge1_f(imageclef_preprocess(r), imageclef_preprocess(c)) for r, c in zip(references, captions)]
        rows[(name, sampler)] = {"ROUGE-1 F": sum(rouge) / len(rouge),
                                 "all fields %": 100 * (fields["all_fields"]["accuracy"] or 0),
                                 "example": captions[0]}
print("reference:", test_records[0].caption)
pd.DataFrame(rows).T'''),
        ("code", '''\
print((RUN / "report.md").read_text()[:3000])'''),
    ],
)

SERVING_CLIENT = notebook(
    "03 Serving: export, serve, caption through the gRPC client",
    "The serving path end to end: the trained models become versioned SavedModels (`python -m export`), the "
    "TF-Serving-compatible server (`python -m serving.server`) serves them, and `serving.client.CaptionClient` "
    "captions images over gRPC, as it would against the real TensorFlow Serving.",
    [
        ("md", "## A trained run\nThe latest run of notebook 02 in the same output folder, or a tiny one trained now."),
        ("code", '''\
import json

RUNS = OUT / "runs"
runs = sorted(p for p in RUNS.glob("*") if (p / "summary.json").is_file())
if not runs:
    from pipelines.synthetic import ensure_dataset
    from pipelines.train import main as train

    data = ensure_dataset(OUT / "synthetic-tiny", workers=1, n_train=96, n_valid=24, n_test=24, image_size=128, seed=0)
    train(["--dataset", str(data), "--out", str(RUNS), "--preset", "tiny", "--epochs", "1", "--vocab-size", "300"])
    runs = sorted(p for p in RUNS.glob("*") if (p / "summary.json").is_file())
RUN = runs[-1]
print(RUN)'''),
        ("md", "## Export\nExactly what `python -m export --model RUN --base-dir BASE` does: every model of the run "
               "becomes `BASE/{name}/{version}/` with the `serving_default` (greedy) and `beam_search` signatures."),
        ("code", '''\
from export.__main__ import main as export

BASE = OUT / "serving"
export(["--model", str(RUN), "--base-dir", str(BASE)])
sorted(str(p.relative_to(BASE)) for p in BASE.glob("*/*") if p.name.isdigit())'''),
        ("md", "## Serve\nThe server reads the same config file as TF Serving (`serving/config/models.config`, whose "
               "`/models/...` base paths map to `BASE`), in a subprocess on free ports."),
        ("code", '''\
import atexit

from serving.testing import ServerProcess

config = REPO / "serving" / "config" / "models.config"
server = ServerProcess(["--model_config_file", str(config), "--model_base_path_root", str(BASE)], OUT / "server.log")
atexit.register(server.stop)  # stopped with the kernel even if a cell below fails
server.start().wait_ready(timeout=180)
print("gRPC", server.grpc_address, " REST", server.rest_url)'''),
        ("md", "## Caption over gRPC\nStatus and signatures first, then real example images (with their published "
               "captions: models trained on synthetic images do not describe real figures well)."),
        ("code", '''\
from serving.client import CaptionClient

clients = {name: CaptionClient(server.grpc_address, name) for name in ("cnn_gru", "git")}
for name, client in clients.items():
    print(name, client.status(), list(client.metadata()["signatures"]))'''),
        ("code", '''\
import pandas as pd

from pipelines.rocov2 import EXAMPLES_DIR, read_split

examples = read_split(EXAMPLES_DIR, "valid", check_images=False, progress=False)[0]
images = [open(r.image_path, "rb").read() for r in examples]
table = {"published caption": [r.caption for r in examples]}
for name, client in clients.items():
    for signature in ("serving_default", "beam_search"):
        client.signature = signature
        answers = client.caption(images)
        table[f"{name} {signature}"] = [f"{a['caption']}  ({a['score']:.2f})" for a in answers]
pd.set_option("display.max_colwidth", 80)
pd.DataFrame(table, index=[r.id for r in examples])'''),
        ("md", "A DICOM file is turned into PNG pixels on this side (`serving.client.read_image`): no patient field "
               "is sent. A bad file gets its own error; the others are still captioned."),
        ("code", '''\
import io

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

meta = FileMetaDataset()
meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
meta.TransferSyntaxUID = ExplicitVRLittleEndian
ds = FileDataset("ct.dcm", {}, file_meta=meta, preamble=b"\\0" * 128)
ds.PatientName, ds.Modality = "DOE^JANE", "CT"
ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 128, 128, 1, "MONOCHROME2"
ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, -1024, 40, 400
ds.PixelData = np.random.default_rng(0).integers(900, 1200, (128, 128), dtype=np.uint16).tobytes()
ds.save_as(OUT / "ct.dcm", enforce_file_format=True)
(OUT / "notes.txt").write_text("not an image")

clients["git"].signature = "serving_default"
pd.DataFrame(clients["git"].caption_files([OUT / "ct.dcm", OUT / "notes.txt", examples[0].image_path]))'''),
        ("md", "The REST API answers the same request in TF Serving's JSON format (images base64-encoded)."),
        ("code", '''\
import base64
import urllib.request

body = json.dumps({"signature_name": "serving_default",
                   "instances": [{"b64": base64.b64encode(images[0]).decode()}]}).encode()
request = urllib.request.Request(f"{server.rest_url}/v1/models/git:predict", body, {"Content-Type": "application/json"})
print(json.loads(urllib.request.urlopen(request, timeout=60).read()))'''),
        ("md", "## Stop"),
        ("code", '''\
for client in clients.values():
    client.close()
print("server exit code", server.stop())'''),
    ],
)

NOTEBOOKS = {
    "01_data_exploration.ipynb": DATA_EXPLORATION,
    "02_train_and_compare.ipynb": TRAIN_AND_COMPARE,
    "03_serving_client.ipynb": SERVING_CLIENT,
}


def main() -> None:
    """Write every notebook beside this script."""
    for name, nb in NOTEBOOKS.items():
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print(f"wrote notebooks/{name}")


if __name__ == "__main__":
    main()
