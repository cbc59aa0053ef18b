"""defense=pruning: exactly the largest-magnitude fraction survives, per tensor or globally."""

import math

import pytest
import torch

from fedsim.defenses.base import DefenseContext, build_defense
from fedsim.defenses.pruning import prune


def _update():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(37, 11, generator=g), "b": 10 * torch.randn(53, generator=g),
            "c": torch.randn(3, generator=g)}


@pytest.mark.parametrize("keep", [0.01, 0.1, 0.37, 0.9])
def test_per_tensor_pruning_keeps_ceil_keep_n_largest_entries_of_every_tensor(keep):
    update = _update()
    pruned = prune(update, keep, "tensor")
    for name, v in update.items():
        kept = pruned[name] != 0
        assert int(kept.sum()) == max(1, math.ceil(keep * v.numel()))
        assert torch.equal(pruned[name][kept], v[kept])                 # survivors unchanged
        if (~kept).any():
            assert float(v[kept].abs().min()) >= float(v[~kept].abs().max())


def test_global_pruning_keeps_the_largest_fraction_of_the_whole_update():
    update = _update()
    pruned = prune(update, 0.1, "global")
    total = sum(v.numel() for v in update.values())
    kept = {k: pruned[k] != 0 for k in update}
    assert sum(int(m.sum()) for m in kept.values()) == math.ceil(0.1 * total)
    smallest_kept = min(float(update[k][m].abs().min()) for k, m in kept.items() if m.any())
    largest_dropped = max(float(update[k][~m].abs().max()) for k, m in kept.items() if (~m).any())
    assert smallest_kept >= largest_dropped
    assert int(kept["b"].sum()) > 0.5 * 53         # the large-magnitude tensor takes most of the budget


def test_keep_one_is_the_identity_and_the_input_is_never_modified():
    update = _update()
    before = {k: v.clone() for k, v in update.items()}
    defense = build_defense({"name": "pruning", "keep": 1.0})
    ctx = DefenseContext(1, 0, "fedsgd", 1, torch.Generator())
    assert all(torch.equal(defense.transform(update, ctx)[k], update[k]) for k in update)
    build_defense({"name": "pruning", "keep": 0.1}).transform(update, ctx)
    assert all(torch.equal(update[k], before[k]) for k in update)


def test_keep_is_checked_at_the_door():
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match="defense.keep"):
        build_defense({"name": "pruning", "keep": 0.0})
    with pytest.raises(ConfigError, match="defense.scope"):
        build_defense({"name": "pruning", "scope": "layer"})


def test_pruning_in_a_federation_sends_updates_with_the_kept_fraction(tmp_path):
    from tests.conftest import fedsim_run

    r = fedsim_run(tmp_path, "data=digits", "model.widths=[32]", "fl.rounds=1", "fl.batch_size=1",
                   "attack=analytic", "defense=pruning", "defense.keep=0.05")
    # the analytic attack divides the pruned weight rows by the pruned bias: far from the sample
    assert all(a["exact"] == 0.0 and a["defense_keep"] == 0.05 for a in r.attacks())
