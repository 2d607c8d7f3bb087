"""Who may change the model registry: MLflow's basic-auth users and permissions.

An MLflow server started with ``--app-name basic-auth`` (``deploy/mlflow.yaml``) knows users
and per-resource permissions (``READ`` < ``USE`` < ``EDIT`` < ``MANAGE``). Separated duties,
three roles, per production model ``M`` and its candidates model ``M-candidates``
(``pipeline.registry.tracking.candidates_model_name``: where the pipeline registers):

- the **pipeline** identity (its Secret in the cluster) creates experiments and runs (it
  MANAGEs what it creates), registers versions into ``M-candidates`` and sets ``challenger``
  there: ``EDIT`` on each candidates model, only ``READ`` on every production model (and on
  every other model and experiment), ``EDIT`` on the audit experiment;
- **release managers** promote and roll back: ``cessl promote`` copies a candidate into ``M``
  (``copy_model_version``) and moves ``champion``: ``MANAGE`` on each production model,
  ``EDIT`` on each candidates model (the decision's tags, test-set refreshes), ``READ`` on
  every model and experiment, ``EDIT`` on the audit experiment;
- **reviewers** read: ``READ`` on every model and experiment;
- **auditors** read everything and write one thing: ``EDIT`` on the experiment
  ``cessl-audit-anchors``, where ``cessl audit verify --anchor`` (the audit CronJob) records how
  far each log had verified (:mod:`pipeline.registry.anchor`: a log that a release manager cuts
  together with its head tag is caught there; no other role may write it).

:func:`plan_grants` says exactly which; :func:`apply_plan` (``cessl access init``) creates or
updates the users and grants through MLflow's own auth client, creates the production and
candidates models and the audit experiment first (as the admin: whoever creates a model
MANAGEs it, and the pipeline must create neither), and drops every per-user grant on those
models that the plan does not give (a pipeline's earlier ``EDIT`` on a production model,
a reviewer's ``MANAGE`` on a model it created).

What the server enforces (MLflow 3.17.2, read in ``mlflow/server/auth/__init__.py``): a new
version, a version tag and *any* alias (``SetRegisteredModelAlias``) need ``EDIT`` on the
model; deleting an alias, a version or the model, and changing permissions, need ``MANAGE``;
copying a version needs ``READ`` on the source model and ``EDIT`` on the target. So the
server itself refuses the pipeline every write to a production model: no version, no tag,
no alias (``champion`` included), no delete; it refuses reviewers every write to what they
did not create, and anonymous calls (401). cessl adds :func:`require_model_permission`:
``promote`` / ``rollback`` require ``MANAGE`` on the production model before any change.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ml.errors import ParameterError, ServiceUnavailableError
from pipeline.registry.anchor import ANCHOR_EXPERIMENT

log = logging.getLogger(__name__)

PIPELINE, RELEASE_MANAGER, REVIEWER, AUDITOR = "pipeline", "release-manager", "reviewer", "auditor"
ROLES = (PIPELINE, RELEASE_MANAGER, REVIEWER, AUDITOR)
READ, EDIT, MANAGE = "READ", "EDIT", "MANAGE"
PERMISSION_ORDER = ("NO_PERMISSIONS", READ, "USE", EDIT, MANAGE)
PROMOTE_PERMISSION = MANAGE  # what cessl requires on a model to move its champion
MODEL, EXPERIMENT = "registered_model", "experiment"
ALL = "*"
PASSWORD_ENV_PREFIX = "CESSL_PASSWORD_"
MIN_PASSWORD_LEN = 12  # MLflow 3.17 refuses shorter passwords
CURRENT_USER = "/api/2.0/mlflow/users/current"
USER_PERMISSION = "/api/3.0/mlflow/users/permissions/get"
SEARCH_EXPERIMENTS = "/api/2.0/mlflow/experiments/search"  # every MLflow server answers it
USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


class AccessDeniedError(ServiceUnavailableError):
    """The authenticated MLflow user lacks the permission an operation needs (exit 3)."""


@dataclass(frozen=True)
class Grant:
    """One permission of one user on one resource (``"*"``: every resource of the type)."""

    resource_type: str
    resource: str  # a model name, an experiment *name*, or "*"
    permission: str


@dataclass(frozen=True)
class Identity:
    """The user the server authenticated this process as."""

    username: str
    is_admin: bool


@dataclass(frozen=True)
class AccessPlan:
    """Who is who: one pipeline identity, release managers, reviewers, auditors; the production models."""

    pipeline: str
    release_managers: tuple[str, ...]
    reviewers: tuple[str, ...]
    models: tuple[str, ...]
    audit_experiment: str = "cessl-audit"
    auditors: tuple[str, ...] = ()
    anchor_experiment: str = ANCHOR_EXPERIMENT

    def __post_init__(self) -> None:
        names = [self.pipeline, *self.release_managers, *self.reviewers, *self.auditors]
        for name in names:
            if not name or ":" in name or name != name.strip():
                raise ParameterError(f"user name {name!r}: must be non-empty, without ':' or surrounding spaces")
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ParameterError(f"users with more than one role: {', '.join(doubled)} (one role per user)")
        if not self.models:
            raise ParameterError("no production model: name one with --model (default cessl-ecg) or --all-sites")

    def roles(self) -> dict[str, str]:
        """user -> role."""
        return {
            self.pipeline: PIPELINE,
            **{u: RELEASE_MANAGER for u in self.release_managers},
            **{u: REVIEWER for u in self.reviewers},
            **{u: AUDITOR for u in self.auditors},
        }


def candidates_of(models: Sequence[str]) -> tuple[str, ...]:
    """The candidates model of each production model (where the pipeline registers)."""
    from pipeline.registry.tracking import candidates_model_name

    return tuple(candidates_model_name(m) for m in models)


def role_grants(
    role: str, models: Sequence[str], audit_experiment: str, anchor_experiment: str = ANCHOR_EXPERIMENT
) -> tuple[Grant, ...]:
    """The permissions of ``role`` on the production ``models`` and their candidates models
    (see the module's doc); every other model and experiment: ``READ``."""
    read_all = (Grant(MODEL, ALL, READ), Grant(EXPERIMENT, ALL, READ))
    if role == REVIEWER:
        return read_all
    if role == AUDITOR:
        return (*read_all, Grant(EXPERIMENT, anchor_experiment, EDIT))
    if role not in (PIPELINE, RELEASE_MANAGER):
        raise ParameterError(f"unknown role {role!r}; one of {ROLES}")
    candidates = tuple(Grant(MODEL, m, EDIT) for m in candidates_of(models))
    production = () if role == PIPELINE else tuple(Grant(MODEL, m, MANAGE) for m in models)
    return (*read_all, Grant(EXPERIMENT, audit_experiment, EDIT), *production, *candidates)


def plan_grants(plan: AccessPlan) -> dict[str, tuple[Grant, ...]]:
    """user -> the grants :func:`apply_plan` sets."""
    return {
        user: role_grants(role, plan.models, plan.audit_experiment, plan.anchor_experiment)
        for user, role in plan.roles().items()
    }


# --------------------------------------------------------------------------- passwords


def password_env(user: str) -> str:
    """The variable ``cessl access init`` reads ``user``'s password from:
    ``CESSL_PASSWORD_<USER>`` (upper case, other characters as ``_``)."""
    return PASSWORD_ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", user.upper())


def parse_password_file(text: str, source: str) -> dict[str, str]:
    """``user:password`` lines (``#`` comments and blank lines skipped) -> {user: password};
    ParameterError ``SOURCE:LINE: problem`` (the line itself is never echoed)."""
    passwords: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: a password may hold \x0c or \x85
        line = line.removesuffix("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if "\x00" in line:
            raise ParameterError(f"{source}:{number}: a NUL character (\\0) in the line")
        if not sep or not user.strip() or not password:
            raise ParameterError(f"{source}:{number}: expected user:password")
        if user.strip() in passwords:
            raise ParameterError(f"{source}:{number}: user {user.strip()!r} given twice")
        passwords[user.strip()] = password.rstrip("\r\n")
    return passwords


def check_password(user: str, password: str, source: str) -> None:
    if len(password) < MIN_PASSWORD_LEN:
        raise ParameterError(
            f"password of {user!r} ({source}) is shorter than {MIN_PASSWORD_LEN} characters (MLflow refuses it)"
        )


# --------------------------------------------------------------------------- the server


def is_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def _get(tracking_uri: str, endpoint: str, params: Mapping[str, str] | None = None) -> Any:
    """GET ``endpoint`` with MLflow's standard credentials (``MLFLOW_TRACKING_USERNAME`` /
    ``PASSWORD`` or ``TOKEN``, as every MLflow client sends them); the response."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    return http_request(get_default_host_creds(tracking_uri), endpoint, "GET", params=dict(params or {}), max_retries=0)


def _credentials_refused(tracking_uri: str) -> ServiceUnavailableError:
    import os

    user = os.environ.get(USERNAME_ENV, "")
    if not user:
        return ServiceUnavailableError(
            f"MLflow at {tracking_uri} requires a login: set {USERNAME_ENV} and {PASSWORD_ENV}"
        )
    return ServiceUnavailableError(
        f"MLflow at {tracking_uri} refused the credentials of user {user!r} "
        f"({USERNAME_ENV} / {PASSWORD_ENV}): wrong password or unknown user"
    )


def _no_auth_app(tracking_uri: str) -> None:
    """None once the server at ``tracking_uri`` answers MLflow's REST API (a server without
    authentication); ServiceUnavailableError when it does not: a server that answers 404
    everywhere is not MLflow, and says nothing about who may change a registry."""
    probe = _get(tracking_uri, SEARCH_EXPERIMENTS, {"max_results": "1"})
    if probe.status_code == 200:
        return None
    if probe.status_code == 401:
        raise _credentials_refused(tracking_uri)
    raise ServiceUnavailableError(
        f"{tracking_uri} is not an MLflow tracking server: HTTP 404 at {CURRENT_USER} and HTTP "
        f"{probe.status_code} at {SEARCH_EXPERIMENTS}; check the host, port and path of --tracking-uri"
    )


def authenticated_user(tracking_uri: str) -> Identity | None:
    """Who the server at ``tracking_uri`` authenticates this process as; None for a local
    store or a server without authentication (nothing to enforce there)."""
    if not is_server(tracking_uri):
        return None
    response = _get(tracking_uri, CURRENT_USER)
    if response.status_code == 404:  # no auth app (the endpoint does not exist), if this is MLflow at all
        _no_auth_app(tracking_uri)
        return None
    if response.status_code == 401:
        raise _credentials_refused(tracking_uri)
    if response.status_code != 200:
        raise ServiceUnavailableError(f"MLflow at {tracking_uri}: {CURRENT_USER} answered HTTP {response.status_code}")
    try:
        user = response.json()["user"]
        return Identity(str(user["username"]), bool(user.get("is_admin", False)))
    except (ValueError, KeyError, TypeError):  # not MLflow's answer (a proxy's page?): never assume a user
        raise ServiceUnavailableError(
            f"MLflow at {tracking_uri}: {CURRENT_USER} did not answer with a user (a proxy in between?)"
        ) from None


def model_permission(tracking_uri: str, username: str, model: str) -> str:
    """``username``'s effective permission on registered model ``model``, as the server
    resolves it for a real request (a user may ask about itself)."""
    response = _get(tracking_uri, USER_PERMISSION, {"username": username, "resource_type": MODEL, "resource_id": model})
    if response.status_code == 401:
        raise _credentials_refused(tracking_uri)
    if response.status_code != 200:
        raise ServiceUnavailableError(
            f"MLflow at {tracking_uri}: cannot read the permission of {username!r} on {model!r} "
            f"(HTTP {response.status_code})"
        )
    return str(response.json().get("permission", "NO_PERMISSIONS"))


def at_least(permission: str, needed: str) -> bool:
    rank = {name: i for i, name in enumerate(PERMISSION_ORDER)}
    return rank.get(permission, -1) >= rank[needed]


def require_model_permission(
    tracking_uri: str, model: str, action: str, needed: str = PROMOTE_PERMISSION
) -> str | None:
    """The authenticated user name, once it holds ``needed`` on ``model`` (admins hold
    everything); :class:`AccessDeniedError` naming who, which model and which permission
    otherwise. None for a local store or a server without authentication."""
    identity = authenticated_user(tracking_uri)
    if identity is None:
        return None
    if identity.is_admin:
        return identity.username
    has = model_permission(tracking_uri, identity.username, model)
    if not at_least(has, needed):
        raise AccessDeniedError(
            f"user {identity.username!r} may not {action} model {model!r}: that needs {needed} on registered "
            f"model {model!r} (release managers: `cessl access init --release-manager`); {identity.username!r} "
            f"has {has}"
        )
    return identity.username


def client_tracking_uri(client) -> str:
    """The tracking URI of an ``MlflowClient``."""
    return str(client._tracking_client.tracking_uri)


# --------------------------------------------------------------------------- cessl access init


def _error_code(err: BaseException) -> str:
    return str(getattr(err, "error_code", ""))


def _ensure_user(auth, user: str, password: str | None) -> str:
    """Create ``user`` or update its password; what was done."""
    from mlflow.exceptions import MlflowException

    try:
        auth.get_user(user)
    except MlflowException as err:
        if _error_code(err) != "RESOURCE_DOES_NOT_EXIST":
            raise
        if password is None:
            raise ParameterError(
                f"user {user!r} does not exist yet and has no password: set ${password_env(user)} or use --passwords"
            ) from None
        auth.create_user(user, password)
        return "created"
    if password is None:
        return "kept"
    auth.update_user_password(user, password)
    return "password updated"


def _ensure_model(tracking, name: str) -> bool:
    """Create registered model ``name`` (as the admin) if it does not exist; whether it was."""
    from mlflow.exceptions import MlflowException

    try:
        tracking.get_registered_model(name)
        return False
    except MlflowException as err:
        if _error_code(err) != "RESOURCE_DOES_NOT_EXIST":
            raise
    what = "candidates model: the pipeline registers here" if name.endswith("-candidates") else "production model"
    tracking.create_registered_model(name, description=f"{what} (created by `cessl access init`)")
    return True


def _ensure_experiment(tracking, name: str) -> str:
    experiment = tracking.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    return str(tracking.create_experiment(name))


def _set_grant(auth, user: str, resource_type: str, resource_id: str, permission: str) -> None:
    """Grant, replacing an earlier grant of the same user on the same resource (MLflow's grant
    refuses to overwrite one: RESOURCE_ALREADY_EXISTS)."""
    from mlflow.exceptions import MlflowException

    try:
        auth.grant_user_permission(user, resource_type, resource_id, permission)
    except MlflowException as err:
        if _error_code(err) != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(user, resource_type, resource_id)
        auth.grant_user_permission(user, resource_type, resource_id, permission)


def _revoke(auth, user: str, resource_type: str, resource_id: str) -> None:
    """Drop ``user``'s own grant on a resource (its role's wildcard grant stays), if any."""
    from mlflow.exceptions import MlflowException

    try:
        auth.revoke_user_permission(user, resource_type, resource_id)
    except MlflowException as err:
        if _error_code(err) != "RESOURCE_DOES_NOT_EXIST":
            raise


@dataclass
class AccessReport:
    users: dict[str, str]  # user -> what was done
    models_created: list[str]
    grants: dict[str, tuple[Grant, ...]]


def apply_plan(
    tracking_uri: str,
    plan: AccessPlan,
    password_of: Callable[[str], str | None],
) -> AccessReport:
    """Create/update the users and their grants on the server at ``tracking_uri`` (the caller
    is an MLflow admin: ``MLFLOW_TRACKING_USERNAME`` / ``PASSWORD``). ``password_of(user)``:
    the user's new password, or None to keep it."""
    from mlflow import MlflowClient
    from mlflow.server import get_app_client

    if not is_server(tracking_uri):
        raise ParameterError(
            f"--tracking-uri {tracking_uri!r}: a local store has no users; access control needs an MLflow "
            "server started with --app-name basic-auth (http(s)://...)"
        )
    identity = authenticated_user(tracking_uri)
    if identity is None:
        raise ParameterError(
            f"MLflow at {tracking_uri} runs without authentication (start it with --app-name basic-auth)"
        )
    if not identity.is_admin:
        raise AccessDeniedError(f"user {identity.username!r} is not an MLflow admin: `cessl access init` needs one")
    auth = get_app_client("basic-auth", tracking_uri=tracking_uri)
    tracking = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    users = {user: _ensure_user(auth, user, password_of(user)) for user in plan.roles()}
    governed = (*plan.models, *candidates_of(plan.models))
    created = [m for m in governed if _ensure_model(tracking, m)]
    experiment_ids = {
        name: _ensure_experiment(tracking, name) for name in (plan.audit_experiment, plan.anchor_experiment)
    }
    grants = plan_grants(plan)
    for user, user_grants in grants.items():
        for grant in user_grants:
            named = grant.resource_type == EXPERIMENT and grant.resource != ALL
            resource_id = experiment_ids[grant.resource] if named else grant.resource
            _set_grant(auth, user, grant.resource_type, resource_id, grant.permission)
        granted = {g.resource for g in user_grants if g.resource_type == MODEL}
        for model in set(governed) - granted:  # the pipeline's old EDIT on production; a reviewer's own model
            _revoke(auth, user, MODEL, model)
    for user, done in users.items():
        log.info("user %s (%s): %s", user, plan.roles()[user], done)
    if created:
        log.info("created registered models: %s", ", ".join(created))
    return AccessReport(users, created, grants)
