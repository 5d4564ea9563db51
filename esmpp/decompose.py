"""Essential Subspace Decomposition (ESD), SVD truncation and polar factors: pure tensor functions.

ESD decomposes a task matrix ``ΔW`` (``d_out × d_in``) along the principal directions of the activation
shift it causes, ``ΔY = X ΔWᵀ`` over the proxy tokens ``X`` (``N × d_in``), instead of along the singular
directions of ``ΔW`` itself. Tokens are never kept: everything goes through the Gram ``G = XᵀX``
(``d_in × d_in``), since ``ΔYᵀΔY = ΔW G ΔWᵀ``.

Precision: the Gram route squares the conditioning of ``X``, so ESD runs in float64 throughout and
returns float64 tensors; callers cast down when they store results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class EssentialBasis:
    """The ESD of one task matrix (all float64).

    ``basis`` P: ``d_out × r`` orthonormal columns (r = d_out unless a rank was asked for), ordered by
    descending ``eigenvalues`` (``r``, the variances ``σ²/(N−1)`` of the activation shift along each
    column, zero on the completion). ``coordinates`` C = PᵀΔW: ``r × d_in``; ``ΔW = P C`` when r = d_out.
    ``total_variance``: the sum of all d_out variances, of which ``eigenvalues`` are the leading share.
    """

    basis: Tensor
    eigenvalues: Tensor
    coordinates: Tensor
    total_variance: float


def essential_basis(
    delta: Tensor,
    gram: Tensor,
    num_tokens: int,
    centered: bool = False,
    mean: Tensor | None = None,
    rank: int | None = None,
) -> EssentialBasis:
    """ESD of ``delta`` (``d_out × d_in``) from the Gram ``gram`` = XᵀX (``d_in × d_in``) of ``num_tokens``
    proxy tokens.

    The eigenvectors of ΔW G ΔWᵀ are the left singular vectors of ΔW L for any factor G = L Lᵀ
    (:func:`gram_factor`). The SVD is ``d_out × d_in``-sized, never a ``d_out × d_out`` eigh.

    ``centered=True`` decomposes the covariance of the shift instead of its second moment (the paper's
    "PCA" wording); it needs ``mean`` (``d_in``), the token mean of X: Σ(x−μ)(x−μ)ᵀ = G − N μμᵀ.
    ``rank``: keep only the leading ``rank`` directions (``basis`` ``d_out × rank``, ``coordinates``
    ``rank × d_in``), which skips completing the basis when the SVD already has them; None keeps d_out.
    """
    _check_num_tokens(num_tokens)
    delta64 = delta.to(torch.float64)
    gram64 = second_moment(gram, num_tokens, centered, mean)
    left, singular_values, _ = torch.linalg.svd(delta64 @ gram_factor(gram64), full_matrices=False)
    return _from_left_singular(delta64, left, singular_values, num_tokens, rank)


def gram_matrix(matrix: Tensor) -> Tensor:
    """AᵀA (``n × n``) of ``matrix`` A (``m × n``), in A's dtype.

    Formed a block of columns at a time on and below the diagonal and mirrored above it, about half the
    multiply-adds of ``A.T @ A``, which BLAS computes in full (torch has no syrk). Measured (float64, 2
    threads): 0.26 s against 0.45 s for 3072², 0.115 against 0.17 s for 2304², 18 against 24 ms for
    3072 × 768 (ESM's step 6 Grams: about 3 s of a ViT-B/32 build at T = 8).
    """
    n = matrix.shape[1]
    result = matrix.new_empty(n, n)
    # One buffer for every block: a fresh product per block left ~25 MB more resident for a 3072² Gram
    # (the allocator keeps freed blocks of that size), and step 6's Grams sit at ESM's memory peak.
    buffer = matrix.new_empty(n * min(n, _GRAM_BLOCK_COLUMNS))
    for start in range(0, n, _GRAM_BLOCK_COLUMNS):
        stop = min(start + _GRAM_BLOCK_COLUMNS, n)
        below = buffer[: (n - start) * (stop - start)].view(n - start, stop - start)
        torch.mm(matrix[:, start:].T, matrix[:, start:stop], out=below)  # rows start: of columns start:stop
        result[start:, start:stop] = below
        result[start:stop, stop:] = below[stop - start :].T
    return result


# Narrower blocks waste less on the upper triangle but multiply smaller matrices: 256 was the fastest or
# within 5 % of it from 768 to 4096 columns.
_GRAM_BLOCK_COLUMNS = 256


def second_moment(gram: Tensor, num_tokens: int, centered: bool, mean: Tensor | None) -> Tensor:
    """The Gram XᵀX (``d × d``) of N = ``num_tokens`` tokens in float64, or with ``centered`` their scatter
    Σ(x−μ)(x−μ)ᵀ = XᵀX − N μμᵀ around their mean ``mean`` (``d``)."""
    gram64 = gram.to(torch.float64)
    if not centered:
        return gram64
    if mean is None:
        raise ValueError("centered ESD needs the token mean of X (shape (d_in,)).")
    mean64 = mean.to(torch.float64)
    return gram64 - num_tokens * torch.outer(mean64, mean64)


def gram_factor(gram: Tensor) -> Tensor:
    """A factor L (``d × d``) with L Lᵀ = ``gram`` (``d × d``, symmetric PSD, float64).

    Cholesky when it succeeds (an order of magnitude faster than ``eigh`` at d = 3072 and backward
    stable); a singular Gram (N < d_in, collinear tokens) makes it fail, and then L = V sqrt(max(λ, 0))
    from ``eigh``, the clamp removing the tiny negative eigenvalues rounding gives a PSD matrix.
    """
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return factor
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    return eigenvectors * eigenvalues.clamp(min=0).sqrt()


def essential_top(
    delta: Tensor,
    gram: Tensor,
    num_tokens: int,
    rank: int,
    centered: bool = False,
    mean: Tensor | None = None,
) -> EssentialBasis:
    """The top ``rank`` components of :func:`essential_basis` (``basis`` ``d_out × k``, ``eigenvalues``
    ``k``, ``coordinates`` ``k × d_in``), equal to ``truncate``-ing the full ESD up to the sign of each
    column (and a rotation among the directions of eigenvalue 0, where k exceeds the rank of ΔW), at a
    fraction of its cost: no factor of the ``d_in × d_in`` Gram, no SVD, no Householder basis completion.

    ΔW G ΔWᵀ is eigen-decomposed on its smaller side: directly (``d_out × d_out``) when d_out ≤ d_in;
    otherwise through the thin QR ΔW = Q R, since ΔW G ΔWᵀ = Q (R G Rᵀ) Qᵀ with R G Rᵀ only
    ``d_in × d_in``. A ``rank`` above d_in (T = 2 on a widening layer) asks for directions of eigenvalue 0
    beyond the range of ΔW: the columns of the full Q past d_in span exactly that complement, so they
    complete the basis for the cost of applying Q (any orthonormal basis of it is as valid as another).
    Float64 throughout: the eigenvalues are squared singular values of ΔY, so float32 would drop the
    components below ~1e-7 of the largest (see the tests).
    """
    _check_num_tokens(num_tokens)
    d_out, d_in = delta.shape
    if rank > d_out:
        raise ValueError(f"rank {rank} exceeds d_out {d_out}: ΔW G ΔWᵀ has d_out components.")
    delta64 = delta.to(torch.float64)
    gram64 = second_moment(gram, num_tokens, centered, mean)
    if d_out <= d_in:
        return _essential(delta64, *_leading_eigenpairs(delta64 @ gram64 @ delta64.T, rank), num_tokens)
    # ΔW = Q R with Q left as Householder reflectors: applying them to the k eigenvectors (ormqr) costs
    # what Q @ top does, and forming Q (as linalg.qr does) would cost as much again as the factorisation.
    reflectors, tau = torch.geqrf(delta64)
    factor = reflectors[:d_in].triu()  # R: d_in × d_in
    filled = min(rank, d_in)
    eigenvalues, top, total = _leading_eigenpairs(factor @ gram64 @ factor.T, filled)
    complement = torch.eye(d_out - d_in, rank - filled, dtype=torch.float64, device=delta64.device)
    basis = torch.ormqr(reflectors, tau, torch.block_diag(top, complement))  # Q @ [top 0; 0 I]
    eigenvalues = torch.cat([eigenvalues, eigenvalues.new_zeros(rank - filled)])
    # C = PᵀΔW = [top 0; 0 I]ᵀ Qᵀ Q [R; 0] = [topᵀR; 0]: a k × d_in² product instead of k × d_out × d_in,
    # and exact zeros on the completion, which lies outside ΔW's range.
    coordinates = torch.cat([top.T @ factor, factor.new_zeros(rank - filled, d_in)])
    return _essential(delta64, eigenvalues, basis, total, num_tokens, coordinates)


def essential_few(delta: Tensor, gram: Tensor, num_tokens: int, rank: int) -> EssentialBasis:
    """:func:`essential_top` (uncentred) for a few directions of a widening layer (d_out > d_in, ``rank`` ≤
    d_in / 2; an ESM++ expert: 32 of 768), without the QR of ΔW, the largest step of that route:
    0.09-0.10 s against 0.14-0.15 s on 2304/3072 × 768 at rank 32 (2 threads). Outside that range it is
    :func:`essential_top`.

    With G = L Lᵀ, ΔW G ΔWᵀ = (ΔW L)(ΔW L)ᵀ, whose leading eigenvectors are ΔW L V for the leading
    eigenvectors V of Lᵀ (ΔWᵀΔW) L (``d_in × d_in``, the same squared problem as the QR route's R G Rᵀ).
    ΔW L V has columns of norm σ_i and leaks the larger directions into the smaller ones at rounding level;
    its thin QR (Gram–Schmidt in column order) removes exactly that leak, and turns columns of eigenvalue 0
    into directions orthogonal to every kept one, hence outside the shift. Same eigenvalues and subspaces as
    :func:`essential_top`, except that a direction without shift can keep a rounding-level eigenvalue
    (1e-14 of the largest, not 0) when G is singular, since factoring G rounds its null space: harmless for an
    expert, which nothing weighs by its eigenvalues, but not for ESM's step 3, which therefore uses
    :func:`essential_top`.

    The eigenpairs come from :func:`krylov_eigenpairs` where three of its blocks fit in half the core
    (3·(rank + 8) ≤ d_in / 2), and from the dense eigh where they do not or are not certified.
    """
    d_out, d_in = delta.shape
    if d_out <= d_in or 2 * rank > d_in:
        return essential_top(delta, gram, num_tokens, rank)
    _check_num_tokens(num_tokens)
    delta64 = delta.to(torch.float64)
    factor = gram_factor(gram.to(torch.float64))
    core = factor.T @ gram_matrix(delta64) @ factor
    block = rank + _KRYLOV_OVERSAMPLING
    certified = krylov_eigenpairs(core, rank, block, d_in // 2) if _FIRST_CHECK_BLOCKS * block <= d_in // 2 else None
    eigenvalues, vectors, total = certified or _leading_eigenpairs(core, rank)
    basis, _ = torch.linalg.qr(delta64 @ (factor @ vectors))
    return _essential(delta64, eigenvalues, basis, total, num_tokens)


def essential_top_from_shift(
    delta: Tensor,
    shift_moment: Tensor,
    num_tokens: int,
    rank: int,
    centered: bool = False,
    mean: Tensor | None = None,
) -> EssentialBasis:
    """:func:`essential_top` from the second moment of the activation shift itself, ``shift_moment`` =
    ΔYᵀΔY = ΔW XᵀX ΔWᵀ (``d_out × d_out``, float64), instead of the Gram XᵀX (``d_in × d_in``).

    The same eigen-problem, without forming it: on a layer that narrows (d_out < d_in, e.g. the MLP's
    c_proj, 3072 → 768) the shift's moment is the smaller statistic to capture and needs no ``d_out × d_in²``
    product here. ``centered`` subtracts N ΔWμ (ΔWμ)ᵀ, ``mean`` (``d_in``) being the token mean of X.
    """
    _check_num_tokens(num_tokens)
    delta64 = delta.to(torch.float64)
    shift_mean = None if mean is None else delta64 @ mean.to(torch.float64)  # the token mean of ΔY
    moment = second_moment(shift_moment, num_tokens, centered, shift_mean)
    if rank > delta64.shape[0]:
        raise ValueError(f"rank {rank} exceeds d_out {delta64.shape[0]} of the shift's moment.")
    return _essential(delta64, *_leading_eigenpairs(moment, rank), num_tokens)


def _leading_eigenpairs(core: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """The ``rank`` largest eigenvalues of the symmetric PSD ``core`` (``n × n``), descending (``rank``),
    their eigenvectors (``n × rank``) and the sum of all n eigenvalues.

    Eigenvalues within the solver's rounding of 0 (≤ n·ε·λ_max) are returned as exactly 0: a rank-deficient
    ΔW (a LoRA fine-tune) or fewer proxy tokens than the rank budget leaves directions of eigenvalue 0, whose
    basis is arbitrary. Left at their rounding noise (1e-32 to 1e-16 of λ_max), ESM's eigenvalue weighting
    would give them weights of 0.005–0.03 instead of 0 and its isotropic step would then restore them to full
    weight, so that the merge would depend on that noise.
    """
    eigenvalues, vectors = torch.linalg.eigh((core + core.T) / 2)  # ascending; symmetrised against rounding
    kept = slice(eigenvalues.shape[0] - rank, None)
    top = _rounded_to_zero(eigenvalues[kept].flip(-1), eigenvalues[-1], core.shape[0])
    return top, vectors[:, kept].flip(-1), float(eigenvalues.clamp(min=0).sum())


def krylov_eigenpairs(
    core: Tensor, rank: int, block: int, max_width: int, tolerance: float = 1e-10
) -> tuple[Tensor, Tensor, float] | None:
    """:func:`_leading_eigenpairs` for a few of the n eigenpairs of the symmetric PSD ``core`` (``n × n``,
    float64; ``rank`` ≤ ``block``), by Rayleigh–Ritz on a block Krylov subspace; None when its Ritz pairs
    are not certified before the subspace would pass ``max_width`` columns, or as soon as the residual's
    decrease between two checks says they will not be (the caller then takes eigh).

    The subspace is spanned by AK, A²K, A³K, … for a random ``n × block`` start K (seeded, so that builds
    repeat), kept orthonormal by Gram–Schmidt twice per block. Certified means every returned pair has a
    residual ‖A v − θ v‖ ≤ ``tolerance``·θ_max and the vectors are orthonormal to ``tolerance``: each θ is
    then within that of an eigenvalue of A, and the vectors span an invariant subspace up to that over the
    eigengap. That the θ are the *largest* eigenvalues rests on the start: a Gaussian block has a component
    along every eigenvector, which the Krylov polynomials amplify in order of eigenvalue.

    Why: a dense ``eigh`` reduces A to tridiagonal form with matrix-vector products whatever few pairs are
    needed (35-41 ms for n = 768 on 2 threads), while the Krylov subspace grows by matrix-matrix products.
    On the bench's ViT-B/32 expert cores (n = 768, 32 pairs, blocks of 40) it certifies at 280 columns in
    20 ms; on a flat spectrum (ΔW pure noise) it never does, and reaching n/2 = 384 columns costs 25 ms
    before the eigh.
    """
    n = core.shape[0]
    if not 0 < rank <= block <= max_width <= n:
        raise ValueError(
            f"krylov_eigenpairs needs 0 < rank ≤ block ≤ max_width ≤ n, got {rank}, {block}, {max_width}, {n}."
        )
    generator = torch.Generator(device=core.device).manual_seed(0)
    start = torch.randn(n, block, dtype=core.dtype, device=core.device, generator=generator)
    basis, _ = torch.linalg.qr(core @ start)
    images = core @ basis  # A·basis, kept: the next block and the Ritz pairs' residuals both need it
    widest = block * (max_width // block)  # the basis grows a block at a time: the last width it reaches
    check_at, last_check = min(_FIRST_CHECK_BLOCKS * block, widest), None
    while True:
        if basis.shape[1] >= check_at:
            projected = basis.T @ images
            values, vectors = torch.linalg.eigh((projected + projected.T) / 2)  # ascending
            values, vectors = values[-rank:].flip(-1), vectors[:, -rank:].flip(-1)
            ritz = basis @ vectors
            residual = float((images @ vectors - ritz * values).norm(dim=0).max() / values[0].clamp(min=1e-300))
            drift = (ritz.T @ ritz - torch.eye(rank, dtype=core.dtype, device=core.device)).abs().max()
            if values[0] > 0 and residual <= tolerance and drift <= tolerance:
                total = float(core.diagonal().sum())  # the trace: the sum of all n eigenvalues
                return _rounded_to_zero(values, values[0], n), ritz, total
            ahead = _blocks_to_tolerance(last_check, (basis.shape[1], residual), block, tolerance)
            if last_check is not None and basis.shape[1] + block * ahead > _HOPELESS_WIDTHS * widest:
                return None  # the decrease so far says the tolerance lies far past max_width
            check_at, last_check = min(basis.shape[1] + block * ahead, widest), (basis.shape[1], residual)
        if basis.shape[1] == widest:
            return None
        source = images[:, -block:]
        grown = source
        for _ in range(2):  # classical Gram–Schmidt twice keeps the basis orthonormal to rounding
            grown = grown - basis @ (basis.T @ grown)
        newest, triangle = torch.linalg.qr(grown)
        if triangle.diagonal().abs().min() < 1e-4 * source.norm(dim=0).max():
            # Part of the block lay inside the basis (a core of low rank, whose range the subspace already
            # holds): normalising what is left magnifies its rounding, so it is orthogonalised once more.
            newest, _ = torch.linalg.qr(newest - basis @ (basis.T @ newest))
        basis = torch.cat([basis, newest], dim=1)
        images = torch.cat([images, core @ newest], dim=1)


# The first Ritz check after 3 blocks, the next one block later, then where the residual's decrease so far
# says the tolerance will be met (see _blocks_to_tolerance). On 16 of the bench's ViT-B/32 expert cores
# (n = 768, 32 pairs, T = 8), which certify at 7 blocks of 40: 20.1 ms per core; checking every block from
# the 4th, 23.7 ms; the dense eigh, 35-41 ms.
_FIRST_CHECK_BLOCKS = 3
# Columns per block beyond the pairs asked for: on those cores blocks of 40 took 20.1 ms, of 48 23.1 ms, of
# 56 23.2 ms (two not certified) and of 64 31.0 ms.
_KRYLOV_OVERSAMPLING = 8
# Give up as soon as the residual's decrease between two checks, kept up, would reach the tolerance only past
# this many times max_width: Krylov convergence speeds up as the subspace grows (on ViT-B/16's expert cores the
# decrease per block tripled between 160 and 360 columns), hence the margin. Those cores (3152 proxy tokens, a
# flatter spectrum than B/32's 800) all stopped 1e-9–2e-8 short at 360 columns, 37–43 ms before the dense
# eigh; their second check, at 160, projects 800–1100 columns. Six of B/32's, traced, project 280; all 48
# of a T = 2 bench build still certify.
_HOPELESS_WIDTHS = 2


def _blocks_to_tolerance(
    previous: tuple[int, float] | None, latest: tuple[int, float], block: int, tolerance: float
) -> int:
    """How many more blocks until the next Ritz check: one after the first check; after later ones, as many
    as the residual's geometric decrease between the last two checks (``(width, residual)`` each) needs to
    reach ``tolerance``. A check costs an eigh of the projected matrix, as much as a block or two."""
    if previous is None or not 0 < latest[1] < previous[1]:
        return 1
    rate_per_block = math.log(previous[1] / latest[1]) * block / (latest[0] - previous[0])
    return max(1, math.ceil(math.log(latest[1] / tolerance) / rate_per_block))


def _rounded_to_zero(top: Tensor, largest: Tensor, n: int) -> Tensor:
    """``top`` eigenvalues with those within an n × n solver's rounding of 0 (≤ n·ε·λ_max) set to exactly 0."""
    rounding = n * torch.finfo(top.dtype).eps * largest.clamp(min=0)
    return torch.where(top > rounding, top, torch.zeros_like(top))


def _essential(
    delta64: Tensor,
    eigenvalues: Tensor,
    basis: Tensor,
    total: float,
    num_tokens: int,
    coordinates: Tensor | None = None,
) -> EssentialBasis:
    """The ESD of ``delta64`` kept on ``basis`` (``d_out × k``), whose directions' shift second moments
    are ``eigenvalues`` (``k``; variances once divided by N − 1) out of ``total`` over all directions;
    ``coordinates`` PᵀΔW (``k × d_in``) when the caller has a cheaper route to them."""
    return EssentialBasis(
        basis=basis,
        eigenvalues=eigenvalues / (num_tokens - 1),
        coordinates=basis.T @ delta64 if coordinates is None else coordinates,
        total_variance=total / (num_tokens - 1),
    )


def essential_basis_direct(delta: Tensor, inputs: Tensor, centered: bool = False) -> EssentialBasis:
    """Reference ESD straight from the tokens ``inputs`` X (``N × d_in``): SVD of ΔY = XΔWᵀ (``N × d_out``).

    Memory grows with N; use :func:`essential_basis` in practice. Kept to check the Gram route.
    """
    delta64 = delta.to(torch.float64)
    inputs64 = inputs.to(torch.float64)
    if centered:
        inputs64 = inputs64 - inputs64.mean(dim=0)
    _, singular_values, right_t = torch.linalg.svd(inputs64 @ delta64.T, full_matrices=False)
    return _from_left_singular(delta64, right_t.T, singular_values, inputs.shape[0])


def _from_left_singular(
    delta64: Tensor, left: Tensor, singular_values: Tensor, num_tokens: int, rank: int | None = None
) -> EssentialBasis:
    """The leading ``rank`` (default d_out) directions from ``left`` (``d_out × r``, orthonormal, by
    descending ``singular_values``), completed with zero-eigenvalue directions where r < rank."""
    _check_num_tokens(num_tokens)
    rank = delta64.shape[0] if rank is None else rank
    basis = (left if left.shape[1] >= rank else complete_orthonormal(left))[:, :rank]
    eigenvalues = torch.zeros(rank, dtype=torch.float64, device=delta64.device)
    kept = min(rank, singular_values.shape[0])
    eigenvalues[:kept] = singular_values[:kept].square() / (num_tokens - 1)
    total = float(singular_values.square().sum()) / (num_tokens - 1)
    return EssentialBasis(basis=basis, eigenvalues=eigenvalues, coordinates=basis.T @ delta64, total_variance=total)


def complete_orthonormal(columns: Tensor) -> Tensor:
    """``columns`` (``n × r``, orthonormal, r ≤ n) followed by n − r orthonormal columns spanning the
    orthogonal complement: an ``n × n`` orthogonal matrix.

    Deterministic: Householder QR of [columns, I] is orthogonal whatever the rank of its input, and its
    first r columns span the same space as ``columns``, so the rest span the complement.
    """
    n, r = columns.shape
    if r == n:
        return columns
    identity = torch.eye(n, dtype=columns.dtype, device=columns.device)
    q, _ = torch.linalg.qr(torch.cat([columns, identity], dim=1))
    return torch.cat([columns, q[:, r:n]], dim=1)


def truncate(decomposition: EssentialBasis, rank: int) -> tuple[Tensor, Tensor]:
    """The rank-``rank`` ESD approximation ΔW ≈ P_k C_k: ``P_k`` (``d_out × k``), ``C_k`` (``k × d_in``)."""
    return decomposition.basis[:, :rank], decomposition.coordinates[:rank]


def truncated_svd(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` singular triplets of ``matrix`` (``m × n``): ``U_k`` (``m × k``), ``s_k`` (``k``),
    ``Vh_k`` (``k × n``); ``U_k diag(s_k) Vh_k`` is the best rank-k approximation in Frobenius norm.
    Copies, not views: callers keep them per task, and views would keep the full factors alive (TSV-M's
    summaries of a ViT-L/14 grew by 200 MB per task)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank].clone(), s[:rank].clone(), vh[:rank].clone()


def functional_error(delta: Tensor, approx: Tensor, gram: Tensor, num_tokens: int) -> Tensor:
    """Σ_x ‖ΔW x − Â x‖² / (N−1) over the proxy tokens, via their Gram: trace(E G Eᵀ)/(N−1), E = ΔW − Â.

    ``delta`` and ``approx``: ``d_out × d_in``; ``gram``: ``d_in × d_in``. A float64 scalar.
    """
    _check_num_tokens(num_tokens)
    error = delta.to(torch.float64) - approx.to(torch.float64)
    return ((error @ gram.to(torch.float64)) * error).sum() / (num_tokens - 1)


def polar_factor(matrix: Tensor) -> Tensor:
    """The orthogonal polar factor U Vᵀ of ``matrix`` (``m × n``) from its thin SVD: the nearest matrix with
    orthonormal columns (m ≥ n) or rows (m < n)."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def isotropic_factor(matrix: Tensor) -> Tensor:
    """``matrix`` (``m × n``) with every singular value replaced by their mean: mean(σ) · U Vᵀ.

    Computed from the eigen-decomposition of the small side's Gram (AᵀA = V Σ² Vᵀ, U Vᵀ = A V Σ⁻¹ Vᵀ),
    about twice as fast as the SVD on the square-ish matrices ESM orthogonalises, whenever the matrix is
    well enough conditioned for that to match the SVD to float tolerance; otherwise the SVD itself.
    """
    return _isotropic_times(matrix, None)


def isotropic_product(left: Tensor, right: Tensor) -> Tensor:
    """``isotropic_factor(left) @ isotropic_factor(right)`` (``m × n`` times ``n × p`` → ``m × p``).

    ESM's step 6 on a layer that widens the input (``n`` = d_out ≥ ``p`` = d_in): the ``n × n`` inverse
    square root of ``left``'s Gram is applied to the ``p`` columns of iso(right) instead of being formed
    and multiplied into ``left`` (2n²p instead of n³ + mn² multiply-adds; 87 GFLOP less per c_fc layer of a
    ViT-B at T = 8), whichever order is cheaper.
    """
    return _isotropic_times(left, isotropic_factor(right))


def _gram_route_max_condition(dtype: torch.dtype) -> float:
    """The condition number up to which the polar factor of a ``dtype`` matrix comes from the float64 Gram of
    its small side rather than from the float64 SVD.

    The Gram route's rounding error is at most about eps₆₄·κ² (measured: ten to a hundred times less), the
    float64 SVD's about eps₆₄·κ, below a float32 result's rounding at any κ a float32 matrix has; the SVD
    takes 1.6× as long as the Gram route on 2304² and 3072². For float64 input the bound keeps the Gram
    route within 2e-7 (κ = 3e4). For float32 input it stays accurate far past that: 4e-7 relative on ESM's
    P of a ViT-B/32 at κ = 8e5, 4e-6 at κ = 1e6 with log-spaced singular values, but 3e-4 at 3e6 and 4e-3
    at 1e7. So it stops at κ = 1e6, where σ_min² is still 10⁴ times the rounding of the Gram's entries;
    rank-deficient inputs take the SVD. (The bench's ViT-B/32 workload at T = 8 has P of κ = 2e3-2e5, and
    one of 1.2e6: the last block's qkv.)
    (A float32 Gram would square κ into float32's rounding: 3-7 % errors at κ = 2e3-8e3.)
    """
    return 3e4 if dtype == torch.float64 else 1e6


def _isotropic_times(matrix: Tensor, other: Tensor | None) -> Tensor:
    """iso(``matrix``) @ ``other`` (iso(``matrix``) itself when ``other`` is None), in ``matrix``'s dtype:
    through the float64 Gram of the small side, or past the conditioning bound the float64 SVD (a float32
    SVD's error grows as eps₃₂·κ: 1e-2 relative at κ = 1e6)."""
    rows, cols = matrix.shape
    tall = rows >= cols
    work = matrix.to(torch.float64)
    gram = gram_matrix(work if tall else work.T)
    # The eigh (Gram, eigenvectors and LAPACK's 2n² workspace) is the build's memory peak at T ≥ 4: the
    # float64 copy of a float32 input is dropped for it and converted again afterwards.
    del work
    eigenvalues, vectors = torch.linalg.eigh(gram)
    del gram
    work = matrix.to(torch.float64)
    singular_values = eigenvalues.clamp(min=0).sqrt()
    if singular_values[0] <= singular_values[-1] / _gram_route_max_condition(matrix.dtype):
        del vectors  # the SVD's factors and workspace take its place at the peak
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        result = s.mean() * (u @ vh if other is None else u @ (vh @ other.to(torch.float64)))
        return result.to(matrix.dtype)
    scale = singular_values.mean()
    if other is not None and 2 * other.shape[1] < rows + cols:
        # Gram^(-1/2) applied to a thin block: V Σ⁻¹ (Vᵀ X), never the square matrix V Σ⁻¹ Vᵀ.
        def inverse_root_times(block: Tensor) -> Tensor:
            return vectors @ ((vectors.T @ block) / singular_values[:, None])

        block = other.to(torch.float64)
        result = scale * (work @ inverse_root_times(block) if tall else inverse_root_times(work @ block))
        return result.to(matrix.dtype)
    inverse_root = (vectors / singular_values) @ vectors.T
    polar = scale * (work @ inverse_root if tall else inverse_root @ work)
    return (polar if other is None else polar @ other.to(torch.float64)).to(matrix.dtype)


def _check_num_tokens(num_tokens: int) -> None:
    if num_tokens < 2:
        raise ValueError(f"ESD needs at least 2 proxy tokens (variances divide by N−1), got {num_tokens}.")
