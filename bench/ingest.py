"""Benchmark: ingest + preprocess throughput against a straightforward per-record baseline.

Both sides turn the same generated WFDB records into the same (N, 12, 6144) float32
array on disk:

- baseline: one process; per record ``wfdb.rdrecord``, ``scipy.signal.filtfilt`` on each
  lead, ``sklearn.preprocessing.StandardScaler``, crop/pad, written into a memory-mapped
  ``.npy``; labels parsed from the header comments.
- ours: ``ml.data.ingest.ingest`` (hash, validate, manifest, quarantine report) then
  ``ml.data.preprocess.preprocess`` (store), with ``--workers`` processes.

Also: synthetic generation rate, agreement of the two outputs, and peak memory (PSS: shared pages counted once) of
ingest + preprocess for a small and a large number of records (``--memory-records``),
each measured in a fresh process, to show that memory stays flat as N grows.

    python bench/ingest.py                       # 2,000 records, memory at 2,000 and 20,000
    python bench/ingest.py --records 500 --memory-records 0     # quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def baseline(record_dir: Path, out: Path, length: int = 6144) -> tuple[float, int]:
    """Straightforward per-record pipeline; returns (seconds, records)."""
    from scipy import signal as sps
    from sklearn.preprocessing import StandardScaler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import wfdb

    start = time.perf_counter()
    headers = sorted(record_dir.rglob("*.hea"))
    b, a = sps.butter(3, [1.0, 47.0], btype="bandpass", fs=500.0)
    signals = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(len(headers), 12, length))
    labels = []
    for i, hea in enumerate(headers):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec = wfdb.rdrecord(str(hea.with_suffix("")))
        x = rec.p_signal.T
        if rec.fs != 500:
            x = sps.resample(x, round(x.shape[1] * 500 / rec.fs), axis=1)
        filtered = np.stack([sps.filtfilt(b, a, lead) for lead in x])
        scaled = StandardScaler().fit_transform(filtered.T).T
        n = min(length, scaled.shape[1])
        row = np.zeros((12, length), np.float32)
        row[:, :n] = scaled[:, :n]
        signals[i] = row
        labels.append(next((c.split(":", 1)[1].strip() for c in rec.comments if c.startswith("Dx")), ""))
    signals.flush()
    del signals
    return time.perf_counter() - start, len(headers)


def ours(record_dir: Path, work: Path, workers: int) -> dict[str, float]:
    from ml.data.ingest import IngestConfig, ingest
    from ml.data.preprocess import preprocess

    t0 = time.perf_counter()
    report = ingest(record_dir, work / "ingest", config=IngestConfig(workers=workers), progress=False)
    t1 = time.perf_counter()
    store = preprocess(work / "ingest", work / "store", min_count=1, workers=workers, progress=False)
    t2 = time.perf_counter()
    return {"ingest_s": t1 - t0, "preprocess_s": t2 - t1, "records": len(store), "seen": report.seen}


class MemorySampler:
    """Peak memory (PSS) of this process and of its descendants (workers), sampled every 50 ms.

    (``ru_maxrss`` would not do: it survives ``exec`` from the parent, and the workers are
    children of the forkserver, not of this process.)"""

    def __init__(self, interval: float = 0.05):
        import threading

        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.main_peak = self.worker_peak = self.total_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _pss(process) -> int:
        """Proportional set size: shared pages (forked from the forkserver) counted once."""
        try:
            return process.memory_full_info().pss
        except AttributeError:  # no smaps: fall back to RSS
            return process.memory_info().rss

    def _sample(self) -> None:
        import psutil

        main = self._pss(self.me)
        workers = []
        for child in self.me.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # the worker exited between listing and reading
                workers.append(self._pss(child))
        self.main_peak = max(self.main_peak, main)
        self.worker_peak = max([self.worker_peak, *workers])
        self.total_peak = max(self.total_peak, main + sum(workers))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> MemorySampler:
        self._sample()
        self.start_rss = self._pss(self.me)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def memory_probe(record_dir: str, work: str, workers: int) -> None:
    """Run ingest + preprocess in this (fresh) process; print peak memory (PSS) in MiB (JSON)."""
    from ml.data.ingest import IngestConfig, ingest
    from ml.data.preprocess import preprocess

    mib = 1 / 2**20
    start = time.perf_counter()
    with MemorySampler() as rss:
        ingest(record_dir, Path(work) / "ingest", config=IngestConfig(workers=workers), progress=False)
        store = preprocess(Path(work) / "ingest", Path(work) / "store", min_count=1, workers=workers, progress=False)
        n = len(store)
        del store
    print(
        json.dumps(
            {
                "records": n,
                "seconds": time.perf_counter() - start,
                "main_start_mib": rss.start_rss * mib,
                "main_peak_mib": rss.main_peak * mib,
                "worker_peak_mib": rss.worker_peak * mib,
                "total_peak_mib": rss.total_peak * mib,
                "store_mib": n * 12 * 6144 * 4 * mib,
            }
        )
    )


def generate(out: Path, n: int, workers: int) -> float:
    from ml.data.synth import SynthConfig
    from ml.data.synth import generate as synth

    start = time.perf_counter()
    synth(out, SynthConfig(records=n, seed=2024, unlabelled_fraction=0.1), workers=workers, progress=False)
    return n / (time.perf_counter() - start)


def synth_cpu_ms(n: int = 200) -> float:
    from ml.data.synth import SynthConfig, synthesize_record, write_record

    config = SynthConfig(records=n, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.process_time()
        for i in range(n):
            write_record(Path(tmp), synthesize_record(i, config))
        return (time.process_time() - start) / n * 1e3


def agreement(work: Path, baseline_npy: Path) -> float:
    """Max |ours - baseline| on the central samples (filtfilt vs sosfiltfilt edges differ)."""
    from ml.data.store import ECGStore

    store = ECGStore.open(work / "store")
    base = np.load(baseline_npy, mmap_mode="r")
    rows = np.linspace(0, len(store) - 1, 50).astype(int)
    return float(np.abs(store.signals[rows, :, 500:4500] - base[rows, :, 500:4500]).max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-records", type=int, nargs="*", default=[2000, 20000])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    parser.add_argument("--memory-probe", nargs=2, metavar=("RECORDS", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe[0], args.memory_probe[1], args.workers)
        return 0

    root = Path(tempfile.mkdtemp(prefix="cessl-bench-", dir=args.work))
    results: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_avg_at_start": os.getloadavg()[0],
        "records": args.records,
        "workers": args.workers,
    }
    try:
        records = root / "records"
        results["synth_records_per_s"] = generate(records, args.records, args.workers)
        results["synth_cpu_ms_per_record"] = synth_cpu_ms()

        t_base, n = baseline(records, root / "baseline.npy")
        mine = ours(records, root / "ours", args.workers)
        t_ours = mine["ingest_s"] + mine["preprocess_s"]
        results.update(
            baseline_s=t_base,
            baseline_records_per_s=n / t_base,
            ours_ingest_s=mine["ingest_s"],
            ours_preprocess_s=mine["preprocess_s"],
            ours_records_per_s=n / t_ours,
            speedup=t_base / t_ours,
            max_abs_difference=agreement(root / "ours", root / "baseline.npy"),
        )
        shutil.rmtree(root / "ours")
        (root / "baseline.npy").unlink()
        # one worker, same records: how much is parallelism, how much the per-record path
        mine1 = ours(records, root / "ours1", 1)
        results["ours_1_worker_records_per_s"] = n / (mine1["ingest_s"] + mine1["preprocess_s"])
        shutil.rmtree(root / "ours1")

        memory = []
        for m in args.memory_records:
            folder = root / f"mem{m}"
            generate(folder / "records", m, args.workers)
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--workers",
                    str(args.workers),
                    "--memory-probe",
                    str(folder / "records"),
                    str(folder / "work"),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            memory.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            shutil.rmtree(folder)
        results["memory"] = memory
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
