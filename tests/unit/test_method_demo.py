"""`cessl method-demo` is a CLI verb with one source of defaults. The demo itself, and the
method learning a synthetic task: tests/integration/test_e2e_finetune.py."""

from __future__ import annotations

import pytest

from ml.model.lora import LoRAConfig
from ml.model.rank_allocation import RankAllocationConfig
from pipeline.cli import build_parser
from pipeline.cli.method_demo import options_from_args

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_method_demo_is_a_cli_command() -> None:
    args = build_parser().parse_args(["method-demo", "--steps", "3", "--no-progress"])
    assert args.command == "method-demo" and args.steps == 3 and callable(args.func)
    options = options_from_args(args)
    assert options.lora == LoRAConfig() and options.allocation == RankAllocationConfig()  # one source of defaults
    given = options_from_args(build_parser().parse_args(["method-demo", "-r", "4", "-p", "0", "--compress", "0.2"]))
    assert given.lora == LoRAConfig(r=4, p=0.0) and given.allocation == RankAllocationConfig(compress=0.2)
