"""medcap in the browser: caption a radiology image with both models and see where each word looked.

    streamlit run serving/app.py
    MEDCAP_SERVER=localhost:8500 streamlit run serving/app.py          # captions from a running server

Models come from exported SavedModels (MEDCAP_ARTIFACTS_DIR, default artifacts/serving), a TF Serving
address (MEDCAP_SERVER) or the `.keras` files of the latest training run (MEDCAP_RUNS_DIR, default runs;
MEDCAP_RUN_DIR for one run or file). Everything but the drawing is in `serving/app_backend.py`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `streamlit run serving/app.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import streamlit as st  # noqa: E402

from serving import app_backend as backend  # noqa: E402

LENGTH_CHOICES = ["model default", 8, 12, 16, 24, 32, 48, 64]


# --- cached resources ----------------------------------------------------------------------------


@st.cache_resource(show_spinner="Loading model...")
def get_captioner(name: str, kind: str, location: str, version: str):
    """One loaded captioner per model version, shared by every session."""
    return backend.load_captioner(backend.ModelRef(name, kind, location, version))


@st.cache_data(ttl=15, show_spinner=False)
def server_models(address: str) -> tuple[dict, str]:
    """The models a server has available (asked again after 15 s)."""
    return backend.find_server_models(address)


@st.cache_resource(show_spinner=False)
def examples() -> list[backend.Example]:
    """The bundled real example images."""
    return backend.list_examples()


@st.cache_data(max_entries=32, show_spinner=False)
def prepare(data: bytes, max_upload_mb: float) -> backend.PreparedImage:
    """A checked upload (cached by its bytes)."""
    return backend.prepare_upload(data, max_upload_mb)


@st.cache_data(max_entries=64, show_spinner=False)
def run_caption(ref: tuple, data: bytes, settings: tuple) -> backend.CaptionResult:
    """One model's caption for one image and setting (cached)."""
    image = backend.PreparedImage(data, "")
    return backend.caption(get_captioner(*ref), image, backend.GenerationSettings(*settings))


@st.cache_data(max_entries=64, show_spinner=False)
def run_attention(ref: tuple, data: bytes, _result: backend.CaptionResult, caption: str, token_ids) -> list:
    """(word, attention grid) pairs for a caption (cached by model, image and caption)."""
    return backend.word_attention(get_captioner(*ref), backend.PreparedImage(data, ""), _result)


def ref_key(ref: backend.ModelRef) -> tuple:
    """A model reference as a hashable cache key."""
    return (ref.name, ref.kind, ref.location, ref.version)


# --- page parts -------------------------------------------------------------------------------------


def sidebar(settings: backend.AppSettings) -> tuple[dict, dict, backend.GenerationSettings, str]:
    """Model sources and generation settings: (caption models, keras models, settings, problem)."""
    st.sidebar.header("Models")
    settings.artifacts_dir = st.sidebar.text_input("Exported SavedModels folder", settings.artifacts_dir,
                                                   help="TF Serving base path: {folder}/{model}/{version}/", key="artifacts_dir")
    settings.server = st.sidebar.text_input("Server address (gRPC, optional)", settings.server,
                                            placeholder="localhost:8500", key="server").strip()
    settings.run_dir = st.sidebar.text_input(
        "Keras run folder or .keras file (optional)", settings.run_dir,
        help=f"Empty: the latest run under {settings.runs_dir}/. Needed for attention maps and free settings.", key="run_dir")
    sources, problem = {}, ""
    if settings.server:
        found, problem = server_models(settings.server)
        if found:
            sources["server"] = found
    if saved := backend.find_saved_models(settings.artifacts_dir):
        sources["saved_model"] = saved
    keras_models = backend.find_keras_models(settings)
    if keras_models:
        sources["keras"] = keras_models
    choice = None
    if sources:
        choice = st.sidebar.radio("Caption with", list(sources), format_func=backend.SOURCES.get, key="source")
    st.sidebar.header("Generation")
    sampler = st.sidebar.radio("Decoding", ["greedy", "beam"], horizontal=True,
                               format_func={"greedy": "Greedy", "beam": "Beam search"}.get, key="sampler")
    beam = sampler == "beam"
    num_beams = st.sidebar.slider("Beam width", 2, 8, 3, disabled=not beam, key="num_beams")
    show_candidates = st.sidebar.checkbox("Show the beam candidates", value=True, disabled=not beam, key="show_candidates")
    length = st.sidebar.select_slider("Maximum length (tokens)", LENGTH_CHOICES, value="model default", key="max_length")
    st.sidebar.caption("Maximum length and beam width apply to the Keras models only; exported models and "
                       "servers use what was fixed at export (their beam search returns only the best beam, "
                       "shown beside the greedy caption).")
    generation = backend.GenerationSettings(sampler, num_beams, None if length == "model default" else int(length),
                                            beam and show_candidates)
    return sources.get(choice, {}), keras_models, generation, problem


def choose_image(settings: backend.AppSettings) -> tuple[backend.PreparedImage | None, backend.Example | None]:
    """The image to caption, from an upload or a bundled example; errors shown, never raised."""
    mode = st.radio("Image", ["upload", "example"], horizontal=True,
                    format_func={"upload": "Upload a file", "example": "Use a bundled example"}.get, key="image_mode")
    if mode == "example":
        chosen = st.selectbox("Example (real ROCO figure, CC BY)", examples(),
                              format_func=lambda e: f"{e.id}: {e.caption[:70]}", key="example")
        return prepare(Path(chosen.path).read_bytes(), settings.max_upload_mb), chosen
    upload = st.file_uploader("PNG, JPEG or DICOM image", type=None, max_upload_size=math.ceil(settings.max_upload_mb),
                              help=f"Up to {settings.max_upload_mb:g} MB. DICOM files are windowed here and "
                                   "only their pixels are used; patient fields are never shown or sent.",
                              key="upload")
    if upload is None:
        return None, None
    try:
        return prepare(upload.getvalue(), settings.max_upload_mb), None
    except backend.UploadError as e:
        st.error(f"This file cannot be captioned. {e}")
        return None, None


def show_image(image: backend.PreparedImage, example: backend.Example | None) -> None:
    """The image (DICOM with its window applied) and what is known about it."""
    st.image(image.data, caption=f"{image.kind}, {image.width} x {image.height} px", width="stretch")
    if example is not None:
        st.markdown(f"**Published caption:** {backend.escape_markdown(example.caption)}")
        st.caption(example.licence)
    if image.metadata:
        with st.expander("DICOM technical fields (no patient data)"):
            st.json(image.metadata)


def show_result(result: backend.CaptionResult) -> None:
    """One model's caption, score, source and candidates."""
    st.markdown(f"#### {backend.MODEL_TITLES.get(result.model, result.model)}")
    with st.container(border=True, key=f"caption_{result.model}"):
        st.markdown(f"**{backend.escape_markdown(result.caption)}**" if result.caption else "_(empty caption)_")
    probability = backend.per_token_probability(result.score)
    st.metric("Score (mean log-prob per token)", f"{result.score:.3f}",
              help=f"About {probability:.0%} probability per word piece (geometric mean); closer to 0 is surer.")
    st.caption(f"{backend.SOURCES[result.source]}, version {result.version}; "
               f"{backend.describe_settings(result.settings)}")
    for note in result.notes:
        st.caption(note)
    if result.candidates:
        st.markdown("Candidates")
        st.table([{"": c["label"], "caption": c["caption"], "score": round(c["score"], 3)}
                  for c in result.candidates], hide_index=True)


def show_attention(keras_models: dict, image: backend.PreparedImage, results: dict) -> None:
    """Where each word looked: per model a word selector and the attention heat map over the image."""
    st.subheader("Where each word looked")
    if not keras_models:
        st.info("Attention maps need the trained `.keras` models (SavedModels and servers return only text). "
                "Train with `python pipelines/train.py`, or give a run folder or `.keras` file in the sidebar.")
        return
    columns = st.columns(len(results))
    for column, (name, result) in zip(columns, results.items()):
        with column:
            st.markdown(f"#### {backend.MODEL_TITLES.get(name, name)}")
            ref = keras_models.get(name)
            if ref is None:
                st.info(f"No `.keras` model for {name} in the run folder: no attention map.")
                continue
            try:
                words = run_attention(ref_key(ref), image.data, result, result.caption, tuple(result.token_ids or ()))
            except Exception as e:  # noqa: BLE001 - a failing explanation must not take the captions down
                st.error(f"Attention maps failed for {name}: {type(e).__name__}: {e}")
                continue
            if not words:
                st.info("The caption is empty: no words to explain.")
                continue
            index = st.selectbox("Word", range(len(words)), key=f"word_{name}",
                                 format_func=lambda i, words=words: f"{i + 1}. {words[i][0]}")
            model = get_captioner(*ref_key(ref)).model
            view = backend.model_view(image, model.image_config)
            st.image(backend.overlay(view, words[index][1]), width=backend.DISPLAY_SIZE,
                     caption=f"'{words[index][0]}': attention over the image as the model frames it (brighter = more)")
            if result.source != "keras":
                st.caption(f"Re-read by {ref.location} (teacher forcing), as the caption came from elsewhere.")


def main() -> None:
    """The page."""
    st.set_page_config(page_title="medcap: radiology captions", layout="wide")
    st.title("medcap: radiology image captions")
    st.caption("Research prototype. Captions are machine-generated and are not a diagnosis.")
    settings = backend.AppSettings.from_env()
    models, keras_models, generation, problem = sidebar(settings)
    if problem:
        st.warning(f"Server: {problem}")
    if not models:
        server_part = f" or on the server {settings.server}" if settings.server else ""
        st.info(backend.HOW_TO.format(artifacts=settings.artifacts_dir, runs=settings.runs_dir,
                                      server_part=server_part))
        return
    left, right = st.columns([2, 3])
    with left:
        image, example = choose_image(settings)
        if image is not None:
            show_image(image, example)
    if image is None:
        return
    results = {}
    with right:
        columns = st.columns(len(models))
        for column, (name, ref) in zip(columns, models.items()):
            with column:
                try:
                    with st.spinner(f"Captioning with {ref.title}..."):
                        result = run_caption(ref_key(ref), image.data, dataclasses.astuple(generation))
                except Exception as e:  # noqa: BLE001 - one model failing leaves the other usable
                    st.error(f"{ref.title} could not caption this image: {type(e).__name__}: {e}")
                    continue
                results[name] = result
                show_result(result)
        if results:
            st.download_button("Download the result (JSON)", backend.result_json(list(results.values()), image, example),
                               file_name="medcap_caption.json", mime="application/json")
    if results:
        show_attention(keras_models, image, results)


main()
