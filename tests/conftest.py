"""Shared fixtures: quiet TensorFlow, a fixed seed, and the location of the optional real sample."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

SHARED_ROCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "roco-ccby"


@pytest.fixture
def shared_roco() -> Path:
    """The 2,088-image real sample beside the checkout; skipped where it is absent (users' machines)."""
    if not (SHARED_ROCO / "train_captions.csv").is_file():
        pytest.skip(f"real sample not present at {SHARED_ROCO}")
    return SHARED_ROCO
