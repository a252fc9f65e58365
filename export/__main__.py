"""python -m export --model RUN_DIR_OR_MODEL.keras --name NAME --base-dir artifacts/serving"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def resolve_models(path: Path, name: str | None) -> list[tuple[str, Path]]:
    """(serving name, .keras file) pairs from a .keras file or a training run directory."""
    if path.suffix == ".keras":
        if not path.is_file():
            sys.exit(f"No model file at {path}.")
        return [(name or path.parent.name, path)]
    found = sorted(path.glob("*/model.keras"))
    if name:
        found = [p for p in found if p.parent.name == name]
    if not found:
        sys.exit(f"No */model.keras under {path}" + (f" for model {name!r}" if name else "") + ".")
    return [(p.parent.name, p) for p in found]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description="Export trained captioners as versioned "
                                "SavedModels for TensorFlow Serving ({base-dir}/{name}/{version}/).")
    p.add_argument("--model", required=True, type=Path,
                   help="a .keras file, or a run directory of pipelines/train.py (exports every model in it)")
    p.add_argument("--name", help="serving model name (default: the model's folder name, e.g. cnn_gru or git); "
                   "with a run directory, exports only that model")
    p.add_argument("--base-dir", default="artifacts/serving", type=Path, help="TF Serving base path root")
    p.add_argument("--version", type=int, help="version number (default: the next integer)")
    p.add_argument("--num-beams", type=int, default=3, help="beam width of the beam_search signature")
    p.add_argument("--max-length", type=int, help="maximum caption length in tokens (default: the model's)")
    args = p.parse_args(argv)

    import keras

    import keras_models  # noqa: F401  (registers the medcap layers for loading)
    from export.saved_model import export_model

    for name, path in resolve_models(args.model, args.name):
        model = keras.saving.load_model(path)
        try:
            target = export_model(model, args.base_dir, name, args.version, args.num_beams, args.max_length)
        except FileExistsError as e:  # --version N where N is taken: a clear line, no traceback
            raise SystemExit(f"python -m export: {e}") from None
        print(f"exported {path} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
