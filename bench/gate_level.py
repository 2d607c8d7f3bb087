"""Benchmark: how often the promotion gate promotes one of two equally good models.

Simulated (:mod:`ml.eval.gate_simulation`): frozen test sets of N records at the demo
hospital's prevalences, a champion and challengers exactly as good (every promotion is a
false one), for several N, side by side in one run:

- one look at nominal one-sided 2.5%: the former interval (percentile bootstrap, 1000 paired
  resamples) against the gate's (jackknife-t);
- ``--attempts`` challengers on one frozen test set: the former gate (percentile, every
  retry at 2.5%) against the gate (jackknife-t, attempt k at 2.5% / 2^k).

The nominal level is 2.5% throughout; the simulation error is sqrt(0.025 x 0.975 / trials).

    python bench/gate_level.py                         # 2,000 trials at 7, 16, 24, 50, 100 records
    python bench/gate_level.py --trials 200 --sizes 24 # quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ml.eval.bootstrap import JACKKNIFE_T, PERCENTILE  # noqa: E402 (after the path set-up)
from ml.eval.gate_simulation import GateRule, Simulation, false_promotions  # noqa: E402

# column -> (attempts on one test set or None for --attempts, the rule)
COLUMNS: dict[str, tuple[int | None, GateRule]] = {
    "percentile, 1 look": (1, GateRule(interval=PERCENTILE, spend=False)),
    "jackknife-t, 1 look": (1, GateRule(interval=JACKKNIFE_T, spend=False)),
    "former gate, retries": (None, GateRule(interval=PERCENTILE, spend=False)),
    "gate, retries": (None, GateRule(interval=JACKKNIFE_T, spend=True)),
}


def measure(sizes: list[int], trials: int, attempts: int, seed: int) -> list[dict]:
    """One row per size: the false-promotion rate of every column, on the same simulated sets."""
    rows = []
    for n in sizes:
        row: dict = {"n_records": n}
        for column, (looks, rule) in COLUMNS.items():
            sim = Simulation(n_records=n, trials=trials, attempts=looks or attempts, seed=seed)
            start = time.perf_counter()
            result = false_promotions(sim, rule)
            row[column] = {**asdict(result), "rate": result.rate, "seconds": time.perf_counter() - start}
        rows.append(row)
    return rows


def report(rows: list[dict], trials: int, attempts: int) -> str:
    """The rates as a Markdown table (percent)."""
    error = rows[0][next(iter(COLUMNS))]
    sigma = 100 * (error["nominal"] * (1 - error["nominal"]) / trials) ** 0.5
    head = ["records", *COLUMNS]
    lines = [
        f"False promotions of two equally good models, nominal 2.5% (simulation error {sigma:.2f}%, {trials} "
        f"test sets, retries: {attempts} challengers per set)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---:|" * len(head),
    ]
    for row in rows:
        lines.append(f"| {row['n_records']} | " + " | ".join(f"{100 * row[c]['rate']:.2f}%" for c in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=2000, help="frozen test sets per cell")
    parser.add_argument("--sizes", default="7,16,24,50,100", help="records per test set (comma-separated)")
    parser.add_argument("--attempts", type=int, default=3, help="challengers tried on one test set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    rows = measure([int(s) for s in args.sizes.split(",")], args.trials, args.attempts, args.seed)
    sys.stdout.write(report(rows, args.trials, args.attempts) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
