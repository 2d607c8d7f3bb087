"""What the model benchmarks share: the device / threads / json options, logging, device naming."""

from __future__ import annotations

import argparse
import logging

import torch


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """--device, --threads, --json: where the benchmark runs and where its figures go."""
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the figures here")


def setup(args: argparse.Namespace, level: int = logging.INFO) -> None:
    """Logging to stderr and torch's CPU thread count, from the run options."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ml.train.build").setLevel(logging.ERROR)  # "no pre-trained backbone" per model
    if args.threads:
        torch.set_num_threads(args.threads)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU with its torch thread count."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
