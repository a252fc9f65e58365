"""Caption scoring cost: GIT's scores from its decoding cache against a second, full teacher-forced pass.

    python -m benchmarks.scoring                      # git-base and small shapes, 2 threads

`generate()` and the SavedModel return each caption's mean log-probability per token. GIT's
`generate_step` scores the chosen tokens in one pass of the text over the image keys/values it
already holds; the alternative (`token_log_probs`, what every captioner without such a step uses)
runs the whole model again, image encoder included. Both are timed in this process on the same
random weights (`benchmarks.generation`'s checkpoints) and the same 32 tokens, next to the
sampler loop alone, and their scores are checked to agree within 1e-4.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import limit_threads, median_seconds, print_table, write_json
from benchmarks.generation import CASES, CONFIGS, NEW_TOKENS, images_for, make_checkpoint, ours_function


def run_config(name: str, repeats: int) -> list[dict]:
    """Every case of `benchmarks.generation` for one shape: seconds for the loop, full-pass and cached scoring."""
    from keras_models.git.convert_hf import convert_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(CONFIGS[name], Path(tmp))
        model = convert_checkpoint(Path(tmp), sequence_length=1 + NEW_TOKENS)
    images, rows = images_for(model.image_config["image_size"]), []
    for case, batch, beams in CASES:
        loop, inputs = ours_function(model, images[:batch], beams)  # also compiles generate() for this sampler

        def full_pass():
            return model.token_log_probs({"images": inputs["images"], **loop()}).numpy()

        def from_cache():
            return model.generate_function(inputs, stop_token_ids=None)["token_log_probs"].numpy()

        difference = float(np.max(np.abs(full_pass() - from_cache())))
        assert difference < 1e-4, f"{name} {case}: scores differ by {difference}"
        loop_s, _ = median_seconds(loop, repeats)
        full_s, _ = median_seconds(full_pass, repeats)
        cached_s, _ = median_seconds(from_cache, repeats)
        rows.append({"config": name, "case": case, "loop_s": loop_s, "full_pass_s": full_s, "cached_s": cached_s,
                     "speedup": full_s / cached_s, "max_abs_difference": difference})
        print(f"{name} {case}: loop {loop_s:.3f} s, + full pass {full_s:.3f} s, scored from the cache {cached_s:.3f} s "
              f"({full_s / cached_s:.2f}x)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure every configuration and print the table."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.scoring", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["small", "base"])
    p.add_argument("--repeats", type=int, default=3, help="timed calls per figure (the median is reported)")
    p.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op and inter-op threads")
    p.add_argument("--out", help="JSON path (default benchmarks/results/scoring.json)")
    args = p.parse_args(argv)
    limit_threads(args.threads)
    rows = [row for name in args.configs for row in run_config(name, args.repeats)]
    print(f"\nSeconds per call, {NEW_TOKENS} tokens, median of {args.repeats} after a warm-up, "
          f"{args.threads} threads:\n")
    print_table(["shape", "case", "sampler loop", "loop + full teacher-forced pass", "scored from the cache",
                 "speed-up", "max |difference|"],
                [[r["config"], r["case"], r["loop_s"], r["full_pass_s"], r["cached_s"], f"{r['speedup']:.2f}x",
                  f"{r['max_abs_difference']:.1e}"] for r in rows])
    write_json("scoring", {"new_tokens": NEW_TOKENS, "threads": args.threads, "repeats": args.repeats, "rows": rows},
               args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
