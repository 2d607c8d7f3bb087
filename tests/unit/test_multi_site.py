"""One forward pass over records of different sites (``ml.model.multi_site``).

Sites with different ranks per layer (unadapted layers, different alpha and deactivation p,
a head-only fine-tune with its own classifier.0 weight), their own BatchNorm statistics,
biases and heads (3-6 classes): a mixed batch, in interleaved order with repeated sites,
and a single record, gives every record its own site's logits (the model ``load_adapter``
builds) within 1e-5; a site that is the reference backbone itself reproduces the reference
goldens in a mixed batch; a full fine-tune is refused with a message.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from serving_support import random_backbone, site_adapter

from ml.model.adapter import AdapterMeta, load_adapter, load_backbone_weights, save_adapter, state_dict_identity
from ml.model.adapter_bank import SharedBackbone, read_site_adapter
from ml.model.backbone import ECGTransformer, backbone_config
from ml.model.lora import LoRAConfig, mark_trainable
from ml.model.multi_site import MultiSiteModel, UnbatchableAdapterError
from ml.model.pretrained import read_backbone

LORAS = [
    LoRAConfig(r=4, rank_map={"encoder_layers.0.conv1": 0, "classifier.0": 2}),
    LoRAConfig(r=2, p=0.1, rank_map={"transformer_layers.0.fc1": 0, "encoder_layers.1.conv2": 6}),
    LoRAConfig(r=8, alpha=4.0, p=0.3, rank_map={"transformer_layers.0.self_attention.c_attn": 3}),
]
CLASSES = ["164889003", "270492004", "59118001", "426783006", "164934002", "713426002"]


def head_only_adapter(out: Path, state: dict[str, torch.Tensor], seed: int) -> Path:
    """A head-only fine-tune: no LoRA, its own classifier.0 and classifier.1 weights."""
    torch.manual_seed(seed)
    model = ECGTransformer(backbone_config("tinylight", 5), LoRAConfig(r=0, p=0.0))
    load_backbone_weights(model, state, drop_head=True)
    mark_trainable(model, "head")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    return save_adapter(model.eval(), out, AdapterMeta(backbone_id=state_dict_identity(state), classes=CLASSES[:5]))


@pytest.fixture(scope="module")
def network(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("multi-site")
    backbone_dir, state = random_backbone(root, "tinylight", seed=0)
    folders = [
        site_adapter(root / f"site-{i}", state, "tinylight", CLASSES[: 3 + i], lora, seed=10 + i)
        for i, lora in enumerate(LORAS)
    ]
    folders.append(head_only_adapter(root / "site-head", state, seed=20))
    backbone = read_backbone(backbone_dir)
    shared = SharedBackbone(backbone.state, backbone.config, backbone.identity)
    adapters = [read_site_adapter(folder, f"site-{i}") for i, folder in enumerate(folders)]
    own = [load_adapter(folder, state)[0] for folder in folders]
    return {"shared": shared, "adapters": adapters, "own": own, "state": state, "root": root}


def own_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_sites_really_differ_in_ranks(network) -> None:
    ranks = [a.ranks for a in network["adapters"]]
    assert len({tuple(sorted(r.items())) for r in ranks}) == len(ranks)
    assert ranks[0]["encoder_layers.0.conv1"] == 0 and ranks[1]["encoder_layers.1.conv2"] == 6
    assert all(r == 0 for r in ranks[3].values())  # the head-only site


@pytest.mark.parametrize(
    "order",
    [[0, 2, 1, 3, 1, 0, 2, 2], [3, 3, 0], [1], [2, 0]],
    ids=["interleaved-repeated", "head-only-twice", "single-record", "two-sites"],
)
def test_each_record_gets_its_own_sites_logits(network, order: list[int]) -> None:
    model = MultiSiteModel(network["shared"].base, network["shared"].config, network["adapters"])
    torch.manual_seed(len(order))
    x = torch.randn(len(order), 12, 1, 6144)
    got = model(x, torch.tensor(order))
    assert got.shape == (len(order), max(model.n_classes))
    for i, site in enumerate(order):
        want = own_logits(network["own"][site], x[i : i + 1])[0]
        assert torch.abs(got[i, : len(want)] - want).max() < 1e-5, (i, site)
        assert torch.all(got[i, len(want) :] == 0)  # the padded head columns
        alone = model(x[i : i + 1], torch.tensor([site]))[0]
        assert torch.abs(alone - got[i]).max() < 1e-5  # batch-mates change nothing
    probabilities = model.probabilities(x, torch.tensor(order))
    assert [len(p) for p in probabilities] == [model.n_classes[s] for s in order]


def test_index_follows_the_adapters_and_the_backbone_is_not_copied(network) -> None:
    shared = network["shared"]
    model = MultiSiteModel(shared.base, shared.config, network["adapters"][::-1])
    assert [model.index(a.key) for a in network["adapters"]] == [3, 2, 1, 0]
    name = "transformer_layers.0.fc1.weight"
    assert model.base[name].data_ptr() == shared.base[name].data_ptr()
    # the per-site stacks: the adapters' tensors, ranks zero-padded per layer, and here every
    # site's classifier.0 weight, as one site (the head-only one) has its own
    assert 0 < model.nbytes < sum(a.nbytes for a in network["adapters"]) * 3


def test_the_reference_backbone_as_a_site_reproduces_the_goldens(reference_dir: Path, tmp_path: Path, network) -> None:
    """A site whose adapter is the reference r = 0 backbone itself (LoRA B = 0), in a batch with
    another site of that backbone: its records give the reference logits."""
    golden = torch.load(reference_dir / "golden_tinylight_r0.pt", weights_only=True)
    x = torch.from_numpy(np.load(reference_dir / "golden_input.npy"))
    want = np.load(reference_dir / "golden_tinylight_r0_logits.npy")
    identity = state_dict_identity(golden)
    plain = ECGTransformer(backbone_config("tinylight", want.shape[1]), LoRAConfig(r=4))
    load_backbone_weights(plain, golden)
    mark_trainable(plain, "lora")
    meta = AdapterMeta(backbone_id=identity, classes=[f"c{i}" for i in range(want.shape[1])])
    golden_site = read_site_adapter(save_adapter(plain.eval(), tmp_path / "golden", meta), "golden")
    other = read_site_adapter(
        site_adapter(tmp_path / "other", golden, "tinylight", CLASSES[:3], LORAS[1], seed=5), "other"
    )
    shared = SharedBackbone(golden, backbone_config("tinylight", want.shape[1]), identity)
    model = MultiSiteModel(shared.base, shared.config, [other, golden_site])
    n = len(x)
    stacked = torch.cat([x, x])
    sites = torch.tensor([1, 0] * n)  # golden, other, golden, other, ...
    order = torch.stack([torch.arange(n), torch.arange(n) + n], dim=1).reshape(-1)
    logits = model(stacked[order], sites)
    assert np.abs(logits[sites == 1].numpy() - want).max() < 1e-5


def test_a_full_fine_tune_is_refused_with_a_message(network, tmp_path: Path) -> None:
    state = network["state"]
    model = ECGTransformer(backbone_config("tinylight", 3), LoRAConfig(r=0, p=0.0))
    load_backbone_weights(model, state, drop_head=True)
    mark_trainable(model, "full")
    with torch.no_grad():
        model.transformer_layers[0].fc1.weight.add_(0.01)
    meta = AdapterMeta(backbone_id=state_dict_identity(state), classes=CLASSES[:3], method="full")
    full = read_site_adapter(save_adapter(model.eval(), tmp_path / "full", meta), "full-site")
    shared = network["shared"]
    with pytest.raises(UnbatchableAdapterError, match=r"full-site: replaces the backbone weight .*full fine-tune"):
        MultiSiteModel(shared.base, shared.config, [network["adapters"][0], full])
