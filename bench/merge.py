"""Benchmark: factored SVD merge vs PEFT's dense SVD merge, and a 1000-target bulk merge.

    python bench/merge.py            # full: 4096² single module + 1000 targets × 64 modules
    python bench/merge.py --quick    # small shapes, seconds
    python bench/merge.py --scale    # per-target time of top-k 8 merges, N = 8 … 1000 sources

Anchor: PEFT's `add_weighted_adapter(combination_type="svd")` on the same adapters, timed in
the same run. Prints a table and writes JSON (default bench/results/merge.json).
`--scale` is anchored on the N = 8 pool's per-target time in the same run (goal: flat,
≤ 1.2× at N = 1000), and writes bench/results/merge_scale.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from common import write_result
from peft import LoraConfig, get_peft_model

from ray_twist.lora import AdapterFactors
from ray_twist.merge import FactorStack, MergeSources, merge_lora_factors
from ray_twist.merge.subset import SPARSE_FRACTION
from ray_twist.retrieval import retrieval_scores


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
    # the floor: the two (T·q × k)(k × d) output projections alone, at this machine's
    # measured float32 GEMM rate (every other step is small beside them)
    k = min(d, n_sources * r)
    floor = n_targets * n_modules * 2 * (2 * d * k * q) / _gemm_flops()
    return {"d": d, "n_sources": n_sources, "r": r, "q": q, "targets": n_targets,
            "modules": n_modules, "chunk": chunk, "qr_s": qr_s, "merge_s": merge_s,
            "total_s": total, "targets_per_s": n_targets / total, "flop_floor_s": floor,
            "vs_floor": total / floor,
            "peak_rss_growth_mb": _max_rss_mb() - rss_before, "checksum": checksum}  # fmt: skip


def _gemm_flops(n: int = 2048) -> float:
    """This machine's float32 GEMM rate (FLOP/s, best of 3 n³ products), measured in-run."""
    x = torch.randn(n, n)
    return 2 * n**3 / _best(lambda: x @ x, 3)


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, LAPACK/OpenMP start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def scale_row(n: int, d: int, r: int, q: int, top_k: int, n_targets: int, full_up_to: int) -> dict:
    """One pool of N random sources (one d×d module): the one-time precomputations, then the
    best-of-5 per-target time of a top-k merge batch as `MergeSources` dispatches it, the
    subset path and (N ≤ full_up_to) the whole stack's path forced, and the error against
    the dense merge of one target's selected sources."""
    g = torch.Generator().manual_seed(n)
    adapters = [
        AdapterFactors({}, {"m": (torch.randn(r, d, generator=g) / d**0.5,
                                  torch.randn(d, r, generator=g) / r)})
        for _ in range(n)
    ]  # fmt: skip
    sources = MergeSources([f"s{i}" for i in range(n)], adapters)
    rng = np.random.default_rng(n)
    keys = rng.normal(size=(n, 32))
    weights = torch.from_numpy(
        retrieval_scores(rng.normal(size=(n_targets, 32)), None, keys, keys, lam=1.0,
                         top_k=top_k)
    ).float()  # fmt: skip
    start = time.perf_counter()
    sources.subset("m")
    subset_s = time.perf_counter() - start
    full_qr_s = None
    if n <= full_up_to:
        start = time.perf_counter()
        sources.stack("m")
        full_qr_s = time.perf_counter() - start
    rss_mb = _max_rss_mb()
    auto = _best(lambda: list(sources.merge_modules(weights, q)), 5) / n_targets
    subset = _best(lambda: sources.subset("m").merge_svd(weights, q), 5) / n_targets
    full = None
    if n <= full_up_to:
        full = _best(lambda: sources.stack("m").merge_svd(weights, q), 5) / n_targets
    [(_, a_t, b_t)] = list(sources.merge_modules(weights[:1], q))
    chosen = weights[0].nonzero().squeeze(1).tolist()
    delta = sum(float(weights[0, s]) * (adapters[s].modules["m"][1].double()
                                        @ adapters[s].modules["m"][0].double())
                for s in chosen)  # fmt: skip
    u, sv, vh = torch.linalg.svd(torch.as_tensor(delta))
    ref = (u[:, :q] * sv[:q]) @ vh[:q]
    rel = float(((b_t[0] @ a_t[0]).double() - ref).norm() / ref.norm())
    sparse = top_k <= SPARSE_FRACTION * n
    return {"n_sources": n, "path": "subset" if sparse else "full stack",
            "per_target_ms": auto * 1e3, "subset_ms": subset * 1e3,
            "full_stack_ms": None if full is None else full * 1e3,
            "subset_precompute_s": subset_s, "full_qr_s": full_qr_s,
            "max_rss_mb": rss_mb, "rel_error": rel}  # fmt: skip


def scale(d: int, r: int, q: int, top_k: int, ns: list[int], n_targets: int) -> dict:
    rows = [scale_row(n, d, r, q, top_k, n_targets, full_up_to=32) for n in ns]
    anchor = rows[0]["per_target_ms"]
    print(f"\nTop-{top_k} merge per target, one {d}x{d} module, r={r} q={q}, "
          f"{n_targets} targets per batch (anchor: N={rows[0]['n_sources']} in this run)")  # fmt: skip
    head = ("N", "path", "ms/target", "vs anchor", "subset ms", "full ms", "subset prep s",
            "full QR s", "rel err")  # fmt: skip
    print("  " + "".join(f"{h:>14}" for h in head))
    for row in rows:
        row["ratio"] = row["per_target_ms"] / anchor
        cells = [str(row["n_sources"]), row["path"], f"{row['per_target_ms']:.3f}",
                 f"{row['ratio']:.2f}x", f"{row['subset_ms']:.3f}",
                 "-" if row["full_stack_ms"] is None else f"{row['full_stack_ms']:.3f}",
                 f"{row['subset_precompute_s']:.2f}",
                 "-" if row["full_qr_s"] is None else f"{row['full_qr_s']:.3f}",
                 f"{row['rel_error']:.1e}"]  # fmt: skip
        print("  " + "".join(f"{c:>14}" for c in cells))
    print("  goal: flat, <= 1.2x the anchor at N = 1000", flush=True)
    return {"d": d, "r": r, "q": q, "top_k": top_k, "targets": n_targets, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--out", default="bench/results/merge.json")
    parser.add_argument("--single-only", action="store_true", help="skip the 1000-target bulk")
    parser.add_argument(
        "--scale",
        action="store_true",
        help="per-target top-k 8 merge time as the pool grows (N = 8 … 1000)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scale:
        ns = [8, 16, 32, 64] if args.quick else [8, 16, 32, 64, 512, 1000]
        d = 256 if args.quick else 1024
        result = scale(d=d, r=8, q=8, top_k=8, ns=ns, n_targets=256)
        result["torch_threads"] = torch.get_num_threads()
        out = (
            args.out if args.out != parser.get_default("out") else "bench/results/merge_scale.json"
        )
        write_result(out, {"scale": result})
        return
    if args.quick:
        single = single_module(d=512, n_sources=4, r=8, q=8, repeats=(2, 7))
    else:
        single = single_module(d=4096, n_sources=8, r=16, q=16, repeats=(2, 7))

    print(f"\nSingle {single['d']}x{single['d']} module, N={single['n_sources']} r={single['r']} "
          f"q={single['q']}")  # fmt: skip
    print(f"  {'PEFT dense SVD (anchor)':<28}{single['peft_dense_svd_s']:>10.3f} s")
    print(f"  {'factored SVD (QR incl.)':<28}{single['factored_s']:>10.4f} s")
    print(f"  {'speed-up (best calls)':<28}{single['speedup']:>10.0f} x   (goal >= 500x)")
    print(f"  {'speed-up (first calls)':<28}{single['speedup_first_calls']:>10.0f} x   "
          "(goal >= 500x)")  # fmt: skip
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
    print(f"  {'total':<28}{many['total_s']:>10.2f} s   (goal <= 45 s)")
    print(f"  {'FLOP floor (GEMM rate)':<28}{many['flop_floor_s']:>10.2f} s   "
          f"({many['vs_floor']:.2f}x the floor)")  # fmt: skip
    print(f"  {'targets/s':<28}{many['targets_per_s']:>10.2f}")
    print(f"  {'peak RSS growth':<28}{many['peak_rss_growth_mb']:>10.0f} MB")
    return many


if __name__ == "__main__":
    main()
