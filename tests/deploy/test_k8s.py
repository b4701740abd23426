"""deploy/k8s rendered by the real kustomize and checked by real validators, then held to the code's contracts.

- Rendering: ``kubectl kustomize`` of the pinned kubectl that scripts/setup.sh installs (scripts/k8s_tools.py).
- Core kinds: ``kubernetes-validate --strict`` (unknown fields are errors) for every Kubernetes version it
  ships from MIN_KUBERNETES on. It only warns on kinds it has no schema for, so the warned kinds are checked
  to be exactly the custom resources below.
- Custom resources (KEDA ScaledObject, ServiceMonitor, PodMonitor, PrometheusRule): the pydantic models that
  cloudcoil generates from those projects' CRDs, in strict mode, and any field the model does not know is
  an error too (``crd_errors``).
- Then what no schema knows: restricted Pod Security, production settings from Secrets, grace periods longer
  than the longest request, probes of the worker's main loop, one source for the alert rules.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import pytest
import redis
import yaml

from service import metrics
from service.config import Settings
from service.redis_server import find_redis_server, free_port

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUBECTL = ROOT / ".venv" / "bin" / "kubectl"
KUBERNETES_VALIDATE = Path(sys.executable).with_name("kubernetes-validate")
MIN_KUBERNETES = "1.30"  # preStop `sleep` (no sleep binary needed in the image) and PDB unhealthyPodEvictionPolicy
SETTINGS_VARS = {f"SAFFRON_{name.upper()}" for name in Settings.model_fields}
OUR_IMAGES = "registry.example.com/saffron-guard/"
PSS_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def rendered_text(overlay: str) -> str:
    assert load_script("k8s_tools").installed(), f"{KUBECTL} is not the pinned kubectl: run scripts/setup.sh"
    path = K8S / ("base" if overlay == "base" else f"overlays/{overlay}")
    result = subprocess.run([str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@cache
def rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(doc for doc in yaml.safe_load_all(rendered_text(overlay)) if doc)


def get(objects, kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(deployment: dict, name: str | None = None) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    if name is None:
        assert len(containers) == 1, [c["name"] for c in containers]
        return containers[0]
    (found,) = [c for c in containers if c["name"] == name]
    return found


def pod_specs(objects):
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield o, o["spec"]["template"]["spec"]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def configmap(objects) -> dict[str, str]:
    return get(objects, "ConfigMap", "saffron-config")["data"]


def settings_of(objects, deployment: str) -> Settings:
    """The Settings a container of ``deployment`` sees: its ConfigMap, its literal env, a stand-in for each Secret."""
    c = container(get(objects, "Deployment", deployment))
    env = dict(configmap(objects))
    for name, e in env_of(c).items():
        env[name] = e.get("value", "from-a-secret")
    env = {k: v for k, v in env.items() if k.startswith("SAFFRON_") and k != "SAFFRON_REDIS_URL"} | {"SAFFRON_REDIS_URL": "redis://r:6379/0"}
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --------------------------------------------------------------------------- the validators


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_kubernetes_validate_strict_on_every_version(overlay, tmp_path):
    from kubernetes_validate.utils import all_versions

    versions = [v for v in all_versions() if tuple(map(int, v.split(".")[:2])) >= tuple(map(int, MIN_KUBERNETES.split(".")))]
    assert len(versions) >= 8, versions  # 1.30 … 1.37 with kubernetes-validate 1.37
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(rendered_text(overlay))
    custom = {o["kind"] for o in rendered(overlay) if o["kind"] in CRD_MODELS}
    for version in versions:
        result = subprocess.run(
            [str(KUBERNETES_VALIDATE), "--strict", "--quiet", "-k", version, str(manifest)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{overlay} on {version}:\n{result.stdout}{result.stderr}"
        unvalidated = set(re.findall(r"Couldn't find schema for kind (\S+)", result.stdout))
        assert unvalidated == custom, f"{overlay} on {version}: no schema for {unvalidated - custom} (a typo in apiVersion?)"


def test_kubernetes_validate_strict_rejects_an_unknown_field(tmp_path):
    """The validator bites: a misspelt probe field fails --strict."""
    objects = [o for o in yaml.safe_load_all(rendered_text("gpu")) if o]  # a copy: the cached objects stay as rendered
    worker = get(objects, "Deployment", "saffron-worker")
    container(worker)["livenessProbe"]["perodSeconds"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(objects))
    result = subprocess.run([str(KUBERNETES_VALIDATE), "--strict", "--quiet", "--no-warn", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1 and "'perodSeconds' was unexpected" in result.stdout, result.stdout


def _crd_models() -> dict:
    from cloudcoil.models.keda.v1alpha1 import ScaledObject
    from cloudcoil.models.prometheus_operator.v1 import PodMonitor, PrometheusRule, ServiceMonitor

    return {
        "ScaledObject": ("keda.sh/v1alpha1", ScaledObject),
        "ServiceMonitor": ("monitoring.coreos.com/v1", ServiceMonitor),
        "PodMonitor": ("monitoring.coreos.com/v1", PodMonitor),
        "PrometheusRule": ("monitoring.coreos.com/v1", PrometheusRule),
    }


CRD_MODELS = {"ScaledObject", "ServiceMonitor", "PodMonitor", "PrometheusRule"}


def _unknown_paths(given, kept, path="") -> list[str]:
    if isinstance(given, dict):
        kept = kept if isinstance(kept, dict) else {}
        return [p for k, v in given.items() for p in ([f"{path}.{k}"] if k not in kept else _unknown_paths(v, kept[k], f"{path}.{k}"))]
    if isinstance(given, list):
        kept = kept if isinstance(kept, list) else []
        return [p for i, v in enumerate(given) for p in _unknown_paths(v, kept[i] if i < len(kept) else None, f"{path}[{i}]")]
    return []


def crd_errors(obj: dict) -> list[str]:
    """What the CRD's model refuses in ``obj``: wrong types and missing required fields (strict pydantic), and
    every field it does not know (the model would drop it silently, as the API server prunes it)."""
    from pydantic import ValidationError

    api_version, model = _crd_models()[obj["kind"]]
    if obj["apiVersion"] != api_version:
        return [f"apiVersion {obj['apiVersion']!r}, expected {api_version!r}"]
    try:
        parsed = model.model_validate(obj, strict=True)
    except ValidationError as e:
        return [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    kept = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [f"{p}: unknown field" for p in _unknown_paths(obj, kept)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_crd_models(overlay):
    custom = [o for o in rendered(overlay) if o["kind"] in CRD_MODELS]
    assert {o["kind"] for o in custom} == CRD_MODELS, "every overlay scales on KEDA and is scraped by the Prometheus Operator"
    for obj in custom:
        assert crd_errors(obj) == [], f"{obj['kind']}/{obj['metadata']['name']}"


def test_crd_check_rejects_unknown_fields_wrong_types_and_missing_fields():
    scaled = get(rendered("gpu"), "ScaledObject", "saffron-worker")
    spec = scaled["spec"]
    assert crd_errors({**scaled, "spec": {**spec, "minReplicas": 1}}) == [".spec.minReplicas: unknown field"]
    assert crd_errors({**scaled, "spec": {**spec, "maxReplicaCount": "8"}}) == ["spec.maxReplicaCount: Input should be a valid integer"]
    assert crd_errors({**scaled, "spec": {k: v for k, v in spec.items() if k != "scaleTargetRef"}}) == ["spec.scaleTargetRef: Field required"]
    monitor = get(rendered("gpu"), "PodMonitor", "saffron-worker")
    endpoint = {**monitor["spec"]["podMetricsEndpoints"][0], "targetport": "metrics"}
    assert crd_errors({**monitor, "spec": {**monitor["spec"], "podMetricsEndpoints": [endpoint]}}) == [
        ".spec.podMetricsEndpoints[0].targetport: unknown field"
    ]


def test_prometheusrules_are_generated_from_the_prometheus_rule_files():
    """One source: deploy/prometheus/rules/*.yml; the PrometheusRule file is their output (scripts/k8s_prometheusrules.py)."""
    gen = load_script("k8s_prometheusrules")
    assert gen.OUT.read_text() == gen.render(), "run: python scripts/k8s_prometheusrules.py"
    rule_files = sorted(gen.RULES.glob("*.yml"))
    assert rule_files, "deploy/prometheus/rules/ has no rule file"
    rules = {o["metadata"]["name"]: o for o in rendered("gpu") if o["kind"] == "PrometheusRule"}
    for path in rule_files:
        assert rules[path.stem]["spec"]["groups"] == yaml.safe_load(path.read_text())["groups"], path.name


# --------------------------------------------------------------------------- security


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_restricted_pod_security_standard(overlay):
    for obj, spec in pod_specs(rendered(overlay)):
        name = obj["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False, name
        assert spec.get("enableServiceLinks") is False, f"{name}: Service links would set SAFFRON_REDIS_* variables"
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0, name
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), f"{name}: {key}"
        for v in spec.get("volumes", []):
            assert set(v) - {"name"} <= PSS_RESTRICTED_VOLUMES, f"{name}: volume {v}"
        mounts_rw = set()
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (name, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert not sc.get("privileged") and sc.get("runAsUser", 1) != 0, (name, c["name"])
            assert not c.get("ports") or all("hostPort" not in p for p in c["ports"]), (name, c["name"])
            mounts_rw |= {m["name"] for m in c.get("volumeMounts", []) if not m.get("readOnly")}
        kinds = {v["name"]: next(k for k in v if k != "name") for v in spec.get("volumes", [])}
        assert {kinds[m] for m in mounts_rw} <= {"emptyDir", "ephemeral", "persistentVolumeClaim"}, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_production_by_default_with_keys_and_redis_url_from_secrets(overlay):
    objects = rendered(overlay)
    assert configmap(objects)["SAFFRON_ENVIRONMENT"] == "production"
    assert "SAFFRON_REDIS_URL" not in configmap(objects) and "SAFFRON_API_KEYS" not in configmap(objects)
    for name in ("saffron-gateway", "saffron-worker"):
        env = env_of(container(get(objects, "Deployment", name)))
        assert env["SAFFRON_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "saffron-api-keys", "key": "SAFFRON_API_KEYS"}, name
        assert env["SAFFRON_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "saffron-redis", "key": "url"}, name
        settings = settings_of(objects, name)  # production with keys: Settings' own refusals pass
        assert settings.environment == "production" and settings.allowed_strategies == ("saffron",)
    for obj in objects:
        assert obj["kind"] != "Secret", "Secrets are created by hand (deploy/k8s/secrets.example.yaml), never rendered"
        assert "namespace" not in obj["metadata"], f"{obj['kind']}/{obj['metadata']['name']} names a namespace"


def test_secrets_example_has_every_key_the_manifests_read():
    examples = {d["metadata"]["name"]: d["stringData"] for d in yaml.safe_load_all((K8S / "secrets.example.yaml").read_text())}
    read = set()
    for overlay in OVERLAYS:
        for _, spec in pod_specs(rendered(overlay)):
            for c in spec.get("initContainers", []) + spec["containers"]:
                read |= {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"]) for e in c.get("env", []) if "valueFrom" in e}
    assert read == {(name, key) for name, keys in examples.items() for key in keys}, read
    redis_example = examples["saffron-redis"]
    assert redis_example["url"] == f"redis://:{redis_example['password']}@saffron-redis:6379/0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_saffron_variable_is_a_setting_and_configmap_values_are_valid(overlay):
    objects = rendered(overlay)
    names = set(configmap(objects))
    for _, spec in pod_specs(objects):
        for c in spec.get("initContainers", []) + spec["containers"]:
            names |= {n for n in env_of(c) if n.startswith("SAFFRON_")}
    assert names - SETTINGS_VARS == set(), f"not fields of service.config.Settings: {sorted(names - SETTINGS_VARS)}"
    for key, value in configmap(objects).items():
        assert isinstance(value, str), f"{key}: ConfigMap values must be strings, got {value!r}"


def test_images_come_from_the_registry_placeholder_and_overlays_can_move_them():
    for overlay in OVERLAYS:
        kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        listed = {i["name"] for i in kustomization["images"]}
        for obj, spec in pod_specs(rendered(overlay)):
            for c in spec.get("initContainers", []) + spec["containers"]:
                image = c["image"]
                assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{overlay}: {image} has no pinned tag"
                if obj["metadata"]["name"] != "saffron-redis":
                    assert image.startswith(OUR_IMAGES) and image.split(":")[0] in listed, f"{overlay}: {image}"


# --------------------------------------------------------------------------- gateway


def test_gateway_deployment_service_hpa_pdb_and_graceful_termination():
    objects = rendered("gpu")
    gateway = get(objects, "Deployment", "saffron-gateway")
    assert "replicas" not in gateway["spec"], "the HPA owns the replica count"
    spec = gateway["spec"]["template"]["spec"]
    gw = container(gateway)
    assert gw["readinessProbe"]["httpGet"]["path"] == "/ready" and gw["livenessProbe"]["httpGet"]["path"] == "/health"
    assert gw["startupProbe"]["httpGet"]["path"] == "/health"
    assert "cpu" in gw["resources"]["requests"], "the HPA scales on CPU utilisation of the requests"
    # preStop, then uvicorn's graceful shutdown, which outlasts the longest request, all inside the pod's grace.
    settings = settings_of(objects, "saffron-gateway")
    pre_stop = gw["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert settings.gateway_shutdown_grace_s >= settings.request_timeout_s, settings
    assert spec["terminationGracePeriodSeconds"] > pre_stop + settings.gateway_shutdown_grace_s, spec["terminationGracePeriodSeconds"]

    service = get(objects, "Service", "saffron-gateway")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]
    assert gw["ports"] == [{"name": "http", "containerPort": 8000}] and gw["args"][-2:] == ["--port", "8000"]
    hpa = get(objects, "HorizontalPodAutoscaler", "saffron-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "saffron-gateway"}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pdb = get(objects, "PodDisruptionBudget", "saffron-gateway")
    assert pdb["spec"]["selector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a PDB as large as the fleet blocks every drain"


# --------------------------------------------------------------------------- workers


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_probes_watch_the_main_loop_not_a_port(overlay):
    objects = rendered(overlay)
    worker = get(objects, "Deployment", "saffron-worker")
    wk = container(worker)
    settings = settings_of(objects, "saffron-worker")
    probe = ["python", "-m", "service.worker.liveness"]
    assert wk["startupProbe"]["exec"]["command"] == probe and wk["livenessProbe"]["exec"]["command"] == probe
    assert "readinessProbe" not in wk, "no Service routes to workers"
    # The loop's file lies on a writable emptyDir; the stall threshold is the settings', read by the probe itself.
    mounts = {m["mountPath"]: m for m in wk["volumeMounts"]}
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for path, m in mounts.items() if str(settings.worker_alive_file).startswith(path + "/")]
    assert "emptyDir" in volumes[mount["name"]] and not mount.get("readOnly"), mount
    assert settings.worker_stall_s > 0
    # Model loading gets minutes; a hung loop is restarted within a few periods after worker_stall_s.
    assert wk["startupProbe"]["periodSeconds"] * wk["startupProbe"]["failureThreshold"] >= 300
    assert wk["livenessProbe"]["timeoutSeconds"] >= 5, "the probe starts a Python interpreter"
    assert [p["containerPort"] for p in wk["ports"]] == [settings.worker_metrics_port]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_drains_longer_than_the_longest_request(overlay):
    objects = rendered(overlay)
    worker = get(objects, "Deployment", "saffron-worker")
    settings = settings_of(objects, "saffron-worker")
    assert "replicas" not in worker["spec"], "KEDA's HPA owns the replica count"
    assert settings.worker_shutdown_grace_s >= settings.request_timeout_s, "in-flight jobs finish instead of being rerun"
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > settings.worker_shutdown_grace_s
    pdb = get(objects, "PodDisruptionBudget", "saffron-worker")
    assert pdb["spec"]["selector"]["matchLabels"] == worker["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_weights_are_prepared_into_a_volume_by_an_init_container(overlay):
    worker = get(rendered(overlay), "Deployment", "saffron-worker")
    spec = worker["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    wk = container(worker)
    assert init["command"] == ["python", "-m", "model_store", "prepare"] and init["image"] == wk["image"]
    home = env_of(wk)["SAFFRON_HOME"]["value"]
    assert env_of(init)["SAFFRON_HOME"]["value"] == home
    init_mount = next(m for m in init["volumeMounts"] if m["mountPath"] == home)
    worker_mount = next(m for m in wk["volumeMounts"] if m["mountPath"] == home)
    assert init_mount["name"] == worker_mount["name"] and not init_mount.get("readOnly") and worker_mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == worker_mount["name"])
    assert "ephemeral" in volume or "persistentVolumeClaim" in volume, "the weights live on a PersistentVolumeClaim"
    assert "envFrom" not in init and not any("valueFrom" in e for e in init.get("env", [])), "prepare needs no Secret"


def test_gpu_overlays_take_one_gpu_per_worker_and_the_cpu_overlay_none():
    for overlay in OVERLAYS:
        worker = get(rendered(overlay), "Deployment", "saffron-worker")
        wk = container(worker)
        device = env_of(wk)["SAFFRON_DEVICE"]["value"]
        limits = wk["resources"]["limits"]
        if overlay.startswith("gpu"):
            assert device == "cuda" and limits["nvidia.com/gpu"] == 1, (overlay, limits)
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["spec"]["template"]["spec"]["tolerations"]
            assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "a rollout must not wait for a spare GPU"
            assert wk["image"].endswith("-cuda")
        else:
            assert overlay == "cpu" and device == "cpu" and "nvidia.com/gpu" not in limits, (overlay, limits)
            assert wk["image"].endswith("-cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_workers_on_the_queue_depth(overlay):
    objects = rendered(overlay)
    scaled = get(objects, "ScaledObject", "saffron-worker")
    assert scaled["spec"]["scaleTargetRef"] == {"name": "saffron-worker"}
    assert scaled["spec"]["minReplicaCount"] >= 1, "no worker: gateways unready, no traffic, no queue to scale back up on"
    assert scaled["spec"]["maxReplicaCount"] > scaled["spec"]["minReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    job = get(objects, "ServiceMonitor", "saffron-gateway")["spec"]["endpoints"][0]["relabelings"][0]["replacement"]
    assert trigger["metadata"]["query"] == f'max(saffron_queue_depth{{job="{job}"}})'
    assert metrics.GATEWAY_REGISTRY.get_sample_value("saffron_queue_depth") is not None, "the gateways export it"
    assert float(trigger["metadata"]["threshold"]) == settings_of(objects, "saffron-worker").worker_max_active


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitors_scrape_gateways_and_workers_under_the_compose_job_names(overlay):
    objects = rendered(overlay)
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    compose_jobs = {j["job_name"] for j in prometheus["scrape_configs"]}
    service = get(objects, "Service", "saffron-gateway")
    monitor = get(objects, "ServiceMonitor", "saffron-gateway")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    worker = get(objects, "Deployment", "saffron-worker")
    pod_monitor = get(objects, "PodMonitor", "saffron-worker")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    (pod_endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert pod_endpoint["port"] in {p["name"] for p in container(worker)["ports"]} and pod_endpoint["path"] == "/metrics"
    jobs = {e["relabelings"][0]["replacement"] for e in (endpoint, pod_endpoint)}
    assert jobs == {"saffron-gateway", "saffron-worker"} and jobs <= compose_jobs, (jobs, compose_jobs)


# --------------------------------------------------------------------------- network and Redis


def pods_selected(selector: dict, objects) -> set[str]:
    """Deployments whose pods a podSelector with matchLabels / matchExpressions (operator In) selects."""
    chosen = set()
    for obj, _ in pod_specs(objects):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        ok = selector.get("matchLabels", {}).items() <= labels.items()
        for expr in selector.get("matchExpressions", []):
            assert expr["operator"] == "In", expr
            ok = ok and labels.get(expr["key"]) in expr["values"]
        if ok:
            chosen.add(obj["metadata"]["name"])
    return chosen


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_only_gateways_and_workers_reach_redis(overlay):
    objects = rendered(overlay)
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    gateway = policies["saffron-gateway"]
    assert pods_selected(gateway["podSelector"], objects) == {"saffron-gateway"}
    assert gateway["ingress"] == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]
    worker = policies["saffron-worker"]
    assert pods_selected(worker["podSelector"], objects) == {"saffron-worker"}
    assert worker["ingress"] == [{"ports": [{"port": settings_of(objects, "saffron-worker").worker_metrics_port, "protocol": "TCP"}]}]
    in_cluster = any(o["kind"] == "Deployment" and o["metadata"]["name"] == "saffron-redis" for o in objects)
    assert in_cluster == (overlay != "gpu-external-redis")
    if not in_cluster:
        assert "saffron-redis" not in policies and not [o for o in objects if "redis" in o["metadata"]["name"]]
        return
    redis_policy = policies["saffron-redis"]
    assert pods_selected(redis_policy["podSelector"], objects) == {"saffron-redis"}
    (rule,) = redis_policy["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}, "same namespace, pods only"
    assert pods_selected(source["podSelector"], objects) == {"saffron-gateway", "saffron-worker"}
    assert rule["ports"] == [{"port": get(objects, "Service", "saffron-redis")["spec"]["ports"][0]["port"], "protocol": "TCP"}]


def test_in_cluster_redis_has_a_password_a_memory_cap_and_starts_with_its_config(tmp_path):
    """The Valkey container's own command and config, run with this machine's Redis-compatible server."""
    objects = rendered("gpu")
    deployment = get(objects, "Deployment", "saffron-redis")
    c = container(deployment)
    assert env_of(c)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "saffron-redis", "key": "password"}
    conf = get(objects, "ConfigMap", "saffron-redis-config")["data"]["valkey.conf"]
    maxmemory = re.search(r"^maxmemory (\d+)mb$", conf, re.M)
    assert maxmemory and int(maxmemory.group(1)) * 2**20 < 1024**3, "maxmemory must sit below the 1Gi limit"
    assert c["resources"]["limits"]["memory"] == "1Gi"

    (tmp_path / "etc").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "etc" / "valkey.conf").write_text(conf.replace("/run/valkey", str(tmp_path / "run")).replace("dir /data", f"dir {tmp_path}"))
    port = free_port()
    shell = c["command"][-1].replace("/run/valkey", str(tmp_path / "run")).replace("/etc/valkey", str(tmp_path / "etc"))
    shell = shell.replace("exec valkey-server", f"exec {find_redis_server()}") + f" --port {port} --bind 127.0.0.1"
    assert c["command"][:2] == ["sh", "-c"]
    password = 'a"b c$d\\e'  # a quote, a space, a dollar and a backslash survive printf, sed and the config parser
    server = subprocess.Popen(["sh", "-c", shell], env={"PATH": os.environ["PATH"], "REDIS_PASSWORD": password})
    try:
        anonymous = redis.Redis(port=port, socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                anonymous.ping()
                raise AssertionError("the server answered without a password")
            except redis.AuthenticationError:
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
                time.sleep(0.05)
        client = redis.Redis(port=port, password=password, socket_timeout=2, decode_responses=True)
        assert client.ping()
        assert client.config_get("maxmemory")["maxmemory"] == str(int(maxmemory.group(1)) * 2**20)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert client.config_get("save")["save"] == "" and client.config_get("appendonly")["appendonly"] == "no"
        assert password not in Path(f"/proc/{server.pid}/cmdline").read_text(), "the password is on the command line"
        client.close()
        anonymous.close()
    finally:
        server.terminate()
        server.wait(10)
