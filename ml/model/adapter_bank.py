"""Many sites' adapters on one backbone: switch a site in by swapping references, never copying W.

A hospital network serves one pre-trained backbone and one CE-SSL adapter per site. The
adapter of a site (:func:`ml.model.adapter.save_adapter`) holds the LoRA A/B of every
adapted layer at that site's own ranks (rank allocation gives each site its own rank
map, 0 meaning "not adapted"), every bias, all BatchNorm/LayerNorm state (running
statistics included: they saw the site's unlabelled records), the classifier head
``classifier.1`` (the site's own classes: its shape differs between sites) and any other
parameter that was trainable when saved (a full fine-tune stores everything).

:class:`SharedBackbone` builds the r = 0 backbone once. :meth:`SharedBackbone.activate`
makes it compute exactly what :func:`ml.model.adapter.load_adapter` would have built
for a site: every tensor the adapter holds replaces the module's entry *by reference*
(the site's tensors were wrapped once, when read), the entries a previous site replaced
and this one does not hold get the backbone's own tensor back, and every LoRA layer gets
the site's rank, scale (alpha / r) and deactivation probability. The backbone's weights
are never copied or modified, so switching costs a few hundred attribute assignments and
the probabilities equal the site's own :class:`ml.eval.predictor.Predictor` (the same
operations on the same tensors). The LoRA update stays unmerged (``W + (1 - p) B A`` in
each forward pass), which is what makes the switch free.

:class:`AdapterLRU` bounds how many sites' adapters stay in memory (least recently used
first out). Not thread-safe on its own: one caller holds a lock around
``activate`` + forward (:mod:`pipeline.serving.server`).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ml.model.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BackboneMismatchError,
    CheckpointError,
    check_state_dict,
    check_tensor_values,
    read_weights,
)
from ml.model.backbone import BackboneConfig, ECGTransformer
from ml.model.lora import LoRAConfig, LoRALayer

log = logging.getLogger(__name__)

_LORA_LEAVES = ("lora_A", "lora_B")


@dataclass(frozen=True)
class SiteAdapter:
    """One site's adapter, read once: its tensors (parameters already wrapped) and settings.

    ``key`` names it in caches and logs (``<registered model>/<version>``). ``ranks`` is
    the rank of every adaptable layer (0: not adapted), ``p`` / ``never_deactivate`` /
    ``alpha`` the LoRA settings that :func:`ml.model.adapter.load_adapter` would apply.
    """

    key: str
    backbone_id: str
    backbone_config: BackboneConfig
    classes: list[str]
    thresholds: list[float]
    ranks: dict[str, int]
    p: float
    never_deactivate: tuple[str, ...]
    alpha: float | None
    tensors: dict[str, Tensor] = field(repr=False)
    method: str = "cessl"

    @property
    def nbytes(self) -> int:
        """Bytes of the adapter's tensors (what one more site costs a server)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(
            r=0, rank_map=dict(self.ranks), p=self.p, never_deactivate=self.never_deactivate, alpha=self.alpha
        )


def _config_field(config: Mapping[str, Any], key: str, where: Path) -> Any:
    if key not in config:
        raise CheckpointError(f"{where}: missing field {key!r}")
    return config[key]


def read_site_adapter(adapter_dir: str | Path, key: str) -> SiteAdapter:
    """Read and check an adapter folder (the tensors' names, shapes and values against the
    model its config describes); :class:`ml.model.adapter.CheckpointError` names the file."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{config_path}: adapter config not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_path}: not a readable adapter config ({err})") from None
    try:
        backbone_config = BackboneConfig(**_config_field(config, "backbone_config", config_path))
        lora = LoRAConfig(
            r=int(_config_field(config, "r", config_path)),
            rank_map=dict(_config_field(config, "rank_map", config_path)),
            p=float(_config_field(config, "p", config_path)),
            never_deactivate=tuple(_config_field(config, "never_deactivate", config_path)),
            alpha=config.get("alpha"),
        )
        with torch.device("meta"):
            reference = ECGTransformer(backbone_config, lora)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path}: not a usable adapter config ({err})") from None
    classes = [str(c) for c in _config_field(config, "classes", config_path)]
    thresholds = config.get("thresholds")
    thresholds = [0.5] * len(classes) if thresholds is None else [float(t) for t in thresholds]
    if len(thresholds) != len(classes) or len(classes) != backbone_config.num_classes:
        raise CheckpointError(
            f"{config_path}: {len(classes)} classes, {len(thresholds)} thresholds and a "
            f"{backbone_config.num_classes}-class head do not agree"
        )
    weights = adapter_dir / ADAPTER_WEIGHTS
    tensors = read_weights(weights)
    expected = reference.state_dict()
    check_tensor_values(tensors, str(weights), expected)
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [k for k in tensors if k in expected and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k.rsplit(".", 1)[-1] in _LORA_LEAVES and k not in tensors]
    if unexpected or mismatched or missing:
        raise CheckpointError(
            f"{weights}: does not fit its config (missing LoRA tensors {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatches {mismatched[:5]})"
        )
    params = {name for name, _ in reference.named_parameters()}
    wrapped: dict[str, Tensor] = {
        k: nn.Parameter(v.contiguous(), requires_grad=False) if k in params else v.contiguous()
        for k, v in tensors.items()
    }
    return SiteAdapter(
        key=key,
        backbone_id=str(_config_field(config, "backbone_id", config_path)),
        backbone_config=backbone_config,
        classes=classes,
        thresholds=thresholds,
        ranks={str(k): int(v) for k, v in reference.rank_map().items()},
        p=lora.p,
        never_deactivate=lora.never_deactivate,
        alpha=lora.alpha,
        tensors=wrapped,
        method=str(config.get("method", "cessl")),
    )


def _same_body(a: BackboneConfig, b: BackboneConfig) -> bool:
    """Whether two configs describe the same backbone apart from the head's class count."""
    return (a.d_model, a.n_transformer_layers, a.n_leads, a.n_heads, a.seq_len, a.max_len) == (
        b.d_model,
        b.n_transformer_layers,
        b.n_leads,
        b.n_heads,
        b.seq_len,
        b.max_len,
    )


class SharedBackbone:
    """One r = 0 backbone in eval mode that any site's adapter can be switched into."""

    def __init__(self, state_dict: Mapping[str, Tensor], config: BackboneConfig, identity: str) -> None:
        self.identity = identity
        self.config = config
        model = ECGTransformer(config)
        check_state_dict(model.state_dict(), state_dict, f"backbone {identity[:12]}")
        model.load_state_dict(dict(state_dict), strict=True)
        model.requires_grad_(False)
        self.model = model.eval()
        # the backbone's own tensors (references): what a site that does not replace an entry uses
        self._base: dict[str, Tensor] = dict(model.state_dict(keep_vars=True))
        self._slots: dict[str, tuple[nn.Module, str, bool]] = {}
        for name in self._base:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            self._slots[name] = (module, leaf, leaf in module._parameters)
        self._layers: dict[str, LoRALayer] = {n: model._lora_layer(n) for n in model.adapted_layer_names()}
        self.active: SiteAdapter | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._base.values())

    @property
    def base(self) -> dict[str, Tensor]:
        """The backbone's own tensors by state-dict name (whatever site is active)."""
        return self._base

    def check(self, adapter: SiteAdapter) -> None:
        """Refuse an adapter trained on another backbone (BackboneMismatchError names both)."""
        if adapter.backbone_id != self.identity:
            raise BackboneMismatchError(
                f"{adapter.key}: adapter was trained on backbone {adapter.backbone_id}, this one is {self.identity}"
            )
        if not _same_body(adapter.backbone_config, self.config):
            raise CheckpointError(f"{adapter.key}: adapter's backbone config {adapter.backbone_config} differs")

    def _put(self, name: str, tensor: Tensor) -> None:
        module, leaf, is_param = self._slots[name]
        if is_param:
            module._parameters[leaf] = tensor  # type: ignore[assignment]  # a Parameter, wrapped when read
        else:
            module._buffers[leaf] = tensor

    @torch.no_grad()
    def activate(self, adapter: SiteAdapter) -> None:
        """Make the model compute ``adapter``'s site (a no-op when it is active already)."""
        if self.active is adapter:
            return
        self.check(adapter)
        previous = self.active
        self.active = None  # half-switched: nobody may use it as either site
        if previous is not None:
            for name in previous.tensors.keys() - adapter.tensors.keys():
                if name in self._base:
                    self._put(name, self._base[name])
        lora = adapter.lora_config()
        for name, layer in self._layers.items():
            rank = adapter.ranks.get(name, 0)
            layer.r = rank
            layer.scale = (float(lora.alpha) if lora.alpha is not None else float(rank)) / rank if rank else 0.0
            layer.p = lora.p_for(name)
            layer.merged = False
            for leaf in _LORA_LEAVES:
                layer._parameters.pop(leaf, None)
                if rank:
                    layer._parameters[leaf] = adapter.tensors[f"{name}.{leaf}"]  # type: ignore[assignment]
        for name, tensor in adapter.tensors.items():
            if name.rsplit(".", 1)[-1] not in _LORA_LEAVES:
                self._put(name, tensor)
        self.active = adapter


class AdapterLRU:
    """At most ``capacity`` adapters by key, the least recently used evicted first."""

    def __init__(self, capacity: int, on_evict: Callable[[SiteAdapter], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"the adapter cache needs room for at least one adapter, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, SiteAdapter] = OrderedDict()
        self._on_evict = on_evict
        self.loads = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def keys(self) -> list[str]:
        return list(self._items)

    def values(self) -> list[SiteAdapter]:
        """The adapters held, least recently used first."""
        return list(self._items.values())

    def get(self, key: str, load: Callable[[], SiteAdapter]) -> SiteAdapter:
        """The adapter ``key`` (now the most recently used), loaded with ``load`` if absent."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        adapter = load()
        self.loads += 1
        self._items[key] = adapter
        while len(self._items) > self.capacity:
            _, evicted = self._items.popitem(last=False)
            self.evictions += 1
            log.info("adapter cache full (%d): evicted %s", self.capacity, evicted.key)
            if self._on_evict is not None:
                self._on_evict(evicted)
        return adapter

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._items.values())
