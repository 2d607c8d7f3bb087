"""SNOMED-CT diagnoses of the PhysioNet/CinC Challenge 2021: scored classes, equivalences.

The Challenge scores 30 diagnoses (``challenge2021_label_mapping.csv``, shipped with this
package) and treats four pairs of codes as one diagnosis. Every code read from a header
goes through :func:`canonical_code`, so a record labelled ``713427006`` (complete RBBB)
and one labelled ``59118001`` (RBBB) carry the same class. Class names stay SNOMED codes
so that real and synthetic hospitals share one label space.

A header's ``# Dx:`` line holds comma-separated SNOMED CT concept ids. Each token is one of:

* **scored**: a code of the mapping (or its equivalent): a class the model can learn;
* **unscored**: a valid SNOMED CT concept id the Challenge does not score (``55827005``,
  ``251187003``...): legitimate, kept in the manifest, not learnt;
* **unknown**: anything else (``AFIB``, ``AF``, a code with a typo): the record's labels
  cannot be trusted, and ingestion quarantines it (``unknown_label``) rather than train on
  it as "negative for everything".

"Valid SNOMED CT concept id" is decided from the id's own structure, since the full SNOMED
CT release is licensed and not shipped (the Challenge's own data carry many codes besides the
scored ones, and a hospital may use any other): 6 to 18 digits, no leading zero, a concept
partition identifier (the two digits before the last: ``00`` core, ``10`` extension), and a
correct Verhoeff check digit (the last), as the SNOMED CT Technical Implementation Guide
specifies for every SCTID. A mistyped digit or two swapped neighbours fail the check digit;
every code of the mapping and of the real records in ``tests/fixtures/ecg`` passes it.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

LABEL_MAPPING_CSV = Path(__file__).with_name("challenge2021_label_mapping.csv")

# Codes scored as the same diagnosis -> the code that represents the pair (the first code
# of the pair in the Challenge's scoring weights).
EQUIVALENT_CODES: dict[str, str] = {
    "733534002": "164909002",  # complete LBBB -> LBBB
    "713427006": "59118001",  # complete RBBB -> RBBB
    "284470004": "63593006",  # PAC -> supraventricular premature beats
    "427172004": "17338001",  # PVC -> ventricular premature beats
}

# Display names of the merged pairs (the names used in the paper's per-class tables).
MERGED_ABBREVIATIONS: dict[str, str] = {
    "164909002": "LBBB",
    "59118001": "RBBB",
    "63593006": "PAC",
    "17338001": "PVC",
}

# Source databases as named by the CSV's count columns.
SOURCES: tuple[str, ...] = (
    "CPSC",
    "CPSC_Extra",
    "StPetersburg",
    "PTB",
    "PTB_XL",
    "Georgia",
    "Chapman_Shaoxing",
    "Ningbo",
)

_SNOMED = re.compile(r"^\d{6,18}$")
_SCTID = re.compile(r"^[1-9]\d{5,17}$")
CONCEPT_PARTITIONS = ("00", "10")  # SCTID partition identifiers of concepts (core, extension)

# Verhoeff's dihedral-group tables (multiplication and position permutation), the SCTID check digit.
_VERHOEFF_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 2, 3, 4, 0, 6, 7, 8, 9, 5),
    (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7),
    (4, 0, 1, 2, 3, 9, 5, 6, 7, 8),
    (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2),
    (7, 6, 5, 9, 8, 2, 1, 0, 4, 3),
    (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 5, 7, 6, 2, 8, 3, 0, 9, 4),
    (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7),
    (9, 4, 5, 3, 1, 2, 6, 8, 7, 0),
    (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5),
    (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)


def canonical_code(code: str) -> str:
    """The code that represents ``code``'s diagnosis (equivalent pairs merged)."""
    code = code.strip()
    return EQUIVALENT_CODES.get(code, code)


def is_snomed_code(code: str) -> bool:
    """Whether ``code`` looks like a SNOMED-CT concept id (6 to 18 digits)."""
    return bool(_SNOMED.match(code.strip()))


def verhoeff_valid(digits: str) -> bool:
    """Whether the last digit of ``digits`` is the Verhoeff check digit of the others."""
    check = 0
    for position, digit in enumerate(reversed(digits)):
        check = _VERHOEFF_D[check][_VERHOEFF_P[position % 8][int(digit)]]
    return check == 0


def is_concept_id(code: str) -> bool:
    """Whether ``code`` is a well-formed SNOMED CT concept id (see the module docstring:
    6-18 digits, no leading zero, a concept partition, a valid Verhoeff check digit)."""
    code = code.strip()
    return bool(_SCTID.match(code)) and code[-3:-1] in CONCEPT_PARTITIONS and verhoeff_valid(code)


def parse_dx(value: str) -> list[str]:
    """Split a ``# Dx:`` value into codes, in header order, without blanks or repeats."""
    out: list[str] = []
    for token in re.split(r"[,;\s]+", value.strip()):
        if token and token not in out:
            out.append(token)
    return out


@dataclass(frozen=True)
class Diagnosis:
    """One scored diagnosis (equivalent codes merged into ``code``)."""

    code: str
    name: str
    abbreviation: str
    codes: tuple[str, ...]  # every SNOMED code scored as this diagnosis
    counts: dict[str, int] = field(default_factory=dict, compare=False)  # per source database


@dataclass(frozen=True)
class LabelMapping:
    """The scored diagnoses, in the CSV's order, keyed by canonical code."""

    diagnoses: dict[str, Diagnosis]
    aliases: dict[str, str] = field(default_factory=dict)  # lower-case abbreviation -> code

    @classmethod
    def from_csv(cls, path: str | Path | None = None) -> LabelMapping:
        return _load_mapping(str(Path(path) if path else LABEL_MAPPING_CSV))

    @property
    def scored_codes(self) -> list[str]:
        return list(self.diagnoses)

    def is_scored(self, code: str) -> bool:
        return canonical_code(code) in self.diagnoses

    def abbreviation(self, code: str) -> str:
        """Short name of a (scored) code; the code itself when it is not scored."""
        diagnosis = self.diagnoses.get(canonical_code(code))
        return diagnosis.abbreviation if diagnosis else code

    def abbreviations(self, codes: Iterable[str]) -> list[str]:
        return [self.abbreviation(c) for c in codes]

    def code_for(self, name: str) -> str:
        """Canonical code for a code or an abbreviation (``"AF"``, ``"PVC"``, ``"164889003"``)."""
        if canonical_code(name) in self.diagnoses:
            return canonical_code(name)
        if name.strip().lower() in self.aliases:
            return self.aliases[name.strip().lower()]
        if is_snomed_code(name):
            return canonical_code(name)
        raise ValueError(f"unknown diagnosis {name!r}: not a SNOMED code nor a Challenge abbreviation")

    def classes_for_source(self, source: str, min_count: int = 200) -> list[str]:
        """Scored diagnoses with at least ``min_count`` records in one source database
        (the paper's class selection: G12EC = ``Georgia`` gives 18 classes)."""
        if source not in SOURCES:
            raise ValueError(f"unknown source database {source!r}; one of {', '.join(SOURCES)}")
        return [c for c, d in self.diagnoses.items() if d.counts.get(source, 0) >= min_count]

    def split_codes(self, codes: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
        """Split header codes into (scored canonical, unscored SNOMED, unknown tokens): scored
        are the mapping's codes (equivalents merged), unscored the other valid SNOMED CT
        concept ids (:func:`is_concept_id`), unknown everything else (see the module docstring)."""
        scored: list[str] = []
        unscored: list[str] = []
        unknown: list[str] = []
        for code in codes:
            canon = canonical_code(code)
            if canon in self.diagnoses:
                if canon not in scored:
                    scored.append(canon)
            elif is_concept_id(canon):
                unscored.append(canon)
            else:
                unknown.append(code)
        return scored, unscored, unknown

    def unknown_label_detail(self, tokens: Sequence[str]) -> str:
        """Why ``tokens`` (unknown ``# Dx`` tokens) are refused, with the code an abbreviation
        stands for where one does (``AF`` -> 164889003)."""
        described = []
        for token in tokens:
            alias = self.aliases.get(token.strip().lower())
            described.append(f"{token!r} (did you mean {alias}, {self.abbreviation(alias)}?)" if alias else repr(token))
        return (
            f"# Dx token(s) {', '.join(described)} are not SNOMED CT concept ids; the # Dx line holds "
            "comma-separated SNOMED CT codes (e.g. 164889003 for atrial fibrillation)"
        )


@lru_cache(maxsize=8)
def _load_mapping(path: str) -> LabelMapping:
    rows = list(csv.DictReader(Path(path).read_text(encoding="utf-8").splitlines()))
    if not rows or "SNOMEDCTCode" not in rows[0]:
        raise ValueError(f"{path}: not a Challenge label mapping (no SNOMEDCTCode column)")
    merged: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    for row in rows:
        code = row["SNOMEDCTCode"].strip()
        aliases.setdefault(row["Abbreviation"].strip().lower(), canonical_code(code))
        canon = canonical_code(code)
        entry = merged.setdefault(canon, {"codes": [], "counts": Counter(), "name": None, "abbrev": None})
        entry["codes"].append(code)
        entry["counts"].update({s: int(row.get(s) or 0) for s in SOURCES})
        if code == canon or entry["name"] is None:
            entry["name"], entry["abbrev"] = row["Dx"].strip(), row["Abbreviation"].strip()
    # Keep the CSV's order of first appearance of each diagnosis.
    diagnoses = {
        canon: Diagnosis(
            code=canon,
            name=e["name"],
            abbreviation=MERGED_ABBREVIATIONS.get(canon, e["abbrev"]),
            codes=tuple(sorted(set(e["codes"]) | {canon}, key=lambda c: c != canon)),
            counts=dict(e["counts"]),
        )
        for canon, e in merged.items()
    }
    aliases.update({d.abbreviation.lower(): d.code for d in diagnoses.values()})
    return LabelMapping(diagnoses, aliases)


def class_descriptions(classes: Sequence[str]) -> tuple[list[str], list[str]]:
    """(abbreviations, names) of SNOMED codes; the code itself where the mapping has none (or
    cannot be read)."""
    try:
        mapping = LabelMapping.from_csv()
    except (OSError, ValueError, KeyError):
        return list(classes), list(classes)
    found = [mapping.diagnoses.get(canonical_code(code)) for code in classes]
    return (
        [d.abbreviation if d else code for d, code in zip(found, classes, strict=True)],
        [d.name if d else code for d, code in zip(found, classes, strict=True)],
    )


def count_labels(label_lists: Iterable[Sequence[str]]) -> Counter:
    """Records per canonical code (each record counts once per diagnosis)."""
    counts: Counter = Counter()
    for labels in label_lists:
        counts.update({canonical_code(c) for c in labels})
    return counts


def select_classes(
    label_lists: Iterable[Sequence[str]],
    min_count: int = 200,
    mapping: LabelMapping | None = None,
) -> list[str]:
    """Scored diagnoses carried by at least ``min_count`` records, in the CSV's order.

    ``label_lists`` holds each labelled record's codes; unscored codes are ignored.
    """
    mapping = mapping or LabelMapping.from_csv()
    counts = count_labels(label_lists)
    return [code for code in mapping.scored_codes if counts.get(code, 0) >= min_count]
