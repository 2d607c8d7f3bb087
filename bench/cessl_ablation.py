"""CE-SSL with one part taken away at a time, on ``bench/quality.py``'s harness and test split.

Bench-only method entries (registered in this process, never offered by ``cessl run``), each
CE-SSL (``ml.train.methods.METHODS["cessl"]``) with changes:

- ``cessl-p0``: no random deactivation;
- ``cessl-uniform``: LoRA's uniform rank instead of the one-shot allocation;
- ``lora-semi``: both, so plain LoRA with CE-SSL's semi-supervised BatchNorm step;
- ``lora-semi-noaug``: the same, the unlabelled half of the BatchNorm batch not augmented.

Every other flag is ``bench/quality.py``'s:

    python bench/cessl_ablation.py --config tiny --methods cessl cessl-p0 cessl-uniform lora-semi \\
        lora-semi-noaug lora head-only --ratios 0.5 --test-ratio 0.4 --seeds 0 --steps 300 --lr 1e-3 \\
        --records 360 --threads 2
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import quality
from ml.train import methods, steps


def _unaugmented_semi_step(model, x, y, x_u, gen, config) -> steps.StepOutput:
    """CE-SSL's step with the unlabelled half passed to the encoder as it is."""
    augment = steps.weak_augment
    steps.weak_augment = lambda x, generator: x
    try:
        return steps.semi_supervised_step(model, x, y, x_u, gen, config.cutmix_alpha)
    finally:
        steps.weak_augment = augment


VARIANTS: dict[str, dict[str, Any]] = {
    "cessl-p0": {"deactivation": False},
    "cessl-uniform": {"rank_policy": "uniform"},
    "lora-semi": {"rank_policy": "uniform", "deactivation": False},
    "lora-semi-noaug": {"rank_policy": "uniform", "deactivation": False, "step": _unaugmented_semi_step},
}


def register() -> None:
    """Add :data:`VARIANTS` to the method registry of this process and to quality.py's choices."""
    cessl = methods.METHODS["cessl"]
    for name, changes in VARIANTS.items():
        methods.METHODS[name] = dataclasses.replace(cessl, name=name, production=False, **changes)
    methods.METHOD_NAMES = tuple(methods.METHODS)
    quality.METHODS = (*quality.METHODS, *VARIANTS)


if __name__ == "__main__":
    register()
    quality.main()
