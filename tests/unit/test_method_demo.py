"""End to end: CE-SSL (rank allocation + LoRA with deactivation + semi-supervised BN) learns.

tinylight, randomly initialised, on a small synthetic multi-label task whose classes are
sinusoid patterns on class-specific leads (:mod:`ml.train.synthetic`). Kept well under a
minute on two CPU cores: few records, batches of 8 + 8, 30 steps.
"""

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
