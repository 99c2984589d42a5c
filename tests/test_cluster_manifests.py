"""The manifests under cluster/ parse, carry the fields their tools require, name files
that exist in the repo, pin one Ray version, and hold no secrets or world-open endpoints.

Pure parsing: no Ray started, no cluster, no network.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
SERVE = CLUSTER / "serve.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob-build-pool.yaml"
RAYSERVICE = CLUSTER / "kuberay" / "rayservice.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"

REQUIRED = [LAUNCHER, RUNTIME_ENV, RAYCLUSTER, RAYJOB, RAYSERVICE]
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in {".yaml", ".yml"})
# Keys whose string value is itself a YAML document.
EMBEDDED_YAML_KEYS = {"serveConfigV2", "runtimeEnvYAML"}
AUTOSCALING_KEYS = {
    "min_replicas",
    "initial_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "max_ongoing_requests",
    "metrics_interval_s",
    "look_back_period_s",
    "smoothing_factor",
    "upscale_smoothing_factor",
    "downscale_smoothing_factor",
    "upscaling_factor",
    "downscaling_factor",
    "downscale_delay_s",
    "downscale_to_zero_delay_s",
    "upscale_delay_s",
    "aggregation_function",
    "policy",
}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML keeps the last one silently)."""


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(k, deep=True) for k, _ in node.value]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise yaml.constructor.ConstructorError(
            None, None, f"duplicate keys {sorted(map(str, dupes))}", node.start_mark
        )
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


@cache
def _docs(path: Path) -> tuple[Any, ...]:
    with path.open(encoding="utf-8") as f:
        return tuple(d for d in yaml.load_all(f, Loader=_StrictLoader) if d is not None)


def _one(path: Path) -> dict[str, Any]:
    if not path.exists():
        pytest.fail(f"{_rel(path)} is missing")
    docs = _docs(path)
    assert len(docs) == 1 and isinstance(docs[0], dict), f"{_rel(path)}: one mapping expected"
    return docs[0]


def _embedded(node: Any) -> Iterator[Any]:
    """Every YAML document embedded as a string under EMBEDDED_YAML_KEYS, parsed."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in EMBEDDED_YAML_KEYS and isinstance(v, str):
                yield yaml.load(v, Loader=_StrictLoader)
            yield from _embedded(v)
    elif isinstance(node, list):
        for v in node:
            yield from _embedded(v)


def _all_docs(path: Path) -> list[Any]:
    out: list[Any] = []
    for doc in _docs(path):
        out.append(doc)
        out.extend(_embedded(doc))
    return out


def _walk(node: Any, where: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(path, key, value) for every mapping entry and list item, depth first."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{where}.{k}", k, v
            yield from _walk(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield f"{where}[{i}]", None, v
            yield from _walk(v, f"{where}[{i}]")


def _strings(node: Any) -> Iterator[str]:
    for _, _, v in _walk(node):
        if isinstance(v, str):
            yield v


# --------------------------------------------------------------------------- parsing


def test_required_manifests_exist() -> None:
    missing = [_rel(p) for p in REQUIRED if not p.exists()]
    assert not missing, f"missing manifests: {missing}"


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{_rel(path)} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{_rel(path)}: top level must be a mapping"
    for emb in (e for d in docs for e in _embedded(d)):
        assert isinstance(emb, dict), f"{_rel(path)}: embedded YAML must be a mapping"


# --------------------------------------------------------------------------- launcher


def _is_gpu_node_type(node_type: dict[str, Any]) -> bool:
    if node_type.get("resources", {}).get("GPU", 0) > 0:
        return True
    cfg = node_type.get("node_config", {})
    if re.match(r"^(g\d|p\d)", str(cfg.get("InstanceType", ""))):  # AWS GPU families
        return True
    return bool(cfg.get("guestAccelerators"))  # GCP


def test_launcher_required_fields() -> None:
    cfg = _one(LAUNCHER)
    assert cfg.get("cluster_name")
    assert cfg["provider"]["type"] == "aws" and cfg["provider"].get("region")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert workers, "no worker node types"
    for name, t in workers.items():
        lo, hi = t.get("min_workers"), t.get("max_workers")
        assert isinstance(lo, int) and isinstance(hi, int), f"{name}: min/max_workers"
        assert 0 <= lo <= hi <= cfg["max_workers"], f"{name}: {lo=} {hi=}"
        assert "node_config" in t and "resources" in t, name
    gpu = [n for n, t in workers.items() if _is_gpu_node_type(t)]
    cpu = [n for n in workers if n not in gpu]
    assert gpu and cpu, f"want a CPU and a GPU worker group, got {gpu=} {cpu=}"
    assert all(workers[n]["max_workers"] > 0 for n in gpu + cpu), "a group cannot scale up"


def test_launcher_matches_ray_schema() -> None:
    """Validate against the JSON schema that `ray up` itself uses (read, not imported)."""
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed")
    schema_path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler"
    schema_path = schema_path / "ray-schema.json"
    if not schema_path.exists():
        pytest.skip(f"no launcher schema at {schema_path}")
    jsonschema.validate(_one(LAUNCHER), json.loads(schema_path.read_text()))


def test_launcher_file_mounts_exist() -> None:
    for remote, local in (_one(LAUNCHER).get("file_mounts") or {}).items():
        assert (ROOT / Path(local).expanduser()).exists(), f"file_mounts {remote}: {local}"


def _makefile_torch_pin() -> str | None:
    m = re.search(r"\btorch==([\w.+]+)", (ROOT / "Makefile").read_text())
    return m.group(1) if m else None


def _install_steps() -> list[Any]:
    steps = []
    try:  # collection must survive a missing or broken file; other tests report those
        launcher = _one(LAUNCHER) if LAUNCHER.exists() else {}
    except (yaml.YAMLError, AssertionError):
        launcher = {}
    steps.append(("ray-cluster.yaml", [str(c) for c in launcher.get("setup_commands", [])]))
    if DOCKERFILE.exists():
        text = DOCKERFILE.read_text().replace("\\\n", " ")
        run = [ln for ln in text.splitlines() if ln.startswith("RUN ")]
        steps.append(("Dockerfile", [c for ln in run for c in ln.split("&&")]))
    return [pytest.param(name, cmds, id=name) for name, cmds in steps]


@pytest.mark.parametrize("name,commands", _install_steps())
def test_install_order_torch_project_deepspeed(name: str, commands: list[str]) -> None:
    """torch (pinned as in the Makefile) → the project → DeepSpeed --no-build-isolation."""

    def index(pattern: str) -> int:
        hits = [i for i, c in enumerate(commands) if re.search(pattern, c)]
        assert hits, f"{name}: no command matching {pattern!r}"
        return hits[0]

    i_torch = index(r"pip install .*\btorch==")
    i_proj = index(r"pip install .*ray[-_]twist")
    i_ds = index(r"pip install .*--no-build-isolation .*\bdeepspeed\b")
    assert i_torch < i_proj < i_ds, f"{name}: install order"
    pin = re.search(r"\btorch==([\w.+]+)", commands[i_torch])
    want = _makefile_torch_pin()
    if want is not None and pin is not None:
        assert pin.group(1) == want, f"{name}: torch=={pin.group(1)}, Makefile pins {want}"


def test_launcher_dashboard_is_local_only() -> None:
    for cmd in _one(LAUNCHER).get("head_start_ray_commands", []):
        m = re.search(r"--dashboard-host[= ](\S+)", str(cmd))
        assert m is None or m.group(1) in {"127.0.0.1", "localhost"}, cmd


# --------------------------------------------------------------------------- runtime_env


def _check_runtime_env(env: dict[str, Any], where: str) -> None:
    assert env.get("working_dir"), f"{where}: working_dir"
    for k, v in (env.get("env_vars") or {}).items():
        assert isinstance(v, str), f"{where}: env_vars.{k} must be a string, got {v!r}"
    assert (env.get("env_vars") or {}).get("HF_HUB_OFFLINE") == "1", f"{where}: offline"


def test_runtime_env() -> None:
    env = _one(RUNTIME_ENV)
    _check_runtime_env(env, _rel(RUNTIME_ENV))
    assert env["working_dir"] == "."
    excludes = {e.strip("/") for e in env.get("excludes", [])}
    for big in (".venv", ".git", "runs", "bench/results"):
        assert big in excludes, f"working_dir upload would include {big}/"


# --------------------------------------------------------------------------- KubeRay


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    containers = template["spec"]["containers"]
    assert containers and all(c.get("image") for c in containers)
    return containers


def _check_cluster_spec(spec: dict[str, Any], where: str) -> None:
    assert spec.get("rayVersion"), f"{where}: rayVersion"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling off"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: head service"
    groups = [("head", head)] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    gpus = []
    for name, group in groups:
        for k, v in (group.get("rayStartParams") or {}).items():
            assert isinstance(v, str), f"{where}/{name}: rayStartParams.{k} must be a string"
        for c in _containers(group["template"]):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{where}/{name}: {kind}"
            if res["limits"].get("nvidia.com/gpu"):
                gpus.append(name)
        if name == "head":
            continue
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        assert isinstance(lo, int) and isinstance(hi, int), f"{where}/{name}: min/maxReplicas"
        assert 0 <= lo <= hi and hi > 0, f"{where}/{name}: {lo=} {hi=}"
        assert lo <= group.get("replicas", lo) <= hi, f"{where}/{name}: replicas"
    assert len(groups) >= 3 and gpus, f"{where}: want head + CPU + GPU groups, GPU: {gpus}"


def _check_kind(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    assert doc.get("apiVersion") == "ray.io/v1", doc.get("apiVersion")
    assert doc.get("kind") == kind and doc.get("metadata", {}).get("name")
    return doc["spec"]


def test_raycluster() -> None:
    spec = _check_kind(_one(RAYCLUSTER), "RayCluster")
    _check_cluster_spec(spec, _rel(RAYCLUSTER))


def test_rayjob() -> None:
    spec = _check_kind(_one(RAYJOB), "RayJob")
    assert spec.get("entrypoint"), "entrypoint"
    assert spec.get("shutdownAfterJobFinishes") is True
    _check_cluster_spec(spec["rayClusterSpec"], _rel(RAYJOB))
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    _check_runtime_env(env, f"{_rel(RAYJOB)} runtimeEnvYAML")


def _serve_apps(cfg: dict[str, Any], where: str) -> list[dict[str, Any]]:
    apps = cfg.get("applications")
    assert isinstance(apps, list) and apps, f"{where}: applications"
    for app in apps:
        assert re.fullmatch(r"[\w.]+:[\w.]+", app.get("import_path", "")), f"{where}: import_path"
    return apps


def _service_apps() -> list[dict[str, Any]]:
    spec = _check_kind(_one(RAYSERVICE), "RayService")
    assert isinstance(spec.get("serveConfigV2"), str), "serveConfigV2 must be a YAML string"
    return _serve_apps(yaml.safe_load(spec["serveConfigV2"]), "serveConfigV2")


# `args` paths where kuberay/rayservice.yaml may differ from cluster/serve.yaml:
SERVICE_ARG_DIFFS = {
    # GPU pods autoscale from zero on KubeRay, so "auto" could resolve to 0 GPUs at deploy
    "generator.num_gpus",
}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _gpu_capacity(cluster_spec: dict[str, Any]) -> float:
    total = 0.0
    for group in cluster_spec["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            total += group["maxReplicas"] * float(c["resources"]["limits"].get("nvidia.com/gpu", 0))
    return total


def test_rayservice() -> None:
    spec = _check_kind(_one(RAYSERVICE), "RayService")
    _check_cluster_spec(spec["rayClusterConfig"], _rel(RAYSERVICE))
    for app in _service_apps():
        deployments = app.get("deployments")
        assert deployments, f"{app.get('name')}: no deployments"
        args = app.get("args") or {}
        for d in deployments:
            auto = d.get("autoscaling_config")
            assert isinstance(auto, dict), f"{d.get('name')}: autoscaling_config"
            assert set(auto) <= AUTOSCALING_KEYS, f"unknown keys {set(auto) - AUTOSCALING_KEYS}"
            assert 0 <= auto["min_replicas"] <= auto["max_replicas"] and auto["max_replicas"] > 0
            assert auto["target_ongoing_requests"] > 0
            # The override wins over the app's own args: the two must say the same thing.
            in_args = (args.get(str(d["name"]).lower()) or {}).get("autoscaling") or {}
            for k in set(auto) & set(in_args):
                assert auto[k] == in_args[k], f"{d['name']}.{k}: override vs args"
        generator = args.get("generator") or {}
        gpus = generator.get("num_gpus")
        if isinstance(gpus, (int, float)) and gpus > 0:
            over = {d["name"]: d["autoscaling_config"] for d in deployments}
            most = over.get("Generator", generator.get("autoscaling", {})).get("max_replicas", 1)
            assert most * gpus <= _gpu_capacity(spec["rayClusterConfig"]), "GPU groups too small"


def _deployment_names_in_code(import_path: str) -> set[str] | None:
    found = _module_file(import_path.split(":")[0])
    if found is None:
        return None
    files = sorted(found.parent.glob("*.py")) if found.name == "__init__.py" else [found]
    text = "\n".join(f.read_text(encoding="utf-8") for f in files)
    named = re.findall(r"serve\.deployment\([^)]*name=[\"'](\w+)", text)
    return set(named) | set(re.findall(r"^class (\w+)", text, re.M))


@pytest.mark.parametrize("path", [RAYSERVICE, SERVE], ids=_rel)
def test_deployment_overrides_name_real_deployments(path: Path) -> None:
    if path == SERVE and not SERVE.exists():
        pytest.skip("cluster/serve.yaml not written yet")
    cfg = _one(path)
    apps = _service_apps() if path == RAYSERVICE else _serve_apps(cfg, _rel(path))
    for app in apps:
        names = _deployment_names_in_code(app["import_path"])
        if names is None:
            pytest.skip(f"{app['import_path']} missing (test_referenced_file_exists fails)")
        for d in app.get("deployments") or []:
            assert d.get("name") in names, f"{_rel(path)}: no deployment {d.get('name')!r}"


def test_rayservice_mirrors_serve_yaml() -> None:
    if not SERVE.exists():
        pytest.skip("cluster/serve.yaml not written yet")
    ours = {a.get("name"): a for a in _service_apps()}
    theirs = {a.get("name"): a for a in _serve_apps(_one(SERVE), _rel(SERVE))}
    assert set(ours) == set(theirs), "application names differ"
    for name, app in theirs.items():
        for key in ("import_path", "route_prefix", "runtime_env"):
            assert ours[name].get(key) == app.get(key), f"{name}: {key} differs"
        a, b = _flatten(app.get("args") or {}), _flatten(ours[name].get("args") or {})
        differ = {k for k in a.keys() | b.keys() if a.get(k, ...) != b.get(k, ...)}
        extra = differ - SERVICE_ARG_DIFFS
        assert not extra, f"{name}: args differ at {sorted(extra)}"
        ours_by_name = {d.get("name"): d for d in ours[name].get("deployments") or []}
        for d in app.get("deployments") or []:
            assert ours_by_name.get(d.get("name")) == d, f"{name}: deployment {d.get('name')}"


def test_serve_yaml() -> None:
    if not SERVE.exists():
        pytest.skip("cluster/serve.yaml not written yet")
    _serve_apps(_one(SERVE), _rel(SERVE))


# --------------------------------------------------------------------------- references


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.exists():
            return cand
    return None


def _references() -> list[tuple[str, str]]:
    """(manifest, reference) for scripts/configs in entrypoints and Serve import paths."""
    refs: list[tuple[str, str]] = []
    for path in YAML_FILES:
        try:  # collection must survive a broken file; test_yaml_parses reports it
            docs = _all_docs(path)
        except (yaml.YAMLError, AttributeError):
            continue
        for doc in docs:
            for _, key, value in _walk(doc):
                if key == "entrypoint" and isinstance(value, str):
                    refs += [
                        (_rel(path), tok)
                        for tok in shlex.split(value)
                        if re.search(r"\.(py|ya?ml|json)$", tok) and "://" not in tok
                    ]
                elif key == "import_path" and isinstance(value, str):
                    refs.append((_rel(path), f"import:{value}"))
    return refs


def test_manifests_reference_something() -> None:
    refs = {r for _, r in _references()}
    assert "jobs/build_pool.py" in refs and "jobs/configs/build_pool_synthetic.yaml" in refs
    assert "import:ray_twist.serve:app_builder" in refs


@pytest.mark.parametrize("manifest,ref", _references(), ids=lambda x: x)
def test_referenced_file_exists(manifest: str, ref: str) -> None:
    if ref.startswith("import:"):
        module, attr = ref.removeprefix("import:").split(":")
        found = _module_file(module)
        assert found, f"{manifest}: import_path module {module} has no file in the repo"
        assert re.search(rf"\b{re.escape(attr)}\b", found.read_text()), f"{attr} not in {found}"
    else:
        assert (ROOT / ref).is_file(), f"{manifest} names {ref}, which is not in the repo"


# --------------------------------------------------------------------------- versions


def test_one_ray_version_everywhere() -> None:
    versions: dict[str, set[str]] = {}
    for path in YAML_FILES:
        for doc in _all_docs(path):
            for _, key, value in _walk(doc):
                if key == "rayVersion":
                    versions.setdefault(str(value), set()).add(_rel(path))
                elif isinstance(value, str):
                    for v in re.findall(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)", value):
                        versions.setdefault(v, set()).add(_rel(path))
    if DOCKERFILE.exists():
        for v in re.findall(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)", DOCKERFILE.read_text()):
            versions.setdefault(v, set()).add(_rel(DOCKERFILE))
    assert len(versions) == 1, f"several Ray versions: {versions}"
    try:
        installed = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        return
    assert set(versions) == {installed}, f"manifests pin {set(versions)}, tested with {installed}"


# --------------------------------------------------------------------------- security

SECRET_WORDS = {"password", "passwd", "secret", "token", "credential", "credentials", "apikey"}
SECRET_PAIRS = {("access", "key"), ("api", "key"), ("private", "key"), ("secret", "key")}
SECRET_TEXT = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}", re.I),
    re.compile(r"\b(hf|ghp|gho|github_pat|xox[bp]|sk)_[A-Za-z0-9_]{20,}"),  # API tokens
]


def _secretish(name: str) -> bool:
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    parts = [w for w in re.split(r"[^a-z0-9]+", words) if w]
    return bool(SECRET_WORDS & set(parts)) or any(
        p in SECRET_PAIRS for p in zip(parts, parts[1:], strict=False)
    )


def test_secret_detector_itself() -> None:
    assert _secretish("AWS_SECRET_ACCESS_KEY") and _secretish("HF_TOKEN")
    assert _secretish("dbPassword") and _secretish("api_key")
    assert not _secretish("TOKENIZERS_PARALLELISM") and not _secretish("key")
    assert not _secretish("serviceAccountName") and not _secretish("HF_HUB_OFFLINE")


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_no_secret_values(path: Path) -> None:
    for doc in _all_docs(path):
        assert doc.get("kind") != "Secret", f"{_rel(path)}: do not ship a Secret"
        for where, key, value in _walk(doc):
            scalar = isinstance(value, (str, int, float)) and not isinstance(value, bool)
            if isinstance(key, str) and _secretish(key) and scalar and str(value):
                pytest.fail(f"{_rel(path)} {where}: literal value for a secret-like key")
            if isinstance(value, dict) and "value" in value and "name" in value:
                # a Kubernetes env entry: secrets must come through valueFrom/secretKeyRef
                assert not _secretish(str(value["name"])), f"{_rel(path)} {where}: env secret"


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER.rglob("*") if p.is_file()), ids=_rel)
def test_no_secret_text(path: Path) -> None:
    text = path.read_text(encoding="utf-8", errors="replace")
    for pattern in SECRET_TEXT:
        m = pattern.search(text)
        assert m is None, f"{_rel(path)}: looks like a credential: {m.group(0)[:12]}..."


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_nothing_open_to_the_world(path: Path) -> None:
    for doc in _all_docs(path):
        assert doc.get("kind") != "Ingress", f"{_rel(path)}: no Ingress by default"
        for where, key, value in _walk(doc):
            here = f"{_rel(path)} {where}"
            if key in {"type", "serviceType"}:
                assert value not in {"LoadBalancer", "NodePort"}, f"{here}: {value}"
            if key == "hostNetwork":
                assert value is not True, f"{here}: hostNetwork"
        for s in _strings(doc):
            assert "0.0.0.0/0" not in s and "::/0" not in s, f"{_rel(path)}: world-open {s!r}"
