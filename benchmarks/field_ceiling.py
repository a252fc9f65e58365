"""How well can one study's findings be read from its synthetic images? A classifier trained on that study alone.

    python -m benchmarks.field_ceiling                                   # abdominal CT, 128 px, 12,000 images
    python -m benchmarks.field_ceiling --study mri/brain --image-size 256 --train 6000 --epochs 10

The captioners learn every study at once from the synthetic set's 16,000 training images (1,406 of them
abdominal CT; 702 of 8,000 before 2026-12-05). This trains the CNN-GRU small preset's image CNN
(`keras_models.cnn_gru.encoders.compact_cnn`, its filters) with a plain classification head on one study
alone, from as many freshly rendered images as asked: finding and size as one class, laterality as another.
Its exact accuracy on held-out images of that study is what that encoder learns from those pixels given N
images of the study and E epochs: a reference for a captioner's accuracy on the study, and a lower bound on
what the pixels allow (another head or more epochs may read more). Images are rendered at 256 px and go
through `pipelines.images`, the captioners' own decoding, letterboxing and normalisation, at `--image-size`.
Prints the test accuracy after each epoch and the most frequent confusions, and writes JSON. Memory: the
float32 images take 0.8 GB for 12,000 at 128 px (four times that at 256 px); Keras may copy them while
training starts (an estimate, not measured).
"""

from __future__ import annotations

import argparse
import io
import math
import time
from collections import Counter
from multiprocessing import get_context

import numpy as np

from benchmarks.common import limit_threads, write_json

SEED = 11  # rendering seed: not the default synthetic dataset's (0), so no image here is one of its images
SPLIT_CODES = {"train": 0, "test": 1}


def _render(job: tuple[str, str, int, int]) -> tuple[bytes, dict]:
    """One image of the study (rejection-sampled fields, as the dataset draws them) as PNG bytes, and its fields."""
    from PIL import Image

    from pipelines.synthetic import render_example, sample_fields

    study, split, index, size = job
    rng = np.random.default_rng([SEED, SPLIT_CODES[split], index])
    while True:
        fields = sample_fields(rng)
        if f"{fields['modality']}/{fields['region']}" == study:
            break
    image, _ = render_example(fields, (SEED, SPLIT_CODES[split], index), size)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue(), fields


def render_study(study: str, split: str, n: int, size: int = 256, workers: int = 2) -> tuple[list[bytes], list[dict]]:
    """`n` rendered images of `study` ("ct/abdomen") and their fields; the same call gives the same images."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {list(SPLIT_CODES)}, got {split!r}")
    jobs = [(study, split, i, size) for i in range(n)]
    if workers == 1:
        out = [_render(job) for job in jobs]
    else:
        with get_context("spawn").Pool(workers) as pool:
            out = pool.map(_render, jobs, chunksize=100)
    return [png for png, _ in out], [fields for _, fields in out]


def labels(fields: list[dict]) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(finding-size classes, laterality classes, their indices per image)."""
    findings = [f"{f['finding']} {f['size'] or ''}".strip() for f in fields]
    sides = [f["laterality"] or "-" for f in fields]
    finding_classes, side_classes = sorted(set(findings)), sorted(set(sides))
    return (finding_classes, side_classes, np.array([finding_classes.index(x) for x in findings]),
            np.array([side_classes.index(x) for x in sides]))


def preprocess(pngs: list[bytes], image_config: dict) -> np.ndarray:
    """The captioners' image function over a list of PNGs, in batches."""
    import tensorflow as tf

    from pipelines.images import preprocess_images

    return np.concatenate([preprocess_images(tf.constant(pngs[i:i + 256]), image_config).numpy()
                           for i in range(0, len(pngs), 256)])


def build_classifier(image_config: dict, filters: list[int], n_findings: int, n_sides: int):
    """The CNN-GRU's compact CNN, flattened (it keeps where the lesion is), a dense layer and two heads."""
    import keras

    from keras_models.cnn_gru.encoders import compact_cnn

    cnn = compact_cnn(image_config["image_size"], image_config["channels"], tuple(filters))
    x = keras.layers.Flatten()(cnn.output)
    x = keras.layers.Dropout(0.3)(keras.layers.Dense(256, activation="relu")(x))
    return keras.Model(cnn.input, [keras.layers.Dense(n_findings, name="finding")(x),
                                   keras.layers.Dense(n_sides, name="laterality")(x)])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.field_ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="ct/abdomen", help="MODALITY/REGION as the synthetic set names them")
    p.add_argument("--image-size", type=int, default=128, help="pixels the classifier reads (the presets': 128)")
    p.add_argument("--train", type=int, default=12000, help="training images of the study")
    p.add_argument("--test", type=int, default=2000, help="held-out images of the study")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="JSON path (default benchmarks/results/field_ceiling.json)")
    args = p.parse_args(argv)
    from pipelines.synthetic import VIEWS_BY_STUDY

    studies = sorted(f"{m}/{r}" for m, r in VIEWS_BY_STUDY)
    if args.study not in studies:
        p.error(f"unknown study {args.study!r}; choose one of {', '.join(studies)}")
    limit_threads(args.threads)
    import keras

    from keras_models.cnn_gru.presets import PRESETS
    from keras_models.schedules import WarmupCosine

    small = PRESETS["small"]
    image_config = {**small["image_config"], "image_size": args.image_size}
    started = time.perf_counter()
    train_png, train_fields = render_study(args.study, "train", args.train, workers=args.threads)
    test_png, test_fields = render_study(args.study, "test", args.test, workers=args.threads)
    finding_classes, side_classes, y_finding, y_side = labels(train_fields + test_fields)
    x_train, x_test = preprocess(train_png, image_config), preprocess(test_png, image_config)
    del train_png, test_png
    prepare_seconds = time.perf_counter() - started
    print(f"{args.study}: {args.train} + {args.test} images at {args.image_size} px rendered and preprocessed in "
          f"{prepare_seconds:.0f} s; classes {finding_classes}, laterality {side_classes}", flush=True)
    n = args.train
    keras.utils.set_random_seed(0)
    model = build_classifier(image_config, small["backbone"]["encoder_filters"], len(finding_classes),
                             len(side_classes))
    steps_per_epoch = math.ceil(n / 64)
    schedule = WarmupCosine(2e-3, args.epochs, steps_per_epoch, warmup_steps=min(200, steps_per_epoch))
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4),
                  loss=[keras.losses.SparseCategoricalCrossentropy(from_logits=True)] * 2)
    views = np.array([f["view"] for f in test_fields])
    history = []

    def evaluate(epoch: int, logs: dict) -> None:
        finding_logits, side_logits = model.predict(x_test, batch_size=256, verbose=0)
        right_finding = finding_logits.argmax(1) == y_finding[n:]
        right_side = side_logits.argmax(1) == y_side[n:]
        exact = right_finding & right_side
        row = {"epoch": epoch + 1, "loss": float(logs["loss"]), "finding_size": float(right_finding.mean()),
               "laterality": float(right_side.mean()), "exact": float(exact.mean()),
               "exact_by_view": {v: float(exact[views == v].mean()) for v in sorted(set(views))}}
        history.append(row)
        by_view = ", ".join(f"{v} {a:.1%}" for v, a in row["exact_by_view"].items())
        print(f"epoch {epoch + 1}/{args.epochs}: finding+size {row['finding_size']:.1%}, laterality "
              f"{row['laterality']:.1%}, exact {row['exact']:.1%} ({by_view}); training loss {row['loss']:.3f}",
              flush=True)

    fit_started = time.perf_counter()
    model.fit(x_train, [y_finding[:n], y_side[:n]], batch_size=64, epochs=args.epochs, verbose=0, shuffle=True,
              callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=evaluate)])
    predicted = model.predict(x_test, batch_size=256, verbose=0)[0].argmax(1)
    confusions = Counter((finding_classes[t], finding_classes[q]) for t, q in zip(y_finding[n:], predicted) if t != q)
    print("most frequent finding/size errors (true -> predicted): " + ", ".join(
        f"{t} -> {q}: {k}" for (t, q), k in confusions.most_common(6)))
    fit_seconds = time.perf_counter() - fit_started
    print(f"trained in {fit_seconds:.0f} s")
    payload = {"args": {k: v for k, v in vars(args).items() if k != "json"}, "image_config": image_config,
               "prepare_seconds": round(prepare_seconds, 1), "fit_seconds": round(fit_seconds, 1),
               "classes": finding_classes, "sides": side_classes,
               "history": history, "confusions": [[t, q, k] for (t, q), k in confusions.most_common()]}
    write_json("field_ceiling", payload, args.json)
    return payload


if __name__ == "__main__":
    main()
