"""Batched multi-target merges: equal to single merges, 1000 targets, the Ray job entry."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel

from ray_twist.backbone import load_backbone
from ray_twist.initialise import merge_weighted
from ray_twist.lora import read_adapter
from ray_twist.pool import Pool, pool_merge_sources

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import merge_targets as merge_targets_job  # noqa: E402


def _delta(factors: dict) -> dict:
    return {m: b @ a for m, (a, b) in factors.items()}


def test_batched_merge_equals_single_merges(t5_pool, tmp_path) -> None:
    pool = Pool.open(t5_pool[0])
    sources = pool_merge_sources(pool)
    g = torch.Generator().manual_seed(0)
    rows = [dict(zip(pool.sources, map(float, torch.rand(3, generator=g)), strict=True))
            for _ in range(7)]  # fmt: skip
    uris = [str(tmp_path / f"t{i}") for i in range(7)]
    merge_weighted(sources, uris, rows, rank=3, chunk_size=3, progress=False)  # 3 chunks
    for uri, row in zip(uris, rows, strict=True):
        [single] = sources.merge([row], 3)
        batched = read_adapter(uri).modules
        for module, delta in _delta(single).items():
            got = batched[module][1] @ batched[module][0]
            assert torch.allclose(got, delta, atol=1e-6, rtol=1e-5), (uri, module)


def test_thousand_targets_through_the_ray_job(t5_pool, ray_session, tmp_path) -> None:
    pool_uri, base = t5_pool
    pool = Pool.open(pool_uri)
    g = torch.Generator().manual_seed(1)
    table = tmp_path / "targets.jsonl"
    with table.open("w") as f:
        for i in range(1000):
            w = torch.rand(len(pool.sources), generator=g).tolist()
            f.write(
                json.dumps(
                    {"name": f"t{i:04d}", "weights": dict(zip(pool.sources, w, strict=True))}
                )
                + "\n"
            )
    config = tmp_path / "job.yaml"
    out = tmp_path / "out"
    config.write_text(yaml.safe_dump({"pool": pool_uri, "targets": str(table), "out": str(out),
                                      "rank": 2, "chunk_size": 256, "dtype": "bf16"}))  # fmt: skip
    assert merge_targets_job.main(["--config", str(config)]) == 0
    dirs = sorted(out.iterdir())
    assert len(dirs) == 1000
    model = PeftModel.from_pretrained(load_backbone(base).model, str(dirs[0]), adapter_name="a0")
    for i, adapter_dir in enumerate(dirs[1:], start=1):  # every adapter loads through PEFT
        model.load_adapter(str(adapter_dir), adapter_name=f"a{i}")
        model.delete_adapter(f"a{i}")
    assert read_adapter(dirs[-1]).config["r"] == 2


def test_job_config_errors_name_the_key(tmp_path, capsys) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"pool": "p", "targets": "t", "out": "o", "rank": 0}))
    assert merge_targets_job.main(["--config", str(config)]) == 2
    assert "bad.yaml: rank" in capsys.readouterr().err


def _tensors(uri: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(uri / "adapter_model.safetensors"))


def _same_deltas(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    """Per module B·A equal to float rounding: the factors of a top-q SVD are unique only up
    to signs and rotations, so slightly different weights may flip them."""
    for key in (k for k in want if "lora_A" in k):
        b = key.replace("lora_A", "lora_B")
        delta_got, delta_want = (t[b].double() @ t[key].double() for t in (got, want))
        if not torch.allclose(delta_got, delta_want, rtol=1e-4, atol=1e-6):
            return False
    return True


def test_distributed_merge_targets_equals_in_process_and_resumes(
    t5_pool, ray_session, tmp_path
) -> None:
    """Chunks as parallel Ray tasks write the in-process adapters, to float rounding (other
    processes may sum in another order; targets keyed on Ray Data: the same keys up to
    float rounding of the actors' thread count). After one
    adapter is deleted, one truncated, one's record garbled and a killed writer's staging
    dir left behind, a re-run redoes those three only, as the uninterrupted run did."""
    from ray_twist.data import make_task, write_task_jsonl
    from ray_twist.initialise import RETRIEVAL_FILE, TargetSpec, merge_targets

    pool = Pool.open(t5_pool[0])
    g = torch.Generator().manual_seed(2)
    specs = [TargetSpec(f"w{i:02d}", dict(zip(pool.sources, torch.rand(3, generator=g).tolist(),
                                                strict=True))) for i in range(10)]  # fmt: skip
    for i, style in enumerate(["pirate", "formal"]):
        data = write_task_jsonl(make_task(style, 6, seed=9 + i), tmp_path / f"{style}.jsonl")
        specs.insert(3 * i, TargetSpec(f"d-{style}", data=data))
    ref, out = tmp_path / "ref", tmp_path / "out"
    merge_targets(pool, specs, str(ref), 2, chunk_size=3)
    merge_targets(pool, specs, str(out), 2, chunk_size=3, concurrency=2)
    first = {s.name: _tensors(out / s.name) for s in specs}
    for spec in specs:
        want, got = _tensors(ref / spec.name), first[spec.name]
        assert got.keys() == want.keys()
        if spec.weights is not None:  # the same weights; BLAS may sum in another order
            assert all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7) for k in want), (
                spec.name,
                max((got[k].float() - want[k].float()).abs().max().item() for k in want),
            )
        else:
            assert _same_deltas(got, want), spec.name
            w_ref = json.loads((ref / spec.name / RETRIEVAL_FILE).read_text())["weights"]
            w_out = json.loads((out / spec.name / RETRIEVAL_FILE).read_text())["weights"]
            assert w_out == pytest.approx(w_ref, rel=1e-5, abs=1e-7)
    inode = {s.name: (out / s.name / RETRIEVAL_FILE).stat().st_ino for s in specs}
    shutil.rmtree(out / "w00")
    (out / ".w00.staging").mkdir()  # a writer killed mid-target: never mistaken for output
    weights = out / "d-formal" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    (out / "w05" / RETRIEVAL_FILE).write_text("{not json")
    merge_targets(pool, specs, str(out), 2, chunk_size=3, concurrency=2)
    # d-formal is merged alone now: as an in-process merge of it alone (in a batch of other
    # targets a module whose q-th and (q+1)-th singular values nearly tie may truncate to
    # another subspace at float rounding)
    alone = tmp_path / "alone"
    merge_targets(pool, [s for s in specs if s.name == "d-formal"], str(alone), 2)
    for spec in specs:
        got, want = _tensors(out / spec.name), first[spec.name]
        if spec.name == "d-formal":
            assert _same_deltas(got, _tensors(alone / spec.name))
        else:
            assert all(torch.equal(got[k], want[k]) for k in want), spec.name
    rewritten = {s.name for s in specs
                 if (out / s.name / RETRIEVAL_FILE).stat().st_ino != inode[s.name]}  # fmt: skip
    assert rewritten - {"w00"} == {"w05", "d-formal"}  # w00's new record may reuse the inode
    assert (out / "w00").is_dir() and not (out / ".w00.staging").exists()
