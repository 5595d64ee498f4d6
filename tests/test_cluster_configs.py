"""Static checks of the cluster deployment files (cluster/) and of the build/GPU helper scripts.

Nothing here talks to a cloud or a Kubernetes API: the files are parsed and their properties that
matter are asserted -- every YAML parses, every job entrypoint/config they name exists, the GPU
and CPU capacity they request covers what the named training config asks for, token
authentication is on, nothing is exposed publicly, no secret is written inline -- plus the
setup.py edit of scripts/build_mamba_ssm.sh, run on synthetic and (when cached) real sdists.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
BUILD_SCRIPT = ROOT / "scripts" / "build_mamba_ssm.sh"
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"
DOCKERFILE = CLUSTER / "Dockerfile"

MIN_RAY_FOR_TOKEN_AUTH = (2, 52)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
ANY_HOSTS = {"0.0.0.0", "::", "[::]", "*"}


# ----------------------------------------------------------------------------------------------
# Loading


def _yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _text_files() -> list[Path]:
    """Every text file under cluster/ (configs, manifests, Dockerfile, README)."""
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _docs(path: Path) -> list:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _k8s_objects() -> list[tuple[Path, dict]]:
    out = []
    for path in _yaml_files():
        for doc in _docs(path):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                out.append((path, doc))
    return out


def _of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _k8s_objects() if d["kind"] == kind]


def _launcher_configs() -> list[tuple[Path, dict]]:
    out = []
    for path in _yaml_files():
        for doc in _docs(path):
            if isinstance(doc, dict) and "provider" in doc and "available_node_types" in doc:
                out.append((path, doc))
    return out


def _ray_cluster_specs() -> list[tuple[str, dict, dict]]:
    """(label, RayCluster spec, owning object) for RayClusters and RayJobs' embedded clusters."""
    out = []
    for path, doc in _of_kind("RayCluster"):
        out.append((f"{path.name}:RayCluster/{doc['metadata']['name']}", doc["spec"], doc))
    for path, doc in _of_kind("RayJob"):
        spec = doc["spec"].get("rayClusterSpec")
        if spec is not None:
            out.append((f"{path.name}:RayJob/{doc['metadata']['name']}", spec, doc))
    return out


def _pod_specs(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]


def _containers(pod_spec: dict) -> list[dict]:
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


def _cpu_quantity(value) -> float:
    s = str(value)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _container_limit(container: dict, resource: str) -> float:
    res = container.get("resources", {})
    value = res.get("limits", {}).get(resource, res.get("requests", {}).get(resource, 0))
    return _cpu_quantity(value) if resource == "cpu" else float(value)


# References to job entrypoints and configs in the cluster files.
JOB_REF = re.compile(r"(?<![\w/.-])(jobs/(?:[\w.-]+/)*[\w.-]+\.(?:py|ya?ml))\b")


def _job_references() -> dict[str, list[str]]:
    refs: dict[str, list[str]] = {}
    for path in _text_files():
        for ref in JOB_REF.findall(path.read_text(encoding="utf-8", errors="replace")):
            refs.setdefault(ref, []).append(str(path.relative_to(ROOT)))
    return refs


def _load_job_config(rel: str) -> dict:
    path = ROOT / rel
    assert path.is_file(), f"{rel} is referenced by the cluster files but does not exist"
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    assert isinstance(data, dict), f"{rel}: expected a mapping"
    return data


def _train_configs() -> list[str]:
    """Referenced job configs that reserve workers: a training run (`train` section) or a batch
    recommendation on Ray (`ray: true`, `actors`)."""
    out = []
    for rel in sorted(_job_references()):
        if rel.startswith("jobs/configs/") and rel.endswith((".yaml", ".yml")):
            path = ROOT / rel
            if path.is_file():
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
                if isinstance(data, dict) and (isinstance(data.get("train"), dict) or data.get("ray") is True):
                    out.append(rel)
    return out


def _gpu_need(train: dict) -> tuple[int, float]:
    """(GPUs, CPUs) that a training config reserves: one GPU per worker when use_gpu."""
    if "actors" in train:  # a recommend config: one GPU (and one CPU) per actor when gpu
        actors = int(train["actors"])
        return (actors if train.get("gpu", False) else 0), float(actors)
    workers = int(train.get("num_workers", 1))
    gpus = workers if train.get("use_gpu", False) else 0
    cpus = workers * float(train.get("cpus_per_worker", 1.0))
    return gpus, cpus


# ----------------------------------------------------------------------------------------------
# Files present, YAML parses, referenced files exist


def test_cluster_directory_has_the_deployment_files():
    assert DOCKERFILE.is_file()
    assert (CLUSTER / "README.md").is_file()
    assert _launcher_configs(), "no Ray cluster launcher config under cluster/"
    assert _of_kind("RayCluster"), "no KubeRay RayCluster manifest under cluster/"
    assert _of_kind("RayJob"), "no KubeRay RayJob manifest under cluster/"


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses(path):
    docs = _docs(path)
    assert docs, f"{path}: no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"


def test_required_job_configs_are_referenced():
    refs = _job_references()
    for rel in ("jobs/configs/beauty-gpu.yaml", "jobs/configs/tune-beauty.yaml", "jobs/configs/evaluate-beauty.yaml",
                "jobs/configs/recommend-beauty.yaml", "jobs/train.py", "jobs/tune.py", "jobs/evaluate.py",
                "jobs/recommend.py"):
        assert rel in refs, f"{rel} is not named anywhere under cluster/"


@pytest.mark.parametrize("rel", sorted(_job_references()))
def test_referenced_job_file_exists(rel):
    where = ", ".join(sorted(set(_job_references()[rel])))
    assert (ROOT / rel).is_file(), f"{rel} (named in {where}) does not exist in the repository"


@pytest.mark.parametrize("rel", [r for r in sorted(_job_references()) if r.endswith((".yaml", ".yml"))])
def test_referenced_job_config_parses(rel):
    _load_job_config(rel)


# ----------------------------------------------------------------------------------------------
# KubeRay: resources


def test_every_ray_cluster_has_a_gpu_worker_group():
    for label, spec, _ in _ray_cluster_specs():
        gpus = [
            sum(_container_limit(c, "nvidia.com/gpu") for c in _containers(g["template"]["spec"]))
            for g in spec.get("workerGroupSpecs", [])
        ]
        assert any(n > 0 for n in gpus), f"{label}: no worker group with nvidia.com/gpu"


def test_num_gpus_start_param_equals_container_gpu_limit():
    for label, spec, _ in _ray_cluster_specs():
        groups = [("head", spec["headGroupSpec"])] + [
            (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
        ]
        for name, group in groups:
            containers = _containers(group["template"]["spec"])
            limit = sum(_container_limit(c, "nvidia.com/gpu") for c in containers)
            for c in containers:
                res = c.get("resources", {})
                if "nvidia.com/gpu" in res.get("requests", {}):
                    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"], (
                        f"{label}/{name}: GPU request and limit differ"
                    )
            params = group.get("rayStartParams", {}) or {}
            if "num-gpus" in params:
                assert float(params["num-gpus"]) == limit, (
                    f"{label}/{name}: rayStartParams num-gpus={params['num-gpus']} but the "
                    f"container GPU limit is {limit:g}"
                )


def test_replica_bounds_are_consistent():
    for label, spec, _ in _ray_cluster_specs():
        for g in spec.get("workerGroupSpecs", []):
            lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", g.get("replicas", 1))
            assert lo <= g.get("replicas", lo) <= hi, f"{label}/{g['groupName']}: replicas out of bounds"


def _k8s_capacity(spec: dict) -> tuple[float, float]:
    """(GPUs, CPUs) that the worker groups of a RayCluster spec provide at their `replicas`."""
    gpus = cpus = 0.0
    for g in spec.get("workerGroupSpecs", []):
        containers = _containers(g["template"]["spec"])
        replicas = g.get("replicas", g.get("minReplicas", 0))
        gpus += replicas * sum(_container_limit(c, "nvidia.com/gpu") for c in containers)
        params = g.get("rayStartParams", {}) or {}
        node_cpus = (
            float(params["num-cpus"]) if "num-cpus" in params
            else sum(_container_limit(c, "cpu") for c in containers)
        )
        cpus += replicas * node_cpus
    return gpus, cpus


ENTRYPOINT_CONFIG = re.compile(r"--config[= ](\S+\.ya?ml)")


def _rayjob_configs() -> list[tuple[str, dict, str]]:
    out = []
    for path, doc in _of_kind("RayJob"):
        m = ENTRYPOINT_CONFIG.search(doc["spec"]["entrypoint"])
        assert m, f"{path.name}: the RayJob entrypoint names no --config"
        rel = m.group(1)
        rel = rel.split("/opt/echomamba/", 1)[-1]  # tolerate absolute paths inside the image
        out.append((f"{path.name}:RayJob/{doc['metadata']['name']}", doc, rel))
    return out


def test_rayjob_entrypoint_runs_a_job_script():
    for label, doc, _ in _rayjob_configs():
        assert JOB_REF.search(doc["spec"]["entrypoint"]), f"{label}: entrypoint runs no jobs/*.py"


def test_rayjob_cluster_covers_its_training_config():
    for label, doc, rel in _rayjob_configs():
        cfg = _load_job_config(rel)
        train = cfg.get("train")
        assert isinstance(train, dict), f"{rel}: no `train` section"
        assert train.get("use_gpu") is True, f"{rel}: the GPU job config must set train.use_gpu: true"
        need_gpus, need_cpus = _gpu_need(train)
        have_gpus, have_cpus = _k8s_capacity(doc["spec"]["rayClusterSpec"])
        assert have_gpus >= need_gpus, (
            f"{label}: worker groups give {have_gpus:g} GPUs, {rel} needs train.num_workers="
            f"{train.get('num_workers', 1)} x 1 GPU"
        )
        assert have_cpus >= need_cpus, (
            f"{label}: worker groups give {have_cpus:g} CPUs, {rel} reserves {need_cpus:g}"
        )


@pytest.mark.parametrize("rel", _train_configs())
def test_every_gpu_cluster_fits_the_training_configs(rel):
    """Each referenced training config fits every cluster definition it may be submitted to."""
    data = _load_job_config(rel)
    need_gpus, need_cpus = _gpu_need(data.get("train", data))
    for label, spec, _ in _ray_cluster_specs():
        gpus, cpus = _k8s_capacity(spec)
        assert gpus >= need_gpus and cpus >= need_cpus, (
            f"{label}: {gpus:g} GPUs / {cpus:g} CPUs < {rel}: {need_gpus} GPUs / {need_cpus:g} CPUs"
        )
    for path, cfg in _launcher_configs():
        gpus, cpus = _launcher_capacity(cfg)
        assert gpus >= need_gpus and cpus >= need_cpus, (
            f"{path.name}: {gpus:g} GPUs / {cpus:g} CPUs < {rel}: {need_gpus} GPUs / {need_cpus:g} CPUs"
        )


def _pvc_mounts(pod_spec: dict) -> list[str]:
    pvc_volumes = {v["name"] for v in pod_spec.get("volumes", []) if "persistentVolumeClaim" in v}
    return [
        m["mountPath"]
        for c in pod_spec.get("containers", [])
        for m in c.get("volumeMounts", [])
        if m["name"] in pvc_volumes
    ]


def _under(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def test_rayjob_checkpoints_and_data_live_on_shared_storage():
    for label, doc, rel in _rayjob_configs():
        cfg = _load_job_config(rel)
        storage = (cfg.get("run") or {}).get("storage_path")
        assert storage, f"{rel}: run.storage_path must be set (shared storage on clusters)"
        for pod in _pod_specs(doc["spec"]["rayClusterSpec"]):
            mounts = _pvc_mounts(pod)
            assert _under(storage, mounts), (
                f"{label}: run.storage_path={storage} of {rel} is not on a PVC mount {mounts}"
            )
            data_path = (cfg.get("data") or {}).get("path")
            if data_path and data_path.startswith("/"):
                assert _under(data_path, mounts), f"{label}: data.path={data_path} is not on a PVC mount"


def test_mlflow_uri_comes_from_the_environment():
    for label, spec, _ in _ray_cluster_specs():
        for pod in _pod_specs(spec):
            for c in pod.get("containers", []):
                env = {e["name"]: e for e in c.get("env", [])}
                assert "MLFLOW_TRACKING_URI" in env, f"{label}/{c['name']}: no MLFLOW_TRACKING_URI"
                source = env["MLFLOW_TRACKING_URI"].get("valueFrom", {})
                assert "configMapKeyRef" in source or "secretKeyRef" in source, (
                    f"{label}/{c['name']}: MLFLOW_TRACKING_URI must come from a ConfigMap or Secret"
                )
    for path, cfg in _launcher_configs():
        for cmd in _start_commands(cfg):
            if "ray start" in cmd:
                assert "MLFLOW_TRACKING_URI=" in cmd.split("ray start")[0], (
                    f"{path.name}: MLFLOW_TRACKING_URI is not exported for: {cmd}"
                )
    for _, _, rel in _rayjob_configs():
        tracking = _load_job_config(rel).get("tracking") or {}
        assert not tracking.get("tracking_uri"), (
            f"{rel}: tracking.tracking_uri would override MLFLOW_TRACKING_URI on the cluster"
        )


def test_configmaps_and_secrets_referenced_by_pods_are_known():
    configmaps = {d["metadata"]["name"] for _, d in _of_kind("ConfigMap")}
    pvcs = {d["metadata"]["name"] for _, d in _of_kind("PersistentVolumeClaim")}
    for label, spec, _ in _ray_cluster_specs():
        for pod in _pod_specs(spec):
            for v in pod.get("volumes", []):
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in pvcs, f"{label}: unknown PVC"
            for c in pod.get("containers", []):
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("configMapKeyRef")
                    if ref and not ref.get("optional"):
                        assert ref["name"] in configmaps, f"{label}: ConfigMap {ref['name']} not defined"


# ----------------------------------------------------------------------------------------------
# Ray cluster launcher


def _launcher_capacity(cfg: dict) -> tuple[float, float]:
    gpus = cpus = 0.0
    head = cfg.get("head_node_type")
    for name, node_type in cfg["available_node_types"].items():
        if name == head:
            continue
        res = node_type.get("resources", {})
        n = node_type.get("max_workers", 0)
        gpus += n * res.get("GPU", 0)
        cpus += n * res.get("CPU", 0)
    return gpus, cpus


def _start_commands(cfg: dict) -> list[str]:
    return [*cfg.get("head_start_ray_commands", []), *cfg.get("worker_start_ray_commands", [])]


def test_launcher_config_validates_against_ray_schema():
    util = pytest.importorskip("ray.autoscaler._private.util")
    pytest.importorskip("jsonschema")
    for path, cfg in _launcher_configs():
        util.validate_config(util.prepare_config(cfg))


def test_launcher_gpu_node_types_are_declared():
    for path, cfg in _launcher_configs():
        gpu_types = [
            name for name, t in cfg["available_node_types"].items()
            if t.get("resources", {}).get("GPU", 0) > 0
        ]
        assert gpu_types, f"{path.name}: no node type declares GPU resources"
        for name in gpu_types:
            assert cfg["available_node_types"][name].get("max_workers", 0) >= 1, f"{path.name}/{name}"
            assert cfg["available_node_types"][name].get("max_workers", 0) <= cfg.get("max_workers", 0), (
                f"{path.name}/{name}: node type max_workers above the cluster's max_workers"
            )


def test_launcher_dashboard_binds_to_localhost():
    for path, cfg in _launcher_configs():
        heads = [c for c in cfg.get("head_start_ray_commands", []) if "ray start" in c and "--head" in c]
        assert heads, f"{path.name}: no `ray start --head` command"
        for cmd in heads:
            m = re.search(r"--dashboard-host[= ](\S+)", cmd)
            assert m and m.group(1) in LOCAL_HOSTS, f"{path.name}: dashboard must bind to 127.0.0.1: {cmd}"
        for cmd in _start_commands(cfg):
            for host in re.findall(r"--(?:dashboard|ray-client-server|node-ip)[\w-]*host[= ](\S+)", cmd):
                assert host not in ANY_HOSTS, f"{path.name}: binds to all interfaces: {cmd}"
        assert "0.0.0.0" not in path.read_text(encoding="utf-8").replace("0.0.0.0/0", ""), (
            f"{path.name}: mentions 0.0.0.0"
        )


def test_launcher_security_group_is_not_open_to_the_world():
    for path, cfg in _launcher_configs():
        sg = cfg["provider"].get("security_group")
        assert sg and sg.get("IpPermissions"), (
            f"{path.name}: set provider.security_group (the launcher's default opens SSH to 0.0.0.0/0)"
        )
        for perm in sg["IpPermissions"]:
            for r in perm.get("IpRanges", []):
                assert r.get("CidrIp") != "0.0.0.0/0", f"{path.name}: inbound rule open to 0.0.0.0/0"
            for r in perm.get("Ipv6Ranges", []):
                assert r.get("CidrIpv6") != "::/0", f"{path.name}: inbound rule open to ::/0"
            assert perm.get("FromPort") != 8265 and perm.get("ToPort") != 8265, (
                f"{path.name}: the dashboard port must not be opened"
            )


def test_launcher_enables_token_auth():
    for path, cfg in _launcher_configs():
        for cmd in _start_commands(cfg):
            if "ray start" in cmd:
                assert re.search(r"\bRAY_AUTH_MODE=token\b", cmd.split("ray start")[0]), (
                    f"{path.name}: RAY_AUTH_MODE=token is not set for: {cmd}"
                )
        token_mounts = {k: v for k, v in cfg.get("file_mounts", {}).items() if "auth_token" in k}
        assert token_mounts, f"{path.name}: no file_mounts entry provides ~/.ray/auth_token"
        for remote, local in token_mounts.items():
            assert local.startswith(("~", "/")), f"{path.name}: token mount source must be a path"


# ----------------------------------------------------------------------------------------------
# KubeRay: security


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


def test_kuberay_token_auth_is_on():
    specs = _ray_cluster_specs()
    assert specs
    for label, spec, _ in specs:
        assert (spec.get("authOptions") or {}).get("mode") == "token", f"{label}: authOptions.mode != token"
        assert _version_tuple(str(spec.get("rayVersion", "0"))) >= MIN_RAY_FOR_TOKEN_AUTH, (
            f"{label}: rayVersion must be >= 2.52 for token authentication"
        )
        for pod in _pod_specs(spec):
            for c in _containers(pod):
                for e in c.get("env", []):
                    if e["name"] == "RAY_AUTH_MODE":
                        assert e.get("value") == "token", f"{label}: RAY_AUTH_MODE={e.get('value')}"
                    if e["name"] in ("RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
                        assert "value" not in e, f"{label}: {e['name']} written inline"


def _network_policies(namespace: str) -> list[dict]:
    return [d for _, d in _of_kind("NetworkPolicy") if d["metadata"].get("namespace") == namespace]


def test_kuberay_dashboard_is_never_bound_to_all_interfaces_without_guard():
    for path, doc in _of_kind("RayCluster"):
        params = doc["spec"]["headGroupSpec"].get("rayStartParams", {}) or {}
        assert params.get("dashboard-host") in LOCAL_HOSTS, (
            f"{path.name}: a standalone RayCluster binds the dashboard to 127.0.0.1 "
            "(reach it with kubectl port-forward)"
        )
    for label, spec, owner in _ray_cluster_specs():
        params = spec["headGroupSpec"].get("rayStartParams", {}) or {}
        host = params.get("dashboard-host")
        assert host not in ANY_HOSTS, f"{label}: dashboard-host={host}"
        if host is None:
            # KubeRay then binds the dashboard on the head pod's interfaces (pod network only), which
            # a RayJob needs: the operator and the submitter reach it through the head Service.
            # That is only acceptable with a NetworkPolicy restricting ingress in the namespace.
            assert owner["kind"] == "RayJob", f"{label}: set dashboard-host to 127.0.0.1"
            ns = owner["metadata"].get("namespace")
            policies = _network_policies(ns)
            assert policies, f"{label}: dashboard on the pod network needs a NetworkPolicy in {ns}"
            for pol in policies:
                assert "Ingress" in pol["spec"].get("policyTypes", ["Ingress"])
                for rule in pol["spec"].get("ingress", []):
                    assert rule.get("from"), f"NetworkPolicy {pol['metadata']['name']}: allow-all rule"
                    for peer in rule["from"]:
                        assert "ipBlock" not in peer or peer["ipBlock"].get("cidr") != "0.0.0.0/0"


def test_no_public_services_or_host_networking():
    for path, doc in _k8s_objects():
        kind = doc["kind"]
        assert kind not in ("Ingress", "Route", "Gateway", "HTTPRoute"), f"{path.name}: {kind} exposes a service"
        if kind == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{path.name}: public Service"
        assert kind != "Secret", f"{path.name}: Secrets are created out of band, never committed"
    for label, spec, owner in _ray_cluster_specs():
        assert spec["headGroupSpec"].get("serviceType") == "ClusterIP", (
            f"{label}: headGroupSpec.serviceType must be ClusterIP"
        )
        serve = owner["spec"].get("serviceType") if owner["kind"] == "RayService" else None
        assert serve in (None, "ClusterIP")
        for pod in _pod_specs(spec):
            assert not pod.get("hostNetwork"), f"{label}: hostNetwork"
            for c in _containers(pod):
                for port in c.get("ports", []):
                    assert "hostPort" not in port, f"{label}: hostPort {port}"


def test_pods_run_as_non_root():
    for label, spec, _ in _ray_cluster_specs():
        for pod in _pod_specs(spec):
            ctx = pod.get("securityContext", {})
            assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) != 0, label


# ----------------------------------------------------------------------------------------------
# No secrets written in the cluster files

SECRET_KEY = re.compile(
    r"(?i)(?<![\w-])([\w-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key)[\w-]*)"
    r"[ \t]*(?::[ \t]+|=)[ \t]*(['\"]?)([^\s'\"#,)]+)"
)
URI_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.I)
KEY_MATERIAL = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----")
# Names of settings that hold a reference (a name, a mode), not a secret value.
REFERENCE_KEYS = {"secretname", "secretkeyref", "auth_token", "ray_auth_mode"}


def _inline_secrets(text: str) -> list[str]:
    found = []
    for m in SECRET_KEY.finditer(text):
        key, value = m.group(1), m.group(3)
        if key.lower() in REFERENCE_KEYS or key.lower().endswith(("_path", "path", "ref", "name")):
            continue
        if value.startswith(("$", "<", "{{", "REPLACE_ME", "~", "/")) or value in ("token", "disabled"):
            continue
        found.append(m.group(0))
    found += URI_WITH_PASSWORD.findall(text)
    found += KEY_MATERIAL.findall(text)
    return found


def test_secret_scanner_detects_inline_values():
    # The scanner must be able to fail, or the test below proves nothing.
    assert _inline_secrets("password: hunter2")
    assert _inline_secrets("MLFLOW_TRACKING_TOKEN=abc123")
    assert _inline_secrets("  api_key: 'sk-live-1'")
    assert _inline_secrets("uri: postgresql://mlflow:s3cret@db:5432/mlflow")
    assert _inline_secrets("aws_access_key_id AKIAABCDEFGHIJKLMNOP")
    assert not _inline_secrets("secretKeyRef:\n  name: x\n  key: password")
    assert not _inline_secrets('export RAY_AUTH_TOKEN="$(kubectl get secret x)"')
    assert not _inline_secrets("authOptions:\n  mode: token")


@pytest.mark.parametrize("path", _text_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_inline_secrets(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    assert not _inline_secrets(text), f"{path}: inline secret-like values: {_inline_secrets(text)}"


def test_no_secret_values_in_yaml_structure():
    def walk(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                key = str(k).lower()
                if isinstance(v, (str, int, float)) and re.search(r"password|passwd|token|apikey|api_key", key):
                    is_reference = key.endswith(("name", "ref", "path")) or str(v).startswith(("~", "/", "$"))
                    assert is_reference, f"{where}.{k}: inline value"
                if key in ("data", "stringdata") and isinstance(node.get("kind"), str) and node["kind"] == "Secret":
                    raise AssertionError(f"{where}: Secret with data")
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    for path in _yaml_files():
        for doc in _docs(path):
            walk(doc, path.name)


# ----------------------------------------------------------------------------------------------
# Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _arg_defaults(instructions) -> dict[str, str]:
    out = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            out[k.strip()] = v.strip().strip("\"'")
    return out


def test_dockerfile_builds_on_a_cuda_devel_torch_image():
    ins = _dockerfile_instructions()
    args = _arg_defaults(ins)
    froms = [rest for word, rest in ins if word == "FROM"]
    assert froms, "no FROM"
    image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), froms[-1].split()[0])
    assert "cuda" in image.lower(), f"FROM {image} is not a CUDA image"
    assert "devel" in image.lower(), f"FROM {image}: nvcc is needed, use a -devel image"


def test_dockerfile_builds_kernels_for_one_arch_without_build_isolation():
    ins = _dockerfile_instructions()
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    args = _arg_defaults(ins)
    assert "CUDA_ARCH" in args or "TORCH_CUDA_ARCH_LIST" in args, "no architecture build arg"
    arch_arg = "CUDA_ARCH" if "CUDA_ARCH" in args else "TORCH_CUDA_ARCH_LIST"
    assert re.search(rf"\$\{{?{arch_arg}\}}?", runs), f"build arg {arch_arg} is never used"
    assert "--no-build-isolation" in runs
    assert "build_mamba_ssm.sh" in runs and "--arch" in runs
    assert "--with-causal-conv1d" in runs
    script = BUILD_SCRIPT.read_text(encoding="utf-8")
    assert "MAMBA_FORCE_BUILD=TRUE" in script and "CAUSAL_CONV1D_FORCE_BUILD=TRUE" in script
    assert "--no-build-isolation --no-deps" in script
    assert re.search(r"pip install[^\n]*--no-build-isolation[^\n]*/opt/echomamba", runs), (
        "the project is not installed into the image"
    )


def test_dockerfile_runs_as_non_root():
    users = [rest for word, rest in _dockerfile_instructions() if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


# ----------------------------------------------------------------------------------------------
# scripts/build_mamba_ssm.sh

FAKE_SETUP = textwrap.dedent(
    '''
    import json, os
    from packaging.version import Version

    bare_metal_version = Version(os.environ.get("FAKE_NVCC", "13.0"))
    HIP_BUILD = False
    SKIP_CUDA_BUILD = False

    def check_if_cuda_home_none(name):
        pass

    if not SKIP_CUDA_BUILD:
        cc_flag = []
        if HIP_BUILD:
            cc_flag.append("-DBUILD_PYTHON_PACKAGE")
        else:
            check_if_cuda_home_none("pkg")
            if bare_metal_version.major != 13:
                os.environ["TORCH_CUDA_ARCH_LIST"] = ""

            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_75,code=sm_75")
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_80,code=sm_80")
            if bare_metal_version >= Version("11.8"):
                cc_flag.append("-gencode")
                cc_flag.append("arch=compute_90,code=sm_90")
            if bare_metal_version >= Version("13.0"):
                cc_flag.append("-gencode")
                cc_flag.append("arch=compute_103,code=sm_103")
        print(json.dumps(cc_flag))
    '''
)


def _make_sdist(directory: Path, name: str, version: str, setup_py: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tarball = directory / f"{name}-{version}.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        data = setup_py.encode()
        info = tarfile.TarInfo(f"{name}-{version}/setup.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return tarball


def _run_script(*args, env=None) -> subprocess.CompletedProcess:
    if shutil.which("bash") is None:
        pytest.skip("bash is not available")
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(
        ["bash", str(BUILD_SCRIPT), *args], capture_output=True, text=True, env=full_env, timeout=120
    )


def test_build_script_syntax():
    assert subprocess.run(["bash", "-n", str(BUILD_SCRIPT)]).returncode == 0
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0


@pytest.mark.parametrize("arch", ["90", "80"])
def test_build_script_keeps_only_one_arch(tmp_path, arch):
    src, work = tmp_path / "sdist", tmp_path / "work"
    _make_sdist(src, "mamba_ssm", "2.3.2.post1", FAKE_SETUP)
    _make_sdist(src, "causal_conv1d", "1.7.0", FAKE_SETUP)
    proc = _run_script("--dry-run", "--with-causal-conv1d", "--arch", arch, "--src", str(src), "--work", str(work))
    assert proc.returncode == 0, proc.stderr
    assert f"arch=compute_{arch},code=sm_{arch}" in proc.stdout
    for pkg in ("mamba_ssm-2.3.2.post1", "causal_conv1d-1.7.0"):
        setup = work / pkg / "setup.py"
        # Executing the edited file gives the flags nvcc would get, for every nvcc version.
        for nvcc in ("11.8", "12.8", "13.0"):
            out = subprocess.run(
                [sys.executable, str(setup)], capture_output=True, text=True, check=True,
                env={**os.environ, "FAKE_NVCC": nvcc},
            ).stdout
            assert json.loads(out) == ["-gencode", f"arch=compute_{arch},code=sm_{arch}"], (pkg, nvcc, out)


def test_build_script_refuses_an_unknown_layout(tmp_path):
    src = tmp_path / "sdist"
    unknown = FAKE_SETUP.replace(
        'cc_flag.append("arch=compute_75,code=sm_75")',
        'cc_flag.append(f"arch=compute_{75},code=sm_{75}")',
    )
    _make_sdist(src, "mamba_ssm", "2.3.2.post1", unknown)
    proc = _run_script("--dry-run", "--src", str(src), "--work", str(tmp_path / "work"))
    assert proc.returncode != 0
    assert "unexpected cc_flag layout" in proc.stderr


def test_build_script_fails_without_sources(tmp_path):
    proc = _run_script("--dry-run", "--src", str(tmp_path / "missing"))
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = _run_script("--dry-run", "--src", str(tmp_path / "empty"))
    assert proc.returncode != 0 and "no mamba_ssm-2.3.2.post1.tar.gz" in proc.stderr


def _sdist_cache() -> Path:
    return Path(os.environ.get("ECHOMAMBA_SDIST_DIR", Path.home() / ".cache" / "echomamba" / "sdist"))


def _flag_is_unconditional(setup: Path, wanted: str) -> bool:
    """True when the assignment holding `wanted` is not nested in an `if bare_metal_version...`."""
    tree = ast.parse(setup.read_text(encoding="utf-8"))
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    hits = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == wanted]
    assert len(hits) == 1, f"{setup}: {len(hits)} occurrences of {wanted}"
    node = hits[0]
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "bare_metal_version" in ast.unparse(node.test):
            if not any(hits[0] is n for stmt in node.orelse for n in ast.walk(stmt)):
                return False
    return True


def test_build_script_dry_run_on_the_real_sdists(tmp_path):
    cache = _sdist_cache()
    mamba = cache / "mamba_ssm-2.3.2.post1.tar.gz"
    if not mamba.is_file():
        pytest.skip(
            f"no {mamba.name} in {cache} (download it as described in scripts/build_mamba_ssm.sh, "
            "or set ECHOMAMBA_SDIST_DIR)"
        )
    args = ["--dry-run", "--src", str(cache), "--work", str(tmp_path)]
    conv = (cache / "causal_conv1d-1.7.0.tar.gz").is_file()
    if conv:
        args.append("--with-causal-conv1d")
    proc = _run_script(*args)
    assert proc.returncode == 0, proc.stderr
    wanted = "arch=compute_90,code=sm_90"
    assert proc.stdout.count(wanted) == (2 if conv else 1), proc.stdout
    for pkg in ["mamba_ssm-2.3.2.post1"] + (["causal_conv1d-1.7.0"] if conv else []):
        setup = tmp_path / pkg / "setup.py"
        text = setup.read_text(encoding="utf-8")
        assert len(re.findall(r"arch=compute_\d+", text)) == 1
        assert _flag_is_unconditional(setup, wanted)


# ----------------------------------------------------------------------------------------------
# scripts/gpu_check.sh


def test_gpu_check_wrapper_runs_the_benchmark_with_the_repo_on_pythonpath(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(GPU_CHECK, tmp_path / "scripts" / "gpu_check.sh")
    (tmp_path / "benchmarks" / "gpu_check.py").write_text(
        "import json, os, sys\nprint(json.dumps({'argv': sys.argv[1:], 'pp': os.environ['PYTHONPATH']}))\n"
    )
    proc = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "gpu_check.sh"), "--quick", "a b"],
        capture_output=True, text=True, cwd="/", env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["argv"] == ["--quick", "a b"]
    assert out["pp"].split(os.pathsep)[0] == str(tmp_path)
    assert "TODO" not in GPU_CHECK.read_text(encoding="utf-8")
