"""Caption generation speed: our Keras GIT against Hugging Face's `GitForCausalLM.generate`, same weights.

    python -m benchmarks.generation                      # git-base and small shapes, 2 threads
    python -m benchmarks.generation --configs small --repeats 3

For each shape a random `GitForCausalLM` is built (torch seed 0), saved as a checkpoint and
timed in a child process that imports only PyTorch and transformers; then this process converts
the checkpoint with `keras_models.git.convert_hf.convert_checkpoint` (same weights) and times ours.
Separate processes keep one runtime's idle, spinning worker threads from slowing the other.
Both generate exactly 32 new tokens after [CLS] for the same preprocessed images:
Hugging Face with `min_new_tokens = max_new_tokens = 32`, ours with `max_length = 33` and no stop
token (the compiled keras-hub sampler loop, ids out, as HF's `generate` returns ids). The [SEP]
logit bias is set to -30 in the checkpoint so the SavedModel (which stops at [SEP]) and our public
`generate()` (which also scores and detokenizes) do the same 32 steps. Each figure is the median
of `--repeats` calls after one warm-up call; both frameworks get `--threads` threads. Ours is also
timed with `fold_biases = False` (each projection's bias added after its product), the peer that the
decoding step's bias folding is measured against; the folding applies to one row only, so for batch 8 and
beams both columns run the same code and their gap is the run's noise.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import limit_threads, median_seconds, print_table, write_json
from benchmarks.hardware_floor import best_rates, floor_seconds, generation_work, measure_rates

CLS, SEP = 101, 102
NEW_TOKENS = 32
VOCAB_SIZE = 30522
# transformers GitConfig kwargs; `base` is GitConfig()'s own shapes (microsoft/git-base, 176.6 M).
CONFIGS = {
    "base": {},
    "small": dict(  # ../shared/notes/git.md's "small": ViT 384x6 at 224/16, text 384x4 (42.1 M)
        vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                           image_size=224, patch_size=16),
        hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
    ),
}
CASES = [("batch 1 greedy", 1, 1), ("batch 8 greedy", 8, 1), ("batch 1, 3 beams", 1, 3)]
TARGETS = {"batch 1 greedy": 1.3, "batch 8 greedy": 2.0, "batch 1, 3 beams": 2.0}  # min speed-up over HF


def bert_like_vocab(size: int = VOCAB_SIZE) -> list[str]:
    """A vocabulary with BERT's special ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103)."""
    from pipelines.text import SPECIAL_TOKENS

    vocab = [f"tok{i}" for i in range(size)]
    for token, index in zip(SPECIAL_TOKENS, (0, 100, CLS, SEP, 103)):
        vocab[index] = token
    return vocab


def make_checkpoint(config: dict, folder: Path):
    """A random `GitForCausalLM` (torch seed 0, [SEP] never chosen) saved with a BERT-like vocab.txt."""
    import torch
    from transformers import GitConfig, GitForCausalLM

    torch.manual_seed(0)
    hf = GitForCausalLM(GitConfig(**config)).eval()
    with torch.no_grad():
        hf.output.bias[SEP] = -30.0  # never end early: the stopping variants do all 32 steps too
    hf.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(bert_like_vocab()) + "\n")
    return hf


def hf_worker(name: str, folder: Path, repeats: int, threads: int) -> None:
    """Child process: make the checkpoint, time Hugging Face on every case, print the figures as JSON."""
    import json

    import torch

    torch.set_num_threads(threads)
    hf = make_checkpoint(CONFIGS[name], folder)
    size = hf.config.vision_config.image_size
    images = images_for(size)
    out = {"parameters": sum(p.numel() for p in hf.parameters()), "cases": {}, "rates": measure_rates("torch")}
    for case, batch, beams in CASES:
        pixel_values = torch.tensor(images[:batch].transpose(0, 3, 1, 2))
        ids = hf_generate(hf, pixel_values, beams).numpy()
        assert ids.shape == (batch, 1 + NEW_TOKENS), ids.shape
        median, times = median_seconds(lambda: hf_generate(hf, pixel_values, beams), repeats)
        out["cases"][case] = {"seconds": median, "times": times, "token_ids": ids.tolist()}
    print("HF-RESULT " + json.dumps(out), flush=True)


def images_for(size: int) -> np.ndarray:
    """The 8 preprocessed images every case draws from (NHWC, seed 0)."""
    return np.random.default_rng(0).standard_normal((8, size, size, 3)).astype("float32")


def run_hf(name: str, folder: Path, repeats: int, threads: int) -> dict:
    """Run `hf_worker` in a child process; its figures."""
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "benchmarks.generation", "--hf-worker", name, str(folder),
               "--repeats", str(repeats), "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in result.stdout.splitlines() if line.startswith("HF-RESULT ")]
    if result.returncode or not lines:
        raise RuntimeError(f"Hugging Face worker failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("HF-RESULT "):])


def hf_generate(hf, pixel_values, num_beams: int):
    """Hugging Face: exactly NEW_TOKENS new tokens after [CLS]; returns the ids."""
    import torch

    with torch.inference_mode():
        return hf.generate(pixel_values=pixel_values, input_ids=torch.full((len(pixel_values), 1), CLS),
                           max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           num_beams=num_beams)


def ours_function(model, images: np.ndarray, num_beams: int):
    """Our compiled sampler loop for `images`, set up (and traced) for `num_beams`: (no-arg call, its inputs).

    Compiled as `make_generate_function` compiles it (XLA), but without scoring the tokens:
    ids out, as Hugging Face's `generate` gives them.
    """
    import tensorflow as tf

    sampler = "greedy" if num_beams == 1 else "beam"
    model.generate(images, max_length=1 + NEW_TOKENS, sampler=sampler, num_beams=num_beams)  # picks the sampler
    function = tf.function(lambda x: model.generate_step(x, stop_token_ids=None, score=False), jit_compile=True)
    inputs = model.preprocessor.generate_preprocess({"images": images}, sequence_length=1 + NEW_TOKENS)
    return (lambda: function(inputs)), inputs


def png_batch(images: np.ndarray) -> list[bytes]:
    """Encoded PNGs of the same pixels (undoing CLIP normalisation roughly, for the SavedModel's input)."""
    from PIL import Image

    out = []
    for image in images:
        pixels = np.clip((image * 0.27 + 0.45) * 255, 0, 255).astype("uint8")
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def run_config(name: str, repeats: int, threads: int, with_saved_model: bool, rates: dict) -> dict:
    """Every case for one shape (Hugging Face in a child process first, then ours); returns its figures.

    `rates` (this process's measured matrix-product rate and bandwidth) and the Hugging Face worker's give each
    case its `benchmarks.hardware_floor` time.
    """
    import tensorflow as tf

    from keras_models.git.convert_hf import convert_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint"
        hf = run_hf(name, folder, repeats, threads)
        ours = convert_checkpoint(folder, sequence_length=1 + NEW_TOKENS)
        parameters = hf["parameters"]
        print(f"\n## {name}: {parameters / 1e6:.1f} M parameters (HF {parameters:,}, ours {ours.count_params():,})",
              flush=True)
        all_images = images_for(ours.image_config["image_size"])
        rates = best_rates(rates, hf["rates"])
        dims = ours.backbone.get_config()
        exported = None
        if with_saved_model:
            from export.saved_model import export_model

            exported = tf.saved_model.load(str(export_model(ours, Path(tmp) / "serving", "git",
                                                            max_length=1 + NEW_TOKENS)))
        rows = []
        for case, batch, beams in CASES:
            images = all_images[:batch]
            call, _ = ours_function(ours, images, beams)
            our_ids = np.asarray(call()["token_ids"])
            assert our_ids.shape == (batch, 1 + NEW_TOKENS), our_ids.shape
            our_s, our_all = median_seconds(call, repeats)
            generate_s, _ = median_seconds(
                lambda: ours.generate(images, max_length=1 + NEW_TOKENS, sampler="greedy" if beams == 1 else "beam",
                                      num_beams=beams), repeats)
            ours.fold_biases = False  # biases not folded: layers called as they are
            try:
                unfolded_s, unfolded_times = median_seconds(ours_function(ours, images, beams)[0], repeats)
            finally:
                ours.fold_biases = True
            reference = hf["cases"][case]
            hf_s, hf_ids = reference["seconds"], np.asarray(reference["token_ids"])
            row = {"config": name, "case": case, "batch": batch, "beams": beams, "hf_s": hf_s, "ours_s": our_s,
                   "speedup": hf_s / our_s, "target": TARGETS[case], "ours_generate_s": generate_s,
                   "ours_unfolded_s": unfolded_s, "ours_unfolded_times": unfolded_times,
                   "hf_best_s": min(reference["times"]), "ours_best_s": min(our_all),
                   "tokens_agree": float(np.mean(hf_ids[:, 1:] == our_ids[:, 1:])),
                   "hf_times": reference["times"], "ours_times": our_all,
                   "floor_s": floor_seconds(generation_work(dims, batch, beams, NEW_TOKENS), rates), "rates": rates}
            if exported is not None:
                signature = exported.signatures["serving_default" if beams == 1 else "beam_search"]
                pngs = tf.constant(png_batch(images))
                row["saved_model_s"], _ = median_seconds(lambda: signature(images=pngs), repeats)
            rows.append(row)
            print(f"{case}: HF {hf_s:.3f} s, ours {our_s:.3f} s ({hf_s / our_s:.2f}x; biases not folded "
                  f"{unfolded_s:.3f} s), generate() {generate_s:.3f} s"
                  + (f", SavedModel {row['saved_model_s']:.3f} s" if "saved_model_s" in row else ""), flush=True)
    return {"parameters": parameters, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    """Measure every configuration and print the table."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["small", "base"])
    p.add_argument("--repeats", type=int, default=3, help="timed calls per figure (the median is reported)")
    p.add_argument("--threads", type=int, default=2, help="threads for both TensorFlow and PyTorch")
    p.add_argument("--no-saved-model", action="store_true", help="skip exporting and timing the SavedModel")
    p.add_argument("--out", help="JSON path (default benchmarks/results/generation.json)")
    p.add_argument("--hf-worker", nargs=2, metavar=("CONFIG", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hf_worker:
        hf_worker(args.hf_worker[0], Path(args.hf_worker[1]), args.repeats, args.threads)
        return 0
    limit_threads(args.threads)
    rates = best_rates(measure_rates("tensorflow"), measure_rates("numpy"))
    results = {name: run_config(name, args.repeats, args.threads, not args.no_saved_model, rates)
               for name in args.configs}
    rows = [r for result in results.values() for r in result["rows"]]
    print(f"\nSeconds per call, {NEW_TOKENS} new tokens, median of {args.repeats} after a warm-up, "
          f"{args.threads} threads:\n")
    print_table(["shape", "case", "HF generate", "ours (sampler loop)", "speed-up", "target", "best of HF / ours",
                 "ours, biases not folded", "ours generate()", "SavedModel (PNG in)", "tokens agree"],
                [[r["config"], r["case"], r["hf_s"], r["ours_s"], f"{r['speedup']:.2f}x", f">= {r['target']}x",
                  f"{r['hf_best_s']:.3f} / {r['ours_best_s']:.3f}", r["ours_unfolded_s"], r["ours_generate_s"],
                  r.get("saved_model_s", "-"), f"{100 * r['tokens_agree']:.0f}%"] for r in rows])
    measured = "; ".join(f"{name} {result['rows'][0]['rates']['flops_per_s'] / 1e9:.0f} GFLOP/s, "
                         f"{result['rows'][0]['rates']['bytes_per_s'] / 1e9:.1f} GB/s"
                         for name, result in results.items() if result["rows"])
    print(f"\nHardware floor (benchmarks/hardware_floor.py: the work at this machine's best measured fp32 rates in "
          f"matrix products and reading memory, best of TensorFlow, PyTorch and NumPy: {measured}); an "
          "implementation that reads its weights from memory each step cannot beat it:\n")
    print_table(["shape", "case", "floor", "HF / floor", "ours / floor", "target time (HF / target)", "target possible"],
                [[r["config"], r["case"], r["floor_s"], f"{r['hf_s'] / r['floor_s']:.2f}x",
                  f"{r['ours_s'] / r['floor_s']:.2f}x", r["hf_s"] / r["target"],
                  "yes" if r["hf_s"] / r["target"] >= r["floor_s"] else "no"] for r in rows])
    if any(min(r["hf_best_s"], r["ours_best_s"]) < r["floor_s"] for r in rows):
        print("\nA call ran faster than its floor: the rates measured here are below what the machine reached "
              "(busy, or its speed swung), so these floors are no bound on this run.")
    write_json("generation", {"new_tokens": NEW_TOKENS, "threads": args.threads, "repeats": args.repeats,
                              "configs": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
