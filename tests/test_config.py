import pytest
from omegaconf import OmegaConf

from fedsim.api import compose
from fedsim.config import validate
from fedsim.errors import AttackNotApplicable, ConfigError


def _validate(*overrides, deep=True):
    return validate(OmegaConf.to_container(compose(list(overrides)), resolve=True), deep=deep)


def test_the_default_config_is_valid():
    run = _validate()
    assert run.fl.clients == 4 and run.fl.mode == "fedsgd" and run.data["name"] == "patches"


@pytest.mark.parametrize("override,pattern", [
    ("fl.clients=0", r"fl.clients=0 is invalid: expected a number >= 1"),
    ("fl.lr=-0.1", r"fl.lr=-0.1 is invalid: expected a number > 0"),
    ("fl.mode=sgd", r"fl.mode='sgd' is invalid: expected one of fedsgd, fedavg"),
    ("fl.batch_size=abc", r"fl.batch_size='abc' is invalid: expected an integer"),
    ("+fl.bach_size=3", r"fl.bach_size=3 is invalid: expected a known key of fl \(.*batch_size"),
    ("fl.clients_per_round=9", r"fl.clients_per_round=9 is invalid: expected at most fl.clients=4"),
    ("attack.targets=7", r"attack.targets=7 is invalid"),
    ("faults.crash=1.5", r"faults.crash=1.5 is invalid: expected a number <= 1.0"),
    ("+seedd=1", r"seedd=1 is invalid: expected a known key"),
    ("+threat.buffers=false", r"threat.buffers=False is invalid: expected no such key: the server always sees .*"
                              r"fl.send_buffers=false"),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _validate(override, deep=False)


def test_a_batch_larger_than_a_clients_data_is_refused():
    with pytest.raises(ConfigError, match=r"fl.batch_size=400 is invalid: expected at most 28[0-9] \(the smallest"):
        _validate("data=digits", "fl.batch_size=400", "fl.clients=5")


def test_an_attack_that_cannot_apply_to_the_model_is_refused_at_config_time():
    with pytest.raises(AttackNotApplicable, match="analytic needs a model whose input goes straight into a Linear"):
        _validate("attack=analytic", "model=cnn")


def test_fault_fractions_must_sum_to_at_most_one():
    with pytest.raises(ConfigError, match="fractions that sum to at most 1"):
        _validate("faults.crash=0.6", "faults.nan=0.6", deep=False)
