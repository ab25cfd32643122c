"""deploy/: the Kubernetes manifests, validated offline and checked against the daemon.

Each built-in kind is validated with kubernetes-validate (the API's own JSON schemas,
strict: an unknown field is an error) for the oldest and newest Kubernetes this
targets; the ServiceMonitor (a CRD, no schema shipped) is checked field by field.
Then what ties the manifests to the daemon: the ConfigMap's overlay passes every
check ``triage run`` makes, in the image's layout (the Containerfile puts
default.toml and failures.toml in /etc/triage, the ConfigMap is mounted at
/etc/triage/site); every secret the config names is filled from a Secret; the
probes ask the daemon's own endpoints; the grace period outlasts the drain.
"""

from __future__ import annotations

import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import msgspec
import pytest
import trio
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import config
from config.loader import catalog_path
from providers.emulators.push import generate_apns_key, generate_service_account
from providers.key_ring import load_ring
from supervisors.emulated import resolve_endpoints
from supervisors.tree import check_config
from supervisors.vocabulary import METRICS, MITIGATIONS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
VERSIONS = ["1.29.0", "1.33.0"]
LABELS = {"app.kubernetes.io/name": "triage", "app.kubernetes.io/component": "daemon"}
SECRETS_ROOT = "/var/run/secrets/triage"


def _documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path.name, doc


def _one(kind: str, name: str = "triage") -> dict[str, Any]:
    found = [d for _, d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


#: The kinds Kubernetes itself serves (the ServiceMonitor is the Prometheus Operator's CRD).
BUILT_IN = [(f, d) for f, d in _documents() if d["apiVersion"] != "monitoring.coreos.com/v1"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("file", "doc"), BUILT_IN, ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in BUILT_IN]
)
def test_every_built_in_manifest_validates_strictly(
    file: str, doc: dict[str, Any], version: str
) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_a_manifest_with_a_typo_is_refused() -> None:
    """The validator is not a formality: a misspelt field fails it."""
    deployment = _one("Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_the_kinds_are_all_there() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for _, d in _documents())
    assert kinds == [
        ("ConfigMap", "triage-config"),
        ("Deployment", "triage"),
        ("PersistentVolumeClaim", "triage-media"),
        ("PodDisruptionBudget", "triage"),
        ("Secret", "triage-apns"),
        ("Secret", "triage-fcm"),
        ("Secret", "triage-join-keys"),
        ("Secret", "triage-secrets"),
        ("Service", "triage"),
        ("ServiceMonitor", "triage"),
    ]


def _pod() -> dict[str, Any]:
    spec: dict[str, Any] = _one("Deployment")["spec"]["template"]["spec"]
    return spec


def _container() -> dict[str, Any]:
    [container] = _pod()["containers"]
    return container


def test_selectors_tie_the_deployment_service_pdb_and_monitor() -> None:
    deployment = _one("Deployment")
    assert deployment["spec"]["selector"]["matchLabels"] == LABELS
    assert deployment["spec"]["template"]["metadata"]["labels"] == LABELS
    assert _one("Service")["spec"]["selector"] == LABELS
    pdb = _one("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"] == LABELS
    assert pdb["maxUnavailable"] < deployment["spec"]["replicas"]
    # Rolling updates never take a replica away before its successor is ready.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    monitor = _one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= _one("Service")["metadata"]["labels"].items()
    )
    [endpoint] = monitor["spec"]["endpoints"]
    service_ports = {p["name"] for p in _one("Service")["spec"]["ports"]}
    assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}


def _real_key(name: str) -> str:
    """What the cluster's Secret holds under ``name`` (the example's are placeholders)."""
    if name == "service-account.json":
        account, _ = generate_service_account(
            project_id="triage", client_email="triage@example.iam", token_uri="https://t.invalid"
        )
        return msgspec.json.encode(account).decode()
    if name == "apns.p8":
        return generate_apns_key()[0]
    if name.endswith(".pem"):  # a join-token signing key (its file name is the kid)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
    raise AssertionError(f"a mounted secret key the test does not know: {name}")


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """The image's /etc/triage with the ConfigMap mounted at site/, and the Secret mounts
    at a temporary root (the overlay's paths pointed there); answers the overlay's path."""
    etc = tmp_path / "etc-triage"
    (etc / "site").mkdir(parents=True)
    for name in ("default.toml", "failures.toml"):
        shutil.copy(ROOT / "config" / name, etc / name)
    secrets = tmp_path / "secrets"
    volumes = {v["name"]: v for v in _pod()["volumes"]}
    for mount in _container()["volumeMounts"]:
        if mount["mountPath"].startswith(SECRETS_ROOT):
            secret = _one("Secret", volumes[mount["name"]]["secret"]["secretName"])
            target = secrets / mount["mountPath"].removeprefix(SECRETS_ROOT + "/")
            target.mkdir(parents=True)
            for key in secret["stringData"]:
                (target / key).write_text(_real_key(key))
    text = _one("ConfigMap", "triage-config")["data"]["triage.toml"]
    text = text.replace(SECRETS_ROOT, str(secrets)).replace("/var/lib/triage", str(tmp_path))
    path = etc / "site" / "triage.toml"
    path.write_text(text)
    return path


def test_the_configmap_passes_every_check_the_daemon_makes(layout: Path) -> None:
    cfg = config.load_config(layout)
    catalog = config.load_catalog(
        catalog_path(cfg, str(layout)), metrics=METRICS, mitigations=MITIGATIONS
    )
    trio.run(trio.to_thread.run_sync, check_config, cfg, catalog, str(layout))
    assert not cfg.emulators.enabled and cfg.daemon.host == "0.0.0.0"
    # Every provider's secret comes from the Deployment's environment (Secret refs).
    env = {
        e["name"]: "placeholder-" + "x" * 32
        for e in _container()["env"]
        if e["valueFrom"]["secretKeyRef"]["name"] == "triage-secrets"
    }
    resolve_endpoints(cfg, env)  # raises a ConfigError naming what is missing
    # ... and each reference names a key the example Secret has.
    keys = set(_one("Secret", "triage-secrets")["stringData"])
    assert {e["valueFrom"]["secretKeyRef"]["key"] for e in _container()["env"]} <= keys
    # No embedded servers in a pod: every service URL is set, clamd is a service too.
    assert {"TRIAGE_POSTGRES_URL", "TRIAGE_NATS_URL", "TRIAGE_REDIS_URL"} <= set(env)
    assert cfg.scanner.clamd_address is not None
    # The join-token ring reads the mounted Secret: the kid its file names may sign.
    assert sorted(load_ring(cfg.tokens.key_dir).keys) == ["join-2026-12"]


def test_media_is_shared_by_every_replica() -> None:
    """Attachments and recordings sit on one ReadWriteMany claim that every pod mounts:
    an upload taken by one replica is scanned and served by any other."""
    volumes = {v["name"]: v for v in _pod()["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in _container()["volumeMounts"]}
    claim = volumes["media"]["persistentVolumeClaim"]["claimName"]
    assert _one("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    overlay = tomllib.loads(_one("ConfigMap", "triage-config")["data"]["triage.toml"])
    for path in (
        overlay["uploads"]["blob_root"],
        overlay["recordings"]["path"],
        overlay["recordings"]["store_path"],
    ):
        assert Path(path).is_relative_to(mounts["media"]), path


def test_probes_port_and_grace_period_match_the_daemon(layout: Path) -> None:
    cfg = config.load_config(layout)
    container = _container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # The daemon's HTTP port and the dashboard's websocket (a fixed port, not 0), both
    # named by the Service.
    assert ports == {"http": cfg.daemon.port, "dashboard": cfg.dashboard.port}
    assert cfg.dashboard.enabled and cfg.dashboard.port != 0
    service = {p["name"]: p["targetPort"] for p in _one("Service", "triage")["spec"]["ports"]}
    assert service == {"http": "http", "dashboard": "dashboard"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The drain (and its grace before the listener closes) ends before the kubelet kills.
    grace = _pod()["terminationGracePeriodSeconds"]
    assert cfg.daemon.drain_grace_s < cfg.daemon.drain_s < grace - 5
    # Readiness turns within the drain grace: the pod leaves the endpoints first.
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < cfg.daemon.drain_grace_s
    assert container["args"] == ["run", "--config", "/etc/triage/site/triage.toml"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/triage/site"]["readOnly"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The spool is on a volume the container may write (the root filesystem is read-only).
    shipped = tomllib.loads(_one("ConfigMap", "triage-config")["data"]["triage.toml"])
    assert shipped["spool"]["path"].startswith("/var/lib/triage/")
    assert "readOnly" not in mounts["/var/lib/triage"]
    # So is the what-if recording, on the pod's own volume (one writer per path), and
    # its whole bound fits in that volume.
    assert cfg.recorder.enabled and shipped["recorder"]["path"].startswith("/var/lib/triage/")
    assert not shipped["recorder"]["path"].startswith("/var/lib/triage/media")
    size_limit = next(v for v in _pod()["volumes"] if v["name"] == "spool")["emptyDir"]
    assert cfg.recorder.segments * cfg.recorder.segment_bytes < _bytes(size_limit["sizeLimit"])


def _bytes(quantity: str) -> int:
    """A Kubernetes binary quantity (``1Gi``, ``512Mi``) in bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity.removesuffix(suffix)) * factor
    return int(quantity)
