"""defense=keylock: the locked block, private layers that never leave the client, and what attackers can do."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedsim.defenses.keylock import KeyLock, KeyLockBlock, KeyLockDefense, is_private, keylock_mod, shared
from fedsim.client_app import client_plan
from fedsim.models import build_model
from fedsim.training import single_thread


def _defense(**knobs):
    return KeyLockDefense(KeyLockDefense.Config(**knobs))


def _fc(defense, private, widths=(32, 32), inputs=(64,)):
    return defense.build_model(build_model({"name": "fc", "widths": list(widths)}, inputs, 10, seed=0), private=private)


def _client_model(defense, **kw):
    model = _fc(defense, True, **kw)
    model.load_state_dict({**model.state_dict(), **defense.private_state(model, seed=0, client=0)})
    return model


def test_the_block_normalises_without_affine_parameters_then_applies_gamma_and_beta_from_the_key():
    torch.manual_seed(0)
    for layer, x in ((torch.nn.Linear(6, 5), torch.randn(8, 6)), (torch.nn.Conv2d(2, 5, 3), torch.randn(4, 2, 7, 7))):
        lock = KeyLock(16, 5, "relu")
        block = KeyLockBlock(layer, lock, "batch").train()
        h = layer(x)
        dims = [0] if h.dim() == 2 else [0, 2, 3]
        h_hat = (h - h.mean(dim=dims, keepdim=True)) / torch.sqrt(h.var(dim=dims, unbiased=False, keepdim=True) + 1e-5)
        gamma, beta = F.relu(lock.scale_fc(lock.key)), F.relu(lock.shift_fc(lock.key))
        shape = (1, 5) if h.dim() == 2 else (1, 5, 1, 1)
        assert torch.allclose(block(x), gamma.view(shape) * h_hat + beta.view(shape), atol=1e-5)
        assert not any("norm" in n for n, _ in block.named_parameters())          # no affine parameters


def test_the_server_model_holds_exactly_the_shared_parameters_and_a_random_key_of_its_own():
    defense = _defense(key_dim=64)
    client, server = _client_model(defense), _fc(defense, False)
    private = [k for k in client.state_dict() if is_private(k)]
    assert sorted(private) == ["net.1.lock.key", "net.1.lock.scale_fc.bias", "net.1.lock.scale_fc.weight",
                               "net.1.lock.shift_fc.bias", "net.1.lock.shift_fc.weight"]
    assert set(server.state_dict()) == set(shared(client.state_dict()))
    gamma_client = F.relu(client.net[1].lock.scale_fc(client.net[1].lock.key))
    assert not torch.allclose(server.net[1].lock.gamma, gamma_client)
    other = _defense(key_dim=64).private_state(_fc(defense, True), seed=0, client=1)
    assert not torch.equal(other["net.1.lock.key"], defense.private_state(_fc(defense, True), 0, 0)["net.1.lock.key"])


def _train_message(arrays, config_yaml, rnd=1):
    from fedsim.client_app import CONFIG_KEY

    msg = Message(RecordDict({"arrays": ArrayRecord(arrays),
                              "config": ConfigRecord({CONFIG_KEY: config_yaml, "server-round": rnd})}),
                  dst_node_id=7, message_type=MessageType.TRAIN, group_id=str(rnd))
    msg.metadata.__dict__["_message_id"] = f"m{rnd}"
    return msg


def test_keylock_mod_restores_the_private_layers_on_download_and_strips_them_from_every_upload():
    import yaml
    from flwr.supercore.task_identity import TaskIdentity

    from fedsim.api import compose
    from fedsim.hook import CLIENT_KEY

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    raw = compose(["defense=keylock", "defense.key_dim=32", "data=digits", "model.widths=[16]", "fl.lr=0.5"])
    from omegaconf import OmegaConf

    config_yaml = yaml.safe_dump(OmegaConf.to_container(raw, resolve=True))
    defense = _defense(key_dim=32)
    server = defense.build_model(build_model({"name": "fc", "widths": [16]}, (64,), 10, 0), private=False)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 2, "num-partitions": 4,
                                                        "fedsim-key-seed": 5}, state=RecordDict(), run_config={})
    seen = []

    buffer_names = ("running_mean", "running_var", "num_batches_tracked", ".key")

    def handler(msg, ctx):  # stands in for the train handler: a FedSGD reply with gradients of ones
        arrays = msg.content["arrays"].to_torch_state_dict()
        seen.append(arrays)
        buffers = [k for k in arrays if k.endswith(buffer_names)]
        sent = {k: (v if k in buffers else torch.ones_like(v)) for k, v in arrays.items()}
        return Message(RecordDict({"arrays": ArrayRecord(sent), "metrics": MetricRecord({"num-examples": 1}),
                                   CLIENT_KEY: ConfigRecord({"partition-id": 2, "buffers": buffers})}), reply_to=msg)

    global_state = server.state_dict()
    plan = client_plan(config_yaml)  # what the client app hands a defense's mod: the run, as this client holds it
    first = keylock_mod(_train_message(global_state, config_yaml, 1), context, handler, plan)
    second = keylock_mod(_train_message(global_state, config_yaml, 2), context, handler, plan)
    for reply in (first, second):
        sent = reply.content["arrays"].to_torch_state_dict()
        assert set(sent) == set(global_state) and not any(is_private(k) for k in sent)
        assert not any(is_private(b) for b in reply.content[CLIENT_KEY]["buffers"])
    # download 1: the client's own initial layers (from its node's seed); download 2: after its own SGD step
    initial = defense.private_state(_fc(defense, True, widths=(16,)), seed=5, client=2)
    assert all(torch.equal(seen[0][k], initial[k]) for k in initial)
    assert torch.allclose(seen[1]["net.1.lock.scale_fc.weight"], initial["net.1.lock.scale_fc.weight"] - 0.5)
    assert torch.equal(seen[1]["net.1.lock.key"], initial["net.1.lock.key"])      # the key itself is fixed
    kept = context.state.array_records["fedsim.keylock"].to_torch_state_dict()
    assert torch.allclose(kept["net.1.lock.shift_fc.bias"], initial["net.1.lock.shift_fc.bias"] - 1.0)


def test_batch_statistics_make_every_gradient_blind_to_the_batch_mean_and_contrast():
    """norm=batch: x_i -> c + t (x_i - mean) changes no gradient: the gradients alone do not give the batch (its
    BatchNorm statistics do: tests/test_keylock_stats.py)."""
    defense = _defense(key_dim=64)
    model = _client_model(defense).train()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(8, 64, generator=g), torch.randint(0, 10, (8,), generator=g)
    shifted = 0.3 + 1.7 * (x - x.mean(dim=0)) + torch.rand(64, generator=g)   # another batch, same gradients
    names = [n for n, _ in model.named_parameters() if not is_private(n)]

    def grads(inputs):
        m = copy.deepcopy(model)
        loss = F.cross_entropy(m(inputs), y)
        params = dict(m.named_parameters())
        return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))

    def distance(u, v):  # relative L2 distance of two whole gradients
        num = sum(float((u[n] - v[n]).double().pow(2).sum()) for n in names)
        return (num / sum(float(u[n].double().pow(2).sum()) for n in names)) ** 0.5

    a, b = grads(x), grads(shifted)
    other = grads(torch.rand(8, 64, generator=g))
    assert (shifted - x).abs().max() > 0.5
    assert distance(a, b) < 2e-3            # equal up to BatchNorm's eps (1e-5 beside the batch variance)
    assert distance(a, other) > 0.3         # a different batch: a different gradient
    assert a["net.1.layer.bias"].abs().max() < 1e-6      # the normalisation cancels the locked layer's bias gradient
    # with the running statistics the block is a fixed affine map: the batches are told apart, the bias gradient lives
    running = _client_model(_defense(key_dim=64, norm="running")).train()
    model = running
    a, b = grads(x), grads(shifted)
    assert distance(a, b) > 0.1
    assert a["net.1.layer.bias"].abs().max() > 1e-4


def test_plain_first_layer_attacks_see_no_linear_relu_pair_under_the_lock():
    from fedsim.models.inspect import first_layer

    for norm, following in (("batch", "BatchNorm1d"), ("running", None)):
        layer = first_layer(_fc(_defense(key_dim=16, norm=norm), False))
        assert isinstance(layer.module, torch.nn.Linear) and layer.name == "net.1.layer"
        assert layer.activation is None
        if following is not None:
            assert layer.next_module == following


def test_the_attacker_view_per_threat_option():
    from fedsim.threat import Observation, TrainMeta

    defense = _defense(key_dim=32, attacker="known_key")
    client = _client_model(defense)
    from fedsim.defenses.keylock import grant_record, lock_outputs

    private = {k: v for k, v in client.state_dict().items() if is_private(k)}
    grant = dict(grant_record(lock_outputs(private, "relu")))
    server = _fc(defense, False)
    meta = TrainMeta(mode="fedsgd", input_shape=(64,), num_classes=10, batch_size=2, private=grant)
    obs = Observation(1, 0, server, {}, meta)
    known = defense.observe(obs)
    gamma, beta = lock_outputs(private, "relu")["net.1"]
    assert torch.allclose(known.model.net[1].lock.gamma, gamma) and torch.allclose(known.model.net[1].lock.beta, beta)
    assert known.meta.private["keylock.attacker"] == "known_key" and known.meta.private["keylock.known"] is True
    assert not any(k.startswith("keylock.gamma") for k in known.meta.private)   # decoded into the model, not passed on
    blind = _defense(key_dim=32, attacker="no_key").observe(obs)
    assert torch.equal(blind.model.net[1].lock.gamma, server.net[1].lock.gamma)
    assert not torch.allclose(blind.model.net[1].lock.gamma, gamma)


def test_in_a_federation_no_update_carries_a_lock_layer_and_clients_keep_their_accuracy(tmp_path):
    from tests.conftest import fedsim_run
    from tests.spies import SEEN

    SEEN.clear()
    r = fedsim_run(tmp_path, "data=digits", "model.widths=[64]", "fl.rounds=3", "fl.mode=fedavg",
                   "fl.local_steps=10", "fl.batch_size=16", "fl.lr=0.1", "attack=analytic", "attack.name=spy_updates",
                   "defense=keylock", "defense.key_dim=128", "output.grid_clients=0")
    assert len(SEEN) == 12
    assert all(not any(is_private(k) for k in update) and "net.1.layer.weight" in update for *_, update, _ in SEEN)
    rows = [row for row in r.rounds if row["round"] >= 1]
    assert all(row["healthy"] == 4 and row["faults"] == 0 and row["clients_evaluated"] == 4 for row in rows)
    # clients (own keys) learn; the server's random key does much worse with the very same shared layers
    assert rows[-1]["client_accuracy"] > 0.6
    assert rows[-1]["client_accuracy"] - rows[-1]["accuracy"] > 0.2


def _keylock_ig(tmp_path, attacker, name, attack="inverting", iterations=400, client=0):
    from tests.conftest import fedsim_run

    with single_thread():
        r = fedsim_run(tmp_path, "data=digits", "model=lenet", "fl.batch_size=1", "fl.rounds=1", "fl.clients=4",
                       f"attack={attack}", f"attack.iterations={iterations}", "attack.tv_weight=0",
                       f"attack.targets=[{client}]", "defense=keylock", f"defense.attacker={attacker}",
                       "output.grid_clients=0", name=name)
    (row,) = r.attacks()
    assert row["error"] is None and row["defense_attacker"] == attacker
    return row


def test_inverting_gradients_on_a_locked_lenet_fails_without_the_key_and_succeeds_with_it(tmp_path):
    """FedKL's leakage setting: DLG's sigmoid LeNet, lock act relu, batch 1; the attacker is Inverting Gradients."""
    blind = _keylock_ig(tmp_path, "no_key", "blind")
    keyed = _keylock_ig(tmp_path, "known_key", "keyed")
    assert blind["ssim"] < 0.1 and blind["psnr"] < 10
    assert keyed["ssim"] > 0.9 and keyed["psnr"] > 25


def test_every_keylock_attacker_option_runs_in_the_federation_and_is_recorded(tmp_path):
    for attacker in ("regress_key", "adaptive"):
        row = _keylock_ig(tmp_path, attacker, attacker, attack="keylock_inversion", iterations=20)
        assert row["stats"]["keylock_attacker"] == attacker and row["psnr"] is not None


@pytest.mark.slow
def test_federated_training_with_keylock_ends_within_3_points_of_fedavg(tmp_path):
    from tests.conftest import fedsim_run

    args = ("data=digits", "model=fc", "model.widths=[256,256]", "fl.mode=fedavg", "fl.local_steps=10",
            "fl.batch_size=16", "fl.lr=0.1", "fl.rounds=6", "attack=keylock_inversion", "attack.iterations=1",
            "attack.targets=1", "output.grid_clients=0")
    plain = fedsim_run(tmp_path, *args, name="plain").rounds[-1]
    locked = fedsim_run(tmp_path, *args, "defense=keylock", name="locked").rounds[-1]
    print(f"FedAvg {plain['accuracy']:.3f}, key-lock (own keys) {locked['client_accuracy']:.3f}, "
          f"server's random key {locked['accuracy']:.3f}")
    assert plain["accuracy"] > 0.85
    assert abs(locked["client_accuracy"] - plain["accuracy"]) <= 0.03   # measured: 0.925 vs 0.914
    assert locked["accuracy"] < locked["client_accuracy"] - 0.1         # measured: 0.71 with a random key


@pytest.mark.slow
def test_the_adaptive_and_key_regressing_attackers_are_recorded(tmp_path):
    """Recorded whatever they give (measured on this LeNet: adaptive ~31 dB / SSIM 0.95, regress_key ~8 dB)."""
    for attacker in ("regress_key", "adaptive"):
        row = _keylock_ig(tmp_path, attacker, attacker, attack="keylock_inversion", iterations=1000, client=1)
        print(attacker, row["psnr"], row["ssim"])
        assert row["psnr"] is not None and row["ssim"] is not None


def test_batch_statistics_of_a_single_sample_are_refused_at_the_door_for_a_linear_first_layer():
    from fedsim.api import compose
    from fedsim.config import validate
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        validate(compose(["defense=keylock", "data=digits", "model=fc", "fl.batch_size=1"]), deep=False)
    assert err.value.key == "fl.batch_size"
    validate(compose(["defense=keylock", "defense.norm=running", "data=digits", "model=fc", "fl.batch_size=1"]),
             deep=False)
    validate(compose(["defense=keylock", "data=digits", "model=lenet", "fl.batch_size=1", "attack=inverting"]),
             deep=False)


SPEAR_FC = ("data=digits", "model=fc", "model.widths=[256,256]", "fl.batch_size=8", "fl.rounds=1", "fl.clients=4",
            "attack.targets=[0]", "output.grid_clients=0", "defense=keylock")


def test_plain_spear_refuses_the_locked_fc_model():
    from fedsim.api import compose
    from fedsim.config import validate
    from fedsim.errors import AttackNotApplicable

    validate(compose(list(SPEAR_FC[:-1]) + ["attack=spear"]))                  # the plain model: accepted
    for norm in ("batch", "running"):
        with pytest.raises(AttackNotApplicable):
            validate(compose(list(SPEAR_FC) + ["attack=spear", f"defense.norm={norm}"]))


def test_with_running_statistics_spear_through_the_lock_is_exact_certified_only_with_the_key(tmp_path):
    from tests.conftest import fedsim_run

    common = SPEAR_FC + ("defense.norm=running", "attack=keylock_spear")
    with single_thread():
        (keyed,) = fedsim_run(tmp_path, *common, "defense.attacker=known_key", "attack.max_seconds=null",
                              name="keyed").attacks()
        # Without the key no certificate can come; the search stops on its counted rule, not on a clock (it ran to a
        # 60 s wall-clock budget before, so this row depended on the machine's speed).
        (blind,) = fedsim_run(tmp_path, *common, "attack.ignore_lock=true", "attack.max_seconds=null",
                              name="blind").attacks()
    assert keyed["exact"] == 1.0 and keyed["certified"] is True and keyed["stats"]["known_key"] is True
    assert blind["exact"] == 1.0 and blind["certified"] is False     # the lock does not stop SPEAR, only its proof
    # the records say why each search ended: the keyed one proved its answer, the blind one settled on it
    assert keyed["stats"]["stop_reason"] == "certified" and keyed["stats"]["budget_exhausted"] is False
    assert blind["stats"]["stop_reason"] == "converged" and blind["stats"]["budget_exhausted"] is False


def test_with_batch_statistics_spear_through_the_lock_gets_the_batch_only_up_to_mean_and_contrast():
    """Key-aware SPEAR: the next layer's features exactly, then the lock inverted with the key."""
    from fedsim.attacks.keylock_spear import KeyLockSpear, KeyLockSpearConfig
    from fedsim.defenses.keylock import grant_record, lock_outputs
    from fedsim.threat import Observation, TrainMeta

    defense = _defense(attacker="known_key")
    client = _client_model(defense, widths=(256, 256)).train()
    server = _fc(defense, False, widths=(256, 256))
    server.load_state_dict(shared(client.state_dict()))
    from fedsim.data import load_dataset

    data = load_dataset({"name": "digits"})
    x, y = data.train_x[:8].flatten(1), data.train_y[:8]
    names = [n for n, _ in server.named_parameters()]
    params = dict(client.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(client(x), y), [params[n] for n in names])
    private = {k: v for k, v in client.state_dict().items() if is_private(k)}
    meta = TrainMeta(mode="fedsgd", input_shape=(64,), num_classes=10, batch_size=8,
                     private=dict(grant_record(lock_outputs(private, "relu"))))
    obs = defense.observe(Observation(1, 0, server, dict(zip(names, grads)), meta))
    with single_thread():
        recon = KeyLockSpear(KeyLockSpearConfig(max_seconds=30)).reconstruct(obs)
    assert recon.stats["features_certified"] is True and recon.certified is False
    # right up to x_i -> c + t (x_i - mean): the best such fit of the reconstruction is the batch itself
    from fedsim.metrics import match

    rows, cols = match(recon.inputs, x)
    r, t = recon.inputs[rows].double(), x[cols].double()
    rc, tc = r - r.mean(0), t - t.mean(0)
    scale = float((rc * tc).sum() / (rc * rc).sum())
    assert float((scale * rc - tc).norm() / tc.norm()) < 1e-4
    assert float((r - t).norm() / t.norm()) > 0.1      # but not the batch: the gradients lose mean and contrast
    # ... which the block's running statistics, sent with the update, give back: the batch itself
    client_stats = {k: v for k, v in client.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    obs = replace(obs, buffers=client_stats)
    with single_thread():
        whole = KeyLockSpear(KeyLockSpearConfig(max_seconds=30)).reconstruct(obs)
    assert whole.stats["statistics"] == "running"
    r = whole.inputs[torch.as_tensor(match(whole.inputs, x)[0])].double()
    assert float((r - x[torch.as_tensor(match(whole.inputs, x)[1])].double()).norm() / x.double().norm()) < 1e-3


def test_running_statistics_move_in_a_clients_model_and_stay_put_in_the_servers():
    defense = _defense(key_dim=16, norm="running")
    client, server = _client_model(defense).train(), _fc(defense, False).train()
    x = torch.rand(8, 64)
    with torch.no_grad():
        client(x)
        server(x)
    assert client.net[1].norm.running_mean.abs().max() > 0       # updated from the batch after normalising with it
    assert torch.equal(server.net[1].norm.running_mean, torch.zeros(32))  # an attacker's copy matches what was sent


def _first_key(node_config: dict, *overrides: str, attacker: str = "no_key"):
    """The key a client's first train message gives it, and whether its reply carries a grant (called directly,
    as a SuperNode's process calls its ClientApp: not a simulation)."""
    import yaml
    from flwr.supercore.task_identity import TaskIdentity
    from omegaconf import OmegaConf

    from fedsim.api import compose
    from fedsim.hook import CLIENT_KEY, GRANT_KEY

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    raw = compose(["defense=keylock", "defense.key_dim=8", "data=digits", "model.widths=[4]",
                   f"defense.attacker={attacker}", *overrides])
    config_yaml = yaml.safe_dump(OmegaConf.to_container(raw, resolve=True))
    server = _defense(key_dim=8).build_model(build_model({"name": "fc", "widths": [4]}, (64,), 10, 0), private=False)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 4, **node_config},
                      state=RecordDict(), run_config={})
    seen = []

    def handler(msg, ctx):
        arrays = msg.content["arrays"].to_torch_state_dict()
        seen.append(arrays["net.1.lock.key"])
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 1}),
                                   CLIENT_KEY: ConfigRecord({"partition-id": 1, "buffers": []})}), reply_to=msg)

    reply = keylock_mod(_train_message(server.state_dict(), config_yaml, 1), context, handler, client_plan(config_yaml))
    return seen[0], GRANT_KEY in reply.content


def test_a_clients_key_comes_from_its_node_never_from_the_config_the_server_sends():
    key, _ = _first_key({"fedsim-key-seed": 11})
    assert torch.equal(_first_key({"fedsim-key-seed": 11}, "seed=3", "defense.key_seed=9")[0], key)
    assert not torch.equal(_first_key({"fedsim-key-seed": 12})[0], key)
    assert not torch.equal(_first_key({})[0], _first_key({})[0])     # no node seed: the node's own randomness


def test_the_known_key_grant_is_sent_only_in_a_simulation_or_with_the_nodes_consent():
    assert _first_key({}, attacker="known_key")[1] is False           # a server's request alone: nothing
    assert _first_key({"fedsim-audit": "true"}, attacker="known_key")[1] is True
