"""Minibatch OT: the optimum of ot.emd2, never worse than independent pairing, labels never crossed."""

import numpy as np
import ot
import pytest
import torch

from flowdiff.couplings import IndependentCoupling, MinibatchOTCoupling, transport_cost


def _emd2(x0, z):
    m = torch.cdist(x0.double(), z.double()).pow(2).numpy()
    return ot.emd2(np.full(len(x0), 1 / len(x0)), np.full(len(z), 1 / len(z)), m)


@pytest.mark.parametrize("n", [16, 128])
def test_exact_coupling_attains_emd_optimum(n):
    g = torch.Generator().manual_seed(n)
    x0, z = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g) * 2 + 3
    y = torch.randint(0, 3, (n,), generator=g)
    a, b, yb = MinibatchOTCoupling("exact")(x0, z, y)
    assert transport_cost(a, b) == pytest.approx(_emd2(x0, z), rel=1e-9)
    assert transport_cost(a, b) <= transport_cost(*IndependentCoupling()(x0, z)[:2])
    # a permutation of the source; data and labels stay together
    assert torch.equal(torch.sort(a, 0).values, torch.sort(x0, 0).values)
    assert torch.equal(b, z) and torch.equal(yb, y)


def test_unequal_batches_use_the_emd_plan():
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(40, 2, generator=g), torch.randn(64, 2, generator=g) + 1
    a, b, _ = MinibatchOTCoupling("exact")(x0, z)
    assert a.shape == b.shape == (64, 2)
    indep = transport_cost(x0[torch.randint(0, 40, (64,), generator=g)], z)
    assert transport_cost(a, b) < indep


def test_sinkhorn_approaches_exact():
    g = torch.Generator().manual_seed(1)
    x0, z = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g) * 2 + 3
    a, b, _ = MinibatchOTCoupling("sinkhorn", reg=0.01)(x0, z)
    exact = _emd2(x0, z)
    indep = transport_cost(x0, z)
    assert transport_cost(a, b) < exact + 0.25 * (indep - exact)


def test_label_aware_pairs_never_cross_labels():
    g = torch.Generator().manual_seed(2)
    n = 120
    z = torch.randn(n, 2, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    x0 = torch.randn(n, 2, generator=g)
    tagged = torch.cat([x0, torch.arange(n, dtype=torch.float32)[:, None]], 1)  # remember source rows
    ztag = torch.cat([z, torch.zeros(n, 1)], 1)
    for method in ("exact", "sinkhorn"):
        a, b, yb = MinibatchOTCoupling(method, by_label=True)(tagged, ztag, y)
        # labels still belong to their data points
        for row_b, label in zip(b[:, :2], yb):
            assert label == y[(z == row_b).all(1)][0]
        # within each label the source rows are distinct (exact) and the pairing is label-pure
        if method == "exact":
            assert len(set(a[:, 2].tolist())) == n
            for c in range(4):
                sel = yb == c
                src = a[sel][:, :2]
                assert transport_cost(src, b[sel][:, :2]) == pytest.approx(_emd2(src, b[sel][:, :2]), rel=1e-6)


def test_sinkhorn_draws_follow_torch_seed_and_a_given_generator():
    """The coupling used to own a NumPy RNG seeded by the OS: two runs after seed_everything(42) paired differently."""
    x0, z = torch.randn(64, 2), torch.randn(64, 2) + 3
    coupling = MinibatchOTCoupling("sinkhorn", reg=0.5)
    torch.manual_seed(42)
    a = MinibatchOTCoupling("sinkhorn", reg=0.5)(x0, z)[0]
    torch.manual_seed(42)
    b = coupling(x0, z)[0]
    assert torch.equal(a, b)
    # a generator of its own (validation) gives the same pairs each time and leaves the global stream alone
    state = torch.get_rng_state()
    c = coupling(x0, z, generator=torch.Generator().manual_seed(5))[0]
    d = coupling(x0, z, generator=torch.Generator().manual_seed(5))[0]
    assert torch.equal(c, d) and torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(c, coupling(x0, z, generator=torch.Generator().manual_seed(6))[0])


def test_a_plan_that_is_not_finite_falls_back_to_independent_pairs_with_a_warning():
    x0, z = torch.randn(32, 2), torch.randn(32, 2) * 100
    with pytest.warns(RuntimeWarning, match="not finite"):
        a, b, _ = MinibatchOTCoupling("sinkhorn", reg=1e-6)(x0, z)
    assert torch.isfinite(a).all() and a.shape == x0.shape and b.shape == z.shape
