"""The same config and seed give the same client updates and metrics in-process and on Ray."""

from tests.conftest import fedsim_run


def test_ray_and_inline_runtimes_give_identical_metrics(tmp_path):
    args = ("attack=analytic", "fl.batch_size=2", "fl.rounds=2", "fl.clients=3", "data=digits", "model.widths=[32]")
    inline = fedsim_run(tmp_path, *args, name="inline")
    ray = fedsim_run(tmp_path, *args, "runtime=ray", "runtime.cpus=2", name="ray")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert ray.status["state"] == "complete"
    assert len(inline.attacks()) == 6
    assert strip(inline.results) == strip(ray.results)
    assert strip(inline.rounds) == strip(ray.rounds)
