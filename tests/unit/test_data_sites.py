"""Record identity is (site, record path); only byte-identical records are duplicates; a
synthetic network of hospitals with real site shift (real WFDB files throughout)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.data.ingest import (
    ACCEPTED,
    MANIFEST_FILE,
    QUARANTINE_FILE,
    QUARANTINED,
    IngestConfig,
    ingest,
    read_manifest,
    write_manifest,
)
from ml.data.preprocess import preprocess
from ml.data.records import STANDARD_LEADS, read_header, read_record_file
from ml.data.sources import derived_site_name, record_id_of, record_key
from ml.data.splits import split_store
from ml.data.synth import (
    AF,
    SynthConfig,
    draw_labels,
    generate,
    site_config,
    site_name,
    synthesize_network,
    synthesize_record,
)
from ml.errors import ParameterError
from pipeline.cli import main
from pipeline.core.sites import load_sites

SERIAL = IngestConfig(workers=1)


def numbered(folder: Path, records: int, seed: int) -> Path:
    """A hospital that names its records 00001, 00002... (as every hospital of a network does)."""
    generate(folder, SynthConfig(records=records, seed=seed, prefix="", start=1), workers=1, progress=False)
    return folder


def keys(manifest: pd.DataFrame) -> list[str]:
    return sorted(record_key(s, i) for s, i in zip(manifest["site"], manifest["id"], strict=True))


@pytest.fixture(scope="module")
def network(tmp_path_factory) -> list[tuple[str, Path]]:
    return synthesize_network(tmp_path_factory.mktemp("net"), 3, 24, seed=5)


# ------------------------------------------------------------------------------ identity


def test_record_ids_are_paths():
    assert record_id_of("A0001.hea") == "A0001"  # records at the root keep their ids
    assert record_id_of("g1/00001.hea") == "g1/00001"
    assert record_id_of("g1/sub/00001.HEA") == "g1/sub/00001"
    assert record_key("", "g1/00001") == "g1/00001" and record_key("hospital-a", "00001") == "hospital-a/00001"
    name = derived_site_name("/data/Hospital B")
    assert name.startswith("hospital-b-") and name == derived_site_name("/data/Hospital B")
    assert derived_site_name("/other/Hospital B") != name


def test_two_sub_folders_with_clashing_names_are_two_records(tmp_path):
    src = tmp_path / "src"
    numbered(src / "g1", 3, seed=1)
    numbered(src / "g2", 3, seed=2)
    report = ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    assert (report.seen, report.accepted, report.by_reason, report.site) == (6, 6, {}, "")
    manifest = read_manifest(tmp_path / "ing")
    assert keys(manifest) == [f"g{g}/0000{i}" for g in (1, 2) for i in (1, 2, 3)]
    store = preprocess(tmp_path / "ing", tmp_path / "store", min_count=1, workers=1, progress=False)
    assert sorted(store.ids) == keys(manifest) and len(set(store.ids)) == 6


def test_two_sites_with_clashing_names_are_both_kept(network, tmp_path):
    (a_name, _), (b_name, b) = network[:2]
    for name, folder in network[:2]:
        report = ingest(folder, tmp_path / "ing", config=SERIAL, progress=False, site=name)
        assert (report.seen, report.accepted, report.by_reason, report.site) == (24, 24, {}, name)
    manifest = read_manifest(tmp_path / "ing")
    assert set(manifest.loc[manifest["site"] == a_name, "id"]) == set(manifest.loc[manifest["site"] == b_name, "id"])
    assert "00001" in set(manifest["id"])
    # the shared tables key a record by <site>/<id>: unique across the network
    store = preprocess(tmp_path / "ing", tmp_path / "store", min_count=3, workers=1, progress=False)
    assert len(store) == 48 and len(set(store.ids)) == 48
    assert {"hospital-a/00001", "hospital-b/00001"} <= set(store.ids)
    row = store.table.set_index("id").loc["hospital-b/00001"]
    assert (row["site"], row["record"], row["key"]) == ("hospital-b", "00001", "00001.hea")
    splits = split_store(store, labelled_ratio=0.3)
    assert sum(splits.sizes().values()) == 48
    # re-ingesting a site reads nothing again
    again = ingest(b, tmp_path / "ing", config=SERIAL, progress=False, site=b_name)
    assert (again.read, again.reused, again.accepted) == (0, 24, 24)
    with pytest.raises(ParameterError, match="DNS label"):
        ingest(b, tmp_path / "ing", config=SERIAL, progress=False, site="Hospital_B")


def test_only_a_byte_identical_copy_is_a_duplicate_and_names_its_original(network, tmp_path):
    (a_name, a), (b_name, b) = network[:2]
    ingest(a, tmp_path / "ing", config=SERIAL, progress=False, site=a_name)
    ingest(b, tmp_path / "ing", config=SERIAL, progress=False, site=b_name)
    c = tmp_path / "c"
    numbered(c, 2, seed=77)  # 00001, 00002: same names as at a and b, other content: kept
    (c / "resent").mkdir()
    for suffix in (".hea", ".mat"):  # a's 00003, byte for byte, in a sub-folder of c
        shutil.copy(a / f"00003{suffix}", c / "resent" / f"00003{suffix}")
        shutil.copy(c / f"00002{suffix}", c / "resent" / f"00002{suffix}")  # and c's own 00002
    report = ingest(c, tmp_path / "ing", config=SERIAL, progress=False, site="hospital-c")
    assert (report.seen, report.accepted, report.by_reason) == (4, 2, {"duplicate_id": 2})
    assert report.duplicates == {"resent/00002.hea": "hospital-c/00002", "resent/00003.hea": "hospital-a/00003"}
    rows = read_manifest(tmp_path / "ing").set_index(["site", "id"])
    assert rows.loc[("hospital-c", "00001"), "status"] == ACCEPTED
    copy = rows.loc[("hospital-c", "resent/00003")]
    assert (copy["status"], copy["reason"]) == (QUARANTINED, "duplicate_id")
    assert copy["detail"] == f"{c}/resent/00003.hea: identical copy of hospital-a/00003 ({a}/00003.hea)"
    text = (tmp_path / "ing" / QUARANTINE_FILE).read_text()
    assert "- Site: hospital-c" in text and "| resent/00003.hea | hospital-a/00003 |" in text
    assert "Duplicates (byte-identical copies of another record, quarantined): 2" in text
    # the copies are not re-read while their originals stay; when c's original goes, its copy takes over
    assert ingest(c, tmp_path / "ing", config=SERIAL, progress=False, site="hospital-c").read == 0
    for suffix in (".hea", ".mat"):
        (c / f"00002{suffix}").unlink()
    report = ingest(c, tmp_path / "ing", config=SERIAL, progress=False, site="hospital-c")
    assert (report.seen, report.accepted, report.read, report.duplicates) == (
        3,
        2,
        0,
        {"resent/00003.hea": "hospital-a/00003"},
    )


def test_sources_without_a_site(tmp_path):
    a, b = numbered(tmp_path / "a", 2, seed=1), numbered(tmp_path / "b", 2, seed=2)
    assert ingest(a, tmp_path / "ing", config=SERIAL, progress=False).site == ""  # the first keeps bare ids
    report = ingest(b, tmp_path / "ing", config=SERIAL, progress=False)
    assert report.site == derived_site_name(str(b)) and report.accepted == 2
    manifest = read_manifest(tmp_path / "ing")
    assert keys(manifest) == ["00001", "00002", f"{report.site}/00001", f"{report.site}/00002"]
    # stable: re-ingesting either keeps its site and reads nothing
    assert ingest(a, tmp_path / "ing", config=SERIAL, progress=False).site == ""
    again = ingest(b, tmp_path / "ing", config=SERIAL, progress=False)
    assert (again.site, again.read) == (report.site, 0)


def test_one_site_two_sources_with_the_same_path_clash(tmp_path):
    a, b = numbered(tmp_path / "a", 2, seed=1), numbered(tmp_path / "b", 2, seed=2)
    ingest(a, tmp_path / "ing", config=SERIAL, progress=False, site="hospital-a")
    report = ingest(b, tmp_path / "ing", config=SERIAL, progress=False, site="hospital-a")
    assert report.by_reason == {"duplicate_id": 2} and report.duplicates == {}
    detail = read_manifest(tmp_path / "ing").set_index(["source", "key"]).loc[(str(b), "00001.hea"), "detail"]
    assert "site hospital-a already holds a record 00001 with different content" in detail
    assert f"({a}/00001.hea)" in detail


def test_a_manifest_from_before_path_ids_is_upgraded_without_reading(tmp_path):
    src = tmp_path / "src"
    numbered(src, 2, seed=1)
    numbered(src / "batch2", 2, seed=2)
    ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    old = read_manifest(tmp_path / "ing")
    old["id"] = [k.rsplit("/", 1)[-1].removesuffix(".hea") for k in old["key"]]  # bare names, as before
    old.loc[old["key"] == "batch2/00001.hea", ["status", "reason"]] = [QUARANTINED, "duplicate_id"]  # the old rule
    write_manifest(old.drop(columns=["site"]), tmp_path / "ing" / MANIFEST_FILE)
    report = ingest(src, tmp_path / "ing", config=SERIAL, progress=False)
    assert (report.seen, report.accepted, report.read) == (4, 4, 1)  # only the old rule's "duplicate" is read
    assert keys(read_manifest(tmp_path / "ing")) == ["00001", "00002", "batch2/00001", "batch2/00002"]


# ------------------------------------------------------------------------------ the network


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def test_network_layout_and_bit_identical_regeneration(network, tmp_path):
    assert [name for name, _ in network] == ["hospital-a", "hospital-b", "hospital-c"]
    assert site_name(25) == "hospital-z" and site_name(26) == "hospital-aa"
    root = network[0][1].parent
    for name, folder in network:
        assert folder == root / name
        assert sorted(p.name for p in folder.glob("*.hea")) == [f"{i:05d}.hea" for i in range(1, 25)]
    again = synthesize_network(tmp_path / "again", 3, 24, seed=5)
    assert [n for n, _ in again] == [n for n, _ in network]
    for (_, one), (_, two) in zip(network, again, strict=True):
        assert _tree_digest(one) == _tree_digest(two)
    other = synthesize_network(tmp_path / "other", 1, 24, seed=6)
    assert _tree_digest(other[0][1]) != _tree_digest(network[0][1])


def test_site_shift_is_measurable(network):
    headers = {name: read_header((folder / "00001.hea").read_bytes(), name)[0] for name, folder in network}
    assert sorted(h.fs for h in headers.values()) == [250.0, 500.0, 1000.0]
    calibration = {(h.signals[0].gain, h.signals[0].units) for h in headers.values()}
    assert calibration == {(1000.0, "mV"), (200.0, "mV"), (1.0, "uV")}

    def records(folder: Path) -> list:
        return [read_record_file(p) for p in sorted(folder.glob("*.hea"))]

    by_site = {name: records(folder) for name, folder in network}
    # the same millivolts whatever the calibration: QRS amplitudes of the same order everywhere
    for recs in by_site.values():
        assert 0.3 < np.median([np.ptp(r.signal[1]) for r in recs]) < 6
    # baseline wander (what a 0.5 Hz low-pass keeps) is much stronger at hospital-b
    from scipy import signal as sps

    def wander(r) -> float:
        sos = sps.butter(2, 0.5, fs=r.fs, output="sos")
        return float(np.median(np.std(sps.sosfiltfilt(sos, r.signal, axis=-1), axis=-1)))

    level = {name: np.median([wander(r) for r in recs]) for name, recs in by_site.items()}
    assert level["hospital-b"] > 3 * level["hospital-a"]

    # case mix: the prevalence of AF differs (drawn over many records, from the same generator:
    # a record's diagnoses are its first draw, so they are drawn here without its signal)
    def site_labels(i: int, k: int) -> list[str]:
        config = site_config(i, 400, seed=5)
        return draw_labels(np.random.default_rng([config.seed, k]), config.classes, dict(config.prevalence))

    assert all(
        site_labels(i, k) == synthesize_record(k, site_config(i, 400, seed=5)).labels
        for i in range(3)
        for k in range(3)
    )
    af = {i: np.mean([AF in site_labels(i, k) for k in range(400)]) for i in range(3)}
    assert af[1] > 2 * af[0] > 0 and af[2] < af[0]
    # device faults: hospital-b's V4 is inverted, hospital-c's V4 flat, in some records only
    v4 = STANDARD_LEADS.index("V4")
    for i, kind in ((1, "inverted"), (2, "flat")):
        config = site_config(i, 24, seed=5)
        faulty = [k for k in range(24) if synthesize_record(k, config).lead_fault]
        assert 0 < len(faulty) < 24, kind
        folder = network[i][1]
        rec = read_record_file(folder / f"{faulty[0] + 1:05d}.hea")
        clean = synthesize_record(faulty[0], SynthConfig(**{**config.__dict__, "lead_fault": ""}))
        step = 1 / (config.gain if config.units == "mV" else config.gain * 1000)
        if kind == "inverted":
            np.testing.assert_allclose(rec.signal[v4], -clean.signal[v4], atol=step)
        else:  # electrode off: the amplifier's offset and its noise, no ECG; never exact zeros
            assert 0.1 - step <= abs(float(np.median(rec.signal[v4]))) <= 0.5 + step
            assert 0 < np.ptp(rec.signal[v4]) < 0.05 / 2
        # the fault draws from its own stream: the other leads are the clean record's
        others = [j for j in range(12) if j != v4]
        np.testing.assert_allclose(rec.signal[others], clean.signal[others], atol=step)


def test_network_records_pass_ingest_and_preprocess(network, tmp_path):
    """Every record passes but those whose device fault is a flat lead (hospital-c's V4 electrode
    off: a near-flat line, not the zeros of a lead not recorded): the signal-quality check
    quarantines them, naming the lead. An inverted lead (hospital-b's
    reversed V4 cable) is site shift the model learns through, not a fault the check can see."""
    flat = {2: [k for k in range(24) if synthesize_record(k, site_config(2, 24, seed=5)).lead_fault]}
    assert 0 < len(flat[2]) < 24
    for i, (name, folder) in enumerate(network):
        report = ingest(folder, tmp_path / "ing", config=SERIAL, progress=False, site=name)
        assert report.seen == 24 and report.accepted == 24 - len(flat.get(i, [])), (name, report.by_reason)
        assert report.by_reason == ({"signal_quality": len(flat[i])} if i in flat else {})
    manifest = read_manifest(tmp_path / "ing")
    assert Counter(manifest["fs"]) == {500.0: 24, 250.0: 24, 1000.0: 24}
    quarantined = manifest[manifest["status"] != "accepted"]
    assert sorted(quarantined["id"]) == [f"{k + 1:05d}" for k in flat[2]]
    assert quarantined["detail"].str.contains(r"signal quality: V4: flat \(peak-to-peak 0\.0\d\d mV < 0\.05 mV").all()
    n = 72 - len(flat[2])
    store = preprocess(tmp_path / "ing", tmp_path / "store", min_count=3, workers=1, progress=False)
    assert len(store) == n and store.signals.shape[1:] == (12, 6144)
    assert np.isfinite(store.read(np.arange(n))).all()


def test_cli_writes_sites_and_their_registry(tmp_path, capsys):
    out = tmp_path / "network"
    assert main(["data", "synth", "--sites", "2", "--records", "3", "--out", str(out), "--workers", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["sites"]) == {"hospital-a", "hospital-b"}
    registry = load_sites(out / "sites.yaml")
    assert registry.names == ["hospital-a", "hospital-b"]
    for site in registry:
        assert Path(site.source) == (out / site.name).resolve()
        assert sorted(p.name for p in Path(site.source).glob("*.hea")) == ["00001.hea", "00002.hea", "00003.hea"]
        assert "synthetic:" in site.description
    assert "source: hospital-a" in (out / "sites.yaml").read_text()  # relative: moves with its data
    # flags that a network fixes per site are refused with one line
    assert main(["data", "synth", "--sites", "2", "--fs", "250", str(tmp_path / "x")]) == 2
    assert "--fs cannot be combined with --sites" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_ingest_step_keys_a_site_s_records_by_site(network, tmp_path):
    from components.common import StepError
    from components.ingest import ingest_step, state_folder
    from components.preprocess import preprocess_step
    from ml.data.store import ECGStore

    name, folder = network[1]
    state = tmp_path / "state"
    result = ingest_step(str(folder), tmp_path / "m", tmp_path / "q.md", state_dir=state, site=name)
    assert (result.n_records, result.n_quarantined) == (24, 0)
    assert (state_folder(state, str(folder), name) / MANIFEST_FILE).is_file()
    preprocess_step(tmp_path / "m", tmp_path / "store", min_count=3, state_dir=state)
    store = ECGStore.open(tmp_path / "store")
    assert sorted(store.ids) == [f"{name}/{i:05d}" for i in range(1, 25)]
    again = ingest_step(str(folder), tmp_path / "m2", tmp_path / "q2.md", state_dir=state, site=name)
    assert (again.read, again.fingerprint) == (0, result.fingerprint)
    with pytest.raises(StepError, match="must be a DNS label"):
        ingest_step(str(folder), tmp_path / "m3", tmp_path / "q3.md", state_dir=state, site="Bad Site")


def test_lead_geometry_differs_by_site_and_survives_preprocessing():
    """Each site turns the heart's dipole (its lead geometry): the same beat reaches the leads
    otherwise, and preprocessing (which undoes rate, gain, wander and mains) keeps it; an
    unturned heart projects exactly as before."""
    from ml.data.preprocess import preprocess_signal
    from ml.data.synth import DIPOLE_TO_LEAD, dipole_to_lead, rotation

    assert dipole_to_lead((0.0, 0.0, 0.0)) is DIPOLE_TO_LEAD
    for angles in [(0.0, 0.0, 35.0), (25.0, 0.0, -25.0), (-20.0, 30.0, 0.0)]:
        turn = rotation(angles)
        np.testing.assert_allclose(turn @ turn.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(turn) == pytest.approx(1.0)
    np.testing.assert_allclose(rotation((0.0, 0.0, 90.0)) @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-12)
    geometries = {site_config(i, 1).heart_rotation_deg for i in range(4)}
    assert len(geometries) == 4 and (0.0, 0.0, 0.0) not in geometries

    base = site_config(0, 4, seed=5)
    turned = SynthConfig(**{**base.__dict__, "heart_rotation_deg": (0.0, -40.0, 0.0)})
    upright = SynthConfig(**{**base.__dict__, "heart_rotation_deg": (0.0, 0.0, 0.0)})
    for k in range(4):
        a, b = synthesize_record(k, upright), synthesize_record(k, turned)
        assert a.labels == b.labels  # the same patient, seen through another geometry
        pa, pb = preprocess_signal(a.signal, a.fs), preprocess_signal(b.signal, b.fs)
        assert np.abs(pa - pb).mean() > 0.2 * np.abs(pa).mean()
    with pytest.raises(ValueError, match="heart_rotation_deg"):
        SynthConfig(heart_rotation_deg=(0.0, 400.0, 0.0))
