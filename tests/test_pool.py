"""The weight pool on real files and a real S3-compatible server (moto, on loopback): round
trips, checksums, refusals, killed and concurrent writers, garbage collection."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from ray_twist import storage
from ray_twist.backbone import default_lora_targets, fan_in_fan_out, load_backbone
from ray_twist.features import TaskKey
from ray_twist.pool import (
    Pool,
    PoolConflictError,
    PoolCorruptError,
    PoolGenerationGoneError,
    PoolMismatchError,
    SourceEntry,
    add_sources,
    cluster_keys,
)

DIM = 8
ROOT = Path(__file__).resolve().parents[1]


def make_adapter(base: str, out: Path, seed: int, targets: list[str] | None = None) -> str:
    """A PEFT LoRA dir with random (non-zero) A and B, as a trained source would have."""
    model = load_backbone(base).model
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets or default_lora_targets(model.config),
        fan_in_fan_out=fan_in_fan_out(model.config),
        init_lora_weights=False,
    )
    torch.manual_seed(seed)
    get_peft_model(model, config).save_pretrained(str(out))
    return str(out)


def key(seed: int, n: int = 10) -> TaskKey:
    rng = np.random.default_rng(seed)
    style, inp = rng.normal(size=(2, DIM))
    return TaskKey(style / np.linalg.norm(style), inp / np.linalg.norm(inp), n)


@pytest.fixture(scope="module")
def adapters(tiny_backbones: dict[str, str], tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    t5, gpt2 = tiny_backbones["t5"], tiny_backbones["gpt2"]
    return {
        "a": make_adapter(t5, root / "a", 1),
        "b": make_adapter(t5, root / "b", 2),
        "c": make_adapter(t5, root / "c", 3),
        "q_only": make_adapter(t5, root / "q_only", 4, targets=["q"]),
        "gpt2": make_adapter(gpt2, root / "gpt2", 5),
    }


def entries(adapters: dict[str, str], *names: str, seed: int = 0) -> list[SourceEntry]:
    return [
        SourceEntry(n, adapters[n], key(seed + i), {"bleu": 0.5}, f"hash-{n}")
        for i, n in enumerate(names)
    ]


def test_round_trip_local(adapters, tiny_backbones, tmp_path) -> None:
    uri = str(tmp_path / "pool")
    written = add_sources(uri, entries(adapters, "b", "a"), tiny_backbones["t5"])
    pool = Pool.open(uri)
    assert pool.generation == written.generation == 1
    assert pool.sources == ["a", "b"] and pool.base_model == tiny_backbones["t5"]
    assert pool.lora_config == {"fan_in_fan_out": False, "target_modules": ["q", "v"]}
    assert pool.source_layout("a")["r"] == 4 and pool.source_layout("a")["lora_alpha"] == 8
    assert pool.manifest["sources"]["a"]["metrics"] == {"bleu": 0.5}
    np.testing.assert_allclose(pool.style_keys[1], key(0).style_key, atol=1e-6)  # "b" got seed 0
    np.testing.assert_allclose(pool.input_keys[0], key(1).input_key, atol=1e-6)
    assert pool.source_cluster_keys().shape == (2, DIM)
    assert sorted(sum(pool.cluster_members, [])) == ["a", "b"]
    assert pickle.loads(pickle.dumps(pool)).sources == pool.sources  # ships to Ray workers
    # the stored dir is a PEFT adapter dir that PEFT loads unchanged
    base = load_backbone(tiny_backbones["t5"]).model
    PeftModel.from_pretrained(base, pool.adapter_dir("a"))

    # a second commit adds one source and replaces "b"; generation moves on
    replaced = SourceEntry("b", adapters["c"], key(9, n=3), {}, "new")
    pool2 = add_sources(uri, [replaced, *entries(adapters, "c")], tiny_backbones["t5"])
    assert pool2.generation == Pool.open(uri).generation == 2
    assert pool2.sources == ["a", "b", "c"]
    assert pool2.manifest["sources"]["b"]["n_examples"] == 3
    np.testing.assert_allclose(Pool.open(uri).style_keys[1], key(9).style_key, atol=1e-6)


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
def test_load_factors_reproduce_peft_delta(kind, adapters, tiny_backbones, tmp_path) -> None:
    name = "a" if kind == "t5" else "gpt2"
    pool = add_sources(tmp_path / "pool", entries(adapters, name), tiny_backbones[kind])
    factors = pool.load_factors(name)
    peft_model = PeftModel.from_pretrained(
        load_backbone(tiny_backbones[kind]).model, pool.adapter_dir(name)
    )
    assert len(factors) == {"t5": 12, "gpt2": 2}[kind]  # every LoRA layer of the tiny model
    for module, (a, b) in factors.items():
        layer = peft_model.get_submodule(module)
        delta = layer.get_delta_weight("default")
        expected = delta.T if pool.lora_config["fan_in_fan_out"] else delta
        assert a.shape[0] == b.shape[1] == 4
        torch.testing.assert_close(b @ a, expected)


def test_killed_write_leaves_previous_generation(adapters, tiny_backbones, tmp_path, monkeypatch):
    uri = str(tmp_path / "pool")
    add_sources(uri, entries(adapters, "a"), tiny_backbones["t5"])
    reader = Pool.open(uri)
    real_create = storage.create_exclusive

    def die_at_commit(target: str, data: bytes) -> bool:
        raise KeyboardInterrupt("killed before the commit")

    monkeypatch.setattr(storage, "create_exclusive", die_at_commit)
    with pytest.raises(KeyboardInterrupt):
        add_sources(uri, entries(adapters, "a", "b", seed=5), tiny_backbones["t5"])
    monkeypatch.undo()
    assert list((tmp_path / "pool").glob("keys.g000002.*.parquet"))  # data files were written
    pool = Pool.open(uri)
    assert pool.generation == 1 and pool.sources == ["a"]
    np.testing.assert_allclose(pool.style_keys[0], key(0).style_key, atol=1e-6)
    assert pool.load_factors("a")

    # the next writer commits over the debris; a reader of the previous generation still works
    add_sources(uri, entries(adapters, "b"), tiny_backbones["t5"])
    assert Pool.open(uri).sources == ["a", "b"]
    assert reader.load_factors("a") and reader.adapter_dir("a")

    # killed after its commit, before the pool.json copy: the commit stands, nothing wedges
    def die_after_commit(target: str, data: bytes) -> bool:
        real_create(target, data)
        raise KeyboardInterrupt("killed after the commit")

    monkeypatch.setattr(storage, "create_exclusive", die_after_commit)
    with pytest.raises(KeyboardInterrupt):
        add_sources(uri, entries(adapters, "c", seed=3), tiny_backbones["t5"])
    monkeypatch.undo()
    assert json.loads((tmp_path / "pool" / "pool.json").read_text())["generation"] == 2
    assert Pool.open(uri).generation == 3 and Pool.open(uri).sources == ["a", "b", "c"]
    assert add_sources(uri, entries(adapters, "a", seed=4), tiny_backbones["t5"]).generation == 4
    assert json.loads((tmp_path / "pool" / "pool.json").read_text())["generation"] == 4


def test_gc_keeps_the_newest_k_generations(adapters, tiny_backbones, tmp_path) -> None:
    """K = 3 by default: a 4th commit drops generation 1 (manifest, keys, its adapter dir)
    and its reader is told the generation is gone. Unnamed files younger than the grace
    period (a concurrent writer's, not yet committed) survive until they are old."""
    root, t5 = tmp_path / "pool", tiny_backbones["t5"]

    def commit(adapter: str, seed: int, **kw: Any) -> Pool:  # source "x" gets this content
        return add_sources(root, [SourceEntry("x", adapters[adapter], key(seed))], t5, **kw)

    first = commit("a", 0, gc_min_age_s=0)
    for adapter, seed in [("b", 1), ("c", 2), ("c", 3)]:
        commit(adapter, seed, gc_min_age_s=0)
    kept = [Pool.open(root, generation=g) for g in (2, 3, 4)]
    assert manifests(root) == ["g000002.json", "g000003.json", "g000004.json"]
    named = {p.manifest["files"][kind]["path"] for p in kept for kind in ("keys", "clusters")}
    assert {p.name for p in root.glob("*.parquet")} == named and len(named) == 6
    dirs = {p.manifest["sources"]["x"]["dir"] for p in kept}
    assert {f"sources/x/{d.name}" for d in (root / "sources" / "x").iterdir()} == dirs
    assert first.manifest["sources"]["x"]["dir"] not in dirs  # a's dir went with generation 1
    with pytest.raises(PoolGenerationGoneError, match="generation 1 is gone.*newest is 4"):
        first.load_factors("x")
    with pytest.raises(PoolGenerationGoneError, match="generation 1 is gone"):
        Pool.open(root, generation=1)
    assert kept[0].load_factors("x").keys() == Pool.open(root).load_factors("x").keys()

    # K is recorded in the pool; young files survive a collection, old ones go
    debris = root / "keys.g000009.0123456789abcdef.parquet"
    debris.write_bytes(b"a concurrent writer's, not yet committed")
    commit("a", 5, keep_generations=2)  # default grace: generations 2 and 3 are young
    assert Pool.open(root).manifest["keep_generations"] == 2
    assert manifests(root) == ["g000004.json", "g000005.json"]
    assert debris.exists() and len(list(root.glob("keys.*"))) == 4 + 1  # 2, 3 young
    an_hour_ago = time.time() - 3601
    for path in [debris, *root.glob("*.parquet"), *(root / "sources").rglob("*")]:
        os.utime(path, (an_hour_ago, an_hour_ago))
    commit("b", 6)
    assert not debris.exists() and manifests(root) == ["g000005.json", "g000006.json"]
    assert len(list(root.glob("keys.*"))) == 2
    assert len(list((root / "sources" / "x").iterdir())) == 2  # a (gen 5) and b (gen 6)


def test_format_1_pool_opens_and_upgrades(adapters, tiny_backbones, tmp_path) -> None:
    """A pool written before per-generation manifests (only pool.json, format 1, keys files
    named by generation alone) opens, and its next commit records its generation under
    manifests/, so collection keeps its files while it is among the newest K."""
    root, t5 = tmp_path / "pool", tiny_backbones["t5"]
    manifest = add_sources(root, entries(adapters, "a"), t5).manifest
    for file in manifest["files"].values():  # rewrite it as the old writer laid it out
        legacy = file["path"].rsplit(".", 2)[0] + ".parquet"
        (root / file["path"]).rename(root / legacy)
        file["path"] = legacy
    shutil.rmtree(root / "manifests")
    del manifest["keep_generations"]
    (root / "pool.json").write_text(json.dumps({**manifest, "format_version": 1}))
    old = Pool.open(root)
    assert old.generation == 1 and old.manifest["files"]["keys"]["path"] == "keys.g000001.parquet"
    add_sources(root, entries(adapters, "b"), t5, gc_min_age_s=0)
    assert manifests(root) == ["g000001.json", "g000002.json"]
    assert (root / "keys.g000001.parquet").exists() and old.load_factors("a")
    assert Pool.open(root).sources == ["a", "b"] and Pool.open(root).manifest["format_version"] == 2


def manifests(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "manifests").iterdir())


COMMIT_HELD = '''"""`twist ARGS` with the pool commit held: the writer marks that it has read the pool and
written its files (BARRIER/ready-NAME), then waits for BARRIER/go before committing."""
import sys
import time
from pathlib import Path

from ray_twist import storage
from ray_twist.cli import main

barrier, name = Path(sys.argv[1]), sys.argv[2]
real_create = storage.create_exclusive


def held(uri, data):
    (barrier / f"ready-{name}").touch()
    while not (barrier / "go").exists():
        time.sleep(0.05)
    return real_create(uri, data)


storage.create_exclusive = held
sys.exit(main(sys.argv[3:]))
'''


def test_two_pool_add_processes_one_commits(adapters, tiny_backbones, tmp_path) -> None:
    """Two `twist pool add` processes both read generation 1 and reach their commit (held
    there by a driver around the commit write), then go together: exactly one commits
    generation 2, the other exits 2 with one line naming the pool and both generations,
    and its retry commits generation 3."""
    from ray_twist.cli import main
    from ray_twist.data import make_task, write_task_jsonl

    t5, uri = tiny_backbones["t5"], tmp_path / "pool"
    style, inp = np.eye(384)[:2]  # the CLI's featurizer keys are 384-d
    add_sources(uri, [SourceEntry("a", adapters["a"], TaskKey(style, inp, 10))], t5)
    driver, barrier = tmp_path / "commit_held.py", tmp_path / "barrier"
    driver.write_text(COMMIT_HELD)
    barrier.mkdir()

    def add_args(name: str) -> list[str]:
        corpus = write_task_jsonl(
            make_task("pirate", 8, seed=ord(name)), tmp_path / f"{name}.jsonl"
        )
        return ["pool", "add", "--pool", str(uri), "--adapter", adapters[name], "--corpus", corpus,
                "--name", name, "--base-model", t5]  # fmt: skip

    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    writers = {
        name: subprocess.Popen(
            [sys.executable, str(driver), str(barrier), name, *add_args(name)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name in ("b", "c")
    }
    deadline = time.monotonic() + 300
    while not all((barrier / f"ready-{name}").exists() for name in writers):
        ended = {n: w.communicate() for n, w in writers.items() if w.poll() is not None}
        assert not ended and time.monotonic() < deadline, ended
        time.sleep(0.1)
    assert Pool.open(uri).generation == 1  # both have read it; neither has committed
    (barrier / "go").touch()
    done = {name: (w.wait(timeout=120), w.communicate()[1]) for name, w in writers.items()}
    [winner] = [name for name, (code, _) in done.items() if code == 0]
    [loser] = [name for name, (code, _) in done.items() if code == 2]
    errors = [line for line in done[loser][1].splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: pool {uri}: another writer committed generation 2 after this write read "
        "generation 1 (the pool is now at generation 2); nothing of this write was committed, "
        "retry it"
    ], done[loser][1]
    assert Pool.open(uri).sources == ["a", winner] and Pool.open(uri).generation == 2
    assert main(add_args(loser)) == 0  # the retry
    pool = Pool.open(uri)
    assert pool.generation == 3 and pool.sources == ["a", "b", "c"]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checksums_catch_flipped_bytes(adapters, tiny_backbones, tmp_path) -> None:
    root = tmp_path / "pool"
    pool = add_sources(root, entries(adapters, "a", "b"), tiny_backbones["t5"])
    weights = root / pool.manifest["sources"]["a"]["dir"] / "adapter_model.safetensors"
    flip_byte(weights)
    with pytest.raises(PoolCorruptError, match="adapter_model.safetensors"):
        Pool.open(root).load_factors("a")
    with pytest.raises(PoolCorruptError, match="adapter_model.safetensors"):
        Pool.open(root).adapter_dir("a")
    assert Pool.open(root).load_factors("b")
    [keys_file] = root.glob("keys.g000001.*.parquet")
    flip_byte(keys_file)
    with pytest.raises(PoolCorruptError, match=r"keys\.g000001\.[0-9a-f]{16}\.parquet"):
        Pool.open(root)


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "", ".hidden", "a b", "x\\y"])
def test_bad_names_refused(bad, adapters, tiny_backbones, tmp_path) -> None:
    entry = SourceEntry(bad, adapters["a"], key(0))
    with pytest.raises(ValueError, match="invalid source name"):
        add_sources(tmp_path / "pool", [entry], tiny_backbones["t5"])
    assert not (tmp_path / "pool").exists()


def test_pickle_files_refused(adapters, tiny_backbones, tmp_path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(adapters["a"], bad)
    (bad / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="safetensors only"):
        add_sources(tmp_path / "pool", [SourceEntry("x", bad, key(0))], tiny_backbones["t5"])


def test_mismatches_refused(adapters, tiny_backbones, tmp_path) -> None:
    uri = tmp_path / "pool"
    add_sources(uri, entries(adapters, "a"), tiny_backbones["t5"])
    with pytest.raises(PoolMismatchError, match="base model"):
        add_sources(uri, entries(adapters, "gpt2"), tiny_backbones["gpt2"])
    with pytest.raises(PoolMismatchError, match="gpt2/adapter_config.json names base_model"):
        add_sources(uri, entries(adapters, "gpt2"), tiny_backbones["t5"])
    anonymous = tmp_path / "gpt2"  # an adapter that names no base: its layer layout differs
    shutil.copytree(adapters["gpt2"], anonymous)
    config = json.loads((anonymous / "adapter_config.json").read_text())
    (anonymous / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": None})
    )
    with pytest.raises(PoolMismatchError, match="fan_in_fan_out"):
        add_sources(uri, [SourceEntry("g", anonymous, key(0))], tiny_backbones["t5"])
    with pytest.raises(PoolMismatchError, match="featurizer"):
        add_sources(uri, entries(adapters, "b"), tiny_backbones["t5"], featurizer="other")
    assert Pool.open(uri).generation == 1
    # other target modules are no mismatch: heterogeneous pools (tests/test_mixed_pool.py)
    assert add_sources(uri, entries(adapters, "q_only"), tiny_backbones["t5"]).generation == 2


@pytest.fixture
def s3_bucket(monkeypatch) -> Iterator[str]:
    """An S3-compatible server (moto, on loopback) with one bucket: yields "s3://bucket"."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for var, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(var, value)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bucket")
        yield "s3://bucket"
    finally:
        server.stop()


def test_s3_round_trip(adapters, tiny_backbones, s3_bucket, tmp_path) -> None:
    uri = f"{s3_bucket}/pool"
    add_sources(uri, entries(adapters, "a"), tiny_backbones["t5"])
    add_sources(uri, entries(adapters, "b", "c", seed=1), tiny_backbones["t5"])
    pool = Pool.open(uri)
    assert pool.generation == 2 and pool.sources == ["a", "b", "c"]
    assert json.loads(storage.read_bytes(f"{uri}/pool.json"))["generation"] == 2
    assert json.loads(storage.read_bytes(f"{uri}/manifests/g000002.json")) == pool.manifest
    local = pool.adapter_dir("b", local_cache_dir=tmp_path / "cache")
    assert Path(local, "adapter_model.safetensors").is_file()
    assert pool.adapter_dir("b", local_cache_dir=tmp_path / "cache") == local  # cached
    for rel in ("adapter_model.safetensors", "adapter_config.json"):
        assert Path(local, rel).read_bytes() == Path(adapters["b"], rel).read_bytes()
    assert set(pool.load_factors("b")) == set(pool.load_factors("c"))
    keys_2 = pool.manifest["files"]["keys"]["path"]
    keys_1 = Pool.open(uri, generation=1).manifest["files"]["keys"]["path"]
    add_sources(uri, entries(adapters, "a", seed=7), tiny_backbones["t5"],  # keys only
                keep_generations=2, gc_min_age_s=0)  # fmt: skip
    assert Pool.open(uri).generation == 3
    assert not storage.exists(f"{uri}/{keys_1}")  # collected on S3 too
    assert not storage.exists(f"{uri}/manifests/g000001.json")
    assert storage.exists(f"{uri}/{keys_2}")


def test_s3_conflict_one_commit_wins(adapters, tiny_backbones, s3_bucket, monkeypatch) -> None:
    """Two writers read generation 1, then both commit (held at a barrier in front of the
    conditional PUT, then let through one at a time): one commits generation 2, the other
    gets the conflict, and its retry commits generation 3."""
    uri, t5 = f"{s3_bucket}/shared-pool", tiny_backbones["t5"]  # moto keeps other tests' keys
    add_sources(uri, entries(adapters, "a"), t5)
    barrier, one_at_a_time = threading.Barrier(2, timeout=120), threading.Lock()
    real_create = storage.create_exclusive

    def together(target: str, data: bytes) -> bool:
        barrier.wait()  # both have read generation 1 and written their files
        with one_at_a_time:
            return real_create(target, data)

    monkeypatch.setattr(storage, "create_exclusive", together)
    results: dict[str, int | Exception] = {}

    def write(name: str) -> None:
        try:
            results[name] = add_sources(uri, entries(adapters, name, seed=3), t5).generation
        except Exception as exc:  # the loser's conflict, or a failure the test reports
            results[name] = exc

    threads = [threading.Thread(target=write, args=(name,)) for name in ("b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    monkeypatch.setattr(storage, "create_exclusive", real_create)  # (undo would drop the env)
    outcomes = sorted(str(r) if isinstance(r, int) else type(r).__name__ for r in results.values())
    assert outcomes == ["2", "PoolConflictError"], results
    [winner] = [name for name, r in results.items() if r == 2]
    [loser] = [name for name, r in results.items() if isinstance(r, PoolConflictError)]
    message = str(results[loser])
    assert f"pool {uri}" in message and "generation 2" in message and "generation 1" in message
    assert Pool.open(uri).sources == ["a", winner]
    assert add_sources(uri, entries(adapters, loser, seed=3), t5).generation == 3
    assert Pool.open(uri).sources == ["a", "b", "c"]


def test_cluster_two_obvious_groups() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, DIM))
    keys = np.concatenate([c + 0.05 * rng.normal(size=(4, DIM)) for c in centres])
    labels, centroids = cluster_keys(keys)
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-6)
    assert cluster_keys(keys, seed=3)[0].tolist() == labels.tolist()
    assert cluster_keys(keys, n_clusters=20)[0].tolist() == list(range(8))  # capped at N


def test_cluster_one_and_two_sources() -> None:
    a, b = np.eye(DIM)[:2]
    assert cluster_keys(a[None])[0].tolist() == [0]
    assert cluster_keys(np.stack([a, b]))[0].tolist() == [0, 1]
    assert cluster_keys(np.stack([a, a + 0.01 * b]))[0].tolist() == [0, 0]
    assert cluster_keys(np.stack([a, b]), n_clusters=1)[0].tolist() == [0, 0]
