"""Serving throughput: gRPC clients against `serving.server`, next to the SavedModel's in-process ceiling.

    python -m benchmarks.serving --model runs/<run>/git/model.keras       # a trained captioner
    python -m benchmarks.serving                                            # untrained GIT small preset

The captioner is exported with `export.saved_model.export_model` (the very SavedModel TF Serving
would load). The ceiling is that SavedModel called in this process on batches of the server's
`max_batch_size` (images per second, no gRPC, no queueing). Then the server runs with and without
`--enable_batching` (serving/config/batching.config) and 1, 4, 16 and 32 concurrent clients
(`serving.loadtest.throughput`, one gRPC channel each, one image per request) send a real example
image for `--seconds` each. Printed: requests/s, p50/p99 latency, failures and the fraction of the
ceiling reached. Clients and server share this machine's cores, as they do in the figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import median_seconds, print_table, write_json
from serving.loadtest import percentile_ms

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "pipelines" / "examples" / "valid"
BATCHING_CONFIG = REPO / "serving" / "config" / "batching.config"
MONITORING_CONFIG = REPO / "serving" / "config" / "monitoring.config"
CONCURRENCY = (1, 4, 16, 32)
TARGET = 0.8  # of the ceiling, at 32 clients with batching

MODELS_CONFIG = """model_config_list {{
  config {{ name: "{name}" base_path: "/models/{name}" model_platform: "tensorflow" }}
}}
"""


def example_image() -> bytes:
    """The first bundled real example image (CC-licensed ROCO figure), as sent by a client."""
    return sorted(p for p in EXAMPLE.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[0].read_bytes()


def export_captioner(base_dir: Path, name: str, model_path: str | None, preset: str) -> tuple[Path, str]:
    """Export `model_path` (.keras) or an untrained `preset` GIT; returns (version dir, what it is)."""
    import keras

    import keras_models  # noqa: F401  (registers the medcap layers for loading)
    from export.saved_model import export_model

    if model_path:
        model = keras.saving.load_model(model_path)
        what = f"{type(model).__name__} from {model_path}"
    else:
        from keras_models.registry import build_captioner
        from pipelines.rocov2 import read_split
        from pipelines.text import build_vocabulary, make_tokenizer

        records, _ = read_split(REPO / "pipelines" / "examples", "train")
        keras.utils.set_random_seed(0)
        model = build_captioner("git", preset, make_tokenizer(build_vocabulary([r.caption for r in records], 500)))
        what = f"untrained GIT {preset} preset (random weights, captions run to max length)"
    return export_model(model, base_dir, name), what


def batching_max(path: Path = BATCHING_CONFIG) -> int:
    """max_batch_size of a batching parameters file."""
    from serving import protos

    return int(protos.parse_text_file(str(path), protos.BatchingParameters).max_batch_size.value)


class Ceiling:
    """The SavedModel's serving_default called in this process: images per second at a batch size."""

    def __init__(self, version_dir: Path, image: bytes, repeats: int):
        import tensorflow as tf

        self.signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
        self.image, self.repeats = image, repeats

    def __call__(self, batch: int) -> float:
        """Images per second at `batch` (median of `repeats` calls after a warm-up)."""
        import tensorflow as tf

        images = tf.constant([self.image] * batch)
        seconds, _ = median_seconds(lambda: self.signature(images=images), self.repeats)
        return batch / seconds


def batch_sums(rest_url: str) -> tuple[float, float, float]:
    """(model calls, rows processed incl. padding, requests) so far, from the server's Prometheus page."""
    import re
    import urllib.request

    with urllib.request.urlopen(rest_url + "/monitoring/prometheus/metrics", timeout=10) as response:
        text = response.read().decode()

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    prefix = ":tensorflow:serving:batching_session:"
    return (total(prefix + "processed_batch_size_count"), total(prefix + "processed_batch_size_sum"),
            total(prefix + "tasks_per_batch_sum"))


def serve_and_load(root: Path, name: str, image: bytes, batching: Path | None, seconds: float,
                   concurrency: tuple[int, ...], ceiling: Ceiling, max_batch: int) -> list[dict]:
    """Start the server, run each concurrency level between two ceiling measurements, stop it; a row per level.

    The machine is shared, so each row's fraction is taken against the mean of the ceilings measured
    just before and just after it.
    """
    import psutil

    from serving.loadtest import throughput
    from serving.testing import ServerProcess

    config = root / "models.config"
    config.write_text(MODELS_CONFIG.format(name=name))
    args = ["--model_config_file", str(config), "--model_base_path_root", str(root / "models"),
            "--file_system_poll_wait_seconds", "0", "--monitoring_config_file", str(MONITORING_CONFIG)]
    if batching:
        args += ["--enable_batching", "--batching_parameters_file", str(batching)]
    rows = []
    with ServerProcess(args, root / f"server-{'batching' if batching else 'plain'}.log") as server:
        throughput(server.grpc_address, name, image, 4, requests=16)  # warm the server's functions up
        process = psutil.Process(server.process.pid)
        for clients in concurrency:
            ceiling_before = ceiling(max_batch)
            before, cpu_before = batch_sums(server.rest_url), sum(process.cpu_times()[:2])
            load = throughput(server.grpc_address, name, image, clients, seconds=seconds)
            server_cores = (sum(process.cpu_times()[:2]) - cpu_before) / load.elapsed
            calls, rows_run, tasks = (b - a for a, b in zip(before, batch_sums(server.rest_url)))
            top = (ceiling_before + ceiling(max_batch)) / 2
            rows.append({"batching": bool(batching), "clients": clients, "requests": load.done,
                         "ceiling_images_per_second": top, "fraction_of_ceiling": load.requests_per_second / top,
                         "server_cpu_cores": server_cores,
                         "mean_batch": rows_run / calls if calls else None,
                         "mean_requests_per_batch": tasks / calls if calls else None,
                         "failures": len(load.failures), "seconds": load.elapsed,
                         "requests_per_second": load.requests_per_second,
                         "p50_ms": percentile_ms(load.latencies, 50), "p99_ms": percentile_ms(load.latencies, 99),
                         "first_failure": load.failures[0] if load.failures else None})
            print(f"batching={bool(batching)} clients={clients}: {load.requests_per_second:.1f} req/s "
                  f"({load.requests_per_second / top:.0%} of {top:.1f}), "
                  f"{len(load.failures)} failures" + (f", {tasks / calls:.1f} requests per model call "
                                                      f"(padded to {rows_run / calls:.1f})" if calls else ""),
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Export, measure the ceiling, load the server both ways, print the table."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a trained .keras captioner (default: an untrained GIT --preset)")
    p.add_argument("--preset", default="small", help="GIT preset when no --model is given")
    p.add_argument("--seconds", type=float, default=15.0, help="load duration per concurrency level")
    p.add_argument("--repeats", type=int, default=5, help="timed calls for the in-process ceiling")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    p.add_argument("--batching-config", type=Path, default=BATCHING_CONFIG, help="BatchingParameters text proto")
    p.add_argument("--out", help="JSON path (default benchmarks/results/serving.json)")
    args = p.parse_args(argv)
    name, image = "git", example_image()
    with tempfile.TemporaryDirectory(prefix="medcap-serving-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        version_dir, what = export_captioner(root / "models", name, args.model, args.preset)
        print(f"exported {what} -> {version_dir} in {time.perf_counter() - started:.0f} s", flush=True)
        max_batch = batching_max(args.batching_config)
        ceiling = Ceiling(version_dir, image, args.repeats)
        by_batch = {batch: ceiling(batch) for batch in sorted({1, 8, max_batch, 2 * max_batch})}
        print("in-process images/s by batch: " + ", ".join(f"{b}: {v:.1f}" for b, v in by_batch.items()), flush=True)
        rows = [row for batching in (args.batching_config, None)
                for row in serve_and_load(root, name, image, batching, args.seconds, tuple(args.concurrency),
                                          ceiling, max_batch)]
    print(f"\nModel: {what}; image {len(image):,} bytes; ceiling = the SavedModel in process at batch {max_batch}, "
          f"measured before and after each row; {args.seconds:.0f} s per row.\n")
    print_table(["batching", "clients", "requests/s", "p50 ms", "p99 ms", "failures", "requests per call",
                 "server CPU (cores)", "ceiling img/s", "of ceiling"],
                [["on" if r["batching"] else "off", r["clients"], r["requests_per_second"], r["p50_ms"], r["p99_ms"],
                  r["failures"], "-" if r["mean_requests_per_batch"] is None else r["mean_requests_per_batch"],
                  r["server_cpu_cores"], r["ceiling_images_per_second"], f"{100 * r['fraction_of_ceiling']:.0f}%"]
                 for r in rows])
    at_32 = [r for r in rows if r["batching"] and r["clients"] == 32]
    if at_32:
        met = at_32[0]["fraction_of_ceiling"] >= TARGET and at_32[0]["failures"] == 0
        print(f"\ntarget (>= {TARGET:.0%} of the ceiling at 32 clients with batching, no errors): "
              f"{'met' if met else 'NOT met'}")
    write_json("serving", {"model": what, "image_bytes": len(image), "seconds_per_row": args.seconds,
                           "batching_config": args.batching_config.read_text(),
                           "in_process_images_per_second_by_batch": by_batch, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
