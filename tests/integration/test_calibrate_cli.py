"""`cessl calibrate` on a real MLflow (SQLite) registry with a tiny signed champion
(``promote_support.signed_champion``): too few records is insufficient evidence and records
nothing; a calibration is a signed ``calibrate`` decision in the audit log that leaves the
champion where it was, and `cessl predict` answers with it (present / absent / refer) once the
log verifies; training records are refused as a calibration split; a calibrate entry signed by
a key the trust file does not list breaks the log, and predict refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from promote_support import CLASSES, signed_champion
from signing_support import make_signer

from ml.errors import EXIT_INSUFFICIENT
from ml.eval.calibration import ABSENT, PRESENT, REFER, CalibrationSet
from pipeline import cli
from pipeline.registry.audit import AuditEntry, history, record
from pipeline.registry.calibration import CALIBRATE, calibration_of
from pipeline.registry.model_card import CARD_FILE as MODEL_CARD
from pipeline.registry.signing import find_trust, load_signer
from pipeline.registry.tracking import CHAMPION
from pipeline.registry.verify import verify_model

MODEL = "calibrate-ecg"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return signed_champion(tmp_path_factory.mktemp("calibrate"), MODEL)


def calibrations(world: dict) -> list[AuditEntry]:
    return [e for e in history(world["client"], MODEL) if e.action == CALIBRATE]


def test_too_few_records_are_insufficient_evidence_and_record_nothing(world, caplog):
    code = cli.main(["calibrate", MODEL, *world["store"], "--signing-key", str(world["keys"].private)])
    assert code == EXIT_INSUFFICIENT
    err = caplog.text
    assert "insufficient evidence: 6 readable labelled records" in err and "--min-records 50" in err
    assert calibrations(world) == []


def test_training_records_are_refused_as_a_calibration_split(world, capsys):
    code = cli.main(["calibrate", MODEL, "--records", str(world["records"]), "--dry-run", *world["store"]])
    assert code == 2
    err = capsys.readouterr().err
    assert "10 of its records trained or tuned calibrate-ecg v1" in err and err.count("\n") == 1


def test_a_calibration_is_a_signed_decision_that_predict_answers_with(world, tmp_path, capsys):
    client = world["client"]
    champion = str(client.get_model_version_by_alias(MODEL, CHAMPION).version)
    output = tmp_path / "calibration.json"
    code = cli.main(
        [
            "calibrate",
            MODEL,
            "--min-records",
            "5",
            "--critical",
            "STach,SB",
            "--target-miss-rate",
            "0.5",
            "--output",
            str(output),
            "--signing-key",
            str(world["keys"].private),
            *world["store"],
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "calibrated on 6 records" in out and "refer rate on the calibration split" in out
    (entry,) = calibrations(world)
    assert entry.versions == {"calibrated": champion} and entry.signature and entry.champion["version"] == champion
    assert entry.metrics["fit"]["records"] == 6 and "test split of run" in entry.metrics["fit"]["source"]
    # the log verifies (the entry is signed by a trusted key) and the champion did not move
    result = verify_model(client, MODEL, find_trust(world["trust"]))
    assert result.ok and result.expected_version == champion
    assert str(client.get_model_version_by_alias(MODEL, CHAMPION).version) == champion
    signed = calibration_of(result.entries, champion, CLASSES)
    assert signed is not None and signed == CalibrationSet.load(output)
    # predict answers with the signed calibration: a decision per class, the refer column
    record = sorted(world["records"].glob("*.hea"))[0].with_suffix("")
    answer = tmp_path / "answer.json"
    code = cli.main(
        ["predict", "--model", f"models:/{MODEL}@champion", str(record), "-o", str(answer), *world["store"]]
    )
    assert code == 0, capsys.readouterr()
    (row,) = json.loads(answer.read_text())["records"]
    probs = np.array([[row[f"p_{c}"] for c in CLASSES]])
    assert [row[f"decision_{c}"] for c in CLASSES] == list(signed.decide(probs)[0])
    assert set(row[f"decision_{c}"] for c in CLASSES) <= {PRESENT, ABSENT, REFER} and "refer" in row


def test_the_model_card_shows_the_signed_evidence_and_is_logged_with_each_decision(world, tmp_path, capsys):
    client = world["client"]
    champion = str(client.get_model_version_by_alias(MODEL, CHAMPION).version)
    card = tmp_path / "card.md"
    assert cli.main(["card", MODEL, "-o", str(card), *world["store"]]) == 0, capsys.readouterr()
    text = card.read_text()
    assert text.startswith(f"# Model card: {MODEL} v{champion}") and "Not for clinical use without validation" in text
    (entry,) = calibrations(world)
    assert f"promote by **{entry.who}**" in text and "(audit entry #1)" in text  # the decision that made it champion
    assert f"(audit entry #{entry.seq})" in text and "fitted on 6 records" in text
    assert "| STach (sinus tachycardia) | yes |" in text  # critical, by name
    assert "## Known limits" in text and "## Intended use" in text
    # `cessl calibrate` logged the card to its decision's audit run
    from pipeline.registry.audit import audit_runs

    run = next(r for r in audit_runs(client, MODEL)[MODEL] if r.data.tags["cessl.audit.seq"] == str(entry.seq))
    logged = client.download_artifacts(run.info.run_id, MODEL_CARD, str(tmp_path / "logged"))
    assert Path(logged).read_text().splitlines()[:3] == text.splitlines()[:3]
    assert "| STach (sinus tachycardia) | yes |" in Path(logged).read_text()


def test_a_pinned_version_answers_with_its_calibration_while_the_alias_is_moved(world, tmp_path, capsys):
    """A moved alias refuses `@champion`, not a pinned version: it is answered, calibrated, from
    the log (which is not broken)."""
    client = world["client"]
    signed = str(client.get_model_version_by_alias(MODEL, CHAMPION).version)
    moved = client.copy_model_version(f"models:/{MODEL}/{signed}", MODEL).version
    client.set_registered_model_alias(MODEL, CHAMPION, moved)
    record = str(sorted(world["records"].glob("*.hea"))[0].with_suffix(""))
    answer = tmp_path / "pinned.json"
    try:
        capsys.readouterr()
        assert cli.main(["predict", "--model", f"models:/{MODEL}@champion", record, *world["store"]]) == 1
        assert "but the last valid signed decision names" in capsys.readouterr().err
        code = cli.main(["predict", "--model", f"models:/{MODEL}/{signed}", record, "-o", str(answer), *world["store"]])
        assert code == 0, capsys.readouterr()
        (row,) = json.loads(answer.read_text())["records"]
        assert all(f"decision_{c}" in row for c in CLASSES)  # the signed calibration of that version
    finally:
        client.set_registered_model_alias(MODEL, CHAMPION, signed)


def test_a_calibrate_entry_signed_by_an_untrusted_key_breaks_the_log(world, tmp_path, capsys):
    """Who may not decide (a key the trust file does not list) cannot slip a calibration in:
    the log no longer verifies, and predict refuses in one line before loading anything."""
    client = world["client"]
    champion = str(client.get_model_version_by_alias(MODEL, CHAMPION).version)
    mallory = make_signer(tmp_path, "mallory", trust=tmp_path / "other-trust.yaml")
    (last,) = calibrations(world)
    forged = AuditEntry(
        model=MODEL,
        action=CALIBRATE,
        versions={"calibrated": champion},
        reason="no refer band",
        metrics=last.metrics,
        who="mallory",
        champion=last.champion,
        evidence=last.evidence,
    )
    record(client, forged, load_signer(mallory.private))
    record_path = str(sorted(world["records"].glob("*.hea"))[0].with_suffix(""))
    for uri in (
        f"models:/{MODEL}@champion",
        f"models:/{MODEL}/{champion}",
    ):  # pinned too: its calibration is in that log
        assert cli.main(["predict", "--model", uri, record_path, *world["store"]]) == 1
        assert "mallory" in capsys.readouterr().err
