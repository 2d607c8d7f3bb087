"""The promotion gate's false-promotion rate, simulated: two equally good models.

A trial is one frozen test set: ``n_records`` records with independent labels at the demo
hospital's prevalences (:data:`DEMO_PREVALENCE`), a champion, and up to ``attempts``
challengers tried on it one after the other. Every model diagnoses each class of a record
independently: a positive record with probability ``sensitivity``, a negative one with
``false_positive_rate``. So each challenger is exactly as good as the champion, and any
promotion is a false one. An attempt promotes when the lower bound of the gate's interval
(:func:`ml.eval.bootstrap.metric_interval`, two-sided at ``1 - 2 alpha_k``) exceeds the
margin 0; with alpha spending (:func:`ml.eval.power.attempt_alpha`) attempt k is tested at
``alpha / 2^k``, without it at ``alpha`` every time. A trial stops at its first promotion.

The rate of trials with a promotion is the gate's family-wise false-promotion rate over
``attempts`` retries; the nominal level is ``alpha``, give or take the simulation error
``sqrt(alpha (1 - alpha) / trials)``. ``tests/unit/test_gate_statistics.py`` holds the gate
to it; ``bench/gate_level.py`` reports it for several sizes and both intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ml.eval.bootstrap import F_BETA, JACKKNIFE_T, BootstrapConfig, metric_interval
from ml.eval.power import PowerConfig, attempt_alpha

# ml.data.synth's default classes: NSR, SB, STach, AF (rhythms, by weight), then the findings
DEMO_PREVALENCE: tuple[float, ...] = (0.48, 0.18, 0.18, 0.16, 0.14, 0.10, 0.12, 0.14, 0.12, 0.14)


@dataclass(frozen=True)
class Simulation:
    """What is simulated (see the module doc)."""

    n_records: int = 24
    trials: int = 200
    attempts: int = 3
    prevalence: tuple[float, ...] = DEMO_PREVALENCE
    sensitivity: float = 0.7
    false_positive_rate: float = 0.15
    seed: int = 0


@dataclass(frozen=True)
class GateRule:
    """How the simulated gate decides: its interval, its level, whether retries spend alpha."""

    interval: str = JACKKNIFE_T
    evidence: PowerConfig = PowerConfig()
    spend: bool = True
    margin: float = 0.0
    metric: str = F_BETA

    def alpha(self, attempt: int) -> float:
        return attempt_alpha(self.evidence.alpha, attempt) if self.spend else self.evidence.alpha


@dataclass(frozen=True)
class SimulationResult:
    """How many trials promoted a challenger, and at which attempt."""

    trials: int
    promoted: int
    by_attempt: tuple[int, ...]  # promotions at attempt 1, 2, ...
    nominal: float  # the family-wise level alpha

    @property
    def rate(self) -> float:
        return self.promoted / self.trials

    @property
    def simulation_error(self) -> float:
        """The binomial standard error of the rate at the nominal level."""
        return math.sqrt(self.nominal * (1.0 - self.nominal) / self.trials)


def predictions(rng: np.random.Generator, labels: np.ndarray, sim: Simulation) -> np.ndarray:
    """One model's 0/1 diagnoses of ``labels`` (n, C): positives at the sensitivity, negatives
    at the false-positive rate, each independently."""
    u = rng.random(labels.shape)
    return np.where(labels == 1, u < sim.sensitivity, u < sim.false_positive_rate).astype(np.int64)


def trial(rng: np.random.Generator, sim: Simulation, rule: GateRule) -> int:
    """One frozen test set and its attempts: the attempt that promoted (0: none did)."""
    labels = (rng.random((sim.n_records, len(sim.prevalence))) < np.asarray(sim.prevalence)).astype(np.int64)
    champion = predictions(rng, labels, sim)
    for attempt in range(1, sim.attempts + 1):
        challenger = predictions(rng, labels, sim)
        alpha = rule.alpha(attempt)
        config = BootstrapConfig(confidence=1.0 - 2.0 * alpha, interval=rule.interval, seed=int(rng.integers(2**31)))
        low = metric_interval(rule.metric, labels, challenger, champion, config).ci_low
        if math.isfinite(low) and low > rule.margin:
            return attempt
    return 0


def false_promotions(sim: Simulation = Simulation(), rule: GateRule = GateRule()) -> SimulationResult:
    """Run ``sim.trials`` trials, each with its own random stream spawned from ``sim.seed``:
    deterministic, and every rule meets the same test sets and models."""
    streams = np.random.default_rng(sim.seed).spawn(sim.trials)
    outcomes = np.array([trial(rng, sim, rule) for rng in streams])
    by_attempt = tuple(int((outcomes == k).sum()) for k in range(1, sim.attempts + 1))
    return SimulationResult(sim.trials, int((outcomes > 0).sum()), by_attempt, rule.evidence.alpha)
