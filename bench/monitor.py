"""Benchmark: label-free drift monitoring (``ml/eval/drift.py``) on synthetic sites.

A champion stand-in: a ``tinylight`` backbone (random initialisation, as the tests build
one) whose pooled embeddings feed a logistic-regression head per class fitted on the
reference records' labels (so that predicted prevalences follow the true ones). The reference:
``--reference`` records of synthetic hospital A (``ml.data.synth.site_config(0)``). Recent
batches of the same hospital, unshifted or with one injected shift, side by side in one run:

- ``none``: fresh records of the same hospital (every alarm is a false one);
- ``noise``: white noise of ``--noise-mv`` mV added to every lead (a worn cable, an unshielded room);
- ``lead swap``: the LA and RA electrodes reversed (I inverted, II <-> III, aVR <-> aVL), every record;
- ``gain``: every lead times ``--gain`` (a miscalibrated recorder; preprocessing standardises each
  lead, so the model never sees it: a shift that does not matter to it);
- ``prevalence``: the case mix changes (AF x3, NSR x0.4: a cardiology ward opens).

For each scenario, batch sizes ``--sizes`` and ``--seeds`` disjoint batches (the smaller sizes:
the first records of each batch): the detection rate (decision "drift"), which checks fired,
the records needed (the smallest size detected in >= 80% of the batches), and for ``none``
the false-alarm rate (nominal alpha = 5% per report; simulation error
sqrt(0.05 x 0.95 / seeds)).

    python bench/monitor.py                          # ~2-3 minutes on 2 CPU cores
    python bench/monitor.py --seeds 4 --sizes 30,100 # quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ml.data.quality import check_signal  # noqa: E402 (after the path set-up)
from ml.data.synth import AF, NSR, SynthConfig, site_config, synthesize_record  # noqa: E402
from ml.eval.drift import DRIFT, DriftConfig, Observations, drift_report  # noqa: E402
from ml.eval.monitoring import embed  # noqa: E402
from ml.eval.predictor import preprocess_signal  # noqa: E402

log = logging.getLogger("bench.monitor")
Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def shifts(noise_mv: float, gain: float) -> dict[str, Shift]:
    """Scenario -> what it does to one raw record (12, T) in mV."""

    def swap(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """LA/RA electrodes reversed: I inverted, II <-> III, aVR <-> aVL (leads I, II, III, aVR, aVL, aVF, V1-V6)."""
        y = x.copy()
        y[0] = -x[0]
        y[[1, 2]] = x[[2, 1]]
        y[[3, 4]] = x[[4, 3]]
        return y

    return {
        "none": lambda x, rng: x,
        "noise": lambda x, rng: x + rng.normal(scale=noise_mv, size=x.shape),
        "lead swap": swap,
        "gain": lambda x, rng: x * gain,
        "prevalence": lambda x, rng: x,  # the records themselves come from another case mix
    }


def model(seed: int = 3) -> torch.nn.Module:
    from ml.model.backbone import ECGTransformer, backbone_config

    torch.manual_seed(seed)
    return ECGTransformer(backbone_config("tinylight", 6)).eval()


def records(config: SynthConfig, start: int, n: int, shift: Shift, seed: int) -> tuple[np.ndarray, list, int]:
    """Preprocessed readable records (N, 12, 6144), their labels and the unreadable count."""
    rng = np.random.default_rng(seed)
    kept, labels, unreadable = [], [], 0
    for i in range(start, start + n):
        rec = synthesize_record(i, config)
        signal = shift(rec.signal, rng)
        if not check_signal(signal, rec.fs).ok:
            unreadable += 1
            continue
        kept.append(preprocess_signal(signal, rec.fs))
        labels.append([c in rec.labels for c in config.classes])
    return np.stack(kept).astype(np.float32), labels, unreadable


def observations(net, head, x: np.ndarray, unreadable: int) -> Observations:
    emb, _ = embed(net, x)
    probs = np.column_stack([h.predict_proba(emb)[:, 1] if h is not None else np.zeros(len(emb)) for h in head])
    return Observations(emb, probs, probs >= 0.5, unreadable)


def fit_head(emb: np.ndarray, labels: np.ndarray) -> list:
    """One logistic regression per class (None for a class without both outcomes)."""
    from sklearn.linear_model import LogisticRegression

    return [
        LogisticRegression(max_iter=500).fit(emb, labels[:, c]) if 0 < labels[:, c].sum() < len(labels) else None
        for c in range(labels.shape[1])
    ]


def fired(report) -> list[str]:
    return sorted({r.split(":")[0].split(" of ")[0] for r in report.reasons}) if report.decision == DRIFT else []


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    net = model()
    base = site_config(0, args.reference + 10_000, seed=args.seed)
    started = time.perf_counter()
    x, y, bad = records(base, 1, args.reference, shifts(0, 1)["none"], args.seed)
    emb, _ = embed(net, x)
    head = fit_head(emb, np.asarray(y, dtype=bool))
    reference = observations(net, head, x, bad)
    log.info("reference: %d records (%d unreadable) in %.0f s", reference.n, bad, time.perf_counter() - started)
    sizes = sorted(args.sizes)
    config = DriftConfig(permutations=args.permutations)
    results: dict = {}
    for name, shift in shifts(args.noise_mv, args.gain).items():
        cfg = base
        if name == "prevalence":
            cfg = SynthConfig(**{**base.__dict__, "prevalence": ((AF, 3.0), (NSR, 0.4))})
        seeds = args.seeds * (2 if name == "none" else 1)
        rows: dict[int, dict[str, Any]] = {n: {"drift": 0, "insufficient": 0, "checks": {}} for n in sizes}
        t0 = time.perf_counter()
        for s in range(seeds):
            start = 20_000 + s * max(sizes)  # disjoint from the reference and from each other
            xs, _, unreadable = records(cfg, start, max(sizes), shift, args.seed + s)
            full = observations(net, head, xs, 0)
            for n in sizes:
                k = min(n, full.n)
                part = Observations(
                    full.embeddings[:k], full.probs[:k], full.positive[:k], round(unreadable * n / max(sizes))
                )
                report = drift_report(reference, part, [str(c) for c in cfg.classes], config)
                rows[n]["drift"] += report.decision == DRIFT
                rows[n]["insufficient"] += report.decision != DRIFT and report.embedding is None
                for check in fired(report):
                    rows[n]["checks"][check] = rows[n]["checks"].get(check, 0) + 1
        for n in sizes:
            rows[n]["rate"] = rows[n]["drift"] / seeds
        needed = next((n for n in sizes if rows[n]["rate"] >= 0.8), None)
        results[name] = {"seeds": seeds, "sizes": rows, "records_needed": needed}
        log.info("%s: %d batches in %.0f s", name, seeds, time.perf_counter() - t0)
    return {"results": results, "seconds": time.perf_counter() - started}


def report(summary: dict, args: argparse.Namespace) -> str:
    sizes = sorted(args.sizes)
    head = ["scenario", *(f"n = {n}" for n in sizes), "records needed (>= 80%)", "checks that fired (largest n)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(sizes) + "---:|---|"]
    for name, r in summary["results"].items():
        cells = [f"{100 * r['sizes'][n]['rate']:.0f}% ({r['sizes'][n]['drift']}/{r['seeds']})" for n in sizes]
        checks = r["sizes"][sizes[-1]]["checks"]
        needed = "false alarms" if name == "none" else (r["records_needed"] or f"> {sizes[-1]}")
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {needed} | {', '.join(f'{k} {v}' for k, v in sorted(checks.items())) or '-'} |"
        )
    none = summary["results"]["none"]["seeds"]
    lines.append(
        f"\nalpha 5% per report; false-alarm simulation error {100 * math.sqrt(0.05 * 0.95 / none):.1f}% "
        f"({none} batches); {summary['seconds']:.0f} s"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=int, default=300, help="reference records")
    parser.add_argument("--sizes", type=lambda t: [int(s) for s in t.split(",")], default=[30, 50, 100])
    parser.add_argument("--seeds", type=int, default=8, help="batches per shifted scenario (x2 unshifted)")
    parser.add_argument("--permutations", type=int, default=300)
    parser.add_argument("--noise-mv", type=float, default=0.15)
    parser.add_argument("--gain", type=float, default=1.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    summary = measure(args)
    sys.stdout.write(report(summary, args) + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), **summary}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
