"""Benchmark: factored SVD merge vs PEFT's dense SVD merge, and a 1000-target bulk merge.

    python bench/merge.py            # full: 4096² single module + 1000 targets × 64 modules
    python bench/merge.py --quick    # small shapes, seconds

Anchor: PEFT's `add_weighted_adapter(combination_type="svd")` on the same adapters, timed in
the same run. Prints a table and writes JSON (default bench/results/merge.json).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from common import write_result
from peft import LoraConfig, get_peft_model

from ray_twist.merge import FactorStack, merge_lora_factors


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def single_module(d: int, n_sources: int, r: int, q: int, repeats: tuple[int, int]) -> dict:
    """One d×d module: PEFT's dense-SVD merge vs the factored merge (QR included), each the
    best of `repeats` (PEFT, ours) calls; the first calls' ratio is reported too."""
    torch.manual_seed(0)
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(d, d, bias=False)),
        LoraConfig(r=r, lora_alpha=r, target_modules=["0"], init_lora_weights=False),
    )
    names = [f"s{i}" for i in range(n_sources)]
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(r=r, lora_alpha=r, target_modules=["0"],
                                           init_lora_weights=False))  # fmt: skip
    layer = model.base_model.model[0]
    names[0] = "default"
    weights = torch.rand(n_sources, generator=torch.Generator().manual_seed(1))

    peft_times = []
    for i in range(repeats[0]):  # best of a few: both sides timed the same way
        start = time.perf_counter()
        model.add_weighted_adapter(names, weights.tolist(), f"merged{i}", combination_type="svd",
                                   svd_rank=q)  # fmt: skip
        peft_times.append(time.perf_counter() - start)
    peft_delta = layer.get_delta_weight("merged0")

    a_list = [layer.lora_A[n].weight.detach() for n in names]
    b_list = [layer.lora_B[n].weight.detach() * layer.scaling[n] for n in names]
    ours_times = []
    for _ in range(repeats[1]):
        start = time.perf_counter()
        a_t, b_t = merge_lora_factors(a_list, b_list, weights.unsqueeze(0), q)
        ours_times.append(time.perf_counter() - start)
    peft_s, ours_s = min(peft_times), min(ours_times)
    rel = float((b_t[0] @ a_t[0] - peft_delta).norm() / peft_delta.norm())
    return {"d": d, "n_sources": n_sources, "r": r, "q": q, "peft_dense_svd_s": peft_s,
            "factored_s": ours_s, "factored_first_call_s": ours_times[0],
            "peft_times_s": peft_times, "factored_times_s": ours_times,
            "speedup": peft_s / ours_s, "speedup_first_calls": peft_times[0] / ours_times[0],
            "rel_error": rel}  # fmt: skip


def bulk(d: int, n_sources: int, r: int, q: int, n_targets: int, n_modules: int,
         chunk: int) -> dict:  # fmt: skip
    """T targets × M modules, streamed in target chunks; outputs checksummed and dropped."""
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(n_targets, n_sources, generator=g)
    rss_before = _max_rss_mb()
    qr_s = merge_s = 0.0
    checksum = 0.0
    for _ in range(n_modules):
        a_list = [torch.randn(r, d, generator=g) / d**0.5 for _ in range(n_sources)]
        b_list = [torch.randn(d, r, generator=g) / r for _ in range(n_sources)]
        start = time.perf_counter()
        stack = FactorStack.from_factors(a_list, b_list)
        qr_s += time.perf_counter() - start
        start = time.perf_counter()
        for lo in range(0, n_targets, chunk):
            a_t, b_t = stack.merge_svd(weights[lo : lo + chunk], q)
            checksum += float(a_t.sum() + b_t.sum())
        merge_s += time.perf_counter() - start
    total = qr_s + merge_s
    return {"d": d, "n_sources": n_sources, "r": r, "q": q, "targets": n_targets,
            "modules": n_modules, "chunk": chunk, "qr_s": qr_s, "merge_s": merge_s,
            "total_s": total, "targets_per_s": n_targets / total,
            "peak_rss_growth_mb": _max_rss_mb() - rss_before, "checksum": checksum}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--out", default="bench/results/merge.json")
    parser.add_argument("--single-only", action="store_true", help="skip the 1000-target bulk")
    args = parser.parse_args()
    if args.quick:
        single = single_module(d=512, n_sources=4, r=8, q=8, repeats=(2, 7))
    else:
        single = single_module(d=4096, n_sources=8, r=16, q=16, repeats=(2, 7))

    print(f"\nSingle {single['d']}x{single['d']} module, N={single['n_sources']} r={single['r']} "
          f"q={single['q']}")  # fmt: skip
    print(f"  {'PEFT dense SVD (anchor)':<28}{single['peft_dense_svd_s']:>10.3f} s")
    print(f"  {'factored SVD (QR incl.)':<28}{single['factored_s']:>10.4f} s")
    print(f"  {'speed-up (best calls)':<28}{single['speedup']:>10.0f} x   (goal >= 500x)")
    print(f"  {'speed-up (first calls)':<28}{single['speedup_first_calls']:>10.0f} x")
    print(f"  {'relative error vs PEFT':<28}{single['rel_error']:>10.2e}   (goal <= 1e-4)",
          flush=True)  # fmt: skip
    result: dict = {"torch_threads": torch.get_num_threads(), "single_module": single}
    if not args.single_only:
        result["bulk"] = _print_bulk(args.quick)
    write_result(args.out, result)


def _print_bulk(quick: bool) -> dict:
    if quick:
        many = bulk(d=512, n_sources=4, r=8, q=8, n_targets=100, n_modules=4, chunk=50)
    else:
        many = bulk(d=4096, n_sources=8, r=16, q=16, n_targets=1000, n_modules=64, chunk=250)
    print(f"\nBulk: {many['targets']} targets x {many['modules']} modules of "
          f"{many['d']}x{many['d']}")  # fmt: skip
    print(f"  {'QR (once per pool)':<28}{many['qr_s']:>10.2f} s")
    print(f"  {'batched core SVD + outputs':<28}{many['merge_s']:>10.2f} s")
    print(f"  {'total':<28}{many['total_s']:>10.2f} s   (goal <= 120 s)")
    print(f"  {'targets/s':<28}{many['targets_per_s']:>10.2f}")
    print(f"  {'peak RSS growth':<28}{many['peak_rss_growth_mb']:>10.0f} MB")
    return many


if __name__ == "__main__":
    main()
