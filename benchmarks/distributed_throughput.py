"""Training throughput with 1 and 2 local workers on MultiWorkerMirroredStrategy (the `--distribute multi-worker` step).

    python -m benchmarks.distributed_throughput                          # cnn_gru, tiny and small, 1 and 2 workers
    python -m benchmarks.distributed_throughput --models cnn_gru git --steps 40

Each case starts N worker processes on localhost with their own `TF_CONFIG` (N = 1 is a one-worker
cluster, so both run the very same code: `pipelines.distributed.fit_custom` over `make_dataset`, the
model compiled as `train_one` does). Every worker keeps the preset's batch size (global batch = N x
preset batch: weak scaling, the usual data-parallel setup). Epoch 1 (`--steps` steps) pays for tracing;
the figure is epoch 2's training steps only: examples/s = global batch x steps / seconds. Data is a
synthetic set rendered once at 128 px; images are decoded every step, as in training. Workers on one
machine share its cores, so 2 workers can only beat 1 where cores sit idle.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

RESULT = "THROUGHPUT "


def worker(data: str, model_name: str, preset: str, steps: int) -> None:
    """One worker: train `steps` x 2 steps and print (from the chief) the timed epoch's figures."""
    from pipelines.distributed import is_chief, make_strategy, wait_for_all

    strategy = make_strategy("multi-worker")  # before any other TensorFlow op
    import keras

    from keras_models.registry import build_captioner, presets
    from pipelines.dataset import make_dataset
    from pipelines.distributed import fit_custom
    from pipelines.rocov2 import read_split
    from pipelines.text import build_vocabulary, make_tokenizer

    train, _ = read_split(data, "train", progress=False)
    valid, _ = read_split(data, "valid", progress=False)
    batch_size = presets(model_name)[preset]["train"]["batch_size"]
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_captioner(model_name, preset, make_tokenizer(build_vocabulary([r.caption for r in train], 500)))
        model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-4, clipnorm=1.0))

    class StepTimer(keras.callbacks.Callback):
        """Seconds from the start of epoch 2 to its last training step (tracing and validation excluded)."""

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.seconds = time.perf_counter() - self.start

    timer = StepTimer()
    replicas = strategy.num_replicas_in_sync

    def data_fn(records: list, training: bool):
        return lambda ctx: make_dataset(records, model.image_config, batch_size, training=training, repeat=training,
                                        input_context=ctx)

    fit_custom(model, strategy, data_fn(train, True), data_fn(valid[:replicas], False), epochs=2,
               steps_per_epoch=steps, callbacks=[timer], verbose=0)
    if is_chief():
        examples = batch_size * replicas * steps
        print(RESULT + json.dumps({"model": model_name, "preset": preset, "workers": replicas,
                                   "global_batch": batch_size * replicas, "steps": steps,
                                   "seconds": round(timer.seconds, 2),
                                   "examples_per_second": round(examples / timer.seconds, 1)}), flush=True)
    wait_for_all(strategy)


def run_case(data: Path, model: str, preset: str, workers: int, steps: int, timeout: float) -> dict:
    """Start `workers` local processes for one case; return the chief's figures."""
    from pipelines.distributed import run_local_cluster

    command = [sys.executable, "-m", "benchmarks.distributed_throughput", "--worker", str(data), model, preset, str(steps)]
    results = run_local_cluster(command, workers, timeout, cwd=str(Path(__file__).resolve().parents[1]))
    for code, log in results:
        if code:
            raise RuntimeError(f"{model}/{preset} with {workers} worker(s) failed:\n{log[-3000:]}")
    line = next(line for line in results[0][1].splitlines() if line.startswith(RESULT))
    return json.loads(line[len(RESULT):])


def main(argv: list[str] | None = None) -> int:
    """Measure every (model, preset, workers) case and print a table."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        data, model, preset, steps = argv[1:5]
        worker(data, model, preset, int(steps))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cnn_gru"], choices=["cnn_gru", "git"])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--steps", type=int, default=20, help="timed training steps (after as many warm-up steps)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a case's workers are killed")
    p.add_argument("--out", help="JSON file (default benchmarks/results/distributed_throughput.json)")
    args = p.parse_args(argv)

    from benchmarks.common import machine, print_table, write_json
    from pipelines.synthetic import generate_dataset

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_dataset(Path(tmp) / "data", n_train=256, n_valid=8, n_test=1, image_size=128, seed=0)
        for model in args.models:
            for preset in args.presets:
                for workers in args.workers:
                    print(f"{model}/{preset}, {workers} worker(s) ...", flush=True)
                    rows.append(run_case(data, model, preset, workers, args.steps, args.timeout))
                    print(f"  {rows[-1]['examples_per_second']} examples/s", flush=True)
    info = machine()
    print(f"\n{info['cpu']}, {info['cores']} cores, load {info['load_average_1m']} at the end")
    print_table(["model", "preset", "workers", "global batch", "steps", "seconds", "examples/s"],
                [[r["model"], r["preset"], r["workers"], r["global_batch"], r["steps"], r["seconds"],
                  r["examples_per_second"]] for r in rows])
    write_json("distributed_throughput", {"cases": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
