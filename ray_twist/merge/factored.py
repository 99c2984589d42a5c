"""The factored SVD merge: truncated SVD of Σ_s w_s B_s A_s without forming the dense delta.

With the sources' factors stacked, B = [B_1 … B_N] (d_out×Nr) and A = [A_1; …; A_N]
(Nr×d_in), a target's delta is B·D(w)·A where D(w) repeats each source's weight over its r
columns. One QR per module and pool, B = Q_B R_B and Aᵀ = Q_A R_A, turns it into
Q_B (R_B D(w) R_Aᵀ) Q_Aᵀ: the SVD of the delta is the SVD of the small core C = R_B D(w) R_Aᵀ.

The top-q singular triplets of a batch of cores come from one batched `eigh` of C Cᵀ (on the
CPU when the factors live on a GPU and C is wider than 32, unless the Rayleigh–Ritz solver
`top_eigh_subspace` applies: CUDA's batched `eigh` is batched only up to 32×32), then
B_t = Q_B U_q Σ_q^½ and
A_t = Σ_q^-½ U_qᵀ C Q_Aᵀ = Σ_q^½ V_qᵀ Q_Aᵀ. The cores are summed in float64 (weights may
cancel), the Gram matrix and its `eigh` run at the stack's precision: in float32 (the
default) twice as fast as float64 on the CPU, ≈5e-6 relative error on the merged delta.

Merge order (`MergeOrder`). The above is `sum_then_truncate`: ΔW_t = Σ_s w_s ΔW_s, then its
top-q SVD — rank q, and what PEFT's `add_weighted_adapter(combination_type="svd")` does.
`truncate_then_sum` reads the paper's "truncate each source to its top-q, then weighted sum"
literally: ΔW_t = Σ_s w_s trunc_q(ΔW_s). That sum has rank up to Σ_s min(q, r_s) ≤ N·q, and it
is kept *exactly*, not truncated again to q (a second truncation to q would make the two
orders coincide whenever q ≥ r_s, where trunc_q(ΔW_s) = ΔW_s). Each source's top-q SVD
U_s S_s V_sᵀ is computed once per pool (`TruncatedStack`, from the QR of B_s and A_sᵀ and an
r_s×r_s core SVD), its singular values split symmetrically, B'_s = U_s S_s^½ and
A'_s = S_s^½ V_sᵀ; a target is then a weighted concatenation with no SVD at request time,
B_t = [√|w_1|·sign(w_1) B'_1 … ], A_t = [√|w_1| A'_1; …] (the weight split like the
singular values, so B_t and A_t keep balanced magnitudes). The adapter rank is Σ_s min(q, r_s)
(`MergeSources.merge` drops the columns of sources a target weights 0, e.g. outside top-k).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

#: The order of a rank-q merge's two steps (`ray_twist.merge.factored` has the maths):
#: `sum_then_truncate` takes the top-q SVD of ΔW_t = Σ_s R_s ΔW_s (rank q, as PEFT's
#: `add_weighted_adapter(combination_type="svd")`); `truncate_then_sum` sums the sources' own
#: top-q SVDs, Σ_s R_s trunc_q(ΔW_s), kept exactly: rank Σ_s min(q, r_s) over the sources
#: with R_s ≠ 0 (up to N·q), not q.
MergeOrder = Literal["sum_then_truncate", "truncate_then_sum"]
MERGE_ORDERS: tuple[MergeOrder, ...] = ("sum_then_truncate", "truncate_then_sum")
DEFAULT_MERGE_ORDER: MergeOrder = "sum_then_truncate"


#: How a batch of cores is decomposed (`core_svd`): the exact batched eigh, Rayleigh–Ritz on
#: a ≤ 32-dimensional subspace (the GPU path), or the subspace one on CUDA when it applies.
CoreSolver = Literal["auto", "eigh", "subspace"]
CORE_SOLVERS: tuple[CoreSolver, ...] = ("auto", "eigh", "subspace")
#: the widest Gram CUDA's batched `eigh` keeps on its batched path
SUBSPACE_WIDTH = 32
#: directions beyond `keep` the subspace carries, so the top `keep` converge fast
_OVERSAMPLE = 8

MergeMethod = Literal["svd", "linear", "dense-svd"]
MERGE_METHODS: tuple[MergeMethod, ...] = ("svd", "linear", "dense-svd")


def check_factors(a_list: list[Tensor], b_list: list[Tensor]) -> None:
    if not a_list or len(a_list) != len(b_list):
        raise ValueError(f"need as many A as B factors (got {len(a_list)} A, {len(b_list)} B)")
    d_in, d_out = a_list[0].shape[1], b_list[0].shape[0]
    for i, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"source {i}: A must be (r, d_in) and B (d_out, r); got {tuple(a.shape)} "
                f"and {tuple(b.shape)}"
            )
        if a.shape[1] != d_in or b.shape[0] != d_out:
            raise ValueError(
                f"source {i}: shape {tuple(b.shape[:1])}x{tuple(a.shape[1:])} differs from "
                f"source 0's ({d_out}, {d_in})"
            )


@dataclass(frozen=True)
class FactorStack:
    """One module's stacked source factors, QR-factored once and shared by every target."""

    q_b: Tensor  # (d_out, k_b) orthonormal columns
    r_b: Tensor  # (k_b, Nr)
    q_a: Tensor  # (d_in, k_a) orthonormal columns
    r_a: Tensor  # (k_a, Nr)
    ranks: tuple[int, ...]  # r_s per source, in stacking order
    #: (N, k_b·k_a) float64: each source's own core R_Bs R_Asᵀ, flattened, when that is
    #: small (`_SOURCE_CORES_LIMIT`): then a target's core is one (N)·(N, k_b·k_a) product
    #: instead of a (k_b × Nr)(Nr × k_a) one, r times fewer FLOPs
    source_cores: Tensor | None = None

    @classmethod
    def from_factors(
        cls,
        a_list: list[Tensor],
        b_list: list[Tensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> FactorStack:
        """Stack N sources' (A_s, B_s) — B_s with LoRA scaling applied — and QR both sides."""
        check_factors(a_list, b_list)
        a = torch.cat([x.to(device=device, dtype=dtype) for x in a_list], dim=0)
        b = torch.cat([x.to(device=device, dtype=dtype) for x in b_list], dim=1)
        q_b, r_b = torch.linalg.qr(b)
        q_a, r_a = torch.linalg.qr(a.T)
        ranks = tuple(int(x.shape[0]) for x in a_list)
        return cls(q_b, r_b, q_a, r_a, ranks, _source_cores(r_b, r_a, ranks))

    @property
    def n_sources(self) -> int:
        return len(self.ranks)

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the module's delta."""
        return int(self.q_b.shape[0]), int(self.q_a.shape[0])

    def column_weights(self, weights: Tensor) -> Tensor:
        """(T, N) source weights → (T, Nr) per stacked column."""
        return column_weights(weights, self.ranks)

    def cores(self, weights: Tensor) -> Tensor:
        """(T, k_b, k_a) cores R_B D(w) R_Aᵀ = Σ_s w_s R_Bs R_Asᵀ, in float64."""
        if self.source_cores is not None:
            check_weights(weights, self.n_sources)
            flat = weights.to(self.r_b.device, torch.float64) @ self.source_cores
            return flat.reshape(-1, self.r_b.shape[0], self.r_a.shape[0])
        d = self.column_weights(weights.to(self.r_b.device, torch.float64))
        r_b, r_a = self.r_b.double(), self.r_a.double()
        return (r_b.unsqueeze(0) * d.unsqueeze(1)) @ r_a.T

    def merge_svd(
        self, weights: Tensor, rank: int, solver: CoreSolver = "auto"
    ) -> tuple[Tensor, Tensor]:
        """Rank-q truncated SVD of each target's delta, as (A_t (T,q,d_in), B_t (T,d_out,q)).

        Both projections are one (T·q × k)(k × d) GEMM: B_t is computed transposed and
        returned as a (T, d_out, q) view of a (T, q, d_out) tensor, since the batched
        (d_out × k)(k × q) form, with its q-wide outputs, runs ~8× slower on the CPU."""
        b_core, a_core = core_svd(self.cores(weights), rank, self.q_b.dtype, solver)
        dtype = self.q_b.dtype
        b_t = (b_core.to(dtype).mT @ self.q_b.T).mT
        a_t = a_core.to(dtype) @ self.q_a.T
        return pad_rank(a_t, b_t, rank)

    def merge_linear(self, weights: Tensor) -> tuple[Tensor, Tensor]:
        """The exact, untruncated Σ w_s B_s A_s as rank-Nr factors (no SVD)."""
        d = self.column_weights(weights.to(self.r_b.device, self.r_b.dtype))
        root = d.abs().sqrt()
        b_t = self.q_b @ (self.r_b.unsqueeze(0) * (torch.sign(d) * root).unsqueeze(1))
        a_t = (root.unsqueeze(-1) * self.r_a.T.unsqueeze(0)) @ self.q_a.T
        return a_t, b_t


#: the most elements (float64) `FactorStack.source_cores` may hold: 64 MB per module
_SOURCE_CORES_LIMIT = 8 * 2**20


def _source_cores(r_b: Tensor, r_a: Tensor, ranks: tuple[int, ...]) -> Tensor | None:
    """(N, k_b·k_a) float64 per-source cores R_Bs R_Asᵀ, or None above the size limit."""
    k_b, k_a = int(r_b.shape[0]), int(r_a.shape[0])
    if len(ranks) * k_b * k_a > _SOURCE_CORES_LIMIT:
        return None
    r_b, r_a = r_b.double(), r_a.double()
    bounds = [0, *itertools.accumulate(ranks)]
    return torch.stack(
        [(r_b[:, lo:hi] @ r_a[:, lo:hi].T).reshape(-1) for lo, hi in itertools.pairwise(bounds)]
    )


def core_svd(
    core: Tensor, rank: int, dtype: torch.dtype, solver: CoreSolver = "auto"
) -> tuple[Tensor, Tensor]:
    """Top-`rank` SVD of a batch of small cores C (T, m, n), float64, as balanced factors
    (U Σ^½ (T, m, keep), Σ^½ Vᵀ (T, keep, n)) with keep = min(rank, m); dead directions
    (σ ≤ 1e-12 σ_1) are zero. The Gram C Cᵀ and its eigendecomposition run in float32
    unless `dtype` (the factors' precision) is float64.

    `solver`: "eigh", the exact batched `eigh` of C Cᵀ (on the CPU: CUDA's batched `eigh`
    solves one matrix at a time above 32×32, far slower than LAPACK for these cores);
    "subspace", `top_eigh_subspace` (Rayleigh–Ritz on ≤ 32 dimensions, batched matmuls and a
    ≤ 32×32 batched `eigh`: all on the device); "auto", the subspace solver for CUDA cores
    wider than 32 when it applies, else the exact one (CUDA cores ≤ 32 stay on the device).
    """
    eig_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    low = core.to(eig_dtype)
    gram = low @ low.mT
    m = gram.shape[-1]
    keep = min(rank, m)
    if solver not in CORE_SOLVERS:
        raise ValueError(f"solver must be one of {CORE_SOLVERS}; got {solver!r}")
    subspace = subspace_applies(m, keep)
    if solver == "subspace" or (solver == "auto" and core.is_cuda and subspace):
        eigvals, eigvecs = top_eigh_subspace(gram, keep)
    elif core.is_cuda and m > SUBSPACE_WIDTH:
        eigvals, eigvecs = torch.linalg.eigh(gram.cpu())
    else:
        eigvals, eigvecs = torch.linalg.eigh(gram)
    eigvals, eigvecs = eigvals.to(core), eigvecs.to(core)
    u = eigvecs[..., -keep:].flip(-1)  # (T, m, keep), leading first
    sigma = eigvals[..., -keep:].flip(-1).clamp_min(0).sqrt()  # (T, keep)
    root = sigma.sqrt()
    alive = sigma > sigma[..., :1] * 1e-12
    inv_root = torch.where(alive, 1.0 / torch.where(alive, root, 1.0), 0.0)
    b_core = u * torch.where(alive, root, 0.0).unsqueeze(1)  # U Σ^½
    a_core = inv_root.unsqueeze(-1) * (u.mT @ core)  # Σ^-½ Uᵀ C = Σ^½ Vᵀ
    return b_core, a_core


def subspace_applies(m: int, keep: int) -> bool:
    """Whether `top_eigh_subspace` can serve an m×m Gram's top `keep`: only cores wider
    than its subspace need it, and the subspace must hold `keep` plus an oversampling."""
    return m > SUBSPACE_WIDTH and keep + _OVERSAMPLE <= SUBSPACE_WIDTH


def top_eigh_subspace(
    gram: Tensor, keep: int, squarings: int = 1, iterations: int = 16
) -> tuple[Tensor, Tensor]:
    """The top `keep` eigenpairs of a batch of PSD matrices G (T, m, m), as `eigh` orders
    them (ascending, (T, keep) values and (T, m, keep) vectors), from a subspace of at most
    `SUBSPACE_WIDTH` dimensions: why — CUDA's batched `eigh` stays batched only up to 32×32.

    Subspace iteration in float64 on G^(2^squarings) (normalised by its trace, so the ratio
    λ_{p+1}/λ_keep that sets the convergence is raised to that power), started from a fixed
    Gaussian block and re-orthonormalised by QR after each of `iterations` multiplications,
    then Rayleigh–Ritz on G itself: the p×p `eigh` of Xᵀ G X. Householder QR, not a Gram
    of the block, keeps directions whose scale is far below the leading one (trained LoRA
    spectra decay fast); float64 keeps them through the squarings.
    """
    t, m, _ = gram.shape
    p = min(m, SUBSPACE_WIDTH)
    if keep > p:
        raise ValueError(f"keep={keep} exceeds the subspace width {p}")
    g = gram.double()
    tiny = torch.finfo(torch.float64).tiny
    power = g / g.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(tiny)[:, None, None]
    for _ in range(squarings):
        power = power @ power
        trace = power.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(tiny)
        power = power / trace[:, None, None]
    start = torch.randn(m, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.linalg.qr(power @ start.to(g.device)).Q
    for _ in range(iterations):
        x = torch.linalg.qr(power @ x).Q
    ritz_vals, ritz_vecs = torch.linalg.eigh(x.mT @ g @ x)
    vals, vecs = ritz_vals[..., -keep:], x @ ritz_vecs[..., -keep:]
    return vals.to(gram.dtype), vecs.to(gram.dtype)


def pad_rank(a_t: Tensor, b_t: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero-pad to exactly `rank` when the stack holds fewer independent directions."""
    missing = rank - a_t.shape[1]
    if missing <= 0:
        return a_t, b_t
    a_pad = a_t.new_zeros(a_t.shape[0], missing, a_t.shape[2])
    b_pad = b_t.new_zeros(b_t.shape[0], b_t.shape[1], missing)
    return torch.cat([a_t, a_pad], dim=1), torch.cat([b_t, b_pad], dim=2)


def check_weights(weights: Tensor, n_sources: int) -> None:
    if weights.ndim != 2 or weights.shape[1] != n_sources:
        raise ValueError(
            f"weights must be (T, {n_sources}) for {n_sources} sources; got {tuple(weights.shape)}"
        )


def column_weights(weights: Tensor, ranks: tuple[int, ...]) -> Tensor:
    """(T, N) source weights → (T, Σ ranks): each source's weight repeated over its columns."""
    check_weights(weights, len(ranks))
    repeats = torch.tensor(ranks, device=weights.device)
    return torch.repeat_interleave(weights, repeats, dim=1)


def truncate_factors(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """One source's top-`rank` SVD of B·A as balanced factors (A' = S^½ Vᵀ, B' = U S^½), in
    float64, without the dense d_out×d_in product: QR of B and Aᵀ, SVD of the r×r core.
    Exactly min(rank, r) columns (zero-padded where B·A has fewer directions; none for a
    rank-0 block, a source without the module)."""
    keep = min(rank, int(a.shape[0]))
    a, b = a.double(), b.double()
    if keep == 0:
        return a, b
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    n = min(keep, int(s.shape[0]))
    root = s[:n].sqrt()
    b_t = q_b @ (u[:, :n] * root)
    a_t = (root.unsqueeze(1) * vh[:n]) @ q_a.T
    if n < keep:
        a_t = torch.cat([a_t, a_t.new_zeros(keep - n, a_t.shape[1])])
        b_t = torch.cat([b_t, b_t.new_zeros(b_t.shape[0], keep - n)], dim=1)
    return a_t, b_t


@dataclass(frozen=True)
class TruncatedStack:
    """One module's sources, each truncated to its own top-q SVD once, then concatenated:
    the precomputation behind `truncate_then_sum` (a target is a weighted concatenation)."""

    a: Tensor  # (K, d_in): [A'_1; …; A'_N], A'_s = S_s^½ V_sᵀ
    b: Tensor  # (d_out, K): [B'_1 … B'_N], B'_s = U_s S_s^½
    ranks: tuple[int, ...]  # min(q, r_s) per source, in stacking order; K = Σ ranks
    rank: int  # the q each source was truncated to

    @classmethod
    def from_factors(
        cls,
        a_list: list[Tensor],
        b_list: list[Tensor],
        rank: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> TruncatedStack:
        """Truncate N sources' (A_s, B_s) — B_s with LoRA scaling applied — to rank q each."""
        check_factors(a_list, b_list)
        if rank < 1:
            raise ValueError(f"rank must be ≥ 1; got {rank}")
        pairs = [truncate_factors(a, b, rank) for a, b in zip(a_list, b_list, strict=True)]
        a = torch.cat([x for x, _ in pairs]).to(device=device, dtype=dtype)
        b = torch.cat([y for _, y in pairs], dim=1).to(device=device, dtype=dtype)
        return cls(a, b, tuple(int(x.shape[0]) for x, _ in pairs), rank)

    @property
    def n_sources(self) -> int:
        return len(self.ranks)

    def column_weights(self, weights: Tensor) -> Tensor:
        """(T, N) source weights → (T, K) per stacked column."""
        return column_weights(weights, self.ranks)

    def merge(self, weights: Tensor) -> tuple[Tensor, Tensor]:
        """Σ_s w_s trunc_q(ΔW_s) exactly, as (A_t (T,K,d_in), B_t (T,d_out,K)); no SVD."""
        return weighted_columns(self.a, self.b, self.column_weights(weights.to(self.a)))


def weighted_columns(a: Tensor, b: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """B·diag(d)·A as balanced factors (√|d|·A (…,K,d_in), B·sign(d)√|d| (…,d_out,K)) for
    column weights d (…, K): a weighted concatenation, no SVD."""
    root = d.abs().sqrt()
    b_t = b * (torch.sign(d) * root).unsqueeze(-2)
    a_t = root.unsqueeze(-1) * a
    return a_t, b_t


def dense_svd_merge(
    a_list: list[Tensor],
    b_list: list[Tensor],
    weights: Tensor,
    rank: int,
    merge_order: MergeOrder = DEFAULT_MERGE_ORDER,
) -> tuple[Tensor, Tensor]:
    """Reference: form each dense delta and take its full SVD. O(d³) per target.

    `sum_then_truncate`: the top-q SVD of Σ_s w_s B_s A_s (rank q). `truncate_then_sum`:
    Σ_s w_s trunc_q(B_s A_s), each trunc_q a dense SVD, returned as its SVD at rank
    K = Σ_s min(q, r_s) (exact: the sum has no more directions).
    """
    check_factors(a_list, b_list)
    if merge_order not in MERGE_ORDERS:
        raise ValueError(f"merge_order must be one of {MERGE_ORDERS}; got {merge_order!r}")
    dtype = a_list[0].dtype
    deltas = [b @ a for a, b in zip(a_list, b_list, strict=True)]
    keep = rank
    if merge_order == "truncate_then_sum":
        keep = sum(min(rank, int(a.shape[0])) for a in a_list)
        truncated = []
        for source, a in zip(deltas, a_list, strict=True):
            u, s, vh = torch.linalg.svd(source, full_matrices=False)
            k = min(rank, int(a.shape[0]))
            truncated.append((u[:, :k] * s[:k]) @ vh[:k])
        deltas = truncated
    a_out, b_out = [], []
    for w in weights:
        delta = sum(float(ws) * d for ws, d in zip(w, deltas, strict=True))
        u, s, vh = torch.linalg.svd(torch.as_tensor(delta), full_matrices=False)
        root = s[:keep].sqrt()
        b_out.append(u[:, :keep] * root)
        a_out.append(root.unsqueeze(1) * vh[:keep])
    return pad_rank(torch.stack(a_out).to(dtype), torch.stack(b_out).to(dtype), keep)


def merge_lora_factors(
    a_list: list[Tensor],
    b_list: list[Tensor],
    weights: Tensor,
    rank: int,
    method: MergeMethod = "svd",
    stack: FactorStack | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    merge_order: MergeOrder = DEFAULT_MERGE_ORDER,
    truncated: TruncatedStack | None = None,
) -> tuple[Tensor, Tensor]:
    """Merge N sources' LoRA factors for T targets.

    `a_list[s]` is (r_s, d_in), `b_list[s]` is (d_out, r_s) with LoRA scaling applied,
    `weights` is (T, N). Returns (A_t (T, q, d_in), B_t (T, d_out, q)) with B_t @ A_t the
    rank-q truncated SVD of Σ_s w_ts B_s A_s. `method="linear"` returns the exact untruncated
    sum as rank-Σr_s factors; `"dense-svd"` is the slow dense reference. Pass a cached
    `stack` to skip the QR (it must come from the same factors).

    `merge_order="truncate_then_sum"` returns Σ_s w_ts trunc_q(B_s A_s) exactly, at rank
    K = Σ_s min(q, r_s) (columns of 0-weight sources are zero); pass a cached `truncated`
    stack (same factors, same q) to skip the per-source SVDs. It does not combine with
    `"linear"`, which never truncates.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"method must be one of {MERGE_METHODS}; got {method!r}")
    if merge_order not in MERGE_ORDERS:
        raise ValueError(f"merge_order must be one of {MERGE_ORDERS}; got {merge_order!r}")
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1; got {rank}")
    weights = torch.as_tensor(weights)
    if weights.ndim == 1:
        weights = weights.unsqueeze(0)
    if merge_order == "truncate_then_sum":
        if method == "linear":
            raise ValueError(
                "method 'linear' is the untruncated sum; merge_order 'truncate_then_sum' "
                "applies to the truncating methods ('svd', 'dense-svd')"
            )
        if method == "dense-svd":
            return dense_svd_merge(a_list, b_list, weights.to(a_list[0].dtype), rank, merge_order)
        if truncated is not None and truncated.rank != rank:
            raise ValueError(f"truncated stack is at rank {truncated.rank}, not {rank}")
        truncated = truncated or TruncatedStack.from_factors(a_list, b_list, rank, dtype, device)
        return truncated.merge(weights)
    if method == "dense-svd":
        return dense_svd_merge(a_list, b_list, weights.to(a_list[0].dtype), rank)
    stack = stack or FactorStack.from_factors(a_list, b_list, dtype=dtype, device=device)
    if method == "linear":
        return stack.merge_linear(weights)
    return stack.merge_svd(weights, rank)
