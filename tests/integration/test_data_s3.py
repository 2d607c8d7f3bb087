"""Ingestion from s3://bucket/prefix on a real S3 server (SeaweedFS on localhost)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml.data.ingest import ACCEPTED, IngestConfig, ingest, load_record, read_manifest
from ml.data.sources import S3Source, open_source, unsafe_key_problem
from ml.data.synth import SynthConfig, generate, inject_faults

pytestmark = pytest.mark.integration


def _upload(client, bucket: str, root: Path, prefix: str) -> int:
    n = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(root).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            n += 1
    return n


@pytest.fixture
def aws_env(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


def test_unsafe_keys_are_recognised():
    for key in (
        "../evil.hea",
        "a/../b.hea",
        "/abs.hea",
        "a//b.hea",
        "a\\b.hea",
        "a/./b.hea",
        "x\x00.hea",
        "%2E%2E/x.hea",
        "a%2fb.hea",
    ):
        assert unsafe_key_problem(key), key
    assert unsafe_key_problem("site-1/E0001.hea") is None


def test_s3_ingestion_matches_local_and_is_incremental(aws_env, s3_bucket, tmp_path):
    root = tmp_path / "hospital"
    generate(root, SynthConfig(records=12, seed=21, unlabelled_fraction=0.3), workers=1, progress=False)
    expected = inject_faults(root, seed=21)
    client = aws_env.client()
    _upload(client, s3_bucket, root, "hospital-a/2024")
    uri = f"s3://{s3_bucket}/hospital-a/2024"

    local = ingest(root, tmp_path / "local", config=IngestConfig(workers=1), progress=False)
    remote = ingest(uri, tmp_path / "s3", config=IngestConfig(workers=2, chunk_size=8, min_parallel=0), progress=False)
    for field in ("seen", "accepted", "quarantined", "labelled", "unlabelled", "by_reason"):
        assert getattr(remote, field) == getattr(local, field), field
    m_local = read_manifest(tmp_path / "local").set_index("key")
    m_s3 = read_manifest(tmp_path / "s3").set_index("key")
    assert (m_s3["source"] == uri).all()
    for key, outcome in expected.items():
        assert m_s3.loc[key, "reason" if outcome != ACCEPTED else "status"] == outcome, key
    assert (m_s3["content_hash"] == m_local.loc[m_s3.index, "content_hash"]).all()
    record = load_record(uri, "S00003.hea", expected_hash=m_s3.loc["S00003.hea", "content_hash"])
    assert record.signal.shape == (12, 5000)

    # incremental: a new object under the prefix is the only record read
    extra = tmp_path / "extra"
    generate(extra, SynthConfig(records=2, seed=21, start=12), workers=1, progress=False)
    _upload(client, s3_bucket, extra, "hospital-a/2024/new")
    again = ingest(uri, tmp_path / "s3", config=IngestConfig(workers=1), progress=False)
    assert (again.read, again.reused, again.seen) == (2, remote.seen, remote.seen + 2)


def test_path_traversal_keys_are_quarantined_not_read(
    aws_env, s3_bucket, tmp_path, ecg_records_dir, monkeypatch, spy_reads
):
    client = aws_env.client()
    prefix = "site"
    for name in ("E07500.hea", "E07500.mat"):
        client.put_object(Bucket=s3_bucket, Key=f"{prefix}/{name}", Body=(ecg_records_dir / name).read_bytes())
    header = (ecg_records_dir / "E07501.hea").read_bytes()
    # SeaweedFS refuses '.'/'..' segments itself, but stores percent-encoded ones verbatim
    for key in ("%2e%2e/E07501.hea", "..%2fE07502.hea", "a%5c..%5cE07503.hea"):
        client.put_object(Bucket=s3_bucket, Key=f"{prefix}/{key}", Body=header)
    source = S3Source(f"s3://{s3_bucket}/{prefix}")

    read_keys = spy_reads(S3Source)
    report = ingest(source, tmp_path / "ing", config=IngestConfig(workers=1), progress=False)
    assert (report.seen, report.accepted, report.by_reason) == (4, 1, {"unsafe_path": 3})
    assert sorted(set(read_keys)) == ["E07500.hea", "E07500.mat"]  # nothing else was fetched
    manifest = read_manifest(tmp_path / "ing")
    assert manifest[manifest["status"] == "quarantined"]["detail"].str.contains("percent-encoded").all()

    # keys a less careful server could list: never read, quarantined
    hostile = ["../../etc/E1.hea", "a/../../E2.hea", "dir/./E3.hea", "x//E4.hea", "/abs/E5.hea"]
    listing = [(k, 10, "etag") for k in hostile]
    monkeypatch.setattr(S3Source, "_objects", lambda self: listing)
    read_keys.clear()
    report = ingest(source, tmp_path / "ing2", config=IngestConfig(workers=1), progress=False)
    assert report.by_reason == {"unsafe_path": len(hostile)} and read_keys == []
    with pytest.raises(PermissionError):
        source.read("../secret.mat")
    assert isinstance(open_source(f"s3://{s3_bucket}/{prefix}"), S3Source)


def test_monitoring_reads_recent_records_from_s3_and_counts_unsafe_keys_unreadable(aws_env, s3_bucket, ecg_records_dir):
    """`cessl monitor --recent s3://...` (ml.eval.monitoring.records_of): every listed record is
    read or counted unreadable with its reason; a key escaping the prefix is never read."""
    from ml.eval.monitoring import read_signals, records_of

    client = aws_env.client()
    for name in ("E07500.hea", "E07500.mat", "E07501.hea", "E07501.mat"):
        client.put_object(Bucket=s3_bucket, Key=f"recent/{name}", Body=(ecg_records_dir / name).read_bytes())
    client.put_object(
        Bucket=s3_bucket, Key="recent/%2e%2e/E07502.hea", Body=(ecg_records_dir / "E07501.hea").read_bytes()
    )
    read = read_signals(records_of(f"s3://{s3_bucket}/recent"))
    assert read.names == ["E07500", "E07501"] and read.signals.shape == (2, 12, 6144)
    (unsafe,) = read.unreadable
    assert "E07502" in unsafe and "percent-encoded" in read.unreadable[unsafe]
    with pytest.raises(ValueError, match="no WFDB records"):
        records_of(f"s3://{s3_bucket}/nothing-here")
