"""attack.rounds: the rounds the curious server attacks (fedsim/schedule.py), checked at the door and obeyed."""

import pytest

from fedsim.errors import ConfigError
from fedsim.schedule import AttackSchedule


@pytest.mark.parametrize("spec,rounds,expected", [
    ("all", 5, None),
    ("first", 40, {1}),
    ("last", 40, {40}),
    ("middle", 40, {21}),
    (["first", "middle", "last"], 5, {1, 3, 5}),
    ([1, 10, "last"], 30, {1, 10, 30}),
    ({"every": 10}, 40, {1, 11, 21, 31}),
    ({"every": 10, "last": True}, 40, {1, 11, 21, 31, 40}),
    (["first", "last"], 1, {1}),
])
def test_a_schedule_names_the_attacked_rounds(spec, rounds, expected):
    schedule = AttackSchedule.parse(spec, num_rounds=rounds)
    assert schedule.resolve(rounds) == (None if expected is None else frozenset(expected))
    attacked = {r for r in range(1, rounds + 1) if schedule.attacks(r, rounds)}
    assert attacked == (set(range(1, rounds + 1)) if expected is None else expected)


def test_every_k_needs_no_run_length():
    schedule = AttackSchedule.parse({"every": 3})
    assert [r for r in range(1, 11) if schedule.attacks(r, None)] == [1, 4, 7, 10]


@pytest.mark.parametrize("spec", ["often", "", [], [0], [1, "end"], [True], {"every": 0}, {"every": 2, "at": 1},
                                  {"every": "2"}, 3.5])
def test_a_bad_schedule_is_refused_with_key_value_and_what_is_allowed(spec):
    with pytest.raises(ConfigError) as err:
        AttackSchedule.parse(spec)
    assert err.value.key == "attack.rounds" and "first" in err.value.allowed and "{every: k}" in err.value.allowed


def test_a_round_past_the_run_is_refused_and_names_need_the_run_length():
    with pytest.raises(ConfigError, match="past the last"):
        AttackSchedule.parse([1, 5], num_rounds=3)
    with pytest.raises(ConfigError, match="number of rounds is unknown"):
        AttackSchedule.parse("last").resolve(None)


def test_the_config_checks_attack_rounds_before_any_work():
    from omegaconf import OmegaConf

    from fedsim.api import compose
    from fedsim.config import validate

    raw = OmegaConf.to_container(compose(["fl.rounds=3", "attack.rounds=[1,7]"]), resolve=True)
    with pytest.raises(ConfigError) as err:
        validate(raw, deep=False)
    assert err.value.key == "attack.rounds"
    raw = OmegaConf.to_container(compose(["fl.rounds=3", "attack.rounds=[first,last]"]), resolve=True)
    assert validate(raw, deep=False).targets.rounds == ["first", "last"]


def test_a_run_attacks_only_its_scheduled_rounds_and_grids_the_first_and_last_of_them(tmp_path):
    from fedsim.api import run

    result = run(["attack=analytic", "data=digits", "model.widths=[32]", "fl.clients=2", "fl.rounds=5",
                  "fl.batch_size=1", "attack.rounds=[2,middle]"], tmp_path)
    assert sorted({r["round"] for r in result.attacks()}) == [2, 3]
    assert {r["round"]: r.get("attacked") for r in result.rounds if r["round"] > 0} == \
        {1: False, 2: True, 3: True, 4: False, 5: False}
    assert len([r for r in result.rounds if r["round"] > 0 and r.get("accuracy") is not None]) == 5  # all trained
    grids = sorted(p.name for p in (tmp_path / "grids").glob("*.png"))
    assert grids == ["round002_client0_analytic.png", "round002_client1_analytic.png",
                     "round003_client0_analytic.png", "round003_client1_analytic.png"]
