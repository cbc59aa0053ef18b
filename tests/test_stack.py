"""defense=stack: defenses applied in the declared order, validated at the door."""

import pytest
import torch

from fedsim.defenses.base import DefenseContext, build_defense
from fedsim.defenses.noise import clip_update, l2_norm
from fedsim.defenses.pruning import prune
from fedsim.errors import ConfigError


def _ctx():
    return DefenseContext(1, 0, "fedsgd", 8, torch.Generator().manual_seed(0))


def _update():
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(40, 30, generator=g), "b": torch.randn(40, generator=g)}


def test_steps_apply_in_the_declared_order():
    update = _update()
    clip_then_prune = build_defense({"name": "stack", "steps": [{"name": "clip", "clip": 1.0},
                                                                 {"name": "pruning", "keep": 0.1}]})
    prune_then_clip = build_defense({"name": "stack", "steps": [{"name": "pruning", "keep": 0.1},
                                                                 {"name": "clip", "clip": 1.0}]})
    a, b = clip_then_prune.transform(update, _ctx()), prune_then_clip.transform(update, _ctx())
    expected_a = prune(clip_update(update, 1.0), 0.1)
    assert all(torch.allclose(a[k], expected_a[k]) for k in update)
    assert l2_norm(a) < 0.99                  # pruning after clipping leaves less than the clip norm
    assert l2_norm(b) == pytest.approx(1.0)   # clipping last: exactly the clip norm
    assert clip_then_prune.name == "clip+pruning"


def test_the_stack_reports_each_steps_strength_and_the_best_dp_guarantee():
    stack = build_defense({"name": "stack", "steps": [{"name": "pruning", "keep": 0.2},
                                                       {"name": "noise", "clip": 1.0, "sigma": 2.0},
                                                       {"name": "noise", "clip": 1.0, "sigma": 0.5}]})
    s = stack.strength()
    assert s["pruning.keep"] == 0.2 and s["noise1.sigma"] == 2.0 and s["noise2.sigma"] == 0.5
    assert stack.privacy(4, 1.0)["epsilon"] == pytest.approx(
        build_defense({"name": "noise", "sigma": 2.0}).privacy(4, 1.0)["epsilon"])


@pytest.mark.parametrize("steps, key", [
    ([], "defense.steps"),
    ([{"name": "stack"}], "defense.steps[0].name"),
    ([{"name": "noise"}, {"name": "keylock"}], "defense.steps[1].name"),
    ([{"name": "secagg"}, {"name": "noise"}], "defense.steps[0].name"),
    ([{"name": "pruning", "kep": 0.1}], "defense.steps[0].kep"),
    ([{"name": "pruning", "keep": 2}], "defense.steps[0].keep"),
    (["noise"], "defense.steps[0]"),
])
def test_a_bad_stack_is_refused_with_the_key_at_fault(steps, key):
    with pytest.raises(ConfigError) as err:
        build_defense({"name": "stack", "steps": steps})
    assert err.value.key == key


def test_a_stack_runs_in_a_federation_and_records_its_steps(tmp_path):
    from tests.conftest import fedsim_run

    r = fedsim_run(tmp_path, "data=digits", "model.widths=[32]", "fl.rounds=1", "fl.batch_size=2",
                   "attack=analytic", "defense=stack")
    rows = r.attacks()
    assert rows and all(a["defense"] == "clip+pruning+noise" and a["defense_pruning.keep"] == 0.1 for a in rows)
    assert r.rounds[-1]["privacy"] == "dp" and r.rounds[-1]["epsilon"] > 0


def test_keylock_noise_and_secure_aggregation_compose(tmp_path):
    """The model transform first, the protocol last: the aggregate holds shared layers only (BatchNorm buffers and
    their 0-d counters included), and clients still evaluate with their own keys."""
    from tests.conftest import fedsim_run

    r = fedsim_run(tmp_path, "data=digits", "model.widths=[32]", "fl.rounds=2", "fl.batch_size=4", "fl.clients=3",
                   "attack=keylock_inversion", "attack.iterations=5", "output.grid_clients=0", "defense=stack",
                   "defense.steps=[{name: keylock, key_dim: 64},{name: noise, sigma: 0.001},{name: secagg}]")
    rows = [row for row in r.rounds if row["round"] >= 1]
    assert all(row["observed"] == "aggregate" and row["healthy"] == 3 and row["faults"] == 0 for row in rows)
    assert all(row["clients_evaluated"] == 3 and row["privacy"] == "dp" for row in rows)
    assert [a["client"] for a in r.attacks()] == [-1, -1] and all(a["error"] is None for a in r.attacks())
