"""Paired training runs: a change against the unchanged settings, trained side by side in the same minutes.

    python -m benchmarks.paired_runs --b "--learning-rate 2e-3" --seeds 0 1 -- --model git --time-budget 12.7

Each seed trains two variants of `pipelines/train.py` at once, each in its own process with half the CPU
cores (one thread each on 2 cores), as the default run's two models train beside each other. A small
preset's score depends on how many epochs its time budget fits, and a shared VM's speed drifts by the
minute; two variants that share those minutes see the same drift, so their difference is the change's,
not the machine's. Arguments after `--` go to both runs; `--a` and `--b` add each variant's own (`--a`
defaults to none: the settings as they are). Runs land in `--out/seed{S}/{a,b}` (a finished one is read,
not trained again; an interrupted one continues, as `pipelines/train.py --run-dir` does), the table shows each run's epochs and per-field accuracy, and the JSON keeps them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import print_table, write_json

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("finding", "laterality", "size", "all_fields")  # pipelines.findings' fields that small models miss
SCORES = ("BLEU-4", "CIDEr")  # pycocoevalcap's, for datasets whose captions name no findings


def child(threads: int, train_args: list[str]) -> int:
    """In a child process: `pipelines/train.py` with `threads` TensorFlow threads, as a side-by-side child."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    sys.path.insert(0, str(REPO))
    from pipelines.train import main as train

    return train(train_args)


def prepare_synthetic(common: list[str], variants: dict[str, list[str]]) -> None:
    """Render the synthetic set the variants train on once, here, before they start.

    Two runs that each found the cache stale (after a change of the default set) would both render it and swap it
    in, one under the other's feet. Variants that ask for different synthetic sets are refused: they share one cache.
    """
    from pipelines.train import DEFAULT_CACHE, parse_args

    wanted = {name: parse_args([*common, *extra])[0] for name, extra in variants.items()}
    sizes = {name: cfg.synthetic for name, cfg in wanted.items() if not cfg.dataset}
    if len({json.dumps(size, sort_keys=True) for size in sizes.values()}) > 1:
        raise SystemExit(f"the variants ask for different synthetic sets ({sizes}), which share one cache: render one "
                         "with python -m pipelines.synthetic --out DIR --train N and give that variant --dataset DIR")
    if sizes:
        from pipelines.training import synthetic_dataset

        synthetic_dataset(DEFAULT_CACHE, next(iter(sizes.values())))


def run_pair(out: Path, seed: int, common: list[str], variants: dict[str, list[str]], threads: int) -> dict[str, Path]:
    """Train every variant of one seed at once (skipping runs already finished); {variant: run dir}."""
    runs, processes = {}, {}
    for name, extra in variants.items():
        run_dir = out / f"seed{seed}" / name
        runs[name] = run_dir
        if (run_dir / "summary.json").is_file():
            print(f"seed {seed}, {name}: already finished in {run_dir}")
            continue
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        args = [*common, *extra, "--seed", str(seed), "--run-dir", str(run_dir)]
        print(f"seed {seed}, {name}: python pipelines/train.py {shlex.join(args)} (log: {run_dir}.log)", flush=True)
        log = open(f"{run_dir}.log", "w")  # noqa: SIM115 - closed once the process ends
        command = [sys.executable, "-m", "benchmarks.paired_runs", "--child-threads", str(threads), "--", *args]
        processes[name] = (subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log)
    if len(processes) == 1:
        print(f"warning: seed {seed}: only {next(iter(processes))} is left to train; it trains alone, without the "
              "other run's minutes (delete both run folders to train the pair again)", flush=True)
    started = time.perf_counter()
    try:
        for name, (process, log) in processes.items():
            code = process.wait()
            log.close()
            if code:
                raise SystemExit(f"seed {seed}, {name} failed (exit code {code}); see {runs[name]}.log")
    except BaseException:
        for process, _ in processes.values():
            process.terminate()
        raise
    if processes:
        print(f"seed {seed}: trained in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return runs


def read_run(run_dir: Path) -> list[dict]:
    """One row per model of a finished run: epochs that fit and per-field accuracy (%)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = []
    for model, info in summary["models"].items():
        pretraining = info.get("concept_pretraining") or {}
        metrics = info.get("metrics", {})
        fields, scores = metrics.get("fields", {}), metrics.get("caption_metrics", {})
        rows.append({"model": model, "concept_epochs": pretraining.get("epochs", 0),
                     "concept_epoch_kept": pretraining.get("best_epoch"), "captioner_epochs": info.get("epochs_run"),
                     "train_seconds": info.get("train_seconds"),
                     **{f: round(100 * fields[f]["accuracy"], 1) for f in FIELDS
                        if fields.get(f, {}).get("accuracy") is not None},
                     **{s: round(100 * scores[s], 2) for s in SCORES if scores.get(s) is not None}})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Train the pairs, print the table and the differences, write the JSON."""
    argv = sys.argv[1:] if argv is None else argv
    ours, common = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m benchmarks.paired_runs", description=__doc__.split("\n\n")[0],
                                epilog="Arguments after `--` go to `pipelines/train.py` in both runs.")
    p.add_argument("--a", default="", help="variant a's own train.py arguments, quoted (default: none)")
    p.add_argument("--b", required="--child-threads" not in ours, help="variant b's own train.py arguments, quoted; "
                   "one option alone goes with '=': --b=--no-freeze-stem")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one pair of runs per seed (default: 0)")
    p.add_argument("--out", type=Path, default=None, help="where the runs go (default runs/paired-<time>)")
    p.add_argument("--threads", type=int, default=None,
                   help="TensorFlow threads per run (default: half the usable cores, at least 1)")
    p.add_argument("--json", help="JSON path (default benchmarks/results/paired_runs.json)")
    p.add_argument("--child-threads", type=int, help=argparse.SUPPRESS)  # internal: this process is one run
    args = p.parse_args(ours)
    if args.child_threads:
        return child(args.child_threads, common)
    if any(a in common for a in ("--seed", "--run-dir", "--resume")):
        p.error("--seed, --run-dir and --resume are set per run; pass seeds with --seeds")
    from pipelines.parallel_training import usable_cpus

    threads = args.threads or max(1, usable_cpus() // 2)
    out = args.out or REPO / "runs" / time.strftime("paired-%Y%m%d-%H%M%S")
    variants = {"a": shlex.split(args.a), "b": shlex.split(args.b)}
    print(f"paired runs in {out}: a = {args.a or '(as they are)'}; b = {args.b}; both: {shlex.join(common)}; "
          f"{threads} thread(s) each")
    prepare_synthetic(common, variants)
    results = []
    for seed in args.seeds:
        for name, run_dir in run_pair(out, seed, common, variants, threads).items():
            results += [{"seed": seed, "variant": name, **row} for row in read_run(run_dir)]
    print("\nPer-field accuracy (%) and caption scores (x 100) on the evaluation split; epochs: concept pretraining (kept) "
          "+ captioner:\n")
    print_table(["seed", "variant", "model", "epochs", *FIELDS, *SCORES],
                [[r["seed"], r["variant"], r["model"],
                  f"{r['concept_epochs']} ({r['concept_epoch_kept']}) + {r['captioner_epochs']}"
                  if r["concept_epochs"] else str(r["captioner_epochs"]), *(r.get(f, "-") for f in (*FIELDS, *SCORES))]
                 for r in results])
    differences = {}
    for model in sorted({r["model"] for r in results}):
        pairs = [(a, b) for a in results for b in results if a["model"] == b["model"] == model
                 and a["seed"] == b["seed"] and (a["variant"], b["variant"]) == ("a", "b")]
        for key in ("all_fields", "CIDEr"):  # the first that every run of the model has
            if pairs and all(key in a and key in b for a, b in pairs):
                gains = [round(b[key] - a[key], 2) for a, b in pairs]
                differences[model] = {key: gains}
                print(f"\n{model}: b - a, {key.replace('_', ' ')}: {', '.join(f'{g:+.1f}' for g in gains)} points "
                      f"(mean {sum(gains) / len(gains):+.2f} over {len(gains)} seed(s))")
                break
    write_json("paired_runs", {"out": str(out), "a": args.a, "b": args.b, "common": common, "threads": threads,
                               "runs": results, "b_minus_a": differences}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
