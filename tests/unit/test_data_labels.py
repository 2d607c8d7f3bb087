"""SNOMED-CT label mapping: scored classes, equivalent codes, class selection."""

from __future__ import annotations

import filecmp

import pytest

from ml.data.labels import (
    EQUIVALENT_CODES,
    LABEL_MAPPING_CSV,
    LabelMapping,
    canonical_code,
    is_concept_id,
    parse_dx,
    select_classes,
)


def test_packaged_csv_is_the_fixture_copy(label_mapping_csv):
    assert filecmp.cmp(LABEL_MAPPING_CSV, label_mapping_csv, shallow=False)


def test_equivalent_pairs_are_merged(label_mapping_csv):
    mapping = LabelMapping.from_csv(label_mapping_csv)
    assert len(mapping.diagnoses) == 30 - 4  # 30 scored codes, 4 equivalent pairs
    for code, canon in EQUIVALENT_CODES.items():
        assert canonical_code(code) == canon
        assert mapping.is_scored(code) and mapping.is_scored(canon)
        assert code in mapping.diagnoses[canon].codes
    # counts of a merged pair add up (Georgia: PAC 639 + SVPB 1)
    assert mapping.diagnoses["63593006"].counts["Georgia"] == 640
    assert mapping.abbreviations(["164909002", "59118001", "63593006", "17338001"]) == ["LBBB", "RBBB", "PAC", "PVC"]


@pytest.mark.parametrize(
    ("source", "n_classes"), [("Georgia", 18), ("PTB_XL", 19), ("Ningbo", 23), ("Chapman_Shaoxing", 16)]
)
def test_paper_class_counts(label_mapping_csv, source, n_classes):
    """The paper keeps diagnoses with more than 200 records: 18/19/23/16 classes."""
    mapping = LabelMapping.from_csv(label_mapping_csv)
    assert len(mapping.classes_for_source(source, min_count=201)) == n_classes


def test_code_lookup_and_parsing():
    mapping = LabelMapping.from_csv()
    assert mapping.code_for("AF") == "164889003"
    assert mapping.code_for("pvc") == mapping.code_for("VPB") == mapping.code_for("427172004") == "17338001"
    assert mapping.code_for("CRBBB") == "59118001"
    with pytest.raises(ValueError, match="unknown diagnosis"):
        mapping.code_for("NotADiagnosis")
    assert parse_dx(" 164889003, 59118001,,164889003 ") == ["164889003", "59118001"]
    scored, unscored, unknown = mapping.split_codes(["713427006", "55827005", "junk", "426783006"])
    assert scored == ["59118001", "426783006"] and unscored == ["55827005"] and unknown == ["junk"]


def test_select_classes_counts_merged_codes_and_ignores_unscored():
    labels = [["713427006"], ["59118001"], ["55827005"], ["426783006"], ["55827005"]]
    assert select_classes(labels, min_count=2) == ["59118001"]
    assert select_classes(labels, min_count=1) == ["59118001", "426783006"]  # CSV order


def test_a_snomed_ct_concept_id_is_told_by_its_structure(ecg_records_dir):
    """Known means: a scored code of the mapping, or any well-formed SNOMED CT concept id (the
    Challenge's data and hospitals use many codes it does not score); the check digit catches typos."""
    mapping = LabelMapping.from_csv()
    codes = {c for d in mapping.diagnoses.values() for c in d.codes}
    for header in ecg_records_dir.glob("*.hea"):
        line = next(x for x in header.read_text().splitlines() if x.startswith("# Dx:"))
        codes |= set(parse_dx(line.split(":", 1)[1]))
    assert len(codes) == 39 and all(is_concept_id(c) for c in codes)
    assert is_concept_id("67741000119109")  # an extension concept (partition 10), in a fixture record
    for code in sorted(codes):
        for i in range(len(code)):  # any single wrong digit
            for digit in "0123456789":
                if digit != code[i] and (i or digit != "0"):
                    assert not is_concept_id(code[:i] + digit + code[i + 1 :]), (code, i, digit)
        for i in range(len(code) - 1):  # any two neighbours swapped
            swapped = code[:i] + code[i + 1] + code[i] + code[i + 2 :]
            assert swapped == code or not is_concept_id(swapped), (code, i)
    for token in ("AFIB", "AF", "0164889003", "12345", "1234567890123456789", "164889003x", ""):
        assert not is_concept_id(token), token
    assert not is_concept_id("164889019")  # a description id (partition 01), valid check digit: not a concept
    scored, unscored, unknown = mapping.split_codes(["164889003", "55827005", "AFIB", "164889004"])
    assert (scored, unscored, unknown) == (["164889003"], ["55827005"], ["AFIB", "164889004"])
