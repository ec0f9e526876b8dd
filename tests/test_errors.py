"""User errors apart from bugs: one ``UserError`` type for bad input, printed by the command
line as one ``error:`` line (exit 2); any other exception keeps its traceback and asks for a
report (exit ``EXIT_INTERNAL_ERROR``)."""

import dataclasses

import pytest

import subspace_jax
from subspace_jax import cli, projections
from subspace_jax._errors import as_user_error
from subspace_jax._subspace import NonFiniteStateError
from subspace_jax.compress import CompressedModelError
from subspace_jax.data import DataError
from subspace_jax.train import TrainConfig, check_config, load_data


def test_user_error_is_public_and_a_value_error():
    assert subspace_jax.UserError is cli.UserError
    assert issubclass(subspace_jax.UserError, ValueError)
    for sub in (cli.CLIError, DataError):
        assert issubclass(sub, subspace_jax.UserError)


@pytest.mark.parametrize(
    "error, user",
    [
        (subspace_jax.UserError("x"), True),
        (cli.CLIError("x"), True),
        (DataError("x"), True),
        (CompressedModelError("x"), True),
        (FileNotFoundError("x"), True),
        (ValueError("x"), False),  # a plain ValueError is a bug, not bad input
        (NonFiniteStateError("x"), False),  # a projection drawn with NaN: a bug to report
        (KeyError("x"), False),
        (TypeError("x"), False),
    ],
)
def test_which_exceptions_are_user_errors(error, user):
    assert cli.is_user_error(error) is user


def test_as_user_error_converts_value_errors_only_and_keeps_the_cause():
    with pytest.raises(subspace_jax.UserError, match="bad d") as info:
        with as_user_error():
            raise ValueError("bad d")
    assert type(info.value.__cause__) is ValueError
    with pytest.raises(KeyError):
        with as_user_error():
            raise KeyError("not a validation error")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lr": -1.0}, "learning rate must be"),  # validate_config
        ({"dim": 10**9, "projection": "orthogonal"}, "out of range"),  # the layout's sizes
        ({"dim": 5, "projection": "nope"}, "unknown projection"),
    ],
)
def test_check_config_raises_user_errors(changes, message):
    config = dataclasses.replace(TrainConfig(model="mlp_small", dataset="digits"), **changes)
    with pytest.raises(subspace_jax.UserError, match=message):
        check_config(config)


def test_check_config_with_data_checks_the_batch_fits():
    config = TrainConfig(model="mlp_small", dataset="digits", batch_size=10**6)
    check_config(config)  # sizes alone are fine
    with pytest.raises(subspace_jax.UserError, match="larger than the training split"):
        check_config(config, load_data(config))


def test_bad_input_is_exactly_one_error_line_and_exit_2(capsys):
    assert cli.main(["train", "--quiet", "--seeds", "1,1"]) == cli.EXIT_BAD_INPUT == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: seeds must be distinct, got '1,1'"]


@pytest.mark.parametrize("bug", [ValueError, KeyError, TypeError])
def test_an_internal_bug_keeps_its_traceback_and_asks_for_a_report(bug, monkeypatch, capsys):
    def broken():
        raise bug("injected bug")

    monkeypatch.setattr(projections, "projection_names", broken)
    code = cli.main(["projections"])
    assert code == cli.EXIT_INTERNAL_ERROR and code not in (0, 2)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "injected bug" in err
    assert f"{bug.__name__}" in err and "in broken" in err  # where it happened
    assert not any(line.startswith("error:") for line in err.splitlines())
    assert err.rstrip().splitlines()[-1] == f"internal error: {cli.REPORT_BUG}"
    assert "report it" in cli.REPORT_BUG
