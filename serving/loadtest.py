"""Measure a captioning endpoint: latency of one-image requests, then throughput with concurrent clients.

    python -m serving.loadtest --server localhost:8500 --model git --image chest.png \\
        --requests 200 --concurrency 16 --seconds 20

Works against serving.server and real TF Serving alike (it uses serving.client). Each concurrent
client has its own channel, as separate processes would. Prints a short markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from serving.client import CaptionClient, read_image
from serving.testing import png_bytes


def latency(server: str, model: str, image: bytes, requests: int, signature: str) -> list[float]:
    """Seconds per one-image request, sent one after another (after 5 warm-up calls)."""
    with CaptionClient(server, model, signature, retries=0) as client:
        for _ in range(5):
            client.caption([image])
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            client.caption([image])
            times.append(time.perf_counter() - started)
    return times


@dataclass
class LoadResult:
    """What a run of concurrent clients did: successes with their latencies, failures, wall time."""

    concurrency: int
    elapsed: float
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        """Requests answered with captions."""
        return len(self.latencies)

    @property
    def requests_per_second(self) -> float:
        """Answered requests per second of wall time."""
        return self.done / self.elapsed if self.elapsed else 0.0


def throughput(server: str, model: str, image: bytes, concurrency: int, seconds: float | None = None,
               signature: str = "serving_default", requests: int | None = None) -> LoadResult:
    """`concurrency` clients sending one image each, for `seconds` or until `requests` were sent in all."""
    if (seconds is None) == (requests is None):
        raise ValueError("give either seconds or requests")
    stop = threading.Event()
    result = LoadResult(concurrency, 0.0)
    lock = threading.Lock()
    tickets = iter(range(requests)) if requests is not None else None

    def take_ticket() -> bool:
        if tickets is None:
            return not stop.is_set()
        with lock:
            return next(tickets, None) is not None

    def worker():
        with CaptionClient(server, model, signature, retries=0) as client:
            client.caption([image])  # connect before the clock starts
            barrier.wait()
            while take_ticket():
                started = time.perf_counter()
                try:
                    client.caption([image])
                except Exception as e:  # noqa: BLE001 - count and report, keep measuring
                    with lock:
                        result.failures.append(str(e))
                    continue
                with lock:
                    result.latencies.append(time.perf_counter() - started)

    barrier = threading.Barrier(concurrency + 1)
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    if seconds is not None:
        time.sleep(seconds)
        stop.set()
    for thread in threads:
        thread.join()
    result.elapsed = time.perf_counter() - started
    if result.failures:
        print(f"{len(result.failures)} failed requests, e.g. {result.failures[0]}", file=sys.stderr)
    return result


def percentile_ms(values: list[float], q: float) -> float:
    """The q-th percentile of seconds, in milliseconds (nan for none)."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return 1000 * values[0]
    return 1000 * statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main(argv: list[str] | None = None) -> int:
    """Run both measurements and print them."""
    p = argparse.ArgumentParser(prog="python -m serving.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="localhost:8500")
    p.add_argument("--model", default="git")
    p.add_argument("--signature", default="serving_default")
    p.add_argument("--image", type=Path, default=None, help="PNG/JPEG/DICOM to send (default: a 256x256 PNG)")
    p.add_argument("--requests", type=int, default=200, help="sequential requests for the latency test")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20.0, help="duration of the throughput test")
    p.add_argument("--label", default="", help="a name for this run in the table")
    args = p.parse_args(argv)
    image = read_image(args.image) if args.image else png_bytes(128, (256, 256))

    times = latency(args.server, args.model, image, args.requests, args.signature)
    load = throughput(args.server, args.model, image, args.concurrency, args.seconds, args.signature)
    print(f"| run | batch-1 latency p50 / p90 / p99 (ms) | {args.concurrency} clients: requests/s | "
          "latency p50 / p99 (ms) |")
    print("|---|---|---|---|")
    ms = percentile_ms
    print(f"| {args.label or args.model} | {ms(times, 50):.1f} / {ms(times, 90):.1f} / {ms(times, 99):.1f} | "
          f"{load.requests_per_second:.1f} | {ms(load.latencies, 50):.1f} / {ms(load.latencies, 99):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
