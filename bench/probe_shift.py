"""How much of a synthetic site the frozen backbone already separates: the frozen-probe AUROC.

For a network-demo site (``ml.data.synth.site_config``: its profile, the demo's eleven classes),
optionally with another heart rotation, the records are preprocessed as real ones, embedded by
the embedded default backbone (pooled features, frozen) and by the same network with random
weights (what the classes give away without any pre-training); a logistic-regression probe per
class is fit on 108 labelled records and scored on 144 test records: macro AUROC beside each.

    python bench/probe_shift.py --sites 0 1 2
    python bench/probe_shift.py --sites 0 --rotation 0 0 90     # a stronger lead-geometry shift
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RECORDS, TEST, LABELLED = 360, 144, 108


def site_data(index: int, rotation: tuple[float, float, float] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from ml.data.preprocess import preprocess_signal
    from ml.data.synth import NETWORK_DEMO_CLASSES, SiteOptions, site_config, synthesize_record

    config = site_config(
        index, RECORDS, seed=0, options=SiteOptions(classes=NETWORK_DEMO_CLASSES, unlabelled_fraction=0)
    )
    if rotation is not None:
        config = dataclasses.replace(config, heart_rotation_deg=rotation)
    x = np.empty((RECORDS, 12, 6144), np.float32)
    y = np.zeros((RECORDS, len(config.classes)))
    for i in range(RECORDS):
        record = synthesize_record(i, config)
        x[i] = preprocess_signal(record.signal, record.fs)
        y[i, [config.classes.index(c) for c in record.labels if c in config.classes]] = 1
    return x, y, list(config.classes)


def features(x: np.ndarray, pretrained: bool, config_name: str) -> np.ndarray:
    from ml.model.adapter import load_backbone_weights
    from ml.model.backbone import ECGTransformer
    from ml.model.pretrained import read_backbone
    from ml.train.default_backbone import ensure_default_backbone

    backbone = read_backbone(ensure_default_backbone(name=config_name, progress=False))
    torch.manual_seed(0)
    model = ECGTransformer(backbone.config)
    if pretrained:
        load_backbone_weights(model, backbone.state, drop_head=True)
    model.eval()
    with torch.no_grad():
        return np.concatenate(
            [model.pooled(torch.from_numpy(x[s : s + 64])[:, :, None, :]).numpy() for s in range(0, len(x), 64)]
        )


def probe_auroc(f: np.ndarray, y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    order = np.random.default_rng(0).permutation(len(f))
    test, train = order[:TEST], order[TEST : TEST + LABELLED]
    scaler = StandardScaler().fit(f[train])
    aucs = []
    for j in range(y.shape[1]):
        if y[train, j].sum() < 2 or y[test, j].sum() < 1 or y[test, j].all():
            continue
        probe = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(f[train]), y[train, j])
        aucs.append(roc_auc_score(y[test, j], probe.predict_proba(scaler.transform(f[test]))[:, 1]))
    return float(np.mean(aucs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--rotation", type=float, nargs=3, default=None, help="heart rotation (deg) instead of the profile's"
    )
    parser.add_argument("--config", default="tiny", help="the embedded default backbone's size (the demo's: tiny)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rotation = tuple(args.rotation) if args.rotation else None
    for index in args.sites:
        x, y, _ = site_data(index, rotation)
        row = {
            "site": index,
            "rotation": rotation or "profile",
            "pretrained_probe_auroc": round(probe_auroc(features(x, True, args.config), y), 3),
            "random_features_probe_auroc": round(probe_auroc(features(x, False, args.config), y), 3),
        }
        print(json.dumps(row))


if __name__ == "__main__":
    main()
