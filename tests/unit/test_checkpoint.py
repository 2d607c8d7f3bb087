"""Training checkpoints (ml.train.checkpoint): round trip, atomic save, safe load."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from ml.model.adapter import CheckpointError
from ml.train.checkpoint import load_checkpoint, save_checkpoint


class NotPlainData:
    """A pickled object that weights_only loading must refuse."""


def _state() -> dict:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": 7,
        "rng": {"python": random.Random(1).getstate(), "torch": torch.get_rng_state()},
        "history": [{"step": 5, "ap": 0.5}],
        "note": "x",
    }


def test_round_trip(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "sub" / "last.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["note"] == "x" and loaded["history"] == state["history"]
    assert loaded["rng"]["python"] == state["rng"]["python"]
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    assert loaded["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"
    assert list(path.parent.iterdir()) == [path]  # no temporary file left


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 (torch.save's pickling error type varies)
        save_checkpoint(path, {"step": 2, "unpicklable": lambda: None})
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_a_pickle_with_other_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "payload": NotPlainData()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*refused"):
        load_checkpoint(path)
