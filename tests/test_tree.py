"""Leaf path strings: a file and CLI contract (checkpoint leaf names, --dims and labels keys)."""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import struct

from subspace_jax import _tree


class Pair(NamedTuple):
    a: jnp.ndarray
    b: jnp.ndarray


@struct.dataclass
class Scaled:
    weight: jnp.ndarray
    scale: jnp.ndarray


def test_leaf_paths_are_slash_joined_keys_names_and_indices():
    one = np.ones(1, np.float32)
    tree = {
        "params": {"Dense_0": {"kernel": one, "bias": one}},
        "list": [one, (one, one)],
        "pair": Pair(one, one),
        "scaled": Scaled(one, one),
        3: one,
    }
    tree = {str(k): v for k, v in tree.items()}  # dict keys must sort
    assert _tree.leaf_specs(tree).paths == (
        "3",
        "list/0",
        "list/1/0",
        "list/1/1",
        "pair/a",
        "pair/b",
        "params/Dense_0/bias",
        "params/Dense_0/kernel",
        "scaled/weight",
        "scaled/scale",
    )
    labels = _tree.label_leaves(tree, {"pair/b": "frozen", "list/1/0": "direct"})
    assert labels.count("frozen") == 1 and labels[5] == "frozen"
    assert labels.count("direct") == 1 and labels[2] == "direct"


def test_integer_dict_keys_and_the_empty_path():
    assert _tree.path_to_str(()) == ""
    assert _tree.leaf_specs({1: {2: np.zeros(2, np.float32)}}).paths == ("1/2",)
