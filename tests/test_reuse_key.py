"""The sweep's reuse key: every TrainConfig field classified in one place, old keys kept."""

import dataclasses
import hashlib
import json

import pytest

from subspace_jax.data import load_dataset
from subspace_jax.intrinsic_dim import _sweep, config_key, run_dims
from subspace_jax.projections import LR_RULE
from subspace_jax.train import TrainConfig
from subspace_jax.train._reuse import KEY_FIELDS, NOT_IN_KEY


def test_every_config_field_is_classified_once():
    """Fails when a new TrainConfig field is added without deciding whether it changes results
    (add it to KEY_FIELDS or NOT_IN_KEY in subspace_jax/train/_reuse.py)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unclassified = fields - set(KEY_FIELDS) - set(NOT_IN_KEY)
    assert not unclassified, f"classify these TrainConfig fields in train/_reuse.py: {unclassified}"
    assert not set(KEY_FIELDS) & set(NOT_IN_KEY)
    assert len(set(KEY_FIELDS)) == len(KEY_FIELDS)
    assert not (set(KEY_FIELDS) | set(NOT_IN_KEY)) - fields  # no stale names


def key_before_the_declaration(config, *, data):
    """The key as computed before the fields were declared (a frozen copy: every field but
    seeds, dim and data_dir), the reference old runs.jsonl files were written with."""
    d = config.to_dict()
    for k in ("seeds", "dim", "data_dir"):
        d.pop(k, None)
    if config.lr is None:
        d["lr_rule"] = LR_RULE
    if config.theta0_path is not None:
        d["theta0_sha256"] = hashlib.sha256(open(config.theta0_path, "rb").read()).hexdigest()
    d["data_fingerprint"] = str(data)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


CASES = {
    "default": (TrainConfig(), "7c6be8492c71"),
    "tiny": (
        TrainConfig(
            model="mlp_small",
            dim=8,
            seeds=(0, 1),
            epochs=1,
            max_steps=15,
            batch_size=64,
            data_dir="/x",
            model_overrides={"width": 4},
        ),
        "7e047cb573b4",
    ),  # fmt: skip
    "lr": (
        TrainConfig(
            lr=0.01,
            projection="fastfood",
            per_layer=True,
            l2=1e-4,
            val_size=300,
            image_size=32,
            data_seed=3,
        ),
        "c9c6a611eb19",
    ),  # fmt: skip
    "later": (
        TrainConfig(dim=20, burn_in_steps=5, said=True, on_divergence="retry", max_retries=1),
        "6626ae6e97b6",
    ),
    "lottery": (TrainConfig(dim=20, projection="lottery", lottery_every=3), "038768128680"),
    "theta0": (TrainConfig(dim=20, theta0_path="theta0.bin"), "a50232bf08f6"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_keys_are_those_old_runs_were_stored_with(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "theta0.bin").write_bytes(b"theta0 bytes")
    config, stored = CASES[case]
    assert config_key(config, data="fp123") == stored  # the hex of the release before
    assert key_before_the_declaration(config, data="fp123") == stored


def test_an_old_runs_jsonl_is_reused_without_training(tmp_path, monkeypatch):
    data = load_dataset("digits")
    base = TrainConfig(model="mlp_small", dim=0, seeds=(0, 1), epochs=1, max_steps=5)
    key = key_before_the_declaration(dataclasses.replace(base, dim=16), data=data.fingerprint)
    old = [{"config_key": key, "dim": 16, "seed": s, "val_accuracy": 0.5 + s} for s in (0, 1)]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))

    def no_training(*args, **kwargs):
        raise AssertionError("a stored run was trained again")

    monkeypatch.setattr(_sweep, "train_and_evaluate", no_training)
    assert run_dims(base, [16], [0, 1], tmp_path, data=data) == old
