"""Caption radiology images with a medcap model behind TensorFlow Serving (or serving.server), over gRPC.

    python -m serving.client --server localhost:8500 --model git chest.png knee.jpg head.dcm
    python -m serving.client --server localhost:8500 --model git --signature beam_search --json scans/*.dcm

PNG and JPEG files are sent as they are; DICOM files are turned into PNG here first
(`pipelines.dicom.dicom_to_png`), so only pixels leave the machine: no patient, study or
institution field is sent, logged or printed. Images go in batches (`--batch-size`), each call
with a deadline, retried with exponential backoff when the server is UNAVAILABLE or the
deadline passes (nothing else is retried). A file that cannot be captioned is reported on its
own line; the others still are.

Only the tensorflow-serving-api protos and grpc are used (TensorFlow itself is never started),
so the client works unchanged against the real TF Serving.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc

from serving import tensors
from serving.errors import CODES_BY_NUMBER
from serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

logger = logging.getLogger("serving.client")

INPUT_NAME = "images"
CAPTIONS, SCORES = "captions", "scores"
PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
STATE_NAMES = {v: k for k, v in get_model_status_pb2.ModelVersionStatus.State.items()}


class CaptionError(Exception):
    """A request or file that could not be captioned; `code` is the gRPC status code when the server said no."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


def read_image(path: str | Path) -> bytes:
    """PNG or JPEG bytes for a file: PNG/JPEG as is (an EXIF-rotated JPEG as the upright PNG a viewer shows),
    DICOM converted to PNG; CaptionError otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CaptionError(f"cannot read the file ({e.strerror or type(e).__name__})") from None
    if data.startswith(PNG_MAGIC):
        return data
    if data.startswith(JPEG_MAGIC):
        from pipelines.jpeg_for_model import readable_by_the_model

        return readable_by_the_model(data)[0]
    from pipelines.dicom import DicomError, dicom_to_png, is_dicom  # pydicom only when needed

    if is_dicom(data):
        try:
            return dicom_to_png(data)
        except DicomError as e:  # its messages hold technical facts only, never patient fields
            raise CaptionError(f"DICOM: {e}") from None
    raise CaptionError("not a PNG, JPEG or DICOM file")


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class CaptionClient:
    """A captioning model on a TF Serving gRPC endpoint."""

    def __init__(self, server: str, model: str, signature: str = "serving_default", timeout: float = 30.0,
                 retries: int = 3, secure: bool = False, root_certificates: bytes | None = None, *,
                 batch_size: int = 8, backoff: float = 0.5, max_backoff: float = 8.0, version: int | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.server, self.model, self.signature, self.version = server, model, signature, version
        self.timeout, self.retries, self.batch_size = timeout, retries, batch_size
        self.backoff, self.max_backoff = backoff, max_backoff
        self.attempts = 0  # calls made by the last request, retries included
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        if secure or root_certificates:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(server, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(server, options=options)
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> "CaptionClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _spec(self, spec) -> None:
        spec.name = self.model
        if self.version is not None:
            spec.version.value = self.version

    def _call(self, method, request, what: str):
        """One RPC with a deadline, retried with backoff on UNAVAILABLE / DEADLINE_EXCEEDED only."""
        delay, self.attempts = self.backoff, 0
        while True:
            self.attempts += 1
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as e:
                code, details = e.code(), e.details()
                if code in RETRY_CODES and self.attempts <= self.retries:
                    pause = delay * random.uniform(0.8, 1.2)
                    logger.warning("%s on %s: %s (%s); retry %d of %d in %.1f s", what, self.server, code.name,
                                   details, self.attempts, self.retries, pause)
                    time.sleep(pause)
                    delay = min(delay * 2, self.max_backoff)
                    continue
                raise CaptionError(f"{code.name}: {details}", code) from None

    def _caption_batch(self, images: Sequence[bytes]) -> list[dict]:
        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec)
        request.model_spec.signature_name = self.signature
        request.inputs[INPUT_NAME].CopyFrom(tensors.make_tensor_proto(list(images), tensors.DT.DT_STRING))
        response = self._call(self._predict.Predict, request, "Predict")
        if CAPTIONS not in response.outputs:
            raise CaptionError(f"the model answered no '{CAPTIONS}' output (it has: {', '.join(response.outputs)})")
        captions = tensors.make_ndarray(response.outputs[CAPTIONS]).reshape(-1)
        scores = tensors.make_ndarray(response.outputs[SCORES]).reshape(-1) if SCORES in response.outputs else None
        if len(captions) != len(images):
            raise CaptionError(f"the model answered {len(captions)} captions for {len(images)} images")
        return [{"caption": bytes(c).decode("utf-8", errors="replace"),
                 "score": None if scores is None else float(scores[i])} for i, c in enumerate(captions)]

    def caption(self, images: list[bytes]) -> list[dict]:
        """PNG/JPEG bytes -> [{"caption": str, "score": float}], in batches; CaptionError if a call fails."""
        results: list[dict] = []
        for batch in _batches(list(images), self.batch_size):
            results.extend(self._caption_batch(batch))
        return results

    def caption_files(self, paths: Sequence[str | Path]) -> list[dict]:
        """[{"file", "caption", "score", "error"}] per file; a bad file gets an error, the others captions."""
        results = [{"file": str(p), "caption": None, "score": None, "error": None} for p in paths]
        ready = []
        for index, path in enumerate(paths):
            try:
                ready.append((index, read_image(path)))
            except CaptionError as e:
                results[index]["error"] = str(e)
        for batch in _batches(ready, self.batch_size):
            try:
                answers = list(zip(batch, self._caption_batch([data for _, data in batch])))
            except CaptionError as e:
                if e.code != grpc.StatusCode.INVALID_ARGUMENT or len(batch) == 1:
                    for index, _ in batch:
                        results[index]["error"] = str(e)
                    continue
                answers = []  # one bad image fails its whole request: find it by sending them one by one
                for item in batch:
                    try:
                        answers.append((item, self._caption_batch([item[1]])[0]))
                    except CaptionError as single:
                        results[item[0]]["error"] = str(single)
            for (index, _), answer in answers:
                results[index].update(answer)
        return results

    def status(self) -> list[dict]:
        """[{"version", "state", "error_code", "error_message"}] for the model's versions."""
        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec)
        response = self._call(self._models.GetModelStatus, request, "GetModelStatus")
        return [{"version": s.version, "state": STATE_NAMES.get(s.state, str(s.state)),
                 "error_code": CODES_BY_NUMBER.get(s.status.error_code, grpc.StatusCode.UNKNOWN).name,
                 "error_message": s.status.error_message} for s in response.model_version_status]

    def metadata(self) -> dict:
        """{"version": N, "signatures": {name: {"inputs": {alias: {dtype, shape}}, "outputs": {...}}}}."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec)
        response = self._call(self._predict.GetModelMetadata, request, "GetModelMetadata")
        signature_defs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_defs)

        def tensor_infos(infos) -> dict:
            return {alias: {"dtype": tensors.dtype_name(info.dtype),
                            "shape": None if info.tensor_shape.unknown_rank else
                            [int(d.size) for d in info.tensor_shape.dim]} for alias, info in sorted(infos.items())}

        return {"version": response.model_spec.version.value, "signatures": {
            name: {"inputs": tensor_infos(sig.inputs), "outputs": tensor_infos(sig.outputs)}
            for name, sig in sorted(signature_defs.signature_def.items()) if not name.startswith("__")}}


# --- command line -------------------------------------------------------------------------------


def format_table(results: list[dict]) -> str:
    """An aligned table: file, caption (or ERROR: ...), score."""
    rows = [("file", "caption", "score")]
    for r in results:
        text = r["caption"] if r["error"] is None else f"ERROR: {r['error']}"
        rows.append((r["file"], text, "" if r["score"] is None else f"{r['score']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}".rstrip() for row in rows)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", metavar="FILE", help="PNG, JPEG or DICOM files")
    p.add_argument("--server", default="localhost:8500", help="gRPC address host:port")
    p.add_argument("--model", default="git", help="model name in the server's config")
    p.add_argument("--version", type=int, default=None, help="model version (default: the latest served)")
    p.add_argument("--signature", default="serving_default", help="serving_default (greedy) or beam_search")
    p.add_argument("--batch-size", type=int, default=8, help="images per request")
    p.add_argument("--deadline", type=float, default=30.0, help="seconds allowed per request")
    p.add_argument("--retries", type=int, default=3, help="retries on UNAVAILABLE / DEADLINE_EXCEEDED")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    p.add_argument("--secure", action="store_true", help="TLS (system roots unless --root-cert)")
    p.add_argument("--root-cert", type=Path, default=None, help="PEM file of the CA that signed the server cert")
    p.add_argument("--status", action="store_true", help="print the model's version status and exit")
    p.add_argument("--metadata", action="store_true", help="print the model's signatures and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """Caption the files; 0 when every file got a caption, 1 otherwise."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.files and not (args.status or args.metadata):
        build_parser().error("give at least one FILE (or --status / --metadata)")
    if args.batch_size < 1:
        build_parser().error("--batch-size must be >= 1")
    root = args.root_cert.read_bytes() if args.root_cert else None
    with CaptionClient(args.server, args.model, args.signature, timeout=args.deadline, retries=args.retries,
                       secure=args.secure, root_certificates=root, batch_size=args.batch_size,
                       version=args.version) as client:
        try:
            if args.status or args.metadata:
                print(json.dumps(client.status() if args.status else client.metadata(), indent=2))
                return 0
        except CaptionError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        results = client.caption_files(args.files)
    if args.json:
        for result in results:
            print(json.dumps(result, ensure_ascii=False))
    else:
        print(format_table(results))
    return 0 if all(r["error"] is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
