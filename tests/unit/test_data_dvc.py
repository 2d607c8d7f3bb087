"""DVC: the directory md5 DVC records and the .dvc file parser. The demo data and the S3
remote: tests/integration/test_data_dvc_versions.py."""

from __future__ import annotations

import pytest

from ml.data.dvc import (
    data_version,
    dvc_md5,
)


def test_dvc_file_parser(tmp_path):
    """One YAML parser for .dvc files: the output at a path, a missing file, a broken one."""
    (tmp_path / "data").mkdir()
    dvc = tmp_path / "multi.dvc"
    dvc.write_text(
        "outs:\n- md5: 11111111111111111111111111111111.dir\n  path: other\n"
        "- md5: 22222222222222222222222222222222.dir\n  size: 10\n  path: data\n"
    )
    assert dvc_md5(dvc) == "11111111111111111111111111111111.dir"
    assert dvc_md5(dvc, tmp_path / "data") == "22222222222222222222222222222222.dir"
    assert dvc_md5(dvc, tmp_path / "elsewhere") is None
    assert dvc_md5(tmp_path / "missing.dvc") is None
    assert data_version(tmp_path, "multi.dvc") == "11111111111111111111111111111111.dir"
    (tmp_path / "broken.dvc").write_text("outs: [\n")
    with pytest.raises(ValueError, match=r"not a valid \.dvc file"):
        dvc_md5(tmp_path / "broken.dvc")
    (tmp_path / "nomd5.dvc").write_text("outs:\n- path: data\n")
    with pytest.raises(ValueError, match="has no md5"):
        dvc_md5(tmp_path / "nomd5.dvc")
