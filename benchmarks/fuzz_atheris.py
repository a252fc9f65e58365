"""Coverage-guided fuzzing (atheris / libFuzzer) of the server's Predict path, in process.

    python -m benchmarks.fuzz_atheris --runs 20000          # about a minute on 2 cores

The fuzzer's bytes (mutations of a seed corpus: serialized requests, a real JPEG, small PNG and JPEG)
become a serialized PredictRequest, or the image bytes of a well-formed request (alone or after a
good image in a batch), and go through `serving.core.ServingCore.predict` (the code behind
gRPC and REST) serving a SavedModel that runs the real `pipelines.images.preprocess_images`. An
answer must be a response or a `ServingError` with a client-error status; anything else (another
exception, a crash in a TensorFlow kernel) stops the run with the input that caused it. Only the
`serving` and `pipelines.images` modules are instrumented. tests/test_reliability.py holds the fast
Hypothesis fuzzing of the running server.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table, write_json

ALLOWED = {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}
REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    """Start the in-process server core and fuzz it for --runs inputs."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.fuzz_atheris", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20_000, help="inputs to try")
    p.add_argument("--out", help="JSON path (default benchmarks/results/fuzz_atheris.json)")
    args, libfuzzer_args = p.parse_known_args(argv)

    import atheris
    import psutil

    with atheris.instrument_imports(include=["serving", "pipelines.images"]):
        from serving import errors
        from serving.apis import model_server_config_pb2, predict_pb2
        from serving.core import ServingCore
        from serving.model_manager import ModelManager
        from serving.tensors import make_tensor_proto
        from serving.testing import jpeg_bytes, png_bytes, write_fake_captioner
    from google.protobuf.message import DecodeError

    tmp = tempfile.mkdtemp(prefix="medcap-atheris-")
    write_fake_captioner(tmp, "m", 1)
    config = model_server_config_pb2.ModelServerConfig()
    config.model_config_list.config.add(name="m", base_path=str(Path(tmp) / "m"), model_platform="tensorflow")
    manager = ModelManager(config, poll_wait_seconds=0)
    manager.start()
    core = ServingCore(manager)
    seeds = [png_bytes(90, (24, 20)), jpeg_bytes(200, (24, 20)),
             sorted((REPO / "pipelines" / "examples" / "valid").glob("*.jpg"))[0].read_bytes()[:4096]]
    outcomes: collections.Counter = collections.Counter()
    process = psutil.Process()
    state = {"started": time.perf_counter(), "rss0": None}

    def request_for(images: list[bytes]) -> predict_pb2.PredictRequest:
        message = predict_pb2.PredictRequest()
        message.model_spec.name = "m"
        import numpy as np

        message.inputs["images"].CopyFrom(make_tensor_proto(np.array(images, dtype=object), 7))
        return message

    def one_input(data: bytes) -> None:
        mode, payload = (data[0] % 3, data[1:]) if data else (1, b"")
        if mode == 0:  # the whole request from the fuzzer
            try:
                message = predict_pb2.PredictRequest.FromString(payload)
            except DecodeError:
                outcomes["undecodable proto (gRPC refuses it)"] += 1
                return
        elif mode == 1:  # one image from the fuzzer
            message = request_for([payload])
        else:  # the fuzzer's image in a batch after a good one
            message = request_for([seeds[0], payload])
        try:
            core.predict(message)
            outcomes["OK"] += 1
        except errors.ServingError as e:
            outcomes[e.code.name] += 1
            if e.code.name not in ALLOWED:
                raise AssertionError(f"{e.code.name}: {e.message}") from None
        done = sum(outcomes.values())
        if done == 1000:
            state["rss0"] = process.memory_info().rss
        if done >= args.runs:  # libFuzzer ends the process with exit(), past any Python clean-up
            report(done)
            sys.stdout.flush()
            os._exit(0)

    def report(done: int) -> None:
        seconds = time.perf_counter() - state["started"]
        rss = process.memory_info().rss
        print(f"\n{done} inputs in {seconds:.0f} s ({done / seconds:.0f}/s); RSS after 1,000 inputs "
              f"{(state['rss0'] or rss) / 2**20:.0f} MiB, at the end {rss / 2**20:.0f} MiB\n")
        print_table(["outcome", "inputs"], sorted(outcomes.items()))
        write_json("fuzz_atheris", {"inputs": done, "seconds": seconds, "outcomes": dict(outcomes),
                                    "rss_after_1000_mib": (state["rss0"] or rss) / 2**20, "rss_end_mib": rss / 2**20,
                                    "crashes": 0}, args.out)

    corpus = Path(tmp) / "corpus"  # first byte: the mode; then a well-formed request or image to mutate
    corpus.mkdir()
    for index, seed in enumerate(seeds):
        (corpus / f"request-{index}").write_bytes(b"\x00" + request_for([seed]).SerializeToString())
        (corpus / f"image-{index}").write_bytes(b"\x01" + seed)
        (corpus / f"batch-{index}").write_bytes(b"\x02" + seed)
    # A crashing input is written to the temp folder (its path is printed); -seed makes a run repeatable.
    atheris.Setup([sys.argv[0], str(corpus), f"-runs={args.runs + 1000}", "-seed=1", "-max_len=8192",
                   "-reduce_inputs=0",
                   f"-artifact_prefix={tmp}/", *libfuzzer_args], one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
