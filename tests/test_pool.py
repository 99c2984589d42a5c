"""The weight pool on real files and a real S3-compatible server (moto, on loopback)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from ray_twist import storage
from ray_twist.backbone import default_lora_targets, fan_in_fan_out, load_backbone
from ray_twist.features import TaskKey
from ray_twist.pool import (
    Pool,
    PoolCorruptError,
    PoolMismatchError,
    SourceEntry,
    add_sources,
    cluster_keys,
)

DIM = 8


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
    real_write = storage.write_bytes_atomic

    def die_at_commit(target: str, data: bytes) -> None:
        if target.endswith("pool.json"):
            raise KeyboardInterrupt("killed before the commit")
        real_write(target, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", die_at_commit)
    with pytest.raises(KeyboardInterrupt):
        add_sources(uri, entries(adapters, "a", "b", seed=5), tiny_backbones["t5"])
    monkeypatch.undo()
    assert (tmp_path / "pool" / "keys.g000002.parquet").exists()  # data files were written
    pool = Pool.open(uri)
    assert pool.generation == 1 and pool.sources == ["a"]
    np.testing.assert_allclose(pool.style_keys[0], key(0).style_key, atol=1e-6)
    assert pool.load_factors("a")

    # the next writer commits over the debris; a reader of the previous generation still works
    add_sources(uri, entries(adapters, "b"), tiny_backbones["t5"])
    assert Pool.open(uri).sources == ["a", "b"]
    assert reader.load_factors("a") and reader.adapter_dir("a")


def test_old_generations_are_collected(adapters, tiny_backbones, tmp_path) -> None:
    root = tmp_path / "pool"
    for i, name in enumerate(["a", "a", "b"]):
        add_sources(root, entries(adapters, name, seed=i), tiny_backbones["t5"])
    assert sorted(p.name for p in root.glob("keys.*")) == [
        "keys.g000002.parquet",
        "keys.g000003.parquet",
    ]
    assert len(list((root / "sources" / "a").iterdir())) == 1  # same content → same dir


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
    flip_byte(root / "keys.g000001.parquet")
    with pytest.raises(PoolCorruptError, match=r"keys\.g000001\.parquet"):
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


def test_s3_round_trip(adapters, tiny_backbones, monkeypatch, tmp_path) -> None:
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

        uri = "s3://bucket/pool"
        add_sources(uri, entries(adapters, "a"), tiny_backbones["t5"])
        add_sources(uri, entries(adapters, "b", "c", seed=1), tiny_backbones["t5"])
        pool = Pool.open(uri)
        assert pool.generation == 2 and pool.sources == ["a", "b", "c"]
        assert json.loads(storage.read_bytes(f"{uri}/pool.json"))["generation"] == 2
        local = pool.adapter_dir("b", local_cache_dir=tmp_path / "cache")
        assert Path(local, "adapter_model.safetensors").is_file()
        assert pool.adapter_dir("b", local_cache_dir=tmp_path / "cache") == local  # cached
        for rel in ("adapter_model.safetensors", "adapter_config.json"):
            assert Path(local, rel).read_bytes() == Path(adapters["b"], rel).read_bytes()
        assert set(pool.load_factors("b")) == set(pool.load_factors("c"))
        add_sources(uri, entries(adapters, "a", seed=7), tiny_backbones["t5"])  # keys only
        assert Pool.open(uri).generation == 3
        assert not storage.exists(f"{uri}/keys.g000001.parquet")  # collected on S3 too
        assert storage.exists(f"{uri}/keys.g000002.parquet")
    finally:
        server.stop()


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
