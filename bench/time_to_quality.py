"""How long the defaults take to caption a dataset well, per dataset family and seed, beside
seemore's original recipe on the same data and wall-clock budget.

    python -m bench.time_to_quality [--families shapes,polygons,...] [--seeds 1337,1,2]
        [--recipes defaults,seemore,pooled] [--n 3000] [--budget-s 300] [--eval-every 50] [--out runs/ttq] [key=value ...]

For each family (``bench.caption_families``) the bench writes one CSV, then trains each recipe on it
once per seed (``train.seed``: the split, the initial weights and the data order), engine-free on
this machine's CPU, evaluating the whole held-out split every ``--eval-every`` steps. A run ends with
its schedule or, at ``--budget-s`` seconds of wall clock, with SIGTERM (it saves and exits, as a
preempted job does). Training seconds are the summed step times of ``timing_logs.csv``: start-up
and evaluation excluded. Prints one JSON line per run, then a table of medians over the seeds with
the range beside them. key=value arguments go to every run (e.g. train.max_steps=2000).
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.caption_families import FAMILIES, write_family_csv
from seemore_ds.precision import cpu_facts

THRESHOLDS = (0.9, 0.95)
# seemore's notebook: one patch conv, the CLS vector as the only image token, no LayerNorm on the
# patches, its widths and depths, dropout 0.1, batch 16, constant lr 1e-3 with AdamW's own defaults,
# no clipping, images as they are; it trains until the budget ends it.
RECIPES = {
    "defaults": [],
    # The defaults handing the decoder the CLS token and the patch grid averaged 2 x 2 (fewer, cheaper tokens).
    "pooled": ["model.image_tokens=pooled"],
    "seemore": ["model.image_tokens=cls", "model.patch_embed=patch", "model.patch_norm=false",
                "model.image_embed_dim=512", "model.n_layer=8", "model.dropout=0.1", "train.batch_size=16",
                "train.lr=0.001", "train.warmup_steps=0", "train.min_lr_ratio=1.0", "train.weight_decay=0.01",
                "train.beta2=0.999", "train.grad_clip=0", "data.shift_px=0", "train.max_steps=1000000"],
}


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def train_once(csv_path: Path, run_dir: Path, recipe: str, seed: int, budget_s: float, eval_every: int,
               overrides: list[str]) -> dict:
    """One training run; its time to each threshold, read back from the run's own logs."""
    command = [sys.executable, "-m", "seemore_ds", "train", f"data.csv={csv_path}", f"run.output_dir={run_dir}",
               "train.backend=torch", "train.device=cpu", "log.every=1", f"eval.every={eval_every}",
               "eval.max_batches=0", "checkpoint.every=0", "checkpoint.keep_last=1", "log.progress=false",
               f"train.seed={seed}", *RECIPES[recipe], *overrides]
    start = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        stopped_by_budget = False
        while process.poll() is None:
            if not stopped_by_budget and time.perf_counter() - start > budget_s:
                process.send_signal(signal.SIGTERM)  # finish the step, save, exit
                stopped_by_budget = True
            time.sleep(0.5)
    wall_s = time.perf_counter() - start
    if process.returncode not in (0, 128 + signal.SIGTERM):
        raise SystemExit(f"{recipe} on {csv_path.name} (seed {seed}) failed; see {run_dir.with_suffix('.log')}")
    train_s_at, elapsed = {}, 0.0
    for row in read_rows(run_dir / "timing_logs.csv"):
        elapsed += float(row["step_s"])
        train_s_at[int(row["step"])] = elapsed
    evals = [(int(r["step"]), float(r["val_exact_match"])) for r in read_rows(run_dir / "losses_log.csv")
             if r.get("val_exact_match")]
    result = {"recipe": recipe, "seed": seed, "steps": max(train_s_at, default=0), "train_s": round(elapsed, 1),
              "wall_s": round(wall_s, 1), "stopped_by_budget": stopped_by_budget,
              "final_exact_match": evals[-1][1] if evals else None}
    for threshold in THRESHOLDS:
        first = next((step for step, match in evals if match >= threshold), None)
        result[f"steps_to_{threshold}"] = first
        result[f"train_s_to_{threshold}"] = round(train_s_at[first], 1) if first else None
    return result


def spread(values: list[float | None], digits: int) -> str:
    """median [min-max] of the runs that reached a value; '-' where none did, 'k/n' when only some did."""
    reached = [v for v in values if v is not None]
    if not reached:
        return "-"
    text = f"{statistics.median(reached):.{digits}f} [{min(reached):.{digits}f}-{max(reached):.{digits}f}]"
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)})"


def table(results: list[dict]) -> str:
    header = ("| family | recipe | s to 0.9 | s to 0.95 | steps to 0.95 | final exact match |\n"
              "|---|---|---|---|---|---|")
    lines = [header]
    for family in dict.fromkeys(r["family"] for r in results):
        for recipe in dict.fromkeys(r["recipe"] for r in results):
            runs = [r for r in results if r["family"] == family and r["recipe"] == recipe]
            if runs:
                lines.append(f"| {family} | {recipe} | {spread([r['train_s_to_0.9'] for r in runs], 0)} | "
                             f"{spread([r['train_s_to_0.95'] for r in runs], 0)} | "
                             f"{spread([r['steps_to_0.95'] for r in runs], 0)} | "
                             f"{spread([r['final_exact_match'] for r in runs], 3)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    parser.add_argument("--seeds", default="1337,1,2")
    parser.add_argument("--recipes", default="defaults,seemore", help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--n", type=int, default=3000, help="rows per family (10%% held out)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="wall-clock seconds at most per run")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--out", default="runs/ttq")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    families, recipes = args.families.split(","), args.recipes.split(",")
    unknown = [f for f in families if f not in FAMILIES] + [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown family or recipe: {', '.join(unknown)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"bench": "time_to_quality", "machine": cpu_facts(), "n": args.n, "budget_s": args.budget_s,
                      "eval_every": args.eval_every, "overrides": args.overrides}), flush=True)
    results = []
    for family in families:
        csv_path = write_family_csv(family, out / f"{family}.csv", args.n, seed=0)
        for recipe in recipes:
            for seed in (int(s) for s in args.seeds.split(",")):
                run_dir = out / f"{family}-{recipe}-seed{seed}"
                result = {"bench": "time_to_quality", "family": family,
                          **train_once(csv_path, run_dir, recipe, seed, args.budget_s, args.eval_every, args.overrides)}
                print(json.dumps(result), flush=True)
                results.append(result)
    print(table(results))


if __name__ == "__main__":
    main()
