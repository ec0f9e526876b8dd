"""``allocate_dims``: every leaf gets 1 <= d_i <= its size, in proportion, up to d = D."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subspace_jax as sj


def _proportional(sizes, dim):
    """The uncapped rule (1 each, the rest by largest remainder), written independently."""
    spare = dim - len(sizes)
    raw = np.array(sizes, np.float64) * spare / sum(sizes)
    alloc = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - alloc), kind="stable")[: spare - alloc.sum()]:
        alloc[i] += 1
    return list(1 + alloc)


def test_the_issue_case():
    assert sj.allocate_dims([1, 3], 4) == [1, 3]


def test_every_small_case_exhaustively():
    """All size triples in 1..6 and every valid d: the bounds, the total, and proportionality."""
    for sizes in itertools.product(range(1, 7), repeat=3):
        sizes = list(sizes)
        for dim in range(3, sum(sizes) + 1):
            alloc = sj.allocate_dims(sizes, dim)
            assert sum(alloc) == dim, (sizes, dim, alloc)
            assert all(1 <= a <= s for a, s in zip(alloc, sizes, strict=True)), (sizes, dim, alloc)
            if all(a < s for a, s in zip(_proportional(sizes, dim), sizes, strict=True)):
                # No cap binds: the proportional rule itself (so existing layouts are unchanged).
                assert alloc == _proportional(sizes, dim), (sizes, dim, alloc)
            # A capped leaf is full; every leaf below its size gets at least its uncapped share
            # rounded down (water-filling only moves dimensions to leaves with room).
            raw = [1 + (dim - 3) * s / sum(sizes) for s in sizes]
            for a, s, r in zip(alloc, sizes, raw, strict=True):
                assert a == s or a >= int(r), (sizes, dim, alloc)


def test_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="d >= number of projected leaves"):
        sj.allocate_dims([5, 5, 5], 2)
    with pytest.raises(ValueError, match="d <= number of projected parameters"):
        sj.allocate_dims([5, 5], 11)


def _mlp_theta0():
    """The leaves of a 784-200-10 MLP's first layer and head (bias of 10 included)."""
    k = jax.random.key(0)
    return {
        "h": {"kernel": jax.random.normal(k, (20, 8)), "bias": jnp.zeros((8,))},
        "out": {"kernel": jax.random.normal(k, (8, 10)), "bias": jnp.zeros((10,))},
    }


@pytest.mark.slow
@pytest.mark.parametrize("projection", ["dense", "fastfood", "sparse_very"])
def test_per_leaf_up_to_d_equals_D(projection):
    theta0 = _mlp_theta0()
    D = sum(x.size for x in jax.tree_util.tree_leaves(theta0))
    for dim in (D - 3, D):
        sub = sj.init_subspace(jax.random.key(1), theta0, dim, projection=projection, per_leaf=True)
        assert sum(g.dim for g in sub.layout.groups) == dim
        assert all(g.dim <= g.size for g in sub.layout.groups)
        # Every coordinate of w moves theta: no zero column in any group.
        w = jnp.zeros((dim,))
        flat = lambda w, sub=sub: jnp.concatenate(
            [x.ravel() for x in jax.tree_util.tree_leaves(sj.to_params(sub, w))]
        )
        J = np.asarray(jax.jacrev(flat)(w))
        assert (np.abs(J).sum(axis=0) > 0).all()
        if dim == D and projection == "dense":
            assert np.linalg.matrix_rank(J) == D  # the subspace is the whole space
