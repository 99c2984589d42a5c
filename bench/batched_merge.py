"""Benchmark: the batched multi-target merge job, writing one PEFT adapter per target.

    python bench/batched_merge.py                       # 1000 targets × 64 LLaMA-7B q/v modules
    python bench/batched_merge.py --quick               # small shapes, seconds
    python bench/batched_merge.py --device cuda         # the same on a GPU, vs CPU in-run

Sources are random LoRA factors of LLaMA-7B q_proj/v_proj shape (4096×4096, 32 layers →
64 modules, N=8 sources of r=16), merged at q=16 through `initialise.merge_weighted` —
the code behind `twist merge --targets` and jobs/merge_targets.py — and streamed to
storage as safetensors adapters in the chosen precision. Anchor: the same run on the CPU
(when --device cuda) or the arithmetic-only merge with outputs discarded (when on CPU), so
the ratio shows what writing costs. Ratios are of targets/s. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import write_result

from ray_twist.initialise import merge_weighted
from ray_twist.lora import AdapterFactors
from ray_twist.merge import MergeSources


def llama_like_sources(n_sources: int, r: int, d: int, layers: int) -> MergeSources:
    g = torch.Generator().manual_seed(0)
    modules = [f"base_model.model.model.layers.{i}.self_attn.{p}_proj"
               for i in range(layers) for p in ("q", "v")]  # fmt: skip
    template = {"r": r, "lora_alpha": r, "target_modules": ["q_proj", "v_proj"]}
    adapters = [
        AdapterFactors(
            template,
            {
                m: (torch.randn(r, d, generator=g) / d**0.5, torch.randn(d, r, generator=g) / r)
                for m in modules
            },
        )  # fmt: skip
        for _ in range(n_sources)
    ]
    return MergeSources([f"s{i}" for i in range(n_sources)], adapters)


def run(sources: MergeSources, n_targets: int, rank: int, device: str, dtype: torch.dtype,
        chunk: int, write: bool) -> dict:  # fmt: skip
    sources = MergeSources(sources.names, sources.adapters, device=device)
    weights = torch.rand(n_targets, len(sources.names), generator=torch.Generator().manual_seed(1))
    rows = [dict(zip(sources.names, map(float, w), strict=True)) for w in weights]
    out = Path(tempfile.mkdtemp(prefix="bench_merge_"))
    start = time.perf_counter()
    if write:
        merge_weighted(sources, [str(out / f"t{i:05d}") for i in range(n_targets)], rows, rank,
                       chunk_size=chunk, out_dtype=dtype, progress=False)  # fmt: skip
    else:
        for lo in range(0, n_targets, chunk):
            for _, a_t, b_t in sources.merge_modules(weights[lo : lo + chunk], rank):
                float(a_t.sum() + b_t.sum())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shutil.rmtree(out, ignore_errors=True)
    return {"device": device, "dtype": str(dtype).removeprefix("torch."), "write": write,
            "targets": n_targets, "modules": len(sources.modules), "seconds": seconds,
            "targets_per_s": n_targets / seconds, "bytes_written": size}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--targets", type=int, default=None)
    parser.add_argument(
        "--cpu-targets",
        type=int,
        default=None,
        help="targets for the CPU anchor when --device is a GPU [same]",
    )
    parser.add_argument("--out", default="bench/results/batched_merge.json")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    d, layers, targets, chunk = (512, 4, 100, 50) if args.quick else (4096, 32, 1000, 32)
    targets = args.targets or targets
    sources = llama_like_sources(n_sources=8, r=16, d=d, layers=layers)
    runs = []
    if args.device == "cpu":
        runs.append(run(sources, targets, 16, "cpu", dtype, chunk, write=False))
        runs.append(run(sources, targets, 16, "cpu", dtype, chunk, write=True))
    else:
        cpu_targets = args.cpu_targets or targets
        runs.append(run(sources, cpu_targets, 16, "cpu", dtype, chunk, write=True))
        run(sources, min(targets, 64), 16, args.device, dtype, chunk, write=True)  # warm-up
        runs.append(run(sources, targets, 16, args.device, dtype, chunk, write=False))
        runs.append(run(sources, targets, 16, args.device, dtype, chunk, write=True))
    anchor = runs[0]["targets_per_s"]
    print(f"\nBatched merge: {targets} targets x {runs[0]['modules']} modules of {d}x{d}, "
          f"N=8 r=16 -> q=16, outputs {args.dtype}")  # fmt: skip
    print(f"  {'device':<8}{'writes':<8}{'seconds':>10}{'targets/s':>12}{'GB written':>12}"
          f"{'vs anchor':>11}")  # fmt: skip
    for r in runs:
        print(f"  {r['device']:<8}{r['write']!s:<8}{r['seconds']:>10.2f}"
              f"{r['targets_per_s']:>12.2f}{r['bytes_written'] / 1e9:>12.2f}"
              f"{r['targets_per_s'] / anchor:>10.2f}x")  # fmt: skip
    write_result(args.out, {"runs": runs, "anchor": "first row"})


if __name__ == "__main__":
    main()
