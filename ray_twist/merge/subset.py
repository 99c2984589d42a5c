"""The top-k merge: a target that weights k of N sources costs what a k-source pool costs.

`FactorStack` QR-factors the whole stack, so each target's core is Nr × Nr and its
decomposition grows with (N·r)³ even when all but k weights are 0. `SubsetStack` keeps
what lets a target assemble its core from its k selected sources only (S, m = Σ_{s∈S} r_s
columns), precomputed once per module and pool:

- per source, the QR of each side, B_s = Q_Bs R_Bs and A_sᵀ = Q_As R_As, and the r×r core
  M_s = R_Bs R_Asᵀ, so that w_s B_s A_s = Q_Bs (w_s M_s) Q_Asᵀ;
- the cross-Gram of the orthonormal bases, G_B = [Q_B1 … Q_BN]ᵀ[Q_B1 … Q_BN] (and G_A),
  stored as N × N blocks of r × r (the diagonal blocks are I).

For a target with support S, Q_BS = [Q_Bs]_{s∈S} (d_out × m) and G_BS = Q_BSᵀ Q_BS is the
gathered m × m block of G_B. With G_BS = R_Gᵀ R_G (Cholesky; an eigh-based root with a
tolerance where the sources' bases are nearly dependent) and P_B = R_G⁺, Q̃_B = Q_BS P_B
has orthonormal columns and Q_BS = Q̃_B R_G. So

    ΔW_t = Σ_{s∈S} w_s B_s A_s = Q_BS W Q_ASᵀ = Q̃_B (R_GB W R_GAᵀ) Q̃_Aᵀ,   W = ⊕_s w_s M_s,

and the top-q SVD of ΔW_t is that of the m × m core C = R_GB W R_GAᵀ (`core_svd`, as the
full stack's): B_t = Q_BS P_B U_q Σ_q^½, A_t = Σ_q^-½ U_qᵀ C P_Aᵀ Q_ASᵀ, in the same ΔW = B·A,
balanced Σ^½ convention as `FactorStack.merge_svd`. Per target: an m×m gather, two m×m
Cholesky factorisations, one m×m eigh and the two (d × m)(m × q) projections — nothing that
depends on N. The QR per source rather than a Gram of the raw factors keeps each source's
own conditioning exact (trained LoRA factors have fast-decaying spectra); the Gram only
resolves how the sources' subspaces overlap.

Sources of different ranks are zero-padded to r_max columns (dead columns: zero in Q_s and
M_s, identity in the gathered Gram, so they contribute exactly nothing); a source without
the module is all dead; a target with fewer than k_max sources in a batch is padded with a
dead all-zero source. Memory per module: the per-source bases, N·r_max·(d_in + d_out) (the
pool's own size), plus the two Grams, 2·(N·r_max)² — at N = 1000 in float32, 0.5 GB for
r = 8 and 2 GB for r = 16 per module, i.e. N·r/d times the factors themselves. They are
built on the first sparse merge of a module (or by `MergeSources.prepare(top_k=…)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ray_twist.merge.factored import check_factors, core_svd, pad_rank

#: the sparse path applies when every target in a batch weights at most this fraction of
#: the pool's sources. Measured (bench/merge.py --scale, d = 1024, r = q = k = 8, 1 thread):
#: at k = N/2 it takes 0.51 ms per target against the whole stack's 1.72 ms; at k = N the two
#: are close (0.46 vs 0.61 ms) and the whole stack needs no Gram precomputation or memory
SPARSE_FRACTION = 0.5
#: targets per slice of the gathered (T, m, d) bases: bounds the transient memory
_SLICE = 64
#: (float64, float32 Gram): the Cholesky root is kept where every pivot² exceeds this
#: fraction of the largest (no column nearly in the span of the previous ones, which keeps
#: R⁻¹ well conditioned in float32), else the eigh root drops eigenvalues below
#: the second fraction of the largest
_ACCEPT = {False: 1e-10, True: 1e-3}
_DROP = {False: 1e-12, True: 1e-6}


@dataclass(frozen=True)
class SubsetStack:
    """One module's sources, factored per source with their cross-Gram, for merges of
    targets that select few of them (see the module docstring)."""

    q_b: Tensor  # (N + 1, r, d_out): Q_Bsᵀ per source, zero-padded; the last is all zero
    q_a: Tensor  # (N + 1, r, d_in): Q_Asᵀ
    cores: Tensor  # (N, r, r) M_s = R_Bs R_Asᵀ, float64
    g_b: Tensor  # (N, N, r, r) Q_Bsᵀ Q_Bs'
    g_a: Tensor  # (N, N, r, r) Q_Asᵀ Q_As'
    live: Tensor  # (N + 1, r) bool: the source's real (unpadded) columns
    ranks: tuple[int, ...]

    @classmethod
    def from_factors(
        cls,
        a_list: list[Tensor],
        b_list: list[Tensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> SubsetStack:
        """Per-source QR, cores and cross-Grams of N sources' (A_s, B_s), B_s scaled."""
        check_factors(a_list, b_list)
        ranks = tuple(int(a.shape[0]) for a in a_list)
        d_in, d_out = int(a_list[0].shape[1]), int(b_list[0].shape[0])
        r = max(1, *ranks)
        if r > min(d_in, d_out):
            raise ValueError(f"rank {r} exceeds the module's {d_out}x{d_in} shape")
        n = len(ranks)
        live = torch.zeros(n + 1, r, dtype=torch.bool, device=device)
        b_pad = torch.zeros(n, d_out, r, dtype=torch.float64, device=device)
        a_pad = torch.zeros(n, d_in, r, dtype=torch.float64, device=device)
        for s, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
            live[s, : ranks[s]] = True
            b_pad[s, :, : ranks[s]] = b.to(device, torch.float64)
            a_pad[s, :, : ranks[s]] = a.T.to(device, torch.float64)
        q_b, r_b = torch.linalg.qr(b_pad)  # zero columns give zero rows of R
        q_a, r_a = torch.linalg.qr(a_pad)
        mask = live[:n].unsqueeze(1).to(q_b.dtype)  # dead columns of Q set to zero
        q_b = (q_b * mask).mT.to(dtype).contiguous()
        q_a = (q_a * mask).mT.to(dtype).contiguous()
        cores = r_b @ r_a.mT
        zero = torch.zeros(1, r, d_out, dtype=dtype, device=device)
        return cls(
            torch.cat([q_b, zero]),
            torch.cat([q_a, zero.new_zeros(1, r, d_in)]),
            cores,
            _cross_gram(q_b),
            _cross_gram(q_a),
            live,
            ranks,
        )

    @property
    def n_sources(self) -> int:
        return len(self.ranks)

    def merge_svd(self, weights: Tensor, rank: int) -> tuple[Tensor, Tensor]:
        """Rank-q truncated SVD of each target's delta from its non-zero-weight sources
        only, as (A_t (T,q,d_in), B_t (T,d_out,q)): what `FactorStack.merge_svd` returns."""
        weights = weights.to(self.cores.device, torch.float64)
        if weights.ndim != 2 or weights.shape[1] != self.n_sources:
            raise ValueError(
                f"weights must be (T, {self.n_sources}) for {self.n_sources} sources; "
                f"got {tuple(weights.shape)}"
            )
        support, w = support_of(weights)
        parts = [
            self._merge_slice(support[lo : lo + _SLICE], w[lo : lo + _SLICE], rank)
            for lo in range(0, len(w), _SLICE)
        ]
        a_t = torch.cat([a for a, _ in parts])
        b_t = torch.cat([b for _, b in parts])
        return pad_rank(a_t, b_t, rank)

    def _merge_slice(self, idx: Tensor, w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
        t, k = idx.shape
        r = self.cores.shape[-1]
        m = k * r
        live = _rows(self.live, idx).reshape(t, m)
        src = idx.clamp(max=self.n_sources - 1)  # the padding source reads source N-1 ...
        root_b = _GramRoot(_gather_gram(self.g_b, src, live))
        root_a = _GramRoot(_gather_gram(self.g_a, src, live))
        blocks = w.unsqueeze(-1).unsqueeze(-1) * _rows(self.cores, src)  # ... with weight 0
        # C = R_GB (⊕_s w_s M_s) R_GAᵀ, the block-diagonal product done block by block
        left = torch.einsum("tmkr,tkrq->tmkq", root_b.root.reshape(t, m, k, r), blocks)
        core = left.reshape(t, m, m) @ root_a.root.mT
        b_core, a_core = core_svd(core, rank, self.q_b.dtype)
        dtype = self.q_b.dtype
        q_bs = _rows(self.q_b, idx).reshape(t, m, -1)  # Q_BSᵀ: rows are the selected columns
        q_as = _rows(self.q_a, idx).reshape(t, m, -1)
        # B_t = Q_BS R_GB⁺ U Σ^½, computed transposed: (q × m)(m × d_out) is a wide product
        # that batched GEMM runs ~8× faster than (d_out × m)(m × q) with its q-wide output
        b_t = (root_b.solve(b_core).to(dtype).mT @ q_bs).mT.contiguous()
        a_t = root_a.solve(a_core.mT).mT.to(dtype) @ q_as  # Σ^½ Vᵀ (Q_AS R_GA⁺)ᵀ
        return a_t, b_t


def _rows(table: Tensor, idx: Tensor) -> Tensor:
    """table[idx] for a (T, k) index into the first dimension, as contiguous row copies."""
    flat = table.reshape(table.shape[0], -1).index_select(0, idx.reshape(-1))
    return flat.reshape(*idx.shape, *table.shape[1:])


def support_of(weights: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's non-zero sources, (T, k_max) indices and their (T, k_max) weights; rows
    with fewer are padded with index N (the all-zero source) and weight 0."""
    nonzero = weights != 0
    k = max(1, int(nonzero.sum(1).max()))
    n = weights.shape[1]
    # non-zero columns first, in source order (a stable sort of the zero flags)
    order = torch.sort((~nonzero).to(torch.int8), dim=1, stable=True).indices[:, :k]
    keep = torch.gather(nonzero, 1, order)
    idx = torch.where(keep, order, n)
    w = torch.where(keep, torch.gather(weights, 1, order), 0.0)
    return idx, w


def sparse_applies(weights: Tensor, n_sources: int) -> bool:
    """Whether a batch's widest support is small enough for `SubsetStack` to beat the full
    stack (`SPARSE_FRACTION` of the pool)."""
    widest = int((weights != 0).sum(1).max()) if weights.numel() else n_sources
    return widest <= SPARSE_FRACTION * n_sources


def _cross_gram(q: Tensor) -> Tensor:
    """(N, r, d) bases → (N, N, r, r) blocks Q_sᵀ Q_s', diagonal blocks exactly I."""
    n, r, d = q.shape
    flat = q.reshape(n * r, d)
    gram = (flat @ flat.T).reshape(n, r, n, r).permute(0, 2, 1, 3).contiguous()
    eye = torch.eye(r, dtype=gram.dtype, device=gram.device)
    gram[torch.arange(n), torch.arange(n)] = eye
    return gram


def _gather_gram(gram: Tensor, idx: Tensor, live: Tensor) -> Tensor:
    """(T, m, m) Gram of each target's selected columns; dead columns (padding) are made
    independent unit directions, so the Gram stays positive definite."""
    t, k = idx.shape
    n, r = gram.shape[0], gram.shape[-1]
    pairs = (idx.unsqueeze(2) * n + idx.unsqueeze(1)).reshape(-1)
    g = gram.reshape(n * n, r * r).index_select(0, pairs).reshape(t, k, k, r, r)
    g = g.permute(0, 1, 3, 2, 4).reshape(t, k * r, k * r)
    both = live.unsqueeze(2) & live.unsqueeze(1)
    eye = torch.eye(k * r, dtype=torch.bool, device=g.device)
    return torch.where(both, g, torch.where(eye, 1.0, 0.0).to(g))


class _GramRoot:
    """A root R of a batch of Grams G (Rᵀ R = G), float64, and R⁺·X (`solve`): Q R⁺ is
    orthonormal for any Q with Qᵀ Q = G. Cholesky at the Gram's precision (R upper
    triangular, R⁺ = R⁻¹ by triangular solves); where that fails or a column lies within
    `_ACCEPT` of the span of the previous ones (sources sharing directions), an eigh-based
    root in float64 that drops the eigenvalues below `_DROP`·λ_max instead (R = Λ^½ Vᵀ,
    R⁺ = V Λ^-½ over the kept ones)."""

    def __init__(self, gram: Tensor) -> None:
        single = gram.dtype != torch.float64
        chol, info = torch.linalg.cholesky_ex(gram)
        diag = chol.diagonal(dim1=-2, dim2=-1) ** 2
        self.bad = (info != 0) | (diag.amin(-1) <= _ACCEPT[single] * diag.amax(-1))
        eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=gram.device)
        self.root = torch.where(self.bad[:, None, None], eye, chol.mT.double())
        self.pinv: Tensor | None = None
        if bool(self.bad.any()):
            lam, vec = torch.linalg.eigh(gram[self.bad].double())
            alive = lam > _DROP[single] * lam[:, -1:]
            lam = torch.where(alive, lam, 1.0)
            self.root[self.bad] = torch.where(alive, lam.sqrt(), 0.0).unsqueeze(-1) * vec.mT
            self.pinv = vec * torch.where(alive, lam.rsqrt(), 0.0).unsqueeze(1)

    def solve(self, x: Tensor) -> Tensor:
        """R⁺ x for a batch x (T, m, j)."""
        tri = torch.where(self.bad[:, None, None], torch.eye(x.shape[1]).to(x), self.root)
        out = torch.linalg.solve_triangular(tri, x, upper=True)
        if self.pinv is not None:
            out[self.bad] = self.pinv @ x[self.bad]
        return out
