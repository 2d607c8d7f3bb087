"""Calibrated answers (``ml.eval.calibration``): the split-conformal miss-rate guarantee by
simulation, no absent answer without enough calibration positives, the ``calibration.json``
round trip, and the predictor's present / absent / refer answers on real fixture records."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import beta, binomtest

from ml.eval.calibration import (
    ABSENT,
    PRESENT,
    REFER,
    SCHEMA_VERSION,
    CalibrationConfig,
    CalibrationSet,
    calibrate,
    needed_positives,
)

AF, IAVB, RBBB, SNR = "164889003", "270492004", "59118001", "426783006"
ALPHA = 0.1


def synthetic(rng: np.random.Generator, n: int, prevalence: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Scores of one class: positives ~ Beta(5, 2), negatives ~ Beta(2, 5)."""
    y = rng.random(n) < prevalence
    p = np.where(y, rng.beta(5, 2, n), rng.beta(2, 5, n))
    return p, y


def calibrate_one(p: np.ndarray, y: np.ndarray, alpha: float = ALPHA, threshold: float = 0.5):
    config = CalibrationConfig(target_miss_rate=alpha, critical=("AF",))
    return calibrate(p[:, None], y[:, None], [AF], [threshold], config).classes[0]


def test_the_miss_rate_on_held_out_records_meets_the_target():
    """Calibrated on 400 records (about 200 positives), the miss rate on 200 000 held-out
    records is within the target +- the calibration's and the held-out sampling error."""
    rng = np.random.default_rng(0)
    cal = calibrate_one(*synthetic(rng, 400))
    p, y = synthetic(rng, 200_000)
    decisions = cal.decide(p)
    misses = int(np.sum(decisions[y] == ABSENT))
    observed = binomtest(misses, int(y.sum())).proportion_ci(0.999)
    k, m = cal.n_positives, math.floor(ALPHA * (cal.n_positives + 1))
    spread = 3 * math.sqrt(m * (k + 1 - m) / ((k + 1) ** 2 * (k + 2)))  # sd of Beta(m, k + 1 - m)
    refer_rate = float(np.mean(decisions == REFER))
    message = f"miss rate {misses / y.sum():.4f} (target {ALPHA}), refer rate {refer_rate:.3f}, {cal}"
    assert cal.miss_rate_bound == pytest.approx(m / (k + 1)) and cal.miss_rate_bound <= ALPHA
    assert observed.low <= ALPHA + spread and observed.high >= ALPHA - spread - 1 / (k + 1), message
    assert cal.t_low is not None and cal.t_low <= cal.t_high == 0.5
    assert 0 < refer_rate < 0.5, message


def test_over_many_calibration_splits_the_miss_rate_exceeds_the_target_no_more_than_allowed():
    """200 seeds, 60 calibration records each: the miss rate of a new positive averaged over the
    seeds is at most the target (the marginal guarantee); the fraction of seeds whose miss rate
    exceeds the target is what Beta(m, k + 1 - m) allows, and exceeds the Clopper-Pearson upper
    bound in at most 1 - confidence of the seeds (each +- the simulation's binomial error)."""
    rates, above_target, allowed_above, above_upper, refer = [], 0, 0.0, 0, []
    held_p, held_y = synthetic(np.random.default_rng(10_000), 40_000)
    positives = held_p[held_y]
    for seed in range(200):
        cal = calibrate_one(*synthetic(np.random.default_rng(seed), 60))
        assert cal.t_low is not None
        rate = float(np.mean(positives < cal.t_low))
        rates.append(rate)
        m, k = round(cal.miss_rate_bound * (cal.n_positives + 1)), cal.n_positives
        above_target += rate > ALPHA
        allowed_above += float(beta.sf(ALPHA, m, k + 1 - m)) / 200
        above_upper += rate > cal.miss_rate_upper
        refer.append(float(np.mean(cal.decide(held_p) == REFER)))
    message = f"mean miss rate {np.mean(rates):.4f}, mean refer rate {np.mean(refer):.3f}"
    assert np.mean(rates) <= ALPHA + 3 * np.std(rates) / math.sqrt(200), message
    sim_error = 3 * math.sqrt(allowed_above * (1 - allowed_above) / 200)
    assert above_target / 200 <= allowed_above + sim_error, f"{above_target} above target; {message}"
    assert above_upper / 200 <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 200), f"{above_upper} above the upper bound"


def test_too_few_positives_give_no_absent_answer():
    rng = np.random.default_rng(1)
    needed = needed_positives(0.05)
    assert needed == 19
    p, y = synthetic(rng, 200, prevalence=0.0)
    y[:5] = True  # 5 positives: below 19
    cal = calibrate_one(p, y, alpha=0.05)
    assert cal.t_low is None and cal.miss_rate_bound is None and cal.n_positives == 5
    assert "insufficient calibration positives (5 < 19)" in cal.note
    decisions = cal.decide(np.array([0.0, 0.2, 0.49, 0.5, 0.9, np.nan]))
    assert list(decisions) == [REFER, REFER, REFER, PRESENT, PRESENT, ""]
    y[:19] = True  # exactly enough: floor(0.05 * 20) = 1, t_low the smallest positive
    enough = calibrate_one(p, y, alpha=0.05)
    assert enough.t_low == pytest.approx(p[:19].min()) and enough.miss_rate_bound == pytest.approx(1 / 20)


def test_non_critical_classes_keep_present_absent_by_the_threshold():
    rng = np.random.default_rng(2)
    p, y = synthetic(rng, 300)
    config = CalibrationConfig(target_miss_rate=0.1, critical=("STach",))
    cal = calibrate(p[:, None], y[:, None], [AF], [0.4], config).classes[0]
    assert not cal.critical and cal.t_low == cal.t_high == 0.4 and cal.miss_rate_bound is None
    assert set(cal.decide(p)) == {PRESENT, ABSENT}
    assert cal.miss_rate_upper is not None and 0 < cal.miss_rate_upper < 1


def test_critical_classes_by_name_or_code():
    rng = np.random.default_rng(3)
    p = np.stack([synthetic(rng, 100)[0] for _ in range(3)], axis=1)
    y = p > 0.5
    config = CalibrationConfig(critical=("af", "59118001"))
    assert [c.critical for c in calibrate(p, y, [AF, IAVB, RBBB], [0.5] * 3, config).classes] == [True, False, True]
    with pytest.raises(ValueError, match="target_miss_rate"):
        CalibrationConfig(target_miss_rate=0)


def test_json_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    p = np.stack([synthetic(rng, 120)[0] for _ in range(2)], axis=1)
    y = p > 0.6
    y[:, 1] = False
    y[:3, 1] = True  # too few positives: t_low None
    calibration = calibrate(p, y, [AF, IAVB], [0.5, 0.3], CalibrationConfig(critical=("AF", "IAVB")))
    path = calibration.save(tmp_path)
    assert path.name == "calibration.json"
    assert CalibrationSet.load(tmp_path) == calibration == CalibrationSet.from_json(calibration.to_json())
    assert CalibrationSet.load(path).classes[1].t_low is None
    stale = calibration.to_json().replace(f'"schema_version": {SCHEMA_VERSION}', '"schema_version": 99')
    with pytest.raises(ValueError, match="schema version 99"):
        CalibrationSet.from_json(stale)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from model_support import make_model_dirs

    return make_model_dirs(tmp_path_factory.mktemp("model"))


def test_predictor_answers_present_absent_refer_on_real_records(model_dirs, ecg_records_dir):
    """The tiny model's table is unchanged without a calibration; with one, ``diagnoses`` are
    the classes answered present, ``refer`` those in the band, each consistent with the
    class's thresholds, and a class without enough positives says so when referred."""
    from model_support import CLASSES, p_columns

    from ml.eval.predictor import load_predictor

    predictor = load_predictor(*model_dirs)
    records = [ecg_records_dir / "E07500", ecg_records_dir / "HR06000", ecg_records_dir / "missing"]
    plain = predictor.predict_records(records)
    probs = plain[p_columns(plain)].to_numpy()[:2]
    # a calibration that puts the band around the real probabilities: AF (critical, enough
    # positives) refers below its threshold, IAVB (critical, 2 positives) never answers absent
    rng = np.random.default_rng(5)
    n = 200
    cal_p = rng.random((n, len(CLASSES)))
    cal_y = np.zeros((n, len(CLASSES)), dtype=bool)
    cal_y[:, 0] = True
    cal_p[:, 0] = np.linspace(probs[:, 0].min() - 0.05, 1.0, n)  # t_low just below the records' AF
    cal_y[:2, 1] = True
    thresholds = [1.0, probs[:, 1].max() + 1e-6, 0.0, 1.0]  # AF never present, RBBB always, SNR never
    config = CalibrationConfig(target_miss_rate=0.05, critical=("AF", "IAVB"))
    predictor.calibration = calibrate(cal_p, cal_y, CLASSES, thresholds, config)
    table = predictor.predict_records(records)

    assert list(plain.columns) == [c for c in table.columns if c in set(plain.columns)]
    assert "refer" not in plain.columns and "decision_" + CLASSES[0] not in plain.columns
    np.testing.assert_allclose(table[p_columns(table)].to_numpy()[:2], probs, atol=1e-6)
    ok = table.iloc[:2]
    assert list(ok[f"decision_{AF}"]) == [REFER, REFER]  # above t_low, below t_high = 1
    assert list(ok[f"decision_{IAVB}"]) == [REFER, REFER]  # below t_high, no absent answer
    assert list(ok[f"decision_{RBBB}"]) == [PRESENT, PRESENT] and list(ok[f"decision_{SNR}"]) == [ABSENT, ABSENT]
    assert list(ok["codes"]) == [RBBB, RBBB] and list(ok["diagnoses"]) == ["RBBB", "RBBB"]
    assert list(ok["refer"]) == ["AF;IAVB", "AF;IAVB"] and list(ok["refer_codes"]) == [f"{AF};{IAVB}"] * 2
    assert all("IAVB: insufficient calibration positives (2 < 19)" in n for n in ok["calibration_notes"])
    assert ok[f"miss_rate_{AF}"].iloc[0] == pytest.approx(math.floor(0.05 * (n + 1)) / (n + 1))
    missing = table.iloc[2]
    assert missing["status"] == "unreadable" and missing["refer"] == "" and missing[f"decision_{AF}"] == ""
    answers = predictor.answers(table)
    assert len(answers) == 3 * len(CLASSES) and set(answers["decision"]) == {PRESENT, ABSENT, REFER, ""}
    predictor.calibration = calibrate(cal_p[:, :2], cal_y[:, :2], CLASSES[:2], thresholds[:2], config)
    with pytest.raises(ValueError, match="calibration is for classes"):
        predictor.predict_records(records[:1])
