"""The frozen test set: splitting around it (arrays and real WFDB stores), freezing it in a real
MLflow (SQLite) registry, the refresh, the gate's check, the DVC-versionable export."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from pipeline_support import cessl, make_hospital
from signing_support import use_signer

from components.split import SplitConfig, split_step
from ml.data.splits import Splits
from ml.data.testset import REDRAW, FrozenTestSet, freeze, split_with_frozen_test

PRODUCTION = "cessl-testset"
MODEL = PRODUCTION + "-candidates"  # where the pipeline registers (and freezes the test set)


def population(n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"R{i:04d}" for i in range(n)]
    y = (rng.random((n, 4)) < 0.3).astype(np.int8)
    labelled = rng.random(n) > 0.1
    hashes = [hashlib.sha256(i.encode()).hexdigest() for i in ids]
    return ids, hashes, y, labelled


def parts(s: Splits) -> dict[str, set[str]]:
    return {name: set(getattr(s, name)) for name in ("test", "train", "valid", "unlabelled")}


# --------------------------------------------------------------------------- the split


def test_frozen_records_stay_in_test_and_new_records_never_enter_it():
    ids, hashes, y, labelled = population()
    frozen_ids = [i for i, lab in zip(ids[:40], labelled[:40], strict=True) if lab][:15]
    frozen = FrozenTestSet(MODEL, 1, records={i: hashes[ids.index(i)] for i in frozen_ids}, classes=list("abcd"))
    changed, gone = frozen_ids[0], frozen_ids[1]
    # the next data version: one frozen record edited, one deleted, 100 brand-new records
    new_ids, new_hashes, new_y, new_lab = population(300, seed=1)
    keep = [k for k, i in enumerate(ids) if i != gone]
    all_ids = [ids[k] for k in keep] + [f"N{i}" for i in new_ids[200:]]
    all_hashes = [hashes[k] if ids[k] != changed else "edited" for k in keep] + new_hashes[200:]
    all_y = np.vstack([y[keep], new_y[200:]])
    all_lab = np.concatenate([labelled[keep], new_lab[200:]])

    s = split_with_frozen_test(
        all_ids, all_hashes, all_y, frozen, labelled=all_lab, labelled_ratio=0.3, seed=4, classes=list("abcd")
    )
    p = parts(s)
    assert p["test"] == set(frozen_ids) - {changed, gone}
    assert s.test_hashes == {i: frozen.records[i] for i in p["test"]}
    assert not (p["train"] | p["valid"] | p["unlabelled"]) & set(frozen_ids), "a frozen record was put in training"
    assert changed not in set().union(*p.values()), "a changed record is neither test nor train"
    assert s.testset["changed"] == [changed] and s.testset["missing"] == [gone]
    assert s.testset["version"] == 1 and not s.testset["classes_changed"]
    assert not p["test"] & {i for i in all_ids if i.startswith("N")}, "new records never go to test"
    # every other record is trained on (labelled or not), each in one part only
    assert p["train"] | p["valid"] | p["unlabelled"] == set(all_ids) - set(frozen_ids)
    assert sum(len(v) for v in p.values()) == len(set().union(*p.values()))
    # deterministic
    again = split_with_frozen_test(
        all_ids, all_hashes, all_y, frozen, labelled=all_lab, labelled_ratio=0.3, seed=4, classes=list("abcd")
    )
    assert again == s
    other = split_with_frozen_test(all_ids, all_hashes, all_y, frozen, labelled=all_lab, classes=list("abce"))
    assert other.testset["classes_changed"]


def test_frozen_records_found_under_a_new_id_stay_in_test():
    """Ids are record paths (and sites): a frozen record moved to another folder, or a set
    frozen before ids were paths (S00001 -> batch2/S00001), still finds its record by its bytes."""
    ids, hashes, y, labelled = population()
    frozen_ids = [i for i, lab in zip(ids[:40], labelled[:40], strict=True) if lab][:10]
    frozen = FrozenTestSet(MODEL, 1, records={i: hashes[ids.index(i)] for i in frozen_ids}, classes=list("abcd"))
    moved, gone = frozen_ids[0], frozen_ids[1]
    renamed = {moved: f"batch2/{moved}"}
    all_ids = [renamed.get(i, i) for i in ids if i != gone]
    all_hashes = [h for i, h in zip(ids, hashes, strict=True) if i != gone]
    keep = [k for k, i in enumerate(ids) if i != gone]
    s = split_with_frozen_test(
        all_ids, all_hashes, y[keep], frozen, labelled=labelled[keep], labelled_ratio=0.3, seed=4, classes=list("abcd")
    )
    assert set(s.test) == (set(frozen_ids) - {moved, gone}) | {f"batch2/{moved}"}
    assert s.testset["moved"] == {moved: f"batch2/{moved}"} and s.testset["missing"] == [gone]
    assert s.test_hashes[f"batch2/{moved}"] == frozen.records[moved]
    # a frozen record's bytes are never trained on, under whatever id
    copy_ids, copy_hashes = [*all_ids, "copy/elsewhere"], [*all_hashes, frozen.records[frozen_ids[2]]]
    copy_y, copy_lab = np.vstack([y[keep], y[:1]]), np.concatenate([labelled[keep], [True]])
    s = split_with_frozen_test(copy_ids, copy_hashes, copy_y, frozen, labelled=copy_lab, labelled_ratio=0.3, seed=4)
    assert "copy/elsewhere" not in set(s.train) | set(s.valid) | set(s.unlabelled) | set(s.test)


def test_a_redraw_avoids_the_excluded_records():
    ids, hashes, y, labelled = population()
    exclude = ids[:150]
    pending = FrozenTestSet(MODEL, 2, status=REDRAW, exclude=exclude)
    s = split_with_frozen_test(ids, hashes, y, pending, labelled=labelled, test_size=0.1, seed=0)
    assert len(s.test) == round(0.1 * labelled.sum()) and not set(s.test) & set(exclude)
    assert all(labelled[ids.index(i)] for i in s.test)
    assert not set(s.test) & (set(s.train) | set(s.valid) | set(s.unlabelled))
    assert s.testset["status"] == REDRAW and s.testset["short_by"] == 0
    tiny = FrozenTestSet(MODEL, 2, status=REDRAW, exclude=ids[:195])
    short = split_with_frozen_test(ids, hashes, y, tiny, labelled=labelled, test_size=0.1)
    assert short.testset["short_by"] > 0 and not set(short.test) & set(ids[:195])


def test_a_redraw_avoids_byte_identical_copies_of_training_records():
    ids, hashes, y, labelled = population()
    trained = ids[:150]
    # the same bytes under other ids (another folder, another site): copies of training records
    copies = [f"copy/{i}" for i in trained]
    all_ids, all_hashes = ids + copies, hashes + hashes[:150]
    all_y, all_labelled = np.vstack([y, y[:150]]), np.concatenate([labelled, np.ones(150, bool)])
    by_id = FrozenTestSet(MODEL, 2, status=REDRAW, exclude=trained)
    s = split_with_frozen_test(all_ids, all_hashes, all_y, by_id, labelled=all_labelled, seed=1)
    assert s.test and not set(s.test) & (set(trained) | set(copies)), "a copy of a training record was drawn"
    assert s.testset["n_excluded_by_content"] == int(all_labelled[200:].sum())
    # the champion's own ids gone from the data: its recorded content hashes still exclude the copies
    gone = FrozenTestSet(MODEL, 2, status=REDRAW, exclude=trained, exclude_hashes=sorted(hashes[:150]))
    rest = [k for k, i in enumerate(all_ids) if i not in set(trained)]
    s = split_with_frozen_test(
        [all_ids[k] for k in rest], [all_hashes[k] for k in rest], all_y[rest], gone, labelled=all_labelled[rest]
    )
    assert s.test and not set(s.test) & set(copies)
    # every split records the content of what it trains on (a later redraw avoids it)
    hash_of = dict(zip(all_ids, all_hashes, strict=True))
    trained_now = {hash_of[i] for i in s.train + s.valid + s.unlabelled}
    assert s.trained_hashes == sorted(trained_now) and not set(s.trained_hashes) & {hash_of[i] for i in s.test}


def test_frozen_file_bytes_are_canonical(tmp_path):
    frozen = FrozenTestSet(MODEL, 3, records={"b": "2", "a": "1"}, classes=["x"], reason="r")
    path = frozen.save(tmp_path / "t.json")
    assert hashlib.md5(path.read_bytes()).hexdigest() == frozen.md5
    assert FrozenTestSet.load(path) == frozen and FrozenTestSet.load(path).md5 == frozen.md5


def test_split_step_with_a_frozen_set_on_real_records(tmp_path):
    from components.ingest import ingest_step
    from components.preprocess import preprocess_step

    hospital, state = tmp_path / "hospital", tmp_path / "state"
    make_hospital(hospital, records=80, seed=5)

    def store(version: str) -> Path:
        ingest_step(str(hospital), tmp_path / f"manifest{version}", tmp_path / f"q{version}.md", state_dir=state)
        preprocess_step(tmp_path / f"manifest{version}", tmp_path / f"store{version}", min_count=5, state_dir=state)
        return tmp_path / f"store{version}"

    config = SplitConfig(labelled_ratio=0.3, seed=0)
    split_step(store("1"), tmp_path / "s1.json", config)
    first = Splits.load(tmp_path / "s1.json")
    assert set(first.test_hashes) == set(first.test), "the split records the content hash of each test record"
    frozen = freeze(first, MODEL, 1)
    frozen.save(tmp_path / "frozen.json")

    # next data version: a test record relabelled (new content), one deleted, 30 new records
    changed, gone = first.test[0], first.test[1]
    header = hospital / f"{changed}.hea"
    header.write_text(header.read_text() + "# reviewed by cardiology\n")
    for f in hospital.glob(f"{gone}.*"):
        f.unlink()
    make_hospital(hospital, records=30, seed=6, start=80)
    result = split_step(store("2"), tmp_path / "s2.json", config, tmp_path / "frozen.json")
    second = Splits.load(tmp_path / "s2.json")
    trained = set(second.train) | set(second.valid) | set(second.unlabelled)
    assert set(second.test) == set(first.test) - {changed, gone}
    assert not trained & set(first.test)
    assert changed not in trained | set(second.test)
    assert result.testset["changed"] == [changed] and result.testset["missing"] == [gone]
    assert not set(second.test) & {f"S{i:05d}" for i in range(80, 110)}
    assert second.testset == result.testset


# --------------------------------------------------------------------------- the registry


@pytest.fixture
def registry(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("CESSL_USER", "dr-test")
    use_signer(monkeypatch, tmp_path / "signing", "dr-test")  # promote signs its decisions
    from pipeline.registry.store import TrackingConfig, ensure_experiment

    ensure_experiment(TrackingConfig.resolve(uri, "t"))
    return uri, MlflowClient(tracking_uri=uri, registry_uri=uri)


def register(client, splits: Splits, tmp_path: Path, model: str = MODEL) -> tuple[str, str]:
    """A model version whose run logged its split (as the register step does)."""
    experiment = client.get_experiment_by_name("t").experiment_id
    run = client.create_run(experiment)
    path = splits.save(tmp_path / "splits.json")
    client.log_artifact(run.info.run_id, str(path), "data")
    client.set_terminated(run.info.run_id)
    if client.search_registered_models(f"name = '{model}'") == []:
        client.create_registered_model(model)
    mv = client.create_model_version(model, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return str(mv.version), run.info.run_id


def test_freeze_refresh_and_the_gate_in_a_real_registry(registry, tmp_path, capsys):
    from pipeline.registry import testsets
    from pipeline.registry.audit import history
    from pipeline.registry.store import TrackingConfig
    from pipeline.registry.tracking import CHAMPION

    uri, client = registry
    ids, hashes, y, labelled = population()
    hash_of = dict(zip(ids, hashes, strict=True))
    first = Splits(test=ids[:20], train=ids[20:60], valid=ids[60:70], unlabelled=ids[70:150], classes=list("abcd"))
    first.test_hashes = {i: hash_of[i] for i in first.test}
    v1, run1 = register(client, first, tmp_path)
    pointer = testsets.after_registration(client, MODEL, v1, run1, first)
    assert pointer.version == 1 and pointer.status == "frozen" and pointer.n_records == 20
    assert client.get_model_version(MODEL, v1).tags[testsets.TAG_VERSION] == "1"
    stored = testsets.download(client, pointer, tmp_path / "dl.json")
    assert stored.records == first.test_hashes and stored.md5 == pointer.md5 and stored.created_by == "dr-test"
    run = client.get_run(run1)
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == [f"{MODEL}-testset-v1"]
    assert testsets.gate_problem(client, MODEL, client.get_model_version(MODEL, v1)) == ""
    # a second registration does not re-freeze: the set only changes by a refresh
    assert testsets.after_registration(client, MODEL, v1, run1, first).md5 == pointer.md5

    # the reference the split gets names the frozen version; the split reads it back
    reference = testsets.resolve_reference(TrackingConfig.resolve(uri, model_name=MODEL))
    materialized = FrozenTestSet.load(testsets.materialize(reference, uri, tmp_path / "m.json"))
    assert materialized == stored
    assert testsets.resolve_reference(TrackingConfig.resolve(uri, model_name=MODEL), "none") == ""

    # export: the DVC-versionable copy, byte-identical
    exported = testsets.export(client, MODEL, tmp_path / "repo", dvc=False)
    assert hashlib.md5(exported.read_bytes()).hexdigest() == pointer.md5

    # refresh: a recorded, pending new version; the gate refuses until a run draws it
    champion = str(client.copy_model_version(f"models:/{MODEL}/{v1}", PRODUCTION).version)  # what promote does
    client.set_registered_model_alias(PRODUCTION, CHAMPION, champion)
    with pytest.raises(testsets.TestSetError, match="reason"):
        testsets.refresh(client, MODEL, " ")
    assert cessl("testset", "refresh", MODEL, "--reason", "new class added: LBBB") == 0
    pending = testsets.current(client, MODEL)
    assert (pending.version, pending.status, pending.created_by) == (2, REDRAW, "dr-test")
    assert "refreshed" in testsets.gate_problem(client, MODEL, client.get_model_version(MODEL, v1))
    from pipeline.cli.run import testset_pending

    assert testset_pending(TrackingConfig.resolve(uri, model_name=PRODUCTION)) == 2  # cessl retrain runs then
    entries = history(client, MODEL)
    assert [e.action for e in entries] == ["testset_freeze", "testset_refresh"]
    assert entries[-1].reason == "new class added: LBBB" and entries[-1].who == "dr-test"
    assert entries[-1].versions == {"testset": "2", "previous_testset": "1", "champion": champion}

    # the next run: a redraw that avoids the champion's training records, frozen as v2
    reference = testsets.resolve_reference(TrackingConfig.resolve(uri, model_name=MODEL))
    redraw = FrozenTestSet.load(testsets.materialize(reference, uri, tmp_path / "r.json"))
    assert redraw.status == REDRAW and set(redraw.exclude) == set(ids[20:150])
    second = split_with_frozen_test(ids, hashes, y, redraw, labelled=labelled, classes=list("abcd"))
    assert not set(second.test) & set(ids[20:150])
    v2, run2 = register(client, second, tmp_path)
    pointer2 = testsets.after_registration(client, MODEL, v2, run2, second)
    assert (pointer2.version, pointer2.status, pointer2.run_id) == (2, "frozen", run2)
    assert pointer2.reason == "new class added: LBBB"
    assert testsets.gate_problem(client, MODEL, client.get_model_version(MODEL, v2)) == ""
    assert "scored on test set v1" in testsets.gate_problem(client, MODEL, client.get_model_version(MODEL, v1))
    assert [e["version"] for e in testsets.history(client, MODEL)] == [1, 2]
    assert [e.action for e in history(client, MODEL)][-1] == "testset_freeze"

    capsys.readouterr()
    assert cessl("testset", "show", MODEL) == 0
    shown = capsys.readouterr().out
    assert "version        2 (frozen)" in shown and f"records        {len(second.test)}" in shown
    assert "classes        4: a, b, c, d" in shown and "earlier        v1: 20 records" in shown
    assert cessl("testset", "show", "no-such-model") == 2


def test_a_refresh_avoids_what_every_past_champion_trained_on(registry, tmp_path):
    """The redraw excludes the records of every past champion of the production model, not
    only the current one's, by id and by the content hashes their splits recorded; `cessl
    testset refresh` given the production model's name refreshes its candidates' test set."""
    import json

    from pipeline.registry import testsets
    from pipeline.registry.policy import HISTORY_TAG
    from pipeline.registry.store import TrackingConfig
    from pipeline.registry.tracking import CHAMPION

    uri, client = registry
    ids, hashes, y, labelled = population()
    hash_of = dict(zip(ids, hashes, strict=True))

    def split(train: list[str]) -> Splits:
        s = Splits(test=ids[:20], train=train, valid=[], unlabelled=[], classes=list("abcd"))
        s.test_hashes = {i: hash_of[i] for i in s.test}
        s.trained_hashes = sorted(hash_of[i] for i in train)
        return s

    v1, run1 = register(client, split(ids[20:80]), tmp_path / "1")
    testsets.after_registration(client, MODEL, v1, run1, split(ids[20:80]))
    v2, run2 = register(client, split(ids[80:140]), tmp_path / "2")
    _, run3 = register(client, split(ids[140:160]), tmp_path / "3")  # a candidate never promoted: not avoided
    # what promote does: each champion a copy of its candidate (same run) in the production model
    p1, p2 = (str(client.copy_model_version(f"models:/{MODEL}/{v}", PRODUCTION).version) for v in (v1, v2))
    client.set_registered_model_tag(PRODUCTION, HISTORY_TAG, json.dumps([p1, p2]))
    client.set_registered_model_alias(PRODUCTION, CHAMPION, p2)  # p1 was champion before p2
    pending = testsets.refresh(client, MODEL, "new classes", past_champions=[p1])
    assert set(pending.exclude_runs) == {run1, run2} and pending.exclude_run == run2
    assert cessl("testset", "refresh", PRODUCTION, "--reason", "new classes again") == 0  # the production name
    pending = testsets.current(client, MODEL)
    assert (
        pending.version == 2 and pending.reason == "new classes again" and testsets.current(client, PRODUCTION) is None
    )
    assert (
        set(pending.exclude_runs) == {run1, run2} and pending.exclude_run == run2 and run3 not in pending.exclude_runs
    )
    reference = testsets.resolve_reference(TrackingConfig.resolve(uri, model_name=MODEL))
    redraw = FrozenTestSet.load(testsets.materialize(reference, uri, tmp_path / "r.json"))
    assert set(redraw.exclude) == set(ids[20:140])
    assert set(redraw.exclude_hashes) == {hash_of[i] for i in ids[20:140]}
    # the records of v1 now live under other ids (copied into another folder): still avoided
    moved = [f"b2/{i}" if 20 <= k < 80 else i for k, i in enumerate(ids)]
    s = split_with_frozen_test(moved, hashes, y, redraw, labelled=labelled, classes=list("abcd"))
    assert s.test and not {hash_of[ids[moved.index(i)]] for i in s.test} & set(redraw.exclude_hashes)


def test_the_gate_refuses_a_challenger_scored_on_another_test_set(registry, tmp_path):
    from pipeline.registry import testsets
    from pipeline.registry.policy import GateConfig, promote
    from pipeline.registry.tracking import CHALLENGER, candidates_model_name

    _, client = registry
    candidates = candidates_model_name(PRODUCTION)  # the pipeline registers there; promote copies into PRODUCTION
    ids, hashes, _, _ = population()
    first = Splits(test=ids[:20], train=ids[20:60], valid=ids[60:70], unlabelled=ids[70:150], classes=list("abcd"))
    first.test_hashes = dict(zip(ids[:20], hashes[:20], strict=True))
    v1, run1 = register(client, first, tmp_path, candidates)
    testsets.after_registration(client, candidates, v1, run1, first)
    fresh = Splits(test=ids[150:170], train=ids[:100], valid=ids[100:110], unlabelled=[], classes=list("abcd"))
    v2, run2 = register(client, fresh, tmp_path, candidates)
    client.set_model_version_tag(candidates, v2, testsets.TAG_VERSION, testsets.NONE)  # a run with frozen_testset=none
    client.log_metric(run2, "test_macro_f_beta", 0.9)
    client.set_model_version_tag(candidates, v2, "method", "cessl")
    client.set_registered_model_alias(candidates, CHALLENGER, v2)
    decision = promote(client, PRODUCTION, GateConfig())
    assert not decision.promoted and "not comparable" in decision.reason and "test set vnone" not in decision.reason
    assert "frozen test set of" in decision.reason
    assert json.loads(client.get_model_version(candidates, v2).tags["promotion_comparison"])["comparable"] is False


# --------------------------------------------------------------------------- end to end
