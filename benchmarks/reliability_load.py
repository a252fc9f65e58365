"""Soak: 5,000 captioning requests from 32 gRPC clients, zero failures, the server's memory flat.

    python -m benchmarks.reliability_load --model runs/<run>/git/model.keras
    python -m benchmarks.reliability_load                       # untrained GIT small preset

The captioner is exported and served with batching (serving/config/batching.config), as in
`benchmarks.serving`. After a warm-up of 500 requests the server's resident memory is the
baseline; then 5,000 requests (one real image each) go out from 32 clients. Pass: no failed
request, and the resident memory at the end within 10% of the baseline. The server's memory
is sampled every half second throughout (the peak is reported too).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

from benchmarks.common import print_table, write_json
from serving.loadtest import percentile_ms
from benchmarks.serving import BATCHING_CONFIG, MODELS_CONFIG, example_image, export_captioner

TOLERANCE = 0.10


class MemorySampler(threading.Thread):
    """Samples a process's resident memory every `interval` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.5):
        import psutil

        super().__init__(daemon=True)
        self.process, self.interval = psutil.Process(pid), interval
        self.samples: list[int] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.samples.append(self.process.memory_info().rss)

    def stop(self) -> list[int]:
        self._done.set()
        self.join()
        return self.samples


def main(argv: list[str] | None = None) -> int:
    """Export, serve, warm up, soak; print the figures; exit 1 when a condition fails."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.reliability_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a trained .keras captioner (default: an untrained GIT --preset)")
    p.add_argument("--preset", default="small")
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--out", help="JSON path (default benchmarks/results/reliability_load.json)")
    args = p.parse_args(argv)

    from serving.loadtest import throughput
    from serving.testing import ServerProcess

    name, image = "git", example_image()
    with tempfile.TemporaryDirectory(prefix="medcap-soak-") as tmp:
        root = Path(tmp)
        _, what = export_captioner(root / "models", name, args.model, args.preset)
        (root / "models.config").write_text(MODELS_CONFIG.format(name=name))
        server_args = ["--model_config_file", str(root / "models.config"), "--model_base_path_root",
                       str(root / "models"), "--enable_batching", "--batching_parameters_file", str(BATCHING_CONFIG)]
        with ServerProcess(server_args, root / "server.log") as server:
            sampler = MemorySampler(server.process.pid)
            warm = throughput(server.grpc_address, name, image, args.clients, requests=args.warmup)
            baseline = sampler.process.memory_info().rss
            sampler.start()
            load = throughput(server.grpc_address, name, image, args.clients, requests=args.requests)
            samples = sampler.stop()
            end = sampler.process.memory_info().rss
            alive = server.process.poll() is None
    growth = (end - baseline) / baseline
    ok = not load.failures and not warm.failures and load.done == args.requests and abs(growth) <= TOLERANCE and alive
    print(f"\nModel: {what}; {args.clients} clients, one {len(image):,}-byte image per request; batching on.\n")
    print_table(["requests", "failures", "seconds", "requests/s", "p50 ms", "p99 ms", "RSS after warm-up MiB",
                 "RSS peak MiB", "RSS end MiB", "growth"],
                [[load.done + len(load.failures), len(load.failures), load.elapsed, load.requests_per_second,
                  percentile_ms(load.latencies, 50), percentile_ms(load.latencies, 99), baseline / 2**20,
                  max(samples + [end]) / 2**20, end / 2**20, f"{100 * growth:+.1f}%"]])
    print(f"\n{'PASS' if ok else 'FAIL'}: zero failures and end RSS within {TOLERANCE:.0%} of the warm-up RSS")
    write_json("reliability_load", {
        "model": what, "clients": args.clients, "warmup_requests": args.warmup, "requests": args.requests,
        "answered": load.done, "failures": len(load.failures) + len(warm.failures),
        "first_failure": (load.failures or warm.failures or [None])[0], "seconds": load.elapsed,
        "requests_per_second": load.requests_per_second, "p50_ms": percentile_ms(load.latencies, 50),
        "p99_ms": percentile_ms(load.latencies, 99), "rss_after_warmup_mib": baseline / 2**20,
        "rss_peak_mib": max(samples + [end]) / 2**20, "rss_end_mib": end / 2**20, "rss_growth": growth,
        "server_alive": alive, "passed": ok}, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
