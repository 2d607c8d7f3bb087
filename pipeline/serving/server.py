"""``cessl serve``: a hospital network's champions behind one KServe model server.

One process holds each pre-trained backbone once (:class:`ml.model.adapter_bank.SharedBackbone`,
keyed by its identity: normally one for the whole network) and the adapters of the sites'
model versions in an LRU cache (``--max-adapters``), unmerged: answering for a site
switches its adapter into the shared model by reference (no copy of the backbone), so a
site's answer equals its own :class:`ml.eval.predictor.Predictor`'s.

Names: site ``S`` of model ``M`` is the registered model ``M-S``
(:func:`pipeline.registry.policy.site_model_name`). A request addresses ``S`` (its ``champion``)
or ``S:V`` (version ``V``; or the request parameter ``version``). Aliases are resolved
again when older than ``--refresh-seconds``, so a promotion or a rollback is served
without a restart; every answer names the registered model and the version that gave it.

The HTTP side is KServe's Python model server (Open Inference Protocol v2, REST only):
``/v2/health/live``, ``/v2/health/ready``, ``/v2/models``, ``/v2/models/{S}`` (metadata),
``/v2/models/{S}/ready``, ``POST /v2/models/{S}/infer`` (``{S}`` may be ``S:V``, or the
path ``/v2/models/S/versions/V/...``) and ``GET /v2/models/{S}/card``: the answering version's
model card in Markdown (:mod:`pipeline.registry.model_card`, from its verified audit log). A request carries one input:

* ``signals``: FP32 (or FP64) ``[n, 12, samples]`` (``[12, samples]`` is one record), raw
  12-lead signals in mV at the request parameter ``sample_rate`` (Hz, default 500); they
  are resampled, filtered and cropped or padded like the training data.
* ``records``: BYTES ``[n, 2]``: per record its WFDB header text and its signal file
  (``.mat`` or ``.dat``) base64-encoded; the header gives the sample rate.

The answer: ``probabilities`` FP32 ``[n, C]``, ``diagnoses`` and ``codes`` BYTES ``[n]``
(the classes at or above their thresholds, abbreviations / SNOMED codes, ``;``-joined),
``status``, ``reason`` and ``notes`` BYTES ``[n]``, and per class ``classes`` (SNOMED codes),
``class_names`` (abbreviations), ``descriptions`` and ``thresholds``; ``model_name`` /
``model_version`` name the registered model version, the parameters the site and the alias.

Calibrated answers (:mod:`pipeline.registry.calibration`, ``cessl calibrate``): ``decisions``
BYTES ``[n, C]`` (``present`` / ``absent`` / ``refer``, ``""`` for an unreadable record),
``refer`` BYTES ``[n]`` (the classes to refer to a cardiologist, abbreviations ``;``-joined)
and per class ``miss_rate_bounds`` / ``miss_rate_uppers`` FP32 ``[C]`` (the conformal bound
and its Clopper-Pearson upper bound; -1 where none). The calibration is the one the version's
**verified** audit log signs (read with the champion's verification, never from a tag or a
file); the parameters ``calibrated`` (true / false) and ``calibration_entry`` (the audit entry's
number) say which. A version never calibrated answers present / absent by its thresholds.

Every record is checked for signal quality first (:func:`ml.data.quality.check_signal`, the
check ingestion quarantines with): ``status`` is ``ok`` for a record that passed and was
predicted (``reason`` ``""``), ``unreadable`` for one that failed: its ``reason`` names each
failing lead and why (``signal quality: V3: flat (peak-to-peak 0.021 mV < 0.05 mV: an
electrode off?)``), its ``diagnoses`` and ``codes`` are empty and its row of
``probabilities`` is -1 (not a probability, on purpose: JSON has no NaN). ``notes`` tells
what the check tolerated in a record it passed, for whoever reads its diagnoses (``signal
quality: V2, V4, V6 not recorded (all samples 0)``: leads the device did not record), ``""``
otherwise; a client that does not know ``notes`` gets every other output as before. The
other records of the request are answered as if they were alone. A WFDB record is read with
the file and header checks only, so that a flat, too short or implausibly sampled one is
answered ``unreadable`` rather than refused.

Verified champions (:mod:`pipeline.registry.verify`): each time a site's champion is resolved,
its audit log's chain and signatures are checked against the trust file (``$CESSL_TRUST_FILE``,
else ``~/.config/cessl/trust.yaml``; in the cluster the ConfigMap ``cessl-trust``), and the
site serves the version that the last valid signed decision names, never an alias moved
without one. On a mismatch (a moved alias, a broken or shortened log) it keeps serving the
last verified champion, logs the mismatch once, and ``/v2/models/{S}/ready`` answers 503 with
it, and so does ``/v2/health/ready`` (the site still answers; the server is not ready): the
server is ready only when every configured site has a servable verified champion, else 503
naming each site and why; a site with no verified champion yet answers 503.

Batching: concurrent requests, whichever their sites, are answered together
(:class:`Batcher`): the first waits up to ``--batch-window-ms`` for others, then one
:class:`ml.model.multi_site.MultiSiteModel` pass gives every record its own site's answer
(the answer's parameter ``batch_sites`` says how many sites shared it). At most
``--max-queue`` requests are admitted at once (decoding, waiting or running); more are
answered 429. Bodies are decoded off the event loop (a JSON body of 4 MB or more in a child
process, :mod:`pipeline.serving.request_body`), the rest in worker threads.

Errors: a malformed or incomplete body, a wrong tensor (name, type, shape, NaN/Inf: a tensor
with NaN is a malformed request, not a record to judge) or parameter is a 400 naming it, a body over ``--max-body-mb`` a 413, an unknown site or
version a 404, a site without a champion (or whose model cannot be loaded) a 503 saying
why; the process keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import logging
import math
import queue
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.data.labels import class_descriptions
from ml.errors import CesslError, ParameterError
from ml.eval.calibration import REFER
from ml.model.adapter_bank import AdapterLRU, SharedBackbone, SiteAdapter, read_site_adapter
from ml.model.multi_site import MultiSiteModel, UnbatchableAdapterError
from pipeline.core.sites import check_site_name
from pipeline.registry.policy import DEFAULT_MODEL_NAME, site_model_name
from pipeline.registry.signing import find_trust
from pipeline.registry.tracking import CHAMPION
from pipeline.registry.verify import Verification, verify_model
from pipeline.serving.request_body import BodyDecoder

if TYPE_CHECKING:
    from ml.eval.calibration import CalibrationSet
    from pipeline.registry.audit import AuditEntry

log = logging.getLogger(__name__)

N_LEADS = 12
UNREADABLE_PROBABILITY = -1.0  # an unreadable record's row of ``probabilities`` (JSON has no NaN)
DEFAULT_SAMPLE_RATE = 500.0
MIN_SAMPLE_RATE = 50.0  # below it an ECG's QRS is not resolved; also bounds the resampled length
MAX_SAMPLE_RATE = 20_000.0
SIGNALS = "signals"
RECORDS = "records"
_VERSION = re.compile(r"^[1-9][0-9]{0,9}$")
# MLflow's answers that mean "not registered" (anything else: the registry did not answer)
NOT_THERE = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


BY_SITE, ONE_PASS = "by-site", "one-pass"
MIXED_BATCHES = (BY_SITE, ONE_PASS)


@dataclass(frozen=True)
class ServeConfig:
    """What ``cessl serve`` serves and how (the command line's flags)."""

    sites: tuple[str, ...]
    tracking_uri: str
    model_name: str = DEFAULT_MODEL_NAME
    host: str = "0.0.0.0"
    port: int = 8080
    max_adapters: int = 32
    refresh_seconds: float = 30.0
    max_body_bytes: int = 64 * 1024 * 1024
    max_records: int = 256
    trust_file: str = ""  # the release managers' public keys ("" : $CESSL_TRUST_FILE or the local default)
    batch_window_ms: float = 5.0  # how long the first request of a batch waits for others (any site)
    max_batch_records: int = 64  # records of one batched forward pass (a bigger request runs alone)
    max_queue: int = 64  # requests admitted at once (decoding, waiting or in a pass); more: 429
    # how a batch holding several sites' records runs: "by-site" (each site's records through its
    # adapter switched in, one after the other) or "one-pass" (ml.model.multi_site: every record
    # in one forward pass). On CPU by-site is faster (bench/RESULTS.md: one-pass 0.62-0.89x of
    # switching at 1-20 sites per batch), so it is the default; one-pass is for accelerators,
    # where one big batched pass is expected to beat many small ones (not measured yet).
    mixed_batches: str = "by-site"

    def __post_init__(self) -> None:
        if not self.sites:
            raise ParameterError("no sites to serve: give --sites FILE and/or --site NAME")
        for site in self.sites:
            check_site_name(site)
        if self.max_adapters < 1:
            raise ParameterError(f"--max-adapters must be at least 1, got {self.max_adapters}")
        if not 0 <= self.batch_window_ms <= 1000:
            raise ParameterError(f"--batch-window-ms must be in [0, 1000], got {self.batch_window_ms:g}")
        if self.mixed_batches not in MIXED_BATCHES:
            raise ParameterError(
                f"--mixed-batches must be one of {', '.join(MIXED_BATCHES)}, got {self.mixed_batches!r}"
            )
        if self.max_batch_records < 1 or self.max_queue < 1:
            raise ParameterError(
                f"--max-batch-records and --max-queue must be at least 1, got {self.max_batch_records} and "
                f"{self.max_queue}"
            )


# --------------------------------------------------------------------------- errors


class UnknownModelError(CesslError):
    """The request names a site this server does not serve, or a version that does not exist (404)."""


class ModelUnavailableError(CesslError):
    """A served site cannot answer now: no champion, or its model cannot be loaded (503)."""


class BadRequestError(CesslError, ValueError):
    """The request's inputs or parameters are unusable (400); the message names them."""


class ServerBusyError(CesslError):
    """``--max-queue`` requests are already admitted (429): the client retries later."""


# --------------------------------------------------------------------------- the answer


@dataclass
class Prediction:
    """One answer: per-record probabilities and diagnoses, and the model version that gave them."""

    site: str
    model_name: str
    version: str
    alias: str  # "champion", or "" for a pinned version
    classes: list[str]
    thresholds: list[float]
    probabilities: np.ndarray  # (n, C); NaN for an unreadable record
    diagnoses: list[list[str]] = field(default_factory=list)  # SNOMED codes per record
    problems: list[str] = field(default_factory=list)  # per record: "" or why it is unreadable
    notes: list[str] = field(default_factory=list)  # per record: "" or what the quality check tolerated
    batch_sites: int = 0  # sites whose records shared the forward pass that answered (0: none ran)
    calibration: CalibrationSet | None = None  # the version's signed calibration (None: thresholds only)
    calibration_entry: int = 0  # the audit entry that recorded it (0: none)

    def decisions(self) -> np.ndarray:
        """present / absent / refer per record and class (``""`` for an unreadable record)."""
        from ml.eval.predictor import decisions_of

        return decisions_of(self.probabilities, self.classes, self.thresholds, self.calibration)

    def statuses(self) -> list[str]:
        """``ok`` or ``unreadable`` per record."""
        from ml.eval.predictor import OK, UNREADABLE

        return [UNREADABLE if problem else OK for problem in self.problems]


# --------------------------------------------------------------------------- the network


@dataclass
class _Alias:
    version: str | None
    problem: str
    at: float
    audit: str = ""  # the mismatch while the last verified champion is served ("" none)


class Network:
    """The sites' registered models, their adapters and the shared backbones.

    Thread-safe: registry look-ups and downloads run under one lock, switching an adapter
    in and running the model under another (one forward pass at a time on the shared model).
    """

    def __init__(self, config: ServeConfig, cache_dir: Path | None = None) -> None:
        from pipeline.registry.store import TrackingConfig

        self.config = config
        self.tracking = TrackingConfig.resolve(config.tracking_uri)
        self.tracking.activate()
        self._client = self.tracking.client()
        self._own_cache = cache_dir is None
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="cessl-serve-"))
        self._registry_lock = threading.RLock()
        self._model_lock = threading.Lock()
        self._aliases: dict[str, _Alias] = {}
        self.trust = find_trust(config.trust_file)
        self._verified: dict[str, tuple[str, str]] = {}  # site -> (champion, digest of the log's last entry)
        self._entries: dict[str, list[AuditEntry]] = {}  # site -> its last verified audit log
        # (site, version) -> (the verified log's head digest it was read from, (calibration, entry seq))
        self._calibrations: dict[tuple[str, str], tuple[str, tuple[CalibrationSet | None, int]]] = {}
        self._versions: dict[tuple[str, str], bool] = {}
        self.backbones: dict[str, SharedBackbone] = {}
        self.adapters = AdapterLRU(config.max_adapters)
        self._multi: MultiSiteModel | None = None  # the adapters held, batchable in one pass
        self._unbatchable: set[str] = set()  # adapter keys answered by switching (full fine-tunes)
        self._admitted = 0
        self._admission_lock = threading.Lock()
        self.batcher = Batcher(
            self, config.batch_window_ms / 1000.0, config.max_batch_records, config.mixed_batches == ONE_PASS
        )

    # -- names
    def registered_name(self, site: str) -> str:
        return site_model_name(self.config.model_name, site)

    def parse(self, name: str) -> tuple[str, str | None]:
        """``S`` or ``S:V`` -> (site, version or None); UnknownModelError for anything else."""
        site, _, version = name.partition(":")
        if site not in self.config.sites:
            raise UnknownModelError(
                f"no site {site!r} is served here (sites: {', '.join(self.config.sites)}); address a site "
                "as /v2/models/SITE/infer or a version as SITE:VERSION"
            )
        if ":" in name and not _VERSION.match(version):
            raise UnknownModelError(f"{name!r}: a version is a positive integer (SITE:VERSION), got {version!r}")
        return site, version or None

    # -- the registry
    def champion(self, site: str, refresh: bool = False) -> _Alias:
        """The site's verified champion, resolved again when older than ``--refresh-seconds``."""
        from mlflow.exceptions import MlflowException

        now = time.monotonic()
        with self._registry_lock:
            cached = self._aliases.get(site)
            if cached is not None and not refresh and now - cached.at < self.config.refresh_seconds:
                return cached
            name = self.registered_name(site)
            try:
                alias = self._verified_alias(site, verify_model(self._client, name, self.trust), now)
            except (MlflowException, OSError) as err:
                if isinstance(err, MlflowException) and err.error_code in NOT_THERE:
                    alias = _Alias(None, f"{name} has no {CHAMPION} in the registry ({err.error_code})", now)
                elif cached is not None and cached.version is not None:  # the registry does not answer
                    log.warning("%s: registry unavailable, still serving v%s (%s)", name, cached.version, err)
                    alias = _Alias(cached.version, cached.problem, now, cached.audit)
                else:
                    alias = _Alias(None, f"the registry does not answer for {name} ({type(err).__name__})", now)
            if cached is None or (cached.version, cached.audit) != (alias.version, alias.audit):
                if alias.audit:
                    log.warning("%s: %s; serving the last verified %s v%s", name, alias.audit, CHAMPION, alias.version)
                elif alias.version is not None:
                    log.info("%s: %s is v%s (verified)", name, CHAMPION, alias.version)
                else:
                    log.warning("%s", alias.problem)
            self._aliases[site] = alias
            return alias

    def _verified_alias(self, site: str, result: Verification, now: float) -> _Alias:
        """What ``site`` serves after :func:`verify_model`: the signed champion; the last
        verified one while the log is broken or lost entries seen before."""
        last = self._verified.get(site)
        problem = result.problem()
        if not result.broken and last is not None and last[1] not in {e.digest() for e in result.entries}:
            problem = f"model {result.model!r}: audit log broken: an entry verified earlier is gone"
        elif not result.broken and result.expected_version is not None:
            head = result.entries[-1].digest()
            self._verified[site] = (result.expected_version, head)
            self._entries[site] = list(result.entries)
            return _Alias(result.expected_version, "", now, problem)
        if last is not None and (result.broken or problem):
            return _Alias(last[0], "", now, problem)
        return _Alias(None, problem or f"{result.model} has no {CHAMPION} (no signed decision made one)", now)

    def calibration(self, site: str, version: str, classes: Sequence[str]) -> tuple[CalibrationSet | None, int]:
        """(the calibration, its audit entry's seq) that the site's last verified log signs for
        ``version``; (None, 0) when it has none. Read from the verified entries only: an entry of
        a log that failed verification is never used (the last verified log's stays). Parsed and
        its digest checked once per version and verified log, not on every request."""
        from pipeline.registry.calibration import CalibrationMismatchError, signed_calibration

        self.champion(site)  # verified at most --refresh-seconds ago
        with self._registry_lock:
            head = self._verified.get(site, ("", ""))[1]
            cached = self._calibrations.get((site, version))
            if cached is not None and cached[0] == head:
                return cached[1]
            try:
                calibration, entry = signed_calibration(self._entries.get(site, []), version, list(classes))
            except CalibrationMismatchError as err:
                raise ModelUnavailableError(str(err)) from err
            answer = (calibration, entry.seq if entry is not None else 0)
            self._calibrations[(site, version)] = (head, answer)
            return answer

    def card(self, name: str) -> str:
        """The model card (Markdown) of the version that answers ``name`` (``S`` or ``S:V``),
        from the site's last verified audit log (:mod:`pipeline.registry.model_card`)."""
        from mlflow.exceptions import MlflowException

        from pipeline.registry.model_card import model_card

        site, pinned = self.parse(name)
        version, _ = self.resolve(site, pinned)
        classes = self.adapter(site, version).classes
        try:
            with self._registry_lock:
                registered, entries = self.registered_name(site), self._entries.get(site, [])
                return model_card(self._client, registered, version, entries, classes)
        except CesslError as err:  # a signed calibration that does not fit the model
            raise ModelUnavailableError(str(err)) from err
        except (MlflowException, OSError) as err:
            raise ModelUnavailableError(f"the registry does not answer ({type(err).__name__})") from err

    def audit_problem(self, site: str) -> str:
        """The mismatch a site's readiness reports while it serves its last verified champion."""
        return self.champion(site).audit

    def version_exists(self, site: str, version: str) -> bool:
        from mlflow.exceptions import MlflowException

        key = (site, version)
        with self._registry_lock:
            if key not in self._versions:
                try:
                    self._client.get_model_version(self.registered_name(site), version)
                    self._versions[key] = True
                except (MlflowException, OSError) as err:
                    if isinstance(err, MlflowException) and err.error_code in NOT_THERE:
                        return False  # not cached: it may be registered later
                    raise ModelUnavailableError(f"the registry does not answer ({type(err).__name__})") from err
            return self._versions[key]

    def resolve(self, site: str, version: str | None) -> tuple[str, str]:
        """(version, alias) that answers for ``site`` (and an explicit ``version``)."""
        if version is not None:
            if not self.version_exists(site, version):
                raise UnknownModelError(f"{self.registered_name(site)} has no version {version}")
            return version, ""
        alias = self.champion(site)
        if alias.version is None:
            raise ModelUnavailableError(alias.problem)
        return alias.version, CHAMPION

    def problem(self, name: str, audit: bool = True) -> CesslError | None:
        """Why ``name`` (``S`` or ``S:V``) cannot answer now, or (``audit``) why the champion it
        answers with is not the alias's (it still answers then); None (readiness)."""
        try:
            site, version = self.parse(name)
            self.resolve(site, version)
        except (UnknownModelError, ModelUnavailableError) as err:
            return err
        mismatch = self.audit_problem(site) if audit and version is None else ""
        return ModelUnavailableError(mismatch) if mismatch else None

    def readiness(self) -> list[str]:
        """Why the server is not ready: per configured site without a servable verified champion,
        or whose registry check failed (a moved alias, a broken log), ``"S: why"``; [] when ready."""
        return [f"{site}: {problem}" for site in self.config.sites if (problem := self.problem(site)) is not None]

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Hold one of ``--max-queue`` places while a request is decoded, waits and runs;
        ServerBusyError (429) when every place is taken."""
        with self._admission_lock:
            if self._admitted >= self.config.max_queue:
                raise ServerBusyError(
                    f"server busy: {self._admitted} requests already queued (--max-queue {self.config.max_queue}); "
                    "retry later"
                )
            self._admitted += 1
        try:
            yield
        finally:
            with self._admission_lock:
                self._admitted -= 1

    # -- artifacts
    def _download(self, registered: str, version: str, what: str) -> Path:
        """Download the ``what`` artifact (``adapter`` / ``backbone``) of a model version, found
        through its MLmodel file (the artifact's folder keeps the name it was logged from)."""
        import mlflow

        target = self.cache_dir / f"{registered}-v{version}-{what}"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        uri = f"models:/{registered}/{version}"
        mlmodel = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/MLmodel", dst_path=str(target)))
        relative = mlmodel_artifact_path(mlmodel, what, uri)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{relative}", dst_path=str(target)))

    def _load_adapter(self, site: str, version: str) -> SiteAdapter:
        """Download a version's adapter (and, the first time, its backbone) and read it."""
        from mlflow.exceptions import MlflowException

        from ml.model.pretrained import read_backbone

        registered = self.registered_name(site)
        key = f"{registered}/{version}"
        folders = [self.cache_dir / f"{registered}-v{version}-{what}" for what in ("adapter", "backbone")]
        try:
            adapter_dir = self._download(registered, version, "adapter")
            adapter = read_site_adapter(adapter_dir, key)
            if adapter.backbone_id not in self.backbones:
                backbone_dir = self._download(registered, version, "backbone")
                backbone = read_backbone(backbone_dir)
                shared = SharedBackbone(backbone.state, backbone.config, backbone.identity)
                self.backbones[backbone.identity] = shared
                log.info(
                    "loaded backbone %s (%s, %.1f MB) from %s",
                    backbone.identity[:12],
                    backbone.name,
                    shared.nbytes / 1e6,
                    key,
                )
            self.backbones[adapter.backbone_id].check(adapter)
        except (MlflowException, CesslError, OSError, ValueError) as err:
            raise ModelUnavailableError(f"{key} cannot be loaded: {err}") from err
        finally:
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
        log.info("loaded adapter %s (%.2f MB, %d classes)", key, adapter.nbytes / 1e6, len(adapter.classes))
        return adapter

    def adapter(self, site: str, version: str) -> SiteAdapter:
        key = f"{self.registered_name(site)}/{version}"
        with self._registry_lock:
            return self.adapters.get(key, lambda: self._load_adapter(site, version))

    def warm_up(self) -> None:
        """Resolve every site's champion and load the first one's backbone and adapter (so
        the server is ready to answer; the other adapters load on their first request)."""
        for site in self.config.sites:
            alias = self.champion(site, refresh=True)
            if alias.version is not None and not self.backbones:
                try:
                    self.adapter(site, alias.version)
                except ModelUnavailableError as err:  # that site answers 503 until it can be loaded
                    log.warning("%s", err)

    # -- predicting
    def predict(self, name: str, signals: np.ndarray, sample_rate: float, version: str | None = None) -> Prediction:
        """Probabilities of raw signals ``(n, 12, T)`` at ``sample_rate`` for ``name`` (``S`` or ``S:V``);
        a record that fails the signal-quality check is not run: NaN probabilities, no diagnoses
        and its problem in :attr:`Prediction.problems`; what the check tolerated in a record
        that passed (leads not recorded) is in :attr:`Prediction.notes`."""
        from ml.eval.predictor import preprocess_signal, signal_quality

        site, pinned = self.parse(name)
        if version is not None:
            if pinned is not None and pinned != version:
                raise BadRequestError(f"the model {name!r} and the parameter version={version} disagree")
            if not _VERSION.match(version):
                raise BadRequestError(f"parameter version must be a positive integer, got {version!r}")
            pinned = version
        answering, alias = self.resolve(site, pinned)
        adapter = self.adapter(site, answering)
        calibration, calibration_entry = self.calibration(site, answering, adapter.classes)
        raw = np.asarray(signals, dtype=np.float64)  # as Predictor.predict_raw
        verdicts = [signal_quality(r, sample_rate) for r in raw]
        problems, notes = [problem for problem, _ in verdicts], [note for _, note in verdicts]
        good = [i for i, problem in enumerate(problems) if not problem]
        probs = np.full((len(raw), len(adapter.classes)), np.nan)
        diagnoses: list[list[str]] = [[] for _ in raw]
        batch_sites = 0
        if good:
            try:
                x = np.stack([preprocess_signal(raw[i], sample_rate) for i in good])
            except ValueError as err:
                raise BadRequestError(
                    too_short(raw, good, sample_rate) or f"records cannot be preprocessed: {err}"
                ) from err
            probs[good], batch_sites = self.batcher.submit(adapter, x)
            positive = probs[good] >= np.asarray(adapter.thresholds)[None, :]
            for i, row in zip(good, positive, strict=True):
                diagnoses[i] = [c for c, on in zip(adapter.classes, row, strict=True) if on]
        return Prediction(
            site=site,
            model_name=self.registered_name(site),
            version=answering,
            alias=alias,
            classes=list(adapter.classes),
            thresholds=list(adapter.thresholds),
            probabilities=probs,
            diagnoses=diagnoses,
            problems=problems,
            notes=notes,
            batch_sites=batch_sites,
            calibration=calibration,
            calibration_entry=calibration_entry,
        )

    def multi_site(self, adapters: Sequence[SiteAdapter]) -> MultiSiteModel | None:
        """The one-pass model holding every adapter of ``adapters`` that can be batched (built
        again, from the adapters held and these, when one is missing); None if none can."""
        with self._registry_lock:
            wanted = {a.key: a for a in adapters if a.key not in self._unbatchable}
            if not wanted:
                return None
            current = self._multi
            if current is not None and all(key in current.keys for key in wanted):
                return current
            backbone_id = next(iter(wanted.values())).backbone_id
            held = {a.key: a for a in self.adapters.values() if a.backbone_id == backbone_id}
            members = [a for a in {**held, **wanted}.values() if a.key not in self._unbatchable]
            shared = self.backbones[backbone_id]
            while True:
                try:
                    self._multi = MultiSiteModel(shared.base, shared.config, members)
                    break
                except UnbatchableAdapterError as err:
                    log.info("%s", err)
                    self._unbatchable.add(err.key)
                    members = [a for a in members if a.key != err.key]
                    if not members:
                        self._multi = None
                        break
            log.info("batching %d site adapters in one pass", len(members))
            return self._multi

    def forward(self, adapter: SiteAdapter, x: np.ndarray) -> np.ndarray:
        """The site's probabilities of preprocessed signals (the Predictor's own code path)."""
        from ml.eval.predictor import Predictor

        shared = self.backbones[adapter.backbone_id]
        with self._model_lock:
            shared.activate(adapter)
            predictor = Predictor(
                shared.model, adapter.classes, np.asarray(adapter.thresholds, dtype=np.float64), adapter.backbone_id
            )
            return predictor.predict_proba(x)

    def close(self) -> None:
        self.batcher.stop()
        if self._own_cache:
            shutil.rmtree(self.cache_dir, ignore_errors=True)


# --------------------------------------------------------------------------- batching


@dataclass
class _Job:
    """One request's preprocessed records for one site, and where its probabilities go."""

    adapter: SiteAdapter
    x: np.ndarray  # (n, 12, 6144) float32
    done: Future = field(default_factory=Future)  # (probabilities (n, C), sites in its pass)


class Batcher:
    """Concurrent requests' records, whichever their sites, forwarded together.

    The first request waits up to ``window_s`` for others (up to ``max_records`` records in
    all); then one :class:`ml.model.multi_site.MultiSiteModel` pass answers every record with
    its own site's model. A site that cannot be batched (a full fine-tune) is answered by
    switching its adapter in (:meth:`Network.forward`). One thread runs the passes.
    """

    def __init__(self, network: Network, window_s: float, max_records: int, one_pass: bool = False) -> None:
        self.network, self.window_s, self.max_records, self.one_pass = network, window_s, max_records, one_pass
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.passes = 0  # batched forward passes run (for tests and logs)

    def submit(self, adapter: SiteAdapter, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Probabilities ``(n, C)`` of ``x`` for ``adapter``'s site (blocks until its pass ran),
        and how many sites' records shared that pass."""
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cessl-batcher", daemon=True)
                self._thread.start()
        job = _Job(adapter, x)
        self._jobs.put(job)
        return job.done.result()

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=10)

    def _collect(self, first: _Job) -> list[_Job]:
        """``first`` and whatever arrives within the window (up to ``max_records`` records)."""
        batch, records = [first], len(first.x)
        deadline = time.monotonic() + self.window_s
        while records < self.max_records:
            remaining = deadline - time.monotonic()
            try:
                job = self._jobs.get(timeout=remaining) if remaining > 0 else self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._jobs.put(None)  # stop after this batch
                break
            batch.append(job)
            records += len(job.x)
        return batch

    def _run(self) -> None:
        while (first := self._jobs.get()) is not None:
            batch = self._collect(first)
            try:
                results = self.forward(batch)
            except Exception as err:  # every waiting request gets it
                for job in batch:
                    job.done.set_exception(err)
                continue
            for job, answer in zip(batch, results, strict=True):
                job.done.set_result(answer)

    def by_site(self, batch: Sequence[_Job]) -> list[tuple[np.ndarray, int]]:
        """Each site's jobs through its adapter switched in, one forward per site."""
        results: dict[int, tuple[np.ndarray, int]] = {}
        by_key: dict[str, list[int]] = {}
        for i, job in enumerate(batch):
            by_key.setdefault(job.adapter.key, []).append(i)
        for members in by_key.values():
            answer = self.network.forward(batch[members[0]].adapter, np.concatenate([batch[i].x for i in members]))
            bounds = np.cumsum([0] + [len(batch[i].x) for i in members])
            for i, (a, b) in zip(members, itertools.pairwise(bounds), strict=True):
                results[i] = answer[a:b], 1
        return [results[i] for i in range(len(batch))]

    def forward(self, batch: Sequence[_Job]) -> list[tuple[np.ndarray, int]]:
        """Per job its probabilities and the sites of its pass: one multi-site pass for the
        batchable ones (chunks of ``max_records`` records), the adapter switched in for the others."""
        import torch

        if not self.one_pass or len({job.adapter.key for job in batch}) == 1:  # one site: switching is faster
            return self.by_site(batch)
        model = self.network.multi_site([job.adapter for job in batch])
        results: dict[int, tuple[np.ndarray, int]] = {}
        batched = [i for i, job in enumerate(batch) if model is not None and job.adapter.key in model.keys]
        for i, job in enumerate(batch):
            if i not in batched:
                results[i] = self.network.forward(job.adapter, job.x), 1
        if model is not None and batched:
            x = np.concatenate([batch[i].x for i in batched])
            site = np.concatenate([np.full(len(batch[i].x), model.index(batch[i].adapter.key)) for i in batched])
            logits = []
            with torch.no_grad():
                for start in range(0, len(x), self.max_records):
                    chunk = torch.from_numpy(x[start : start + self.max_records, :, None, :])
                    logits.append(model(chunk, torch.from_numpy(site[start : start + self.max_records])))
            probs = torch.sigmoid(torch.cat(logits).float()).numpy().astype(np.float64)
            self.passes += 1
            sites = len({batch[i].adapter.key for i in batched})
            offset = 0
            for i in batched:
                n, c = len(batch[i].x), len(batch[i].adapter.classes)
                results[i] = probs[offset : offset + n, :c], sites
                offset += n
        return [results[i] for i in range(len(batch))]


# --------------------------------------------------------------------------- request decoding


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadRequestError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise BadRequestError(f"{what} must be a number, got {value!r}") from None
    return number


def too_short(raw: np.ndarray, index: Sequence[int], sample_rate: float) -> str:
    """The 400 message for records too short for the model (the minimum in samples and
    seconds, not the filter library's wording); "" when none is."""
    from ml.data.quality import QualityConfig

    seconds = QualityConfig().min_duration_s
    needed = math.ceil(seconds * sample_rate)
    short = [i for i in index if raw[i].shape[-1] < needed]
    if not short:
        return ""
    return (
        f"record {short[0]} has {raw[short[0]].shape[-1]} samples at {sample_rate:g} Hz: at least {needed} "
        f"samples ({seconds:g} s) are needed"
    )


def check_input(name: str, shape: Sequence[Any], parameters: dict[str, Any] | None) -> None:
    """Refuse what would be misread: a negative or non-integer dimension, a per-input
    ``sample_rate`` (it would be ignored: the request's parameter applies to every record)."""
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise BadRequestError(f"input {name!r}: shape {list(shape)} must hold non-negative integers")
    if parameters and "sample_rate" in parameters:
        raise BadRequestError(
            f"input {name!r} has its own parameter sample_rate, which would be ignored: give it as the "
            'request\'s parameter ("parameters": {"sample_rate": ...}), for every record of the request'
        )


def sample_rate_of(parameters: dict[str, Any] | None) -> float:
    value = (parameters or {}).get("sample_rate", DEFAULT_SAMPLE_RATE)
    rate = _number(value, "parameter sample_rate")
    if not math.isfinite(rate) or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise BadRequestError(
            f"parameter sample_rate must be in [{MIN_SAMPLE_RATE:g}, {MAX_SAMPLE_RATE:g}] Hz, got {value!r}"
        )
    return rate


def signals_of(array: np.ndarray, max_records: int) -> np.ndarray:
    """``(n, 12, T)`` float32 of a decoded tensor, or BadRequestError naming the problem."""
    x = np.asarray(array)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[1] != N_LEADS or x.shape[0] == 0 or x.shape[2] == 0:
        raise BadRequestError(f"input {SIGNALS!r} must have the shape [n, 12, samples], got {list(np.shape(array))}")
    if x.shape[0] > max_records:
        raise BadRequestError(f"input {SIGNALS!r} holds {x.shape[0]} records; at most {max_records} per request")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        bad = int(np.argmax(~np.isfinite(x).reshape(len(x), -1).all(axis=1)))
        raise BadRequestError(f"input {SIGNALS!r} contains NaN or infinite values (record {bad})")
    return x


_SIGNAL_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.(mat|dat)$")


def wfdb_records(pairs: np.ndarray, work: Path, max_records: int) -> tuple[list[np.ndarray], list[float]]:
    """Signals and sample rates of ``[n, 2]`` (header text, base64 signal file) pairs."""
    from ml.eval.predictor import read_wfdb

    rows = np.asarray(pairs, dtype=object)
    if rows.ndim == 1 and rows.shape[0] == 2:
        rows = rows[None]
    if rows.ndim != 2 or rows.shape[1] != 2 or rows.shape[0] == 0:
        raise BadRequestError(
            f"input {RECORDS!r} must have the shape [n, 2] (header, base64 signal file), got {list(rows.shape)}"
        )
    if rows.shape[0] > max_records:
        raise BadRequestError(f"input {RECORDS!r} holds {rows.shape[0]} records; at most {max_records} per request")
    signals, rates = [], []
    for i, (header, payload) in enumerate(rows):
        header = header.decode("utf-8", "replace") if isinstance(header, bytes) else str(header)
        payload = payload.decode("ascii", "replace") if isinstance(payload, bytes) else str(payload)
        lines = [line for line in header.splitlines() if line.strip() and not line.startswith("#")]
        files = {line.split()[0] for line in lines[1:] if line.split()}
        if not lines or len(files) != 1 or not _SIGNAL_FILE.match(next(iter(files))):
            raise BadRequestError(
                f"record {i}: the header must name one signal file (a bare NAME.mat or NAME.dat), found {sorted(files)}"
            )
        try:
            content = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequestError(f"record {i}: the signal file is not valid base64") from None
        folder = work / f"r{i}"
        folder.mkdir()
        record = folder / "record"
        record.with_suffix(".hea").write_text(header, encoding="utf-8")
        (folder / next(iter(files))).write_bytes(content)
        try:  # the file and header checks: what the signal holds is judged by the quality check
            signal, fs = read_wfdb(record, structural_only=True)
        except (OSError, ValueError) as err:
            raise BadRequestError(f"record {i}: {str(err).replace(str(folder) + '/', '')}") from None
        signals.append(signal)
        rates.append(fs)
    return signals, rates


# --------------------------------------------------------------------------- KServe


def mlmodel_artifact_path(mlmodel: Path, what: str, uri: str) -> str:
    """The path of the ``what`` artifact (``adapter`` / ``backbone``) inside a model version,
    from its MLmodel file. The file was written by the pipeline's identity, so it is read as
    any untrusted file (:func:`pipeline.core.files.load_yaml`: size cap, no tags, bounded
    aliases) and the path must stay inside the model; ModelUnavailableError otherwise."""
    from ml.errors import BadFileError
    from pipeline.core.files import load_yaml

    try:
        artifacts = load_yaml(mlmodel)["flavors"]["python_function"]["artifacts"]
        relative = str(artifacts[what]["path"])
    except (KeyError, TypeError, BadFileError) as err:
        raise ModelUnavailableError(
            f"{uri} is not a CE-SSL adapter model (its MLmodel has no {what!r} artifact: {err})"
        ) from None
    if relative.startswith("/") or ".." in Path(relative).parts:
        raise ModelUnavailableError(f"{uri}: artifact path {relative!r} escapes the model")
    return relative


def build_server(network: Network, decoder: BodyDecoder):
    """The KServe ModelServer (REST only) answering for ``network``, request bodies decoded by
    ``decoder``; call ``.start(models)``.

    kserve reads ``sys.argv`` when its model_server module is imported; it is imported here
    with an empty command line so that ``cessl serve``'s own flags are not taken for its.
    """
    import sys

    argv = sys.argv
    sys.argv = argv[:1]
    try:
        from kserve import Model, ModelServer
        from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
        from kserve.model_repository import ModelRepository
        from kserve.model_server import app
        from kserve.protocol.dataplane import DataPlane
        from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
        from kserve.protocol.rest.v2_datamodels import InferenceResponse
    finally:
        sys.argv = argv
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    class SiteNotFound(ModelNotFound):
        def __init__(self, reason: str) -> None:
            self.reason = reason

    class SiteModel(Model):
        """The kserve model of one site name (``S`` or ``S:V``); all share ``network``."""

        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.ready = True

        async def healthy(self) -> bool:
            return await asyncio.to_thread(network.problem, self.name) is None

        def get_input_types(self) -> list[dict]:
            return [
                {"name": SIGNALS, "datatype": "FP32", "shape": [-1, N_LEADS, -1]},
                {"name": RECORDS, "datatype": "BYTES", "shape": [-1, 2]},
            ]

        def get_output_types(self) -> list[dict]:
            return [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, -1]},
                {"name": "diagnoses", "datatype": "BYTES", "shape": [-1]},
                {"name": "codes", "datatype": "BYTES", "shape": [-1]},
                {"name": "status", "datatype": "BYTES", "shape": [-1]},
                {"name": "reason", "datatype": "BYTES", "shape": [-1]},
                {"name": "notes", "datatype": "BYTES", "shape": [-1]},
                {"name": "decisions", "datatype": "BYTES", "shape": [-1, -1]},
                {"name": "refer", "datatype": "BYTES", "shape": [-1]},
                {"name": "miss_rate_bounds", "datatype": "FP32", "shape": [-1]},
                {"name": "miss_rate_uppers", "datatype": "FP32", "shape": [-1]},
            ]

        async def predict(self, payload, headers=None, response_headers=None):
            if not isinstance(payload, InferRequest):
                raise InvalidInput("send an Open Inference Protocol v2 request: POST /v2/models/SITE/infer")
            try:
                return await asyncio.to_thread(self._predict, payload)
            except BadRequestError as err:
                raise InvalidInput(str(err)) from None
            except UnknownModelError as err:
                raise SiteNotFound(str(err)) from None
            except ModelUnavailableError as err:
                raise ModelNotReady(self.name, str(err)) from None

        def _predict(self, request: InferRequest):
            params = dict(request.parameters or {})
            unknown = sorted(set(params) - {"sample_rate", "version"})
            if unknown:
                raise BadRequestError(f"unknown parameters {unknown}; known: sample_rate, version")
            version = params.get("version")
            version = None if version is None else str(version)
            inputs = {i.name: i for i in request.inputs}
            if len(request.inputs) != 1 or not ({SIGNALS, RECORDS} & set(inputs)):
                raise BadRequestError(
                    f"send exactly one input, {SIGNALS!r} (FP32 [n, 12, samples]) or {RECORDS!r} "
                    f"(BYTES [n, 2]); got {sorted(inputs) or 'none'}"
                )
            tensor = request.inputs[0]
            check_input(tensor.name, tensor.shape, tensor.parameters)
            limit = network.config.max_records
            if tensor.name == SIGNALS:
                if tensor.datatype not in ("FP32", "FP64"):
                    raise BadRequestError(f"input {SIGNALS!r} must be FP32 (or FP64), got {tensor.datatype}")
                try:
                    array = tensor.as_numpy()
                except (ValueError, TypeError) as err:
                    raise BadRequestError(
                        f"input {SIGNALS!r}: its data does not fit shape {tensor.shape}: {err}"
                    ) from None
                signals = signals_of(array, limit)
                rates = [sample_rate_of(params)] * len(signals)
                prediction = self._by_rate(list(signals), rates, version)
            else:
                if tensor.datatype != "BYTES":
                    raise BadRequestError(f"input {RECORDS!r} must be BYTES, got {tensor.datatype}")
                if "sample_rate" in params:
                    raise BadRequestError("parameter sample_rate does not apply to WFDB records (their headers say it)")
                try:
                    pairs = np.asarray(tensor.data, dtype=object).reshape(tensor.shape)
                except ValueError as err:
                    raise BadRequestError(
                        f"input {RECORDS!r}: its data does not fit shape {tensor.shape}: {err}"
                    ) from None
                with tempfile.TemporaryDirectory(prefix="cessl-serve-records-") as tmp:
                    signals_list, rates = wfdb_records(pairs, Path(tmp), limit)
                prediction = self._by_rate(signals_list, rates, version)
            return response(request, prediction)

        def _by_rate(self, signals: list[np.ndarray], rates: list[float], version: str | None) -> Prediction:
            """Records may differ in length and rate: one forward per (rate, length) group, in order."""
            groups: dict[tuple[float, int], list[int]] = {}
            for i, (s, rate) in enumerate(zip(signals, rates, strict=True)):
                if not (s.ndim == 2 and s.shape[0] == N_LEADS):
                    raise BadRequestError(f"record {i} has {s.shape[0]} leads; 12 are needed")
                groups.setdefault((rate, s.shape[1]), []).append(i)
            result: Prediction | None = None
            probs: np.ndarray | None = None
            diagnoses: list[list[str]] = [[] for _ in signals]
            problems, notes = [""] * len(signals), [""] * len(signals)
            batch_sites = []
            for (rate, _), index in groups.items():
                part = network.predict(self.name, np.stack([signals[i] for i in index]), rate, version)
                if result is None:
                    result = part
                    probs = np.zeros((len(signals), len(part.classes)))
                elif (part.version, part.classes) != (result.version, result.classes):
                    raise ModelUnavailableError(f"{self.name}: the answering version changed during the request; retry")
                assert probs is not None
                batch_sites.append(part.batch_sites)
                probs[index] = part.probabilities
                for j, i in enumerate(index):
                    diagnoses[i], problems[i], notes[i] = part.diagnoses[j], part.problems[j], part.notes[j]
            assert result is not None and probs is not None
            result.probabilities, result.diagnoses = probs, diagnoses
            result.problems, result.notes = problems, notes
            result.batch_sites = max(batch_sites)
            return result

    def response(request: InferRequest, p: Prediction):
        abbreviations, descriptions = class_descriptions(p.classes)
        short = dict(zip(p.classes, abbreviations, strict=True))
        n, c = p.probabilities.shape

        def text(name: str, values: list[str]) -> InferOutput:
            return InferOutput(name=name, shape=[len(values)], datatype="BYTES", data=values)

        probabilities = np.where(np.isnan(p.probabilities), UNREADABLE_PROBABILITY, p.probabilities)
        decisions = p.decisions()
        cals = list(p.calibration.classes) if p.calibration is not None else []

        def per_class(name: str, values: list[float | None]) -> InferOutput:
            data = [UNREADABLE_PROBABILITY if v is None else float(v) for v in values] or [UNREADABLE_PROBABILITY] * c
            return InferOutput(name=name, shape=[c], datatype="FP32", data=data)

        outputs = [
            InferOutput(
                name="probabilities",
                shape=[n, c],
                datatype="FP32",
                data=probabilities.astype(np.float32).reshape(-1).tolist(),
            ),
            text("diagnoses", [";".join(short[code] for code in d) for d in p.diagnoses]),
            text("codes", [";".join(d) for d in p.diagnoses]),
            text("status", p.statuses()),
            text("reason", list(p.problems)),
            text("notes", list(p.notes)),
            text("classes", p.classes),
            text("class_names", abbreviations),
            text("descriptions", descriptions),
            InferOutput(name="thresholds", shape=[c], datatype="FP32", data=[float(t) for t in p.thresholds]),
            InferOutput(name="decisions", shape=[n, c], datatype="BYTES", data=[str(d) for d in decisions.reshape(-1)]),
            text(
                "refer",
                [
                    ";".join(short[code] for code, d in zip(p.classes, row, strict=True) if d == REFER)
                    for row in decisions
                ],
            ),
            per_class("miss_rate_bounds", [cal.miss_rate_bound for cal in cals]),
            per_class("miss_rate_uppers", [cal.miss_rate_upper for cal in cals]),
        ]
        return InferResponse(
            response_id=request.id or "",
            model_name=p.model_name,
            model_version=p.version,
            infer_outputs=outputs,
            parameters={
                "site": p.site,
                "alias": p.alias or "pinned",
                "registered_model": p.model_name,
                "batch_sites": p.batch_sites,
                "calibrated": p.calibration is not None,
                "calibration_entry": p.calibration_entry,
            },
        )

    class NetworkRepository(ModelRepository):
        """Every served site by name, and ``S:V`` made on demand (never stored)."""

        def __init__(self) -> None:
            super().__init__()
            for site in network.config.sites:
                self.update(SiteModel(site))

        def get_model(self, name: str):
            model = self.models.get(name)
            if model is None and ":" in name:
                try:
                    network.parse(name)
                except UnknownModelError:
                    return None
                model = SiteModel(name)
            return model

    class NetworkDataPlane(DataPlane):
        """Says why a site is not ready (503) and which sites exist (404)."""

        async def model_ready(self, model_name: str, disable_predictor_health_check: bool = False) -> bool:
            try:
                network.parse(model_name)
            except UnknownModelError as err:
                raise SiteNotFound(str(err)) from None
            # KServe asks with disable_predictor_health_check=True before an inference and without it
            # for /v2/models/{S}/ready: only the readiness answer reports an audit mismatch
            problem = await asyncio.to_thread(network.problem, model_name, not disable_predictor_health_check)
            if problem is None:
                return True
            if isinstance(problem, UnknownModelError):
                raise SiteNotFound(str(problem))
            raise ModelNotReady(model_name, str(problem))

    class CesslModelServer(ModelServer):
        """ModelServer listening on ``host`` (kserve's own binds 0.0.0.0), REST only."""

        def start(self, models) -> None:
            from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
            from kserve.protocol.rest.server import RESTServer

            class QuietRESTServer(RESTServer):
                def _add_exception_handlers(self, app) -> None:
                    super()._add_exception_handlers(app)
                    install_quiet_handlers(app)

            self._register_and_check_atleast_one_model_is_ready(models)
            self._rest_server = QuietRESTServer(
                FASTAPI_APP_IMPORT_STRING,
                self.dataplane,
                self.model_repository_extension,
                self.http_port,
                workers=1,
                grace_period=self.grace_period,
                event_loop=self.event_loop,
                timeout_keep_alive=self.timeout_keep_alive,
            )
            self._rest_server.config.host = network.config.host
            self.servers.append(self._rest_server.start())
            self.setup_event_loop()  # uvicorn handles SIGINT/SIGTERM itself (graceful shutdown)
            asyncio.run(self._serve())

    repository = NetworkRepository()
    server = CesslModelServer(
        http_port=network.config.port, registered_models=repository, enable_grpc=False, workers=1, grace_period=10
    )
    dataplane = NetworkDataPlane(model_registry=repository)
    server.dataplane = dataplane

    async def infer(request: Request) -> JSONResponse:
        """kserve's infer route, with the body decoded off the event loop (liveness keeps
        answering while a large one is parsed) and at most ``--max-queue`` requests admitted."""
        model_name = request.path_params["model_name"]
        with network.admission():
            await dataplane.model_ready(model_name, True)
            body = await request.body()
            infer_request = await decoder.decode(body, dict(request.headers), model_name)
            model = repository.get_model(model_name)
            if model is None:
                raise SiteNotFound(f"no model {model_name!r}")
            answer = await model.predict(infer_request)
            rest, _ = answer.to_rest()
            return JSONResponse(content=InferenceResponse.model_validate(rest).model_dump(mode="json"))

    async def ready(_request: Request) -> JSONResponse:
        """Ready only when every configured site has a servable verified champion."""
        problems = await asyncio.to_thread(network.readiness)
        if problems:
            return JSONResponse(status_code=503, content={"ready": False, "error": "not ready: " + "; ".join(problems)})
        return JSONResponse(content={"ready": True})

    async def card(request: Request) -> Response:
        """The answering version's model card (Markdown), from its verified audit log."""
        name = request.path_params["model_name"]
        try:
            text = await asyncio.to_thread(network.card, name)
        except UnknownModelError as err:
            raise SiteNotFound(str(err)) from None
        except ModelUnavailableError as err:
            raise ModelNotReady(name, str(err)) from None
        return Response(content=text, media_type="text/markdown; charset=utf-8")

    # plain Starlette routes, registered before kserve's own (at start), so these answer
    app.add_route("/v2/models/{model_name}/infer", infer, methods=["POST"])
    app.add_route("/v2/models/{model_name}/card", card, methods=["GET"])
    app.add_route("/v2/health/ready", ready, methods=["GET"])
    install_http_guards(app, network.config.max_body_bytes)
    return server, list(repository.models.values())


def install_quiet_handlers(app) -> None:
    """The client's mistakes (400/404/413) and a site that cannot answer (503) are logged as
    one line; kserve's own handlers log each with a traceback."""
    from fastapi.responses import JSONResponse
    from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady

    def handler(status: int):
        async def handle(request, exc):
            log.warning("%s %s -> %d: %s", request.method, request.url.path, status, exc)
            return JSONResponse(status_code=status, content={"error": str(exc)})

        return handle

    app.add_exception_handler(InvalidInput, handler(400))
    app.add_exception_handler(ModelNotFound, handler(404))
    app.add_exception_handler(ModelNotReady, handler(503))

    async def busy(request, exc):
        log.warning("%s %s -> 429: %s", request.method, request.url.path, exc)
        return JSONResponse(status_code=429, content={"error": str(exc)}, headers={"Retry-After": "1"})

    app.add_exception_handler(ServerBusyError, busy)


def install_http_guards(app, max_body_bytes: int) -> None:
    """A body limit (413) and one-line 400s for bodies FastAPI cannot parse (instead of 422 lists)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    async def invalid_body(_request, exc: RequestValidationError):
        problems = []
        for error in exc.errors()[:5]:
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        return JSONResponse(status_code=400, content={"error": "malformed request: " + "; ".join(problems)})

    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(VersionPath)


_VERSION_PATH = re.compile(r"^/v2/models/([^/]+)/versions/([^/]+)(/infer|/ready|)$")


class VersionPath:
    """ASGI middleware: the v2 protocol's ``/v2/models/S/versions/V/...`` is ``S:V`` here
    (kserve itself answers 501 to versioned paths)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            match = _VERSION_PATH.match(scope.get("path", ""))
            if match:
                name, version, rest = match.groups()
                path = f"/v2/models/{name}:{version}{rest}"
                scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413, by its
    Content-Length before reading or while a chunked body streams in (the body is read here,
    up to the limit, and handed on whole)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _answer(self, send, status: int, error: str) -> None:
        body = json.dumps({"error": error}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _too_large(self, size: str) -> str:
        return f"request body of {size} exceeds the limit of {self.max_bytes / (1024 * 1024):g} MiB (--max-body-mb)"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and not length.isdigit():
            await self._answer(send, 400, "Content-Length must be a number of bytes")
            return
        if length is not None and int(length) > self.max_bytes:
            await self._answer(send, 413, self._too_large(f"{int(length)} bytes"))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._answer(send, 413, self._too_large(f"more than {self.max_bytes} bytes"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def check_bindable(host: str, port: int) -> None:
    """ParameterError (one line) unless ``host``:``port`` can be listened on now (checked
    before any model is loaded; the socket is closed again at once)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise ParameterError(f"--host {host!r}: not an address of this machine ({err})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            raise ParameterError(f"cannot listen on {host}:{port}: {err.strerror or err} (--host / --port)") from None


def serve(config: ServeConfig) -> None:
    """Start the server (blocks until SIGINT/SIGTERM)."""
    network = Network(config)
    decoder = BodyDecoder()
    try:
        network.warm_up()
        decoder.start()
        server, models = build_server(network, decoder)
        log.info(
            "serving %d sites of %s on http://%s:%d (adapters: at most %d in memory; aliases refreshed every %gs)",
            len(config.sites),
            config.model_name,
            config.host,
            config.port,
            config.max_adapters,
            config.refresh_seconds,
        )
        server.start(models)
    finally:
        decoder.close()
        network.close()
