"""The images and the compose deployment, checked by the real tools and by running what the images run.

- docker/*.Dockerfile: hadolint (no warnings), the shape the issue asks for (multi-stage, non-root, a HEALTHCHECK on
  the service's own endpoint, no weights and no test tools inside), and the gateway's dependencies free of torch.
- docker-compose*.yml: ``docker-compose config`` of docker-compose 1.29 and of Docker Compose v2 on every variant
  (one GPU, N GPUs, CPU), then the normalised result: ports on 127.0.0.1, one GPU per worker, grace periods above
  the drains, secrets required.
- scripts/install.sh, ``python -m model_store prepare``, ``saffron-guard gateway|worker`` and scripts/healthcheck.py,
  the commands of the images, run natively here: a gateway from its own torch-free install, a CPU worker from its.

The validators come from requirements-tools.lock (scripts/install_tools.sh, run by scripts/setup.sh) into .tools/.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from packaging.requirements import Requirement

from service.config import Settings
from service.redis_server import find_redis_server, free_port
from service.serve import wait_until_ok

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools" / "bin"
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
GATEWAY_DOCKERFILE, WORKER_DOCKERFILE = ROOT / "docker/gateway.Dockerfile", ROOT / "docker/worker.Dockerfile"
CUDA_LOCK = ROOT / "docker/requirements-cuda.lock"
GENERATOR = ROOT / "scripts/compose_workers.py"
HEALTHCHECK = ROOT / "scripts/healthcheck.py"
SECRETS = ("SAFFRON_API_KEYS", "REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The committed worker files and the arguments of compose_workers.py that write them.
COMMITTED = {"docker-compose.gpu.yml": ["gpu", "0"], "docker-compose.cpu.yml": ["cpu"]}


def tool(name: str) -> Path:
    path = TOOLS / name
    if not path.exists():
        message = f"{path} is missing: run scripts/setup.sh (scripts/install_tools.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def lock_pins(*paths: Path) -> dict[str, str]:
    pins = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                name, version = line.split("==")
                pins[canonical(name)] = version.strip()
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def forbidden_in_gateway() -> set[str]:
    """The external modules of the import contract "The gateway imports no model code" (pyproject.toml)."""
    config = PYPROJECT["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["name"] == "The gateway imports no model code")
    return {m for m in contract["forbidden_modules"] if m.partition(".")[0] not in config["root_packages"]}


def seconds(duration: str) -> float:
    """A compose duration (``45s``, ``1m30s``, ``10m0s``) in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, duration
    h, m, s = (float(p or 0) for p in parts.groups())
    return 3600 * h + 60 * m + s


def dockerfile_healthcheck(path: Path) -> list[str]:
    text = path.read_text().replace("\\\n", " ")
    return json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M)[1])


# ---------------------------------------------------------------- Dockerfiles


def test_hadolint_finds_nothing_in_any_dockerfile():
    assert {p.name for p in DOCKERFILES} == {"gateway.Dockerfile", "worker.Dockerfile"}, DOCKERFILES
    hadolint = tool("hadolint")
    proc = subprocess.run([hadolint, *DOCKERFILES], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    # The one ignore pragma hides one false positive (a stage named through an ARG is not an image) and nothing else.
    proc = subprocess.run([hadolint, "--disable-ignore-pragma", "--no-color", *DOCKERFILES], capture_output=True, text=True, timeout=60)
    findings = proc.stdout.strip().splitlines()
    assert len(findings) == 1 and " DL3006 " in findings[0], findings
    line = int(re.match(r"\S+:(\d+) ", findings[0])[1])
    assert WORKER_DOCKERFILE.read_text().splitlines()[line - 1] == "FROM python-${VARIANT} AS python", findings


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_multi_stage_non_root_with_a_healthcheck_and_no_weights_or_test_tools(path):
    text = path.read_text()
    stages = re.findall(r"^FROM \S+(?: AS (\S+))?$", text, re.M)
    assert "build" in stages and len(stages) >= 2, stages
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users == ["10001:10001"], f"numeric and non-root (the uid of the volumes' owner): {users}"
    role = "gateway" if path == GATEWAY_DOCKERFILE else "worker"
    assert dockerfile_healthcheck(path) == ["python", "/opt/saffron-guard/healthcheck.py", role]
    assert re.search(r'^ENTRYPOINT \["saffron-guard"\]$', text, re.M)
    runs = " ".join(re.findall(r"^RUN (.*(?:\\\n.*)*)", text, re.M))
    assert "model_store prepare" not in runs, "weights are prepared on a volume at run time, never in the image"
    for test_tool in ("pytest", "ruff", "openai", "matplotlib", "schemathesis", "import-linter"):
        assert test_tool not in text, f"{path.name} mentions the test tool {test_tool}"
    assert "pip install" not in runs, "installs go through scripts/install.sh, which CI runs natively"
    # Everything the Dockerfile COPYs from the context survives .dockerignore (an allowlist).
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].removesuffix("/**") for line in ignore if line.startswith("!")}
    copied = {s for args in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M) for s in args.split()}
    assert copied <= allowed, f"COPY sources excluded by .dockerignore: {copied - allowed}"


def test_the_gateway_image_installs_the_gateway_role_only():
    text = GATEWAY_DOCKERFILE.read_text()
    installs = re.findall(r"^RUN scripts/install\.sh (\S+) /opt/venv", text, re.M)
    assert installs == ["gateway", "gateway"], installs
    instructions = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert "torch" not in instructions.lower() and "model_store" not in instructions, "the gateway image carries no model code"
    assert not re.search(r"^COPY (?!--from).*\b(model_store|bench)\b", text, re.M)


def test_the_worker_image_pins_cuda_to_the_build_of_torch():
    text = WORKER_DOCKERFILE.read_text()
    installs = re.findall(r'^RUN scripts/install\.sh "worker-\$\{VARIANT\}" /opt/venv', text, re.M)
    assert len(installs) == 2, "deps layer, then the code"
    assert re.search(r"^ARG VARIANT=cuda$", text, re.M) and re.search(r"^FROM python:3\.11-slim-\S+ AS python-cpu$", text, re.M)
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu\S+ AS python-cuda$", text, re.M)
    assert base, "the CUDA variant runs on an NVIDIA CUDA runtime base"
    toolkit = re.search(r"^cuda-toolkit==(\d+)\.(\d+)\.", CUDA_LOCK.read_text(), re.M)
    assert base.groups() == toolkit.groups(), f"base CUDA {base.groups()} != torch's CUDA {toolkit.groups()}"
    pins, cuda_pins = lock_pins(ROOT / "requirements.lock"), lock_pins(CUDA_LOCK)
    assert not set(pins) & set(cuda_pins), "the CUDA lock only adds to requirements.lock"
    assert "torch" in pins and any(n.startswith("nvidia-cudnn") for n in cuda_pins)


def closure(requirements: list[str], extras: tuple[str, ...] = ()) -> set[str]:
    """Every distribution ``requirements`` pull in on Linux, from the metadata installed in this environment."""
    seen: set[str] = set()
    todo = [(Requirement(r), extras) for r in requirements]
    while todo:
        req, active = todo.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in ("", *active)):
            continue
        name = canonical(req.name)
        if name == canonical(PYPROJECT["project"]["name"]):  # a self-reference: .[gateway,worker]
            for extra in req.extras:
                todo += [(Requirement(r), ()) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
            continue
        if name in seen:
            continue
        seen.add(name)
        todo += [(Requirement(r), tuple(req.extras)) for r in importlib.metadata.requires(req.name) or []]
    return seen


def test_the_gateway_dependencies_from_the_lock_exclude_torch():
    """What `scripts/install.sh gateway` (the gateway image) resolves: pyproject's base + gateway, pinned by the lock."""
    project = PYPROJECT["project"]
    gateway = closure(project["dependencies"] + project["optional-dependencies"]["gateway"])
    pins = lock_pins(ROOT / "requirements.lock")
    assert gateway <= set(pins), f"not pinned in requirements.lock: {sorted(gateway - set(pins))}"
    heavy = {canonical(m) for m in forbidden_in_gateway()} & gateway
    assert "torch" not in gateway and not heavy, f"the gateway would install {sorted(heavy)}"
    worker = closure(project["dependencies"] + project["optional-dependencies"]["worker"])
    assert {"torch", "transformers"} <= worker, "the closure follows requirements (sanity)"


# ---------------------------------------------------------------- compose


def compose_env(**extra: str) -> dict[str, str]:
    """A clean environment for compose: the example .env's values, dummy secrets, nothing of this shell's."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return env | {name: f"ci-{name.lower()}" for name in SECRETS} | extra


def compose_config(binary: Path, files: list[Path], env: dict[str, str]) -> subprocess.CompletedProcess:
    args = [binary, "--env-file", ROOT / ".env.example"]
    for f in files:
        args += ["-f", f]
    return subprocess.run([*args, "config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def variants(tmp_path: Path) -> dict[str, list[Path]]:
    four = tmp_path / "docker-compose.gpus.yml"
    four.write_text(generate("gpu", "--count", "4").stdout)
    base = ROOT / "docker-compose.yml"
    return {"gpu": [base, ROOT / "docker-compose.gpu.yml"], "cpu": [base, ROOT / "docker-compose.cpu.yml"], "4 gpus": [base, four]}


def generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, GENERATOR, *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("binary", ["docker-compose", "docker-compose-v2"])
def test_docker_compose_config_accepts_every_variant(binary, tmp_path):
    for variant, files in variants(tmp_path).items():
        proc = compose_config(tool(binary), files, compose_env())
        assert proc.returncode == 0, f"{binary} {variant}: {proc.stderr[-3000:]}"
        services = set(yaml.safe_load(proc.stdout)["services"])
        workers = {"cpu": {"worker"}, "gpu": {"worker-gpu0"}, "4 gpus": {f"worker-gpu{i}" for i in range(4)}}[variant]
        assert services == {"redis", "gateway", "prometheus", "grafana", "prepare"} | workers, (variant, services)


@pytest.mark.parametrize("variant", ["gpu", "cpu", "4 gpus"])
def test_the_compose_deployment_as_docker_compose_v2_sees_it(variant, tmp_path):
    proc = compose_config(tool("docker-compose-v2"), variants(tmp_path)[variant], compose_env())
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    drains = Settings(**{k.removeprefix("SAFFRON_").lower(): v for k, v in saffron_env().items()}, api_keys="k")

    for name, service in services.items():  # published on this host only, by default
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)
    assert services["gateway"]["ports"][0]["published"] == "8000"
    assert {s for s in services if services[s].get("ports")} == {"gateway", "prometheus", "grafana"}

    gateway = services["gateway"]
    assert gateway["healthcheck"]["test"] == ["CMD", *dockerfile_healthcheck(GATEWAY_DOCKERFILE)]
    assert seconds(gateway["stop_grace_period"]) > drains.gateway_shutdown_grace_s
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert gateway["read_only"] and gateway["cap_drop"] == ["ALL"]

    prepare = services["prepare"]
    assert prepare["entrypoint"] == ["python", "-m", "model_store"] and prepare["command"] == ["prepare"]
    assert [(v["source"], v["target"], v.get("read_only", False)) for v in prepare["volumes"]] == [("models", "/models", False)]

    workers = {n: s for n, s in services.items() if n.startswith("worker")}
    gpus = []
    for name, worker in workers.items():
        assert worker["image"] == prepare["image"] and worker["command"] == ["worker"], name
        assert worker["image"].endswith("-cpu" if variant == "cpu" else "-cuda")
        assert worker["build"]["args"]["VARIANT"] == ("cpu" if variant == "cpu" else "cuda")
        assert worker["environment"]["SAFFRON_DEVICE"] == ("cpu" if variant == "cpu" else "cuda")
        assert worker["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert [(v["source"], v["target"], v["read_only"]) for v in worker["volumes"]] == [("models", "/models", True)]
        assert "worker" in worker["networks"]["default"]["aliases"], "Prometheus scrapes the DNS name `worker`"
        assert worker["healthcheck"]["test"] == ["CMD", *dockerfile_healthcheck(WORKER_DOCKERFILE)]
        assert seconds(worker["stop_grace_period"]) > drains.worker_shutdown_grace_s + 5, "drain, then hand back"
        assert seconds(worker["healthcheck"]["start_period"]) >= 300, "model loading"
        assert worker["environment"]["SAFFRON_REDIS_URL"] == gateway["environment"]["SAFFRON_REDIS_URL"]
        devices = worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if variant == "cpu":
            assert devices == [], name
        else:
            assert len(devices) == 1 and "count" not in devices[0] and devices[0]["driver"] == "nvidia", devices
            gpus += devices[0]["device_ids"]
    expected = {"cpu": [], "gpu": ["0"], "4 gpus": ["0", "1", "2", "3"]}[variant]
    assert sorted(gpus) == expected, "one worker per GPU, each reserving its own"


def test_compose_refuses_to_start_without_the_secrets():
    files = [ROOT / "docker-compose.yml", ROOT / "docker-compose.gpu.yml"]
    for binary in ("docker-compose", "docker-compose-v2"):
        for missing in SECRETS:
            proc = compose_config(tool(binary), files, compose_env(**{missing: ""}))
            assert proc.returncode != 0 and f"set {missing} in .env" in proc.stderr, (binary, missing, proc.stderr[-500:])


def test_the_committed_worker_files_are_the_generators_output():
    for name, args in COMMITTED.items():
        proc = generate(*args)
        assert proc.returncode == 0, proc.stderr
        assert (ROOT / name).read_text() == proc.stdout, f"regenerate: python3 scripts/compose_workers.py {' '.join(args)} > {name}"
    uuid_ids = generate("gpu", "GPU-5c3c7b2e-0b5d-4c1e-9a7e-2f0d6b1c9e11", "3").stdout
    assert 'device_ids: ["GPU-5c3c7b2e-0b5d-4c1e-9a7e-2f0d6b1c9e11"]' in uuid_ids and "worker-gpu1:" in uuid_ids
    for bad in (["gpu"], ["gpu", "0", "0"], ["gpu", "0;rm"], ["cpu", "0"], ["gpu", "--count", "0"]):
        proc = generate(*bad)
        assert proc.returncode == 2 and proc.stderr, (bad, proc.stdout)


def saffron_env() -> dict[str, str]:
    lines = (ROOT / "deploy/compose/saffron.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_env_files_name_settings_and_the_secrets_stay_out_of_git():
    settings = saffron_env()
    assert set(settings) <= {f"SAFFRON_{n.upper()}" for n in Settings.model_fields}, sorted(settings)
    assert settings["SAFFRON_ENVIRONMENT"] == "production" and "SAFFRON_API_KEYS" not in settings
    Settings(**{k.removeprefix("SAFFRON_").lower(): v for k, v in settings.items()}, api_keys="k")  # valid values

    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines() if re.match(r"\w+=", line))
    assert all(example[s] == "" for s in SECRETS), "the example holds no secret: each must be chosen"
    assert all((ROOT / f).is_file() for f in example["COMPOSE_FILE"].split(":")), example["COMPOSE_FILE"]
    used = {v for f in ROOT.glob("docker-compose*.yml") for v in re.findall(r"\$\{(\w+)", f.read_text())}
    assert used - {"GRAFANA_ADMIN_USER"} <= set(example), f"not in .env.example: {sorted(used - set(example))}"
    for secret in SECRETS:  # required (`:?`) wherever used, never defaulted
        for f in ROOT.glob("docker-compose*.yml"):
            uses = re.findall(rf"\$\{{{secret}(\W*)", f.read_text())
            assert all(u.startswith(":?") for u in uses), (f.name, secret, uses)

    ignored = subprocess.run(["git", "check-ignore", ".env", "docker-compose.gpus.yml", ".tools/"], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == [".env", "docker-compose.gpus.yml", ".tools/"], ignored.stdout
    tracked_ok = subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=ROOT)
    assert tracked_ok.returncode == 1, ".env.example is committed"


def test_redis_config_on_a_real_server(tmp_path):
    """deploy/compose/redis.conf with the command line compose gives it: password and memory bound, no persistence."""
    port, password = free_port(), uuid.uuid4().hex
    args = [find_redis_server(), ROOT / "deploy/compose/redis.conf", "--requirepass", password, "--maxmemory", "2mb",
            "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp_path]  # the test's own port, on loopback only
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port, password=password, socket_timeout=5, decode_responses=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=5).ping()
        config = client.config_get("*")
        assert config["maxmemory-policy"] == "noeviction" and config["maxmemory"] == str(2 * 1024**2)
        assert config["appendonly"] == "no" and config["save"] == ""
        with pytest.raises(redis.ResponseError, match="maxmemory"):  # full: writes fail, nothing is evicted
            for i in range(10_000):
                client.set(f"k{i}", b"x" * 1024)
        assert client.get("k0") == "x" * 1024
    finally:
        server.terminate()
        server.wait(timeout=10)


# ---------------------------------------------------------------- the images' commands, natively


def test_the_healthcheck_targets(monkeypatch):
    spec = importlib.util.spec_from_file_location("healthcheck", HEALTHCHECK)
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    assert healthcheck.url_for("gateway") == "http://127.0.0.1:8000/health"
    monkeypatch.setenv("SAFFRON_WORKER_METRICS_PORT", "9202")
    assert healthcheck.url_for("worker") == "http://127.0.0.1:9202/healthz"
    proc = subprocess.run([sys.executable, HEALTHCHECK, f"http://127.0.0.1:{free_port()}/health"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "Connection refused" in proc.stderr, proc.stderr


def install(role: str, venv: Path, *args: str, env: dict | None = None) -> None:
    proc = subprocess.run([ROOT / "scripts/install.sh", role, venv, *args], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def stop(proc: subprocess.Popen, timeout_s: float) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.mark.timeout(300)
def test_the_gateway_install_serves_without_torch(tmp_path, redis_url):
    venv = tmp_path / "gateway"
    install("gateway", venv)
    installed = {canonical(d.metadata["Name"]) for d in importlib.metadata.distributions(path=[str(p) for p in venv.glob("lib/python*/site-packages")])}
    assert not installed & {canonical(m) for m in forbidden_in_gateway()}, sorted(installed)
    # Outside the checkout (`python -c` and `-m` put the working directory on sys.path), as in the image.
    no_model_code = subprocess.run([venv / "bin/python", "-c", "import model_store"], cwd=tmp_path, capture_output=True, text=True)
    assert no_model_code.returncode == 1 and "No module named 'model_store'" in no_model_code.stderr

    port = free_port()
    env = os.environ | {"SAFFRON_REDIS_URL": redis_url, "SAFFRON_REDIS_PREFIX": f"image-{uuid.uuid4().hex[:8]}"}
    gateway = subprocess.Popen([venv / "bin/saffron-guard", "gateway", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_ok(f"http://127.0.0.1:{port}/health", 60, (gateway,))
        check = subprocess.run([venv / "bin/python", HEALTHCHECK, f"http://127.0.0.1:{port}/health"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["reason"].startswith("no live worker"), ready.text
    finally:
        code = stop(gateway, 45)
    output = gateway.communicate()[0]
    # uvicorn shuts down gracefully, then re-raises the signal: the exit status says SIGTERM, the log that it drained.
    assert code in (0, -signal.SIGTERM) and "Finished server process" in output, (code, output[-3000:])


@pytest.mark.timeout(300)
def test_the_cuda_worker_install_is_pinned_completely(tmp_path):
    """The CUDA image's set, resolved on PyPI (metadata only): every package exactly pinned by the two locks."""
    env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"} | {"PIP_CONFIG_FILE": os.devnull}  # PyPI, not local CPU wheels
    report = tmp_path / "report.json"
    install("worker-cuda", tmp_path / "venv", "--dry-run", str(report), env=env)
    resolved = {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    pins = lock_pins(ROOT / "requirements.lock", CUDA_LOCK)
    unpinned = {n: v for n, v in resolved.items() if pins.get(n) != v}
    assert not unpinned, f"resolved outside the locks: {unpinned}"
    assert resolved["torch"] == pins["torch"] and "+" not in resolved["torch"], "PyPI's CUDA build, not a +cpu one"
    assert set(lock_pins(CUDA_LOCK)) <= set(resolved), "the CUDA lock pins nothing torch does not pull in"


@pytest.mark.model
@pytest.mark.timeout(900)
def test_the_cpu_worker_install_prepares_and_serves(tmp_path, redis_url, default_model_dir):
    """install.sh worker-cpu, then the image's prepare and start commands from that venv, with its HEALTHCHECK."""
    venv = tmp_path / "worker"
    install("worker-cpu", venv)
    # SAFFRON_HOME as this machine's: setup.sh prepared it, so this is the "already prepared" run of the one-shot.
    prepare = subprocess.run([venv / "bin/python", "-m", "model_store", "prepare"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert prepare.returncode == 0 and f"already prepared at {default_model_dir}" in prepare.stdout, prepare.stdout + prepare.stderr

    env = os.environ | {
        "SAFFRON_REDIS_URL": redis_url, "SAFFRON_REDIS_PREFIX": f"image-{uuid.uuid4().hex[:8]}",
        "SAFFRON_WORKER_METRICS_PORT": str(free_port()), "SAFFRON_DEVICE": "cpu",
    }
    check = [venv / "bin/python", HEALTHCHECK, "worker"]
    worker = subprocess.Popen([venv / "bin/saffron-guard", "worker"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while (proc := subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)).returncode != 0:
            assert worker.poll() is None, f"the worker exited with {worker.returncode}"
            assert time.monotonic() < deadline, proc.stderr
            time.sleep(1)
    finally:
        code = stop(worker, 45)
    output = worker.communicate()[0]
    assert code == 0, output[-3000:]
