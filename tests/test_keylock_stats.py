"""attack=keylock_stats: a key-lock block's BatchNorm statistics give the batch mean and contrast, without the key."""

import torch

from fedsim.attacks.keylock_stats import KeyLockStats, batch_statistic, locked_statistics, mean_input, restore_batch
from fedsim.defenses.keylock import KeyLockDefense, shared
from fedsim.hook import named_state
from fedsim.models import build_model
from fedsim.threat import Observation, TrainMeta
from fedsim.training import local_update, single_thread
from tests.conftest import fedsim_run


def _observation(defense, x, y, *, mode="fedsgd", steps=1, widths=(256, 256)):
    """What the curious server holds after one client trains on (x, y) through the real local update."""
    client = defense.build_model(build_model({"name": "fc", "widths": list(widths)}, (x.shape[1],), 10, seed=0),
                                 private=True)
    client.load_state_dict({**client.state_dict(), **defense.private_state(client, seed=0, client=0)})
    server = defense.build_model(build_model({"name": "fc", "widths": list(widths)}, (x.shape[1],), 10, seed=0),
                                 private=False)
    server.load_state_dict(shared(client.state_dict()))
    global_state = server.state_dict()
    with single_thread():
        result = local_update(client, x, y, mode=mode, batch_size=len(x), local_steps=steps, lr=0.1,
                              gen=torch.Generator().manual_seed(0))
    sent = named_state(shared(result.arrays), server)
    params = {n for n, _ in server.named_parameters()}
    update = {k: (v if mode == "fedsgd" else v - global_state[k]) for k, v in sent.items() if k in params}
    buffers = {k: v for k, v in sent.items() if k not in params}
    meta = TrainMeta(mode=mode, input_shape=(x.shape[1],), num_classes=10, batch_size=len(x), local_steps=steps,
                     lr=0.1)
    return defense.observe(Observation(1, 0, server, update, meta, buffers)), x[result.used]


def _digits(n=8):
    from fedsim.data import load_dataset

    data = load_dataset({"name": "digits"})
    return data.train_x[:n].flatten(1), data.train_y[:n]


def test_the_batch_mean_comes_from_the_running_mean_without_the_key():
    """FedSGD, batch 8, keylock defaults (norm=batch, no_key), fc [256, 256] on digits."""
    x, y = _digits()
    obs, batch = _observation(KeyLockDefense(), x, y)
    recon = KeyLockStats().reconstruct(obs)
    truth = batch.double().mean(0)
    error = float((recon.inputs[0].detach().double() - truth).norm() / truth.norm())
    assert error < 1e-4
    # and each channel's batch variance, the contrast: v_j = var_i(W_j x_i)
    block, _, var_h = locked_statistics(obs)
    expected = (batch.double() @ block.layer.weight.detach().double().T).var(dim=0, unbiased=True)
    assert float((var_h - expected).norm() / expected.norm()) < 1e-4


def test_the_statistics_undo_the_mean_and_contrast_the_gradients_cannot_see():
    """Given the centred batch up to a positive scale (what SPEAR through the lock gets), the batch is exact."""
    x, y = _digits()
    obs, batch = _observation(KeyLockDefense(), x, y)
    block, mean_h, var_h = locked_statistics(obs)
    W = block.layer.weight.detach()
    centred = 0.37 * (batch.double() - batch.double().mean(0))          # scale unknown to the attacker
    restored, _ = restore_batch(centred, W, mean_input(W, block.layer.bias, mean_h), var_h)
    assert float((restored - batch.double()).norm() / batch.double().norm()) < 1e-4


def test_a_narrow_locked_layer_pins_the_mean_only_in_its_row_space():
    """m < n (16 channels, 64 inputs): the part of the mean W does not see is not recovered (min-norm answer)."""
    x, y = _digits()
    obs, batch = _observation(KeyLockDefense(), x, y, widths=(16, 16))
    recon = KeyLockStats().reconstruct(obs)
    truth = batch.double().mean(0)
    assert float((recon.inputs[0].double() - truth).norm() / truth.norm()) > 0.05
    assert recon.stats["rank"] == 16


def test_fedavg_steps_give_the_mean_through_weights_that_moved_so_only_approximately():
    x, y = _digits(8)
    truth = x.double().mean(0)        # every step trains on the whole batch of 8 (reshuffled)

    def error(steps):
        recon = KeyLockStats().reconstruct(_observation(KeyLockDefense(), x, y, mode="fedavg", steps=steps)[0])
        return float((recon.inputs[0].detach().double() - truth).norm() / truth.norm()), recon.stats["exact_model"]

    assert error(1)[0] < 1e-4 and error(1)[1] is True                  # one step: exact
    four, exact_model = error(4)
    assert 1e-4 < four < 1e-2 and exact_model is False                 # W moved between the steps
    assert torch.allclose(batch_statistic(torch.zeros(3), torch.full((3,), 0.1), 0.1), torch.ones(3).double())


def test_in_a_keylock_federation_the_observation_holds_the_blocks_statistics_and_the_mean_is_recovered(tmp_path):
    """The done-when case end to end: defense=keylock defaults, FedSGD, batch 8, fc [256, 256] on digits."""
    from fedsim.api import compose
    from fedsim.config import validate
    from fedsim.data import load_dataset
    from fedsim.data.partition import partition
    from fedsim.training import draw_batches, seed_for
    from omegaconf import OmegaConf

    args = ["data=digits", "model.widths=[256,256]", "defense=keylock", "attack=keylock_stats", "fl.clients=2",
            "fl.rounds=1", "defense.client_evaluation=false"]
    result = fedsim_run(tmp_path, *args)
    rows = result.attacks("keylock_stats")
    assert len(rows) == 2 and not any(r["error"] for r in rows)
    run = validate(OmegaConf.to_container(compose(args), resolve=True), deep=False)
    bundle = load_dataset(run.data)
    part = partition(bundle.train_y, 2, run.partition, run.seed)[0]
    used = draw_batches(len(part), 8, 1, torch.Generator().manual_seed(seed_for(run.seed, 1, 0)))[0]
    truth = bundle.train_x[torch.as_tensor(part)][used].flatten(1).double().mean(0)
    recon = torch.load(result.directory / "reconstructions" / "round001_client0_keylock_stats.pt")["inputs"]
    error = float((recon[0].flatten().double() - truth).norm() / truth.norm())
    assert error < 1e-4, error
