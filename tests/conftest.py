"""Shared fixtures: one Ray instance per session, tiny backbones built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from ray_twist.backbone import TINY_KINDS, build_tiny_backbone  # noqa: E402


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths of tiny random T5, GPT-2, LLaMA and BERT2BERT models, saved once."""
    root = tmp_path_factory.mktemp("backbones")
    return {kind: build_tiny_backbone(kind, root / kind) for kind in TINY_KINDS}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole suite. 4 logical CPUs on 2 cores so fractional-CPU
    trainers really overlap; tests ask for fractions of these."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=int(os.environ.get("RAY_TWIST_TEST_CPUS", "4")),
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def featurizer():
    """The default (packaged MiniLM) featurizer, loaded once: what pools key with."""
    from ray_twist.features import Featurizer

    return Featurizer(device="cpu")


POOL_STYLES = ["pirate", "sailor", "formal"]


@pytest.fixture(scope="session")
def t5_pool(tiny_backbones, tmp_path_factory) -> tuple[str, str]:
    """(pool URI, base model path): three random tiny-T5 LoRAs with synthetic corpora,
    added through `twist pool add`."""
    from ray_twist.backbone import save_random_lora
    from ray_twist.cli import main
    from ray_twist.data import make_task, write_task_jsonl

    root = tmp_path_factory.mktemp("t5_pool")
    base = tiny_backbones["t5"]
    for i, style in enumerate(POOL_STYLES):
        save_random_lora(base, root / f"ad_{style}", seed=i, rank=4)
        corpus = write_task_jsonl(make_task(style, 20, seed=i), root / f"{style}.jsonl")
        code = main(["pool", "add", "--pool", str(root / "pool"), "--adapter",
                     str(root / f"ad_{style}"), "--corpus", corpus, "--name", style])  # fmt: skip
        assert code == 0
    return str(root / "pool"), base


@pytest.fixture(scope="session")
def keyed_pool(tiny_backbones, featurizer, tmp_path_factory) -> tuple[str, str]:
    """(pool URI, base model path): three random rank-4 tiny-T5 LoRAs whose keys make
    retrieval decisive (`retrieval_reference.keyed_entries`), for tests of the weights."""
    from retrieval_reference import keyed_entries

    from ray_twist.backbone import save_random_lora
    from ray_twist.pool import add_sources

    root = tmp_path_factory.mktemp("keyed_pool")
    base = tiny_backbones["t5"]
    adapters = {name: save_random_lora(base, root / name, seed=seed, rank=4)
                for seed, name in enumerate(["k-a", "k-b", "k-c"], start=5)}  # fmt: skip
    add_sources(root / "pool", keyed_entries(featurizer, adapters), base_model=base)
    return str(root / "pool"), base
