"""deploy/: the Kubernetes base and the Dockerfile, checked offline.

The manifests are judged by `kubernetes-validate --strict` (it ships the API schemas, so
it runs with the network cut: under `unshare -n` where that works) and cross-checked
against the agent config they carry: probe ports, grace period, writable paths. No
Docker engine runs here, so the Dockerfile is parsed and held to the rules that matter
at run time (non-root numeric USER, HEALTHCHECK, STOPSIGNAL, pinned bases).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
CONTAINER_CONFIG = ROOT / "deploy" / "svcd.toml"

# The newest Kubernetes release whose schemas kubernetes-validate 1.37 ships.
KUBERNETES_VERSION = "1.37.0"
VALIDATE_TIMEOUT = 120
DEFAULT_GRACEFUL_TIMEOUT_S = 30
# Seconds the agent needs after its workers drained (registry lease revoke, servers).
STOP_MARGIN_S = 5
# Where the image puts the repository's examples/ (COPY examples /opt/svcd/examples).
IMAGE_EXAMPLES = "/opt/svcd/examples"
IMAGE_PYTHON = "/opt/svcd/bin/python"

Manifest = dict[str, Any]


# --------------------------------------------------------------------------- helpers


def kustomization() -> Manifest:
    data: Manifest = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return data


def resource_files() -> list[Path]:
    return [K8S / name for name in kustomization()["resources"]]


@cache
def manifests() -> dict[str, Manifest]:
    """kind -> the one manifest of that kind in the base."""
    out: dict[str, Manifest] = {}
    for path in resource_files():
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in out, f"two {doc['kind']} manifests"
            out[doc["kind"]] = doc
    return out


def agent_config() -> dict[str, Any]:
    return tomllib.loads(manifests()["ConfigMap"]["data"]["svcd.toml"])


def pod_spec() -> Manifest:
    spec: Manifest = manifests()["Deployment"]["spec"]["template"]["spec"]
    return spec


def container() -> Manifest:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    c: Manifest = containers[0]
    return c


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def longest_stop(config: dict[str, Any]) -> float:
    """drain_delay + the largest graceful_timeout: how long a clean stop may take."""
    drain = float(config["agent"].get("drain_delay", 0))
    graceful = max(
        float(s.get("graceful_timeout", DEFAULT_GRACEFUL_TIMEOUT_S))
        for s in config["services"].values()
    )
    return drain + graceful


def network_cut() -> list[str]:
    """`unshare -n` when this process may create a network namespace, else nothing."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    probe = subprocess.run([unshare, "-n", "true"], capture_output=True, timeout=10, check=False)
    return [unshare, "-n"] if probe.returncode == 0 else []


def kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    if not tool.exists():
        pytest.skip("kubernetes-validate is not installed in this venv")
    return subprocess.run(
        [*network_cut(), str(tool), "--strict", "--quiet",
         "--kubernetes-version", KUBERNETES_VERSION, *map(str, paths)],
        capture_output=True, text=True, timeout=VALIDATE_TIMEOUT, check=False,
    )


# ------------------------------------------------------------------ the manifests


def test_kustomization_lists_every_manifest() -> None:
    listed = {p.name for p in resource_files()}
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_every_manifest_validates_strictly_offline() -> None:
    result = kubernetes_validate(*resource_files())
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_validation_would_catch_a_named_grpc_port(tmp_path: Path) -> None:
    """The check above can fail: the kubelet's gRPC probe takes only a port number."""
    broken = (K8S / "deployment.yaml").read_text().replace("port: 7071", "port: probe")
    (tmp_path / "deployment.yaml").write_text(broken)
    result = kubernetes_validate(tmp_path / "deployment.yaml")
    assert result.returncode != 0
    assert "grpc.port" in result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_build_validates(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    built = subprocess.run(
        [kubectl, "kustomize", str(K8S)],
        capture_output=True, text=True, timeout=VALIDATE_TIMEOUT, check=False,
    )
    assert built.returncode == 0, built.stderr
    out = tmp_path / "built.yaml"
    out.write_text(built.stdout)
    result = kubernetes_validate(out)
    assert result.returncode == 0, result.stdout + result.stderr


def test_probes_call_the_agents_probe_listener() -> None:
    config = agent_config()
    probe = config["agent"]["probe_address"]
    # The kubelet dials the pod IP: loopback would fail every probe.
    assert probe.rsplit(":", 1)[0] == "0.0.0.0"
    c = container()
    expected = {"startupProbe": "liveness", "livenessProbe": "liveness",
                "readinessProbe": "readiness"}
    for name, service in expected.items():
        grpc_probe = c[name]["grpc"]
        assert grpc_probe["port"] == port_of(probe), name
        assert grpc_probe["service"] == service, name
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["probe"] == port_of(probe)
    assert ports["metrics"] == port_of(config["agent"]["metrics_address"])
    listens = {
        port_of(addr)
        for s in config["services"].values()
        for addr in s.get("listen", [])
    }
    assert ports["http"] in listens


def test_grace_period_covers_drain_delay_and_graceful_timeout() -> None:
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace >= longest_stop(agent_config()) + STOP_MARGIN_S


def test_pod_runs_non_root_on_a_read_only_root() -> None:
    pod = pod_spec()
    c = container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # Same uid as the image's USER, so files the image prepared are the agent's own.
    uid, _ = dockerfile_user()
    assert str(pod["securityContext"]["runAsUser"]) == uid


def volume_kinds() -> dict[str, str]:
    """mountPath -> the kind of volume mounted there (emptyDir, configMap, secret)."""
    kinds = {}
    by_name = {v["name"]: v for v in pod_spec()["volumes"]}
    for mount in container()["volumeMounts"]:
        volume = by_name[mount["name"]]
        kinds[mount["mountPath"]] = next(k for k in volume if k != "name")
    return kinds


def mount_for(path: str) -> str:
    """The kind of volume holding `path` (deepest mount wins), or 'root'."""
    best = ""
    for mount in volume_kinds():
        if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best = mount
    return volume_kinds()[best] if best else "root"


def test_every_path_the_agent_writes_is_a_writable_volume() -> None:
    agent = agent_config()["agent"]
    for key in ("log_dir", "state_dir"):
        assert mount_for(agent[key]) == "emptyDir", key
    # The agent creates the control socket's directory itself (0700): its parent must be
    # writable, and the directory must not pre-exist as a group-writable mount point.
    socket_dir = os.path.dirname(agent["control_socket"])
    assert mount_for(os.path.dirname(socket_dir)) == "emptyDir"
    assert socket_dir not in volume_kinds()
    assert mount_for("/tmp") == "emptyDir"
    assert mount_for("/etc/svcd/svcd.toml") == "configMap"


def test_registry_credentials_come_from_the_secret() -> None:
    registry = agent_config()["registry"]
    secret = manifests()["Secret"]
    values = {**secret.get("stringData", {}), **secret.get("data", {})}
    secret_mounts = [p for p, kind in volume_kinds().items() if kind == "secret"]
    for key in ("ca_cert", "cert", "key"):
        path = registry[key]
        assert mount_for(path) == "secret", key
        assert os.path.basename(path) in values, key
    volume = next(v for v in pod_spec()["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert len(secret_mounts) == 1
    # A host name, not an IP: the endpoints name the etcd Service.
    for endpoint in registry["endpoints"]:
        host = re.sub(r"^https?://", "", endpoint).rsplit(":", 1)[0]
        assert host.endswith(".svc.cluster.local") or host.endswith(".svc"), endpoint


def test_service_and_pdb_select_the_pods() -> None:
    labels = manifests()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selector = manifests()["Deployment"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    service = manifests()["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert manifests()["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= (
        labels.items()
    )
    port_names = {p["name"] for p in container()["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in port_names


def test_images_are_pinned() -> None:
    image = container()["image"]
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest", image
    for entry in kustomization().get("images", []):
        assert entry.get("newTag", "x") != "latest"


# ------------------------------------------------------- the configs, as the agent reads them


def local_copy(text: str, tmp_path: Path) -> Path:
    """A config rewritten onto this machine: image paths -> temp dirs, users -> ours."""
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "hello.py").write_text("")
    credentials = tmp_path / "etcd"
    credentials.mkdir()
    for name in ("ca.crt", "tls.crt", "tls.key"):
        (credentials / name).write_text("placeholder\n")
    rewrites = {
        IMAGE_PYTHON: sys.executable,
        IMAGE_EXAMPLES: str(examples),
        "/etc/svcd-etcd": str(credentials),
        "/run/svcd": str(tmp_path / "run"),
        "/var/lib/svcd": str(tmp_path / "state"),
        "/var/log/svcd": str(tmp_path / "logs"),
    }
    for old, new in rewrites.items():
        text = text.replace(f'"{old}', f'"{new}')
    path = tmp_path / "svcd.toml"
    path.write_text(text)
    return path


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("agent.config", reason="agent.config not written yet")
    return subprocess.run(
        [sys.executable, "-m", "agent", "check-config", str(path)],
        capture_output=True, text=True, timeout=VALIDATE_TIMEOUT, cwd=ROOT, check=False,
    )


@pytest.mark.parametrize("which", ["configmap", "image-default"])
def test_configs_pass_check_config(which: str, tmp_path: Path) -> None:
    text = (
        manifests()["ConfigMap"]["data"]["svcd.toml"] if which == "configmap"
        else CONTAINER_CONFIG.read_text()
    )
    result = check_config(local_copy(text, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("which", ["configmap", "image-default"])
def test_example_worker_exists_in_the_image(which: str) -> None:
    config = (
        agent_config() if which == "configmap" else tomllib.loads(CONTAINER_CONFIG.read_text())
    )
    for name, service in config["services"].items():
        command = service["command"]
        assert command[0] == IMAGE_PYTHON, name
        script = Path(service.get("cwd", "/")) / command[1]
        assert str(script).startswith(IMAGE_EXAMPLES + "/"), script
        local = ROOT / "examples" / script.relative_to(IMAGE_EXAMPLES)
        if not local.exists():
            pytest.skip(f"{local.relative_to(ROOT)} not written yet (issue 3)")


# ------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.partition(" ")
        yield keyword.upper(), args.strip()
        logical = ""
    assert not logical, "dangling line continuation"


def dockerfile_args() -> dict[str, str]:
    out = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ARG" and "=" in args:
            name, _, default = args.partition("=")
            out[name] = default
    return out


def expand(value: str) -> str:
    args = dockerfile_args()
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), value)


def dockerfile_user() -> tuple[str, str]:
    users = [args for keyword, args in dockerfile_instructions() if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    uid, _, gid = expand(users[-1]).partition(":")
    return uid, gid


def test_dockerfile_is_multi_stage_on_pinned_slim_python() -> None:
    froms = [expand(a) for k, a in dockerfile_instructions() if k == "FROM"]
    assert len(froms) >= 2, "multi-stage: build the venv apart from the runtime image"
    assert " AS " in froms[0].upper()
    for base in froms:
        image = base.split()[0]
        assert image.startswith("python:3.11-slim"), image
        assert not image.endswith(":latest") and ":" in image, image


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    uid, gid = dockerfile_user()
    # runAsNonRoot can only verify a numeric user.
    assert uid.isdigit() and int(uid) != 0, uid
    assert gid.isdigit() and int(gid) != 0, gid


def test_dockerfile_health_stop_and_entrypoint() -> None:
    found = dict(dockerfile_instructions())
    assert found["STOPSIGNAL"] == "SIGTERM"
    health = found["HEALTHCHECK"]
    assert re.search(r"\bCMD .*svctl\b.* probe live\b", health), health
    # Docker knows exit 0 (healthy) and 1 (unhealthy) and reserves 2: map the others.
    assert health.rstrip().endswith("|| exit 1"), health
    assert "svcd" in found["ENTRYPOINT"]
    exposed = {int(p) for p in found["EXPOSE"].split()}
    for config in (agent_config(), tomllib.loads(CONTAINER_CONFIG.read_text())):
        assert port_of(config["agent"]["probe_address"]) in exposed
        assert port_of(config["agent"]["metrics_address"]) in exposed
    env = found["ENV"]
    socket_path = tomllib.loads(CONTAINER_CONFIG.read_text())["agent"]["control_socket"]
    assert f"SVCD_SOCKET={socket_path}" in env


def test_dockerfile_copies_only_what_exists() -> None:
    for keyword, args in dockerfile_instructions():
        if keyword != "COPY" or "--from=" in args:
            continue
        *sources, _dest = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
