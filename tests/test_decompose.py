import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from esmpp import decompose
from esmpp.decompose import (
    _blocks_to_tolerance,
    _gram_route_max_condition,
    _leading_eigenpairs,
    complete_orthonormal,
    essential_basis,
    essential_basis_direct,
    essential_few,
    essential_top,
    essential_top_from_shift,
    functional_error,
    gram_factor,
    gram_matrix,
    isotropic_factor,
    isotropic_product,
    krylov_eigenpairs,
    polar_factor,
    truncate,
    truncated_svd,
)

SETTINGS = settings(deadline=None, max_examples=40)


@st.composite
def layers(draw):
    """A task matrix ΔW (d_out × d_in) and proxy tokens X (N × d_in), float64, sometimes N < d_out."""
    d_out = draw(st.integers(2, 12))
    d_in = draw(st.integers(2, 12))
    num_tokens = draw(st.integers(2, 30))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    delta = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    # Anisotropic tokens with an offset, as real activations have.
    scales = torch.logspace(-1, 1, d_in, dtype=torch.float64)
    inputs = torch.randn(num_tokens, d_in, generator=generator, dtype=torch.float64) * scales + 0.5
    return delta, inputs


def _projector(basis: torch.Tensor, rank: int) -> torch.Tensor:
    p = basis[:, :rank]
    return p @ p.T


@given(layers(), st.booleans())
@SETTINGS
def test_basis_is_orthonormal_and_reconstructs(layer, centered):
    delta, inputs = layer
    esd = essential_basis(delta, inputs.T @ inputs, inputs.shape[0], centered, inputs.mean(0))
    d_out = delta.shape[0]
    assert esd.basis.shape == (d_out, d_out)
    torch.testing.assert_close(esd.basis.T @ esd.basis, torch.eye(d_out, dtype=torch.float64))
    torch.testing.assert_close(esd.basis @ esd.coordinates, delta)
    assert torch.all(esd.eigenvalues[:-1] >= esd.eigenvalues[1:])
    assert torch.all(esd.eigenvalues >= 0)


@given(layers(), st.integers(0, 12), st.booleans())
@SETTINGS
def test_truncation_error_is_tail_eigenvalue_sum(layer, rank, centered):
    delta, inputs = layer
    rank = min(rank, delta.shape[0])
    num_tokens = inputs.shape[0]
    gram = inputs.T @ inputs
    esd = essential_basis(delta, gram, num_tokens, centered, inputs.mean(0))
    basis_k, coords_k = truncate(esd, rank)
    metric = gram - num_tokens * torch.outer(inputs.mean(0), inputs.mean(0)) if centered else gram
    error = functional_error(delta, basis_k @ coords_k, metric, num_tokens)
    tail = esd.eigenvalues[rank:].sum()
    scale = esd.eigenvalues.sum() + 1e-300
    assert abs(error - tail) <= 1e-10 * scale
    # Direct definition: the summed squared error of the (centred) shifts over the tokens.
    tokens = inputs - inputs.mean(0) if centered else inputs
    direct = (tokens @ (delta - basis_k @ coords_k).T).square().sum() / (num_tokens - 1)
    assert abs(direct - tail) <= 1e-10 * scale


@given(layers(), st.integers(1, 12))
@SETTINGS
def test_esd_truncation_beats_svd_truncation(layer, rank):
    delta, inputs = layer
    rank = min(rank, min(delta.shape))
    gram, num_tokens = inputs.T @ inputs, inputs.shape[0]
    basis_k, coords_k = truncate(essential_basis(delta, gram, num_tokens), rank)
    u, s, vh = truncated_svd(delta, rank)
    esd_error = functional_error(delta, basis_k @ coords_k, gram, num_tokens)
    svd_error = functional_error(delta, u @ torch.diag(s) @ vh, gram, num_tokens)
    assert esd_error <= svd_error * (1 + 1e-9) + 1e-12


@given(layers(), st.booleans())
@SETTINGS
def test_gram_route_matches_direct_route(layer, centered):
    delta, inputs = layer
    num_tokens = inputs.shape[0]
    gram_route = essential_basis(delta, inputs.T @ inputs, num_tokens, centered, inputs.mean(0))
    direct = essential_basis_direct(delta, inputs, centered)
    top = direct.eigenvalues[0].item() + 1e-300
    torch.testing.assert_close(gram_route.eigenvalues, direct.eigenvalues, rtol=0, atol=1e-6 * top)
    # Eigenvectors are defined up to rotation within equal eigenvalues: compare the projectors onto
    # the leading k directions wherever the spectrum has a clear gap after k.
    eigenvalues = direct.eigenvalues
    for rank in range(1, delta.shape[0]):
        if eigenvalues[rank - 1] - eigenvalues[rank] > 1e-3 * top:
            torch.testing.assert_close(
                _projector(gram_route.basis, rank), _projector(direct.basis, rank), rtol=0, atol=1e-6
            )


def test_basis_completed_when_fewer_tokens_than_outputs():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(10, 6, generator=generator, dtype=torch.float64)
    inputs = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    esd = essential_basis(delta, inputs.T @ inputs, 3)
    torch.testing.assert_close(esd.basis.T @ esd.basis, torch.eye(10, dtype=torch.float64))
    # Rank ≤ N = 3: the rest is rounding-level (Gram route) or exactly zero (completion).
    assert torch.all(esd.eigenvalues[3:] < 1e-12 * esd.eigenvalues[0])
    assert torch.all(esd.eigenvalues[:3] > 1e-6 * esd.eigenvalues[0])


def test_singular_gram_is_accepted():
    delta = torch.randn(5, 4, dtype=torch.float64)
    inputs = torch.ones(7, 4, dtype=torch.float64)  # rank-1 Gram
    esd = essential_basis(delta, inputs.T @ inputs, 7)
    assert torch.isfinite(esd.basis).all()
    assert (esd.eigenvalues[1:] < 1e-10 * esd.eigenvalues[0]).all()


def test_centered_needs_mean_and_two_tokens():
    delta = torch.randn(3, 3)
    with pytest.raises(ValueError, match="token mean"):
        essential_basis(delta, torch.eye(3), 4, centered=True)
    with pytest.raises(ValueError, match="at least 2"):
        essential_basis(delta, torch.eye(3), 1)


@given(st.integers(1, 8), st.integers(1, 8), st.integers(0, 2**31 - 1))
@SETTINGS
def test_polar_factor_is_orthonormal_and_isotropic_keeps_mean_singular_value(rows, cols, seed):
    matrix = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    polar = polar_factor(matrix)
    small = min(rows, cols)
    gram = polar.T @ polar if rows >= cols else polar @ polar.T
    torch.testing.assert_close(gram, torch.eye(small, dtype=torch.float64))
    singular_values = torch.linalg.svdvals(matrix)
    iso = torch.linalg.svdvals(isotropic_factor(matrix))
    torch.testing.assert_close(iso, singular_values.mean().expand(small))


def test_complete_orthonormal_keeps_given_columns():
    columns, _ = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64))
    full = complete_orthonormal(columns)
    assert torch.equal(full[:, :2], columns)
    torch.testing.assert_close(full.T @ full, torch.eye(6, dtype=torch.float64))


@given(layers(), st.integers(1, 12))
@SETTINGS
def test_requested_rank_matches_truncating_the_full_basis(layer, rank):
    delta, inputs = layer
    rank = min(rank, delta.shape[0])
    gram, num_tokens = inputs.T @ inputs, inputs.shape[0]
    full = essential_basis(delta, gram, num_tokens)
    top = essential_basis(delta, gram, num_tokens, rank=rank)
    basis_k, coords_k = truncate(full, rank)
    assert top.basis.shape == basis_k.shape and top.coordinates.shape == coords_k.shape
    torch.testing.assert_close(top.eigenvalues, full.eigenvalues[:rank])
    torch.testing.assert_close(top.basis @ top.coordinates, basis_k @ coords_k)


@pytest.mark.parametrize("num_tokens", [3, 20])  # singular Gram (eigh fallback), then definite (Cholesky)
def test_gram_factor_reproduces_the_gram(num_tokens):
    inputs = torch.randn(num_tokens, 8, dtype=torch.float64)
    gram = inputs.T @ inputs
    factor = gram_factor(gram)
    torch.testing.assert_close(factor @ factor.T, gram)


@pytest.mark.parametrize("rows", [1, 40])
@pytest.mark.parametrize("columns", [1, 255, 256, 257, 600])
@pytest.mark.parametrize("transposed", [False, True])
def test_the_blockwise_gram_equals_its_definition(rows, columns, transposed):
    """AᵀA from its lower block columns, mirrored: A.T @ A to rounding and symmetric, for widths below,
    at and past a block, and for a transposed view (step 6's Gram of a wide matrix's rows)."""
    generator = torch.Generator().manual_seed(rows * 1000 + columns)
    if transposed:
        matrix = torch.randn(columns, rows, generator=generator, dtype=torch.float64).T
    else:
        matrix = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    gram = gram_matrix(matrix)
    torch.testing.assert_close(gram, matrix.T @ matrix, rtol=1e-12, atol=1e-12 * rows)
    torch.testing.assert_close(gram, gram.T, rtol=0, atol=1e-12 * rows)
    assert gram_matrix(matrix.float()).dtype == torch.float32


@given(layers(), st.integers(0, 14), st.booleans())
@SETTINGS
def test_top_components_equal_the_truncated_full_decomposition(layer, rank, centered):
    """The optimised top-k ESD equals its straightforward definition (full ESD, then truncation): same
    eigenvalues and, wherever the spectrum has a gap after k, the same subspace and approximation."""
    delta, inputs = layer
    rank = min(rank, delta.shape[0])
    num_tokens = inputs.shape[0]
    gram, mean = inputs.T @ inputs, inputs.mean(0)
    full = essential_basis(delta, gram, num_tokens, centered, mean)
    top = essential_top(delta, gram, num_tokens, rank, centered, mean)
    assert top.basis.shape == (delta.shape[0], rank) and top.coordinates.shape == (rank, delta.shape[1])
    torch.testing.assert_close(top.basis.T @ top.basis, torch.eye(rank, dtype=torch.float64))
    torch.testing.assert_close(top.coordinates, top.basis.T @ delta)  # C = PᵀΔW, however it is formed
    scale = full.eigenvalues[0].item() + 1e-300
    torch.testing.assert_close(top.eigenvalues, full.eigenvalues[:rank], rtol=0, atol=1e-9 * scale)
    assert top.total_variance == pytest.approx(float(full.eigenvalues.sum()), rel=1e-9, abs=1e-9 * scale)
    gap = full.eigenvalues[rank - 1] - full.eigenvalues[rank] if 0 < rank < delta.shape[0] else scale
    if gap > 1e-3 * scale:
        basis_k, coords_k = truncate(full, rank)
        torch.testing.assert_close(_projector(top.basis, rank), _projector(full.basis, rank), rtol=0, atol=1e-6)
        torch.testing.assert_close(top.basis @ top.coordinates, basis_k @ coords_k, rtol=0, atol=1e-6)


@given(
    st.integers(2, 12),
    st.integers(1, 12),
    st.integers(1, 12),
    st.integers(2, 30),
    st.integers(0, 2**31 - 1),
)
@SETTINGS
def test_a_few_directions_of_a_widening_layer_equal_its_top_components(d_in, extra_out, delta_rank, num_tokens, seed):
    """Tall ΔW (d_out > d_in), full or low rank (a LoRA fine-tune), with fewer tokens than inputs or more:
    the QR-free route gives essential_top's eigenvalues, an orthonormal basis, the same subspace wherever the
    spectrum has a gap, and C = PᵀΔW; its eigenvalues are exactly 0 where essential_top's are whenever the
    Gram is not singular."""
    generator = torch.Generator().manual_seed(seed)
    d_out = d_in + extra_out
    left = torch.randn(d_out, delta_rank, generator=generator, dtype=torch.float64)
    delta = left @ torch.randn(delta_rank, d_in, generator=generator, dtype=torch.float64)
    scales = torch.logspace(-1, 1, d_in, dtype=torch.float64)
    inputs = torch.randn(num_tokens, d_in, generator=generator, dtype=torch.float64) * scales + 0.5
    gram = inputs.T @ inputs
    full = essential_basis(delta, gram, num_tokens).eigenvalues
    for rank in range(d_in // 2 + 1):
        few, top = essential_few(delta, gram, num_tokens, rank), essential_top(delta, gram, num_tokens, rank)
        scale = float(top.eigenvalues[0]) + 1e-300 if rank else 1.0
        torch.testing.assert_close(few.eigenvalues, top.eigenvalues, rtol=0, atol=1e-9 * scale)
        if num_tokens > d_in:
            assert torch.equal(few.eigenvalues == 0, top.eigenvalues == 0), (few.eigenvalues, top.eigenvalues)
        assert few.total_variance == pytest.approx(top.total_variance, rel=1e-9, abs=1e-9 * scale)
        torch.testing.assert_close(few.basis.T @ few.basis, torch.eye(rank, dtype=torch.float64))
        torch.testing.assert_close(few.coordinates, few.basis.T @ delta)
        gap = full[rank - 1] - full[rank] if rank else scale
        if gap > 1e-3 * scale:
            torch.testing.assert_close(_projector(few.basis, rank), _projector(top.basis, rank), rtol=0, atol=1e-6)


def _psd_with_spectrum(eigenvalues: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A symmetric PSD matrix with the given eigenvalues (n) along random orthonormal directions."""
    directions, _ = torch.linalg.qr(
        torch.randn(eigenvalues.shape[0], eigenvalues.shape[0], generator=generator, dtype=torch.float64)
    )
    return (directions * eigenvalues) @ directions.T


@given(
    st.integers(60, 120),
    st.integers(1, 6),
    st.sampled_from([0.3, 0.6, 0.8]),
    st.sampled_from([None, 3, 10]),
    st.integers(0, 2**31 - 1),
)
@SETTINGS
def test_krylov_eigenpairs_equal_the_dense_leading_eigenpairs(n, rank, decay, nonzero, seed):
    """A decaying spectrum (geometric, rate ``decay``), sometimes of low rank (``nonzero`` eigenvalues, the
    rest exactly 0): the block Krylov pairs are certified and equal to eigh's, including exact zeros."""
    generator = torch.Generator().manual_seed(seed)
    eigenvalues = decay ** torch.arange(n, dtype=torch.float64)
    if nonzero is not None:
        eigenvalues[nonzero:] = 0
    core = _psd_with_spectrum(eigenvalues, generator)
    certified = krylov_eigenpairs(core, rank, block=rank + 4, max_width=n)
    assert certified is not None  # such spectra certify: a None here would only be the slow fallback
    values, vectors, total = certified
    dense_values, dense_vectors, dense_total = _leading_eigenpairs(core, rank)
    torch.testing.assert_close(values, dense_values, rtol=0, atol=1e-9)
    assert torch.equal(values == 0, dense_values == 0)
    assert total == pytest.approx(dense_total, rel=1e-12)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-10)
    if eigenvalues[rank - 1] - eigenvalues[rank] > 1e-3:
        torch.testing.assert_close(_projector(vectors, rank), _projector(dense_vectors, rank), rtol=0, atol=1e-6)


def test_krylov_eigenpairs_refuse_what_they_cannot_certify():
    """A flat spectrum (no gap for the Krylov polynomials to amplify) within a few blocks: None, not pairs
    that are merely close."""
    generator = torch.Generator().manual_seed(0)
    core = _psd_with_spectrum(1 + 0.01 * torch.rand(200, generator=generator, dtype=torch.float64), generator)
    assert krylov_eigenpairs(core, 4, block=8, max_width=40) is None


@pytest.mark.parametrize(("decay", "certified"), [(0.99, True), (0.995, False)])
def test_krylov_eigenpairs_give_up_early_only_where_the_residual_decrease_is_hopeless(monkeypatch, decay, certified):
    """A slowly decaying spectrum (ViT-B/16's expert cores are of that kind): at 0.995 the second check
    projects the tolerance far past max_width, and the subspace stops growing there, 4 blocks of the 25 it
    could reach (where it still would not certify); at 0.99, whose decrease then speeds up, it certifies at the
    last block: the margin keeps it."""
    generator = torch.Generator().manual_seed(0)
    core = _psd_with_spectrum(decay ** torch.arange(400, dtype=torch.float64), generator)
    blocks = []
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *args: blocks.append(1) or qr(*args))
    result = krylov_eigenpairs(core, 4, block=8, max_width=200)
    assert (result is not None) == certified
    assert len(blocks) == (25 if certified else 4)


@pytest.mark.parametrize(("rank", "block", "max_width"), [(0, 4, 20), (5, 4, 20), (2, 24, 20), (2, 4, 41)])
def test_krylov_eigenpairs_refuse_sizes_that_do_not_nest(rank, block, max_width):
    """rank ≤ block ≤ max_width ≤ n, else a block wider than the matrix would make a basis that is not one."""
    with pytest.raises(ValueError, match="rank ≤ block ≤ max_width ≤ n"):
        krylov_eigenpairs(torch.eye(40, dtype=torch.float64), rank, block, max_width)


def test_ritz_checks_are_spaced_by_the_residual_decrease_so_far():
    """After one check, the next is one block on; after two, as many blocks as the residual's geometric
    decrease between them needs to reach the tolerance (1e-2 → 1e-4 over one block: 3 more for 1e-10)."""
    assert _blocks_to_tolerance(None, (120, 1e-2), 40, 1e-10) == 1
    assert _blocks_to_tolerance((120, 1e-2), (160, 1e-4), 40, 1e-10) == 3
    assert _blocks_to_tolerance((120, 1e-2), (200, 1e-4), 40, 1e-10) == 6
    assert _blocks_to_tolerance((120, 1e-4), (160, 1e-4), 40, 1e-10) == 1  # no progress: check every block


def _with_singular_values(
    singular_values: torch.Tensor, rows: int, cols: int, generator: torch.Generator
) -> torch.Tensor:
    """A ``rows × cols`` float64 matrix with ``singular_values`` (min(rows, cols)) along random orthonormal
    directions, the left ones drawn first."""
    count = singular_values.shape[0]
    left, _ = torch.linalg.qr(torch.randn(rows, count, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(cols, count, generator=generator, dtype=torch.float64))
    return (left * singular_values) @ right.T


def _expert_sized_layer(decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A widening layer at a small ViT's scale (1536 × 384): ΔW with singular values ``decay``^i along random
    directions, and the Gram of 800 anisotropic tokens."""
    generator = torch.Generator().manual_seed(0)
    delta = _with_singular_values(decay ** torch.arange(384, dtype=torch.float64), 1536, 384, generator)
    inputs = torch.randn(800, 384, generator=generator, dtype=torch.float64) * torch.logspace(-1, 0.5, 384) + 0.3
    return delta, inputs.T @ inputs


@pytest.mark.parametrize(("decay", "krylov"), [(0.9, True), (1.0, False)])
def test_an_expert_sized_few_equals_its_top_components_by_either_eigensolver(monkeypatch, decay, krylov):
    """32 of 384 directions: a fine-tune-like ΔW (decaying spectrum) is certified by the Krylov route, one
    whose singular values are all equal falls back to eigh; both give essential_top's expert."""
    delta, gram = _expert_sized_layer(decay)
    top = essential_top(delta, gram, 800, 32)
    called = []
    dense = decompose._leading_eigenpairs
    monkeypatch.setattr(decompose, "_leading_eigenpairs", lambda *args: called.append(1) or dense(*args))
    few = essential_few(delta, gram, 800, 32)
    assert bool(called) != krylov
    scale = float(top.eigenvalues[0])
    torch.testing.assert_close(few.eigenvalues, top.eigenvalues, rtol=0, atol=1e-9 * scale)
    assert few.total_variance == pytest.approx(top.total_variance, rel=1e-9)
    torch.testing.assert_close(few.basis.T @ few.basis, torch.eye(32, dtype=torch.float64))
    torch.testing.assert_close(few.coordinates, few.basis.T @ delta)
    full = essential_basis(delta, gram, 800).eigenvalues
    if full[31] - full[32] > 1e-3 * scale:
        torch.testing.assert_close(_projector(few.basis, 32), _projector(top.basis, 32), rtol=0, atol=1e-6)


def test_a_few_directions_outside_their_range_are_the_top_components():
    """A layer that does not widen, or more than d_in / 2 directions, go to essential_top itself."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    for d_out, rank in ((4, 2), (14, 4)):
        delta = torch.randn(d_out, 6, generator=generator, dtype=torch.float64)
        few, top = (f(delta, inputs.T @ inputs, 40, rank) for f in (essential_few, essential_top))
        assert torch.equal(few.basis, top.basis) and torch.equal(few.eigenvalues, top.eigenvalues)


@given(layers(), st.integers(1, 12), st.booleans())
@SETTINGS
def test_top_components_from_the_shift_moment_equal_those_from_the_gram(layer, rank, centered):
    """The shift route (ΔYᵀΔY captured directly) is the Gram route's eigen-problem, formed elsewhere."""
    delta, inputs = layer
    rank = min(rank, delta.shape[0])
    num_tokens = inputs.shape[0]
    gram, mean = inputs.T @ inputs, inputs.mean(0)
    shift = inputs @ delta.T  # ΔY, N × d_out
    from_gram = essential_top(delta, gram, num_tokens, rank, centered, mean)
    from_shift = essential_top_from_shift(delta, shift.T @ shift, num_tokens, rank, centered, mean)
    scale = from_gram.eigenvalues[0].item() + 1e-300
    torch.testing.assert_close(from_shift.eigenvalues, from_gram.eigenvalues, rtol=0, atol=1e-9 * scale)
    assert from_shift.total_variance == pytest.approx(from_gram.total_variance, rel=1e-9, abs=1e-9 * scale)
    full = essential_basis(delta, gram, num_tokens, centered, mean).eigenvalues
    gap = full[rank - 1] - full[rank] if rank < delta.shape[0] else scale
    if gap > 1e-3 * scale:
        torch.testing.assert_close(
            _projector(from_shift.basis, rank), _projector(from_gram.basis, rank), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("centered", [False, True])
def test_top_components_past_the_rank_of_a_tall_matrix_complete_the_basis_outside_its_range(centered):
    """rank 6 > d_in 4 (T = 2 on a widening layer): the 4 filled directions are the full ESD's, the 2 more
    have eigenvalue 0, lie outside the range of ΔW (zero coordinates) and keep the basis orthonormal."""
    generator = torch.Generator().manual_seed(1)
    delta = torch.randn(9, 4, generator=generator, dtype=torch.float64)
    inputs = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    gram, mean = inputs.T @ inputs, inputs.mean(0)
    top = essential_top(delta, gram, 20, 6, centered, mean)
    full = essential_basis(delta, gram, 20, centered, mean)
    torch.testing.assert_close(top.eigenvalues, full.eigenvalues[:6])
    assert (top.eigenvalues[4:] == 0).all()
    torch.testing.assert_close(top.basis.T @ top.basis, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(_projector(top.basis, 4), _projector(full.basis, 4))
    assert (top.coordinates[4:] == 0).all()
    torch.testing.assert_close(top.basis @ top.coordinates, delta)  # the kept directions span range(ΔW)
    assert _owns_only_itself(top.basis) and _owns_only_itself(top.coordinates)


@given(
    st.integers(2, 12),
    st.integers(2, 12),
    st.integers(1, 3),
    st.integers(3, 30),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
@SETTINGS
def test_directions_without_activation_shift_have_eigenvalue_exactly_zero(
    d_out, d_in, delta_rank, num_tokens, centered, seed
):
    """A low-rank ΔW (a LoRA fine-tune), or fewer tokens than directions, leaves directions along which ΔY
    is 0. Their eigenvalues are exactly 0, not the solver's rounding noise, and the others stay positive:
    ESM weighs a direction by its eigenvalue, and noise would weigh an arbitrary basis (see test_esm)."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(d_out, delta_rank, generator=generator, dtype=torch.float64)
    delta = left @ torch.randn(delta_rank, d_in, generator=generator, dtype=torch.float64)
    inputs = torch.randn(num_tokens, d_in, generator=generator, dtype=torch.float64) + 0.5
    gram, mean = inputs.T @ inputs, inputs.mean(0)
    shift = (inputs - mean if centered else inputs) @ delta.T
    shift_rank = min(delta_rank, num_tokens - centered, d_in, d_out)
    for top in (
        essential_top(delta, gram, num_tokens, d_out, centered, mean),
        essential_top_from_shift(delta, (inputs @ delta.T).T @ (inputs @ delta.T), num_tokens, d_out, centered, mean),
    ):
        # Forming ΔY rounds its zero singular values to ~1e-16 of the largest, past matrix_rank's default
        # tolerance (max(N, d_out)·eps) on some draws: the precondition takes a tolerance above that rounding.
        assert int(torch.linalg.matrix_rank(shift, rtol=1e-12)) == shift_rank
        assert (top.eigenvalues[shift_rank:] == 0).all(), top.eigenvalues
        assert (top.eigenvalues[:shift_rank] > 0).all(), top.eigenvalues


def test_top_components_are_at_most_d_out():
    with pytest.raises(ValueError, match="exceeds d_out"):
        essential_top(torch.randn(3, 5), torch.eye(5), 10, rank=4)


def _owns_only_itself(tensor: torch.Tensor) -> bool:
    """No view of a larger tensor: what keeps it keeps no more memory than its own elements."""
    return tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def test_truncated_svd_keeps_no_view_of_the_full_factors():
    u, s, vh = truncated_svd(torch.randn(12, 10), 3)
    assert all(_owns_only_itself(factor) for factor in (u, s, vh))


def test_float64_is_needed_for_the_weak_components():
    """ESD's eigenvalues are squared singular values of ΔY: with activations spanning 1e-4..1 (as real
    layer inputs do) the weak components sit ~1e-8 below the top, under float32's resolution. The float64
    route recovers them to 1e-6 relative; the same eigen-problem in float32 does not."""
    generator = torch.Generator().manual_seed(0)
    d = 24
    scales = torch.logspace(-4, 0, d, dtype=torch.float64)
    inputs = torch.randn(200, d, generator=generator, dtype=torch.float64) * scales
    delta, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    reference = essential_basis_direct(delta, inputs).eigenvalues
    top = essential_top(delta, inputs.T @ inputs, 200, rank=d).eigenvalues
    weak = reference < 1e-6 * reference[0]
    assert weak.any()
    assert ((top - reference).abs()[weak] <= 1e-6 * reference[weak]).all()
    core32 = (delta @ (inputs.T @ inputs) @ delta.T).float()
    single = torch.linalg.eigvalsh(core32).flip(0).double() / 199
    assert ((single - reference).abs()[weak] > 1e-2 * reference[weak]).any()


@given(st.integers(1, 10), st.integers(1, 10), st.sampled_from([0.0, 1e-6, 1.0]), st.integers(0, 2**31 - 1))
@SETTINGS
def test_isotropic_factor_equals_its_svd_definition(rows, cols, weak_scale, seed):
    """The Gram route of isotropic_factor matches mean(σ)·U Vᵀ from the SVD, also for ill-conditioned or
    rank-deficient inputs (where it falls back to the SVD)."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    matrix[:, 0] *= weak_scale  # a weak or missing direction
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    assume(s.numel() == 1 or s[-1] == 0 or (s[-2] - s[-1]) > 1e-9 * s[0])  # else U Vᵀ is not unique
    torch.testing.assert_close(isotropic_factor(matrix), s.mean() * (u @ vh), rtol=0, atol=1e-8 * (1 + s[0]))


@given(
    st.integers(1, 10),
    st.integers(1, 10),
    st.integers(1, 10),
    st.sampled_from([0.0, 1e-6, 1.0]),
    st.integers(0, 2**31 - 1),
)
@SETTINGS
def test_isotropic_product_equals_the_product_of_its_svd_definitions(rows, inner, cols, weak_scale, seed):
    """iso(A) @ iso(B) in the cheaper order equals mean(σ_A)·U_A V_Aᵀ · mean(σ_B)·U_B V_Bᵀ from the SVDs."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(rows, inner, generator=generator, dtype=torch.float64)
    right = torch.randn(inner, cols, generator=generator, dtype=torch.float64)
    left[:, 0] *= weak_scale

    def reference(matrix: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        assume(s.numel() == 1 or s[-1] == 0 or (s[-2] - s[-1]) > 1e-9 * s[0])  # else U Vᵀ is not unique
        return s.mean() * (u @ vh)

    expected = reference(left) @ reference(right)
    scale = 1 + torch.linalg.matrix_norm(left, 2) * torch.linalg.matrix_norm(right, 2)
    torch.testing.assert_close(isotropic_product(left, right), expected, rtol=0, atol=1e-8 * scale)


@pytest.mark.parametrize("weight_exponent", [0.15, 1.0])
def test_isotropic_factor_of_a_float32_matrix_is_as_accurate_as_the_float32_svd(weight_exponent):
    """ESM's P (orthonormal task blocks, weighted, overlapping) in float32, κ = 731 and 6e5: the Gram route
    would square that into float32's rounding (errors of several % before it ran in float64); in float64
    it beats the float32 SVD (1e-6 and 3e-4 relative) with 7e-8, the rounding of the float32 result."""
    generator = torch.Generator().manual_seed(0)
    blocks = []
    for _ in range(8):
        q, _ = torch.linalg.qr(torch.randn(96, 12, generator=generator, dtype=torch.float64))
        blocks.append(q * torch.logspace(0, -4, 12, dtype=torch.float64) ** weight_exponent)
    matrix = torch.cat(blocks, dim=1)
    s = torch.linalg.svdvals(matrix)
    assert 1e2 < s[0] / s[-1] < _gram_route_max_condition(torch.float32)  # the Gram route is taken
    u, s, vh = torch.linalg.svd(matrix)
    reference = s.mean() * (u @ vh)
    u32, s32, vh32 = torch.linalg.svd(matrix.float())
    svd_error = (s32.mean() * (u32 @ vh32)).double() - reference
    error = isotropic_factor(matrix.float()).double() - reference
    assert error.norm() <= min(2 * svd_error.norm(), 1e-6 * reference.norm())


@pytest.mark.parametrize("condition", [2e6, 1e7])
def test_isotropic_factor_and_product_of_an_ill_conditioned_float32_matrix_match_the_float64_svd(condition):
    """Past the Gram route's bound a float32 matrix takes the SVD, in float64: the float32 SVD was 1.5e-2 and
    3.6e-2 relative off here (now 2.5e-8, the rounding of the float32 result), the Gram route would be 9e-6
    and 4e-3."""
    generator = torch.Generator().manual_seed(0)
    n = 256
    singular_values = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), n, dtype=torch.float64)
    matrix = _with_singular_values(singular_values, n, n, generator).float()
    right = torch.randn(n, 64, generator=generator).float()
    s = torch.linalg.svdvals(matrix.double())
    assert s[0] / s[-1] > _gram_route_max_condition(torch.float32)  # the SVD is taken

    def reference(tensor: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(tensor.double(), full_matrices=False)
        return s.mean() * (u @ vh)

    factor, product = reference(matrix), reference(matrix) @ reference(right)
    assert isotropic_factor(matrix).dtype == isotropic_product(matrix, right).dtype == torch.float32
    assert (isotropic_factor(matrix).double() - factor).norm() <= 1e-6 * factor.norm()
    assert (isotropic_product(matrix, right).double() - product).norm() <= 1e-6 * product.norm()
