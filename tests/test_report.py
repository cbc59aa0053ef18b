"""fedsim-report: the tidy table, status labels, plots and the HTML page (rendered in headless Chromium)."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEAD_PID = 2**31 - 2


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real sweep: batch 1 and 2 complete, batch 5000 refused (larger than a client's data)."""
    tmp = tmp_path_factory.mktemp("report")
    folder = tmp / "sweep"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "fedsim.cli", "-m", "attack=analytic", "data=digits",
                           "model.widths=[32]", "fl.clients=2", "fl.rounds=2", "fl.batch_size=1,2,5000",
                           f"hydra.sweep.dir={folder}"], cwd=tmp, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def report(sweep):
    from fedsim.report import write_report

    return write_report(sweep)


def test_the_table_has_one_row_per_run_round_client_attack_keyed_by_overrides(report):
    table = pd.read_csv(report.directory / "table.csv")
    complete = table[table["status"] == "complete"]
    assert len(complete) == 2 * 2 * 2                                    # 2 runs x 2 rounds x 2 clients, 1 attack
    keys = ["fl.batch_size", "round", "client", "attack"]
    assert not complete.duplicated(keys).any()
    assert {"attack", "data", "model.widths", "fl.clients", "fl.rounds", "fl.batch_size"} <= set(table.columns)
    assert set(complete["fl.batch_size"]) == {1, 2} and set(complete["model.widths"]) == {"[32]"}
    one = complete[complete["fl.batch_size"] == 1]
    assert (one["exact"] == 1.0).all() and (complete[complete["fl.batch_size"] == 2]["exact"] < 1).all()
    assert one["final_accuracy"].between(0, 1).all() and one["accuracy"].notna().all()
    invalid = table[table["status"] == "invalid"]
    assert len(invalid) == 1 and invalid["fl.batch_size"].iloc[0] == 5000 and "fl.batch_size" in invalid["error"].iloc[0]
    parquet = pd.read_parquet(report.directory / "table.parquet")
    assert list(parquet.columns) == list(table.columns) and len(parquet) == len(table)
    assert parquet["exact"].dtype.kind == "f" and parquet["fl.batch_size"].dtype.kind == "i"


def test_every_job_gets_a_status_label(sweep, tmp_path):
    from fedsim.report import collect

    root = tmp_path / "labels"
    shutil.copytree(sweep, root, ignore=shutil.ignore_patterns("report"))
    done = root / "0"
    for name, change in [("killed", {"state": "running", "pid": DEAD_PID}),
                         ("alive", {"state": "running", "pid": os.getpid()}),
                         ("failed", {"state": "failed", "error": "RuntimeError: boom"}),
                         ("interrupted", {"state": "interrupted"})]:
        shutil.copytree(done, root / name)
        state = json.loads((done / "status.json").read_text()) | change
        (root / name / "status.json").write_text(json.dumps(state))
    shutil.copytree(done / ".hydra", root / "never-started" / ".hydra")   # Hydra made it, the run never began
    labels = {job.name: job.status for job in collect(root)}
    assert labels == {"0": "complete", "1": "complete", "2": "invalid", "killed": "incomplete", "alive": "running",
                      "failed": "failed", "interrupted": "incomplete", "never-started": "incomplete"}


def test_the_report_has_plots_grids_and_one_page_linking_them(report):
    names = {p.name for p in report.plots}
    assert {"attack_per_round.png", "privacy_utility.png", "sweep_fl.batch_size.png"} <= names
    page = report.page.read_text()
    for plot in report.plots:
        assert f"src='plots/{plot.name}'" in page
    grids = sorted((report.directory / "grids").rglob("*.png"))
    assert len(grids) == 2 * 2 * 2                                      # 2 runs x rounds 1 and 2 x 2 clients
    assert all(f"src='{g.relative_to(report.directory).as_posix()}'" in page for g in grids)
    for status in ("complete", "invalid"):
        assert f">{status}</span>" in page
    # findings in words: what leaked, or why nothing was measured
    assert "analytic vs fl.batch_size=1: no defense: identified 100%, exact 100%" in page
    assert "fl.batch_size=5000: not applicable: not run, the configuration was refused: fl.batch_size=5000" in page
    assert "<code class='cmd'>fedsim attack=analytic data=digits model.widths=[32]" in page  # repeat one run
    assert "<script" not in page and "http" not in page                 # static, nothing fetched


def test_the_page_can_embed_everything_in_one_file(sweep, tmp_path):
    from fedsim.report import write_report

    single = write_report(sweep, tmp_path / "single", embed=True)
    page = single.page.read_text()
    assert page.count("src='data:image/png;base64,") == len(single.plots) + 8


def test_the_command_line_writes_the_report_and_says_where(sweep, tmp_path, capsys):
    from fedsim.report import main

    assert main([str(sweep), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "3 run(s): 2 complete, 1 invalid" in out and str(tmp_path / "cli" / "index.html") in out
    assert main([str(tmp_path / "empty-nothing")]) == 2
    capsys.readouterr()
    assert main(["--markdown", str(sweep)]) == 0                        # the study table, as README shows it
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| setting | identified | exact | PSNR dB | LS ceiling dB | SSIM | final acc | attacked rounds |"
    assert len(lines) == 2 + 3
    # each cell at the first and the last attacked round
    assert "| fl.batch_size=1 | 100% → 100% | 100% → 100% | 100.0 → 100.0 |" in "\n".join(lines)
    assert lines[2].endswith("| 1 → 2 |")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fedsim-report"] == "fedsim.report:main"


def test_the_screenshot_test_runs_here():
    """The Chromium test below must run, not skip, where the suite runs (apt-get install chromium)."""
    assert chromium() is not None, "install chromium (apt-get install -y chromium) to render the report page"


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=10000"]
IMAGE_CHECK = """<script>window.addEventListener('load', function () {
  var out = []; for (var i = 0; i < document.images.length; i++) { var im = document.images[i];
  out.push([im.getAttribute('src'), im.naturalWidth, im.naturalHeight]); }
  var pre = document.createElement('pre'); pre.id = 'image-check'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre); });</script>"""


def test_the_page_renders_in_headless_chromium_with_every_plot_and_grid(report, tmp_path):
    browser = chromium()
    assert browser is not None, "chromium is not installed (apt-get install -y chromium)"
    # A copy of the page with a script that lists every image and its decoded size once the page has loaded.
    probe = report.directory / "probe.html"
    probe.write_text(report.page.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    base = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    probe.unlink()
    assert "<pre id=\"image-check\">" in dom.stdout, dom.stderr[-2000:]
    listed = json.loads(dom.stdout.split("<pre id=\"image-check\">")[1].split("</pre>")[0].replace("&quot;", '"'))
    sources = {src: (w, h) for src, w, h in listed}
    plots = [s for s in sources if s.startswith("plots/")]
    grids = [s for s in sources if s.startswith("grids/")]
    assert len(plots) == len(report.plots) >= 3 and len(grids) == 8
    assert all(w > 100 and h > 100 for w, h in sources.values()), sources   # every image decoded

    # no empty plot: every plot image holds coloured marks (lines, points, bars, or a sentence saying why not)
    import matplotlib.image

    for plot in report.plots:
        pixels = matplotlib.image.imread(plot)[..., :3]
        coloured = ((pixels.max(axis=2) - pixels.min(axis=2)) > 0.2).mean()
        assert coloured > 1e-4, f"{plot.name} looks empty"   # empty axes: black, white and grey only (0)
    assert "In one minute" in dom.stdout and "grids</a>" in dom.stdout   # the first screen: findings, grid links

    shot = tmp_path / "page.png"
    subprocess.run([*base, "--window-size=1280,2000", f"--screenshot={shot}", report.page.as_uri()],
                   capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    coloured = ((pixels.max(axis=2) - pixels.min(axis=2)) > 0.2).mean()  # plot lines, badges: not grey, not white
    assert coloured > 0.002 and pixels.std() > 0.05
    top = pixels[:1000]                                                   # the first screen is not blank
    assert top.std() > 0.05


def test_a_defense_strength_is_the_knob_that_varies_and_the_frontier_keeps_undominated_settings():
    from fedsim.plots import pareto_front
    from fedsim.report import _with_strength

    df = pd.DataFrame({"run": ["a", "b", "c", "d", "d"], "defense": ["none", "noise", "noise", "pruning", "pruning"],
                       "defense.sigma": [None, 0.1, 1.0, None, None], "defense_clip": [None, 1.0, 1.0, None, None],
                       "defense_keep": [None, None, None, 0.5, 0.5]})
    out = _with_strength(df)
    assert list(out["strength"]) == [0.0, 0.1, 1.0, 0.5, 0.5]
    assert list(out["strength_knob"][1:]) == ["defense.sigma", "defense.sigma", "defense.keep", "defense.keep"]
    # (attack success, accuracy): (0.5, 0.6) is beaten by (0.2, 0.7); the rest trade one for the other
    assert pareto_front([(0.9, 0.9), (0.5, 0.6), (0.2, 0.7), (0.0, 0.1)]) == [(0.0, 0.1), (0.2, 0.7), (0.9, 0.9)]


def test_runs_made_from_python_are_keyed_by_the_config_values_that_differ(tmp_path):
    from fedsim.api import run
    from fedsim.report import write_report

    for b in (1, 2):
        run(["attack=analytic", "data=digits", "model.widths=[32]", "fl.rounds=1", "fl.clients=2",
             f"fl.batch_size={b}"], tmp_path / f"b{b}")
    report = write_report(tmp_path)
    assert list(report.runs["fl.batch_size"]) == [1, 2] and "fl.rounds" not in report.runs.columns
    assert list(report.runs["mean_exact"]) == [1.0, 0.0]
    assert "sweep_fl.batch_size.png" in {p.name for p in report.plots}


def _rows(**columns):
    return pd.DataFrame(columns)


@pytest.mark.parametrize("rows,status,expected", [
    (_rows(attack=["spear"] * 2, identified=[0.5, 0.0], exact=[0.25, 0.0], error=[None, None]), "complete", "leaked"),
    (_rows(attack=["spear"] * 2, identified=[0.0, 0.0], exact=[0.0, 0.0], error=[None, None],
           **{"stats.budget_exhausted": [False, True]}), "complete", "attack out of budget"),
    (_rows(attack=["spear"] * 2, identified=[0.0, 0.0], exact=[0.0, 0.0], error=[None, None],
           **{"stats.budget_exhausted": [False, False]}), "complete", "defense held"),
    (_rows(attack=["spear"] * 2, identified=[0.0, 0.0], exact=[0.0, 0.0], error=[None, None]), "complete",
     "defense held"),                                                   # no budget_exhausted recorded: false
    (_rows(attack=["spear"] * 2, identified=[0.0, 0.0], exact=[0.0, 0.0], error=[None, None],
           **{"stats.budget_exhausted": pd.array([pd.NA, pd.NA], dtype="boolean")}), "complete",
     "defense held"),                                                   # an attack that records none (NA)
    (_rows(attack=["spear"] * 2, identified=[0.0, 0.0], exact=[0.0, 0.0], error=["ReconstructionFailed: x"] * 2),
     "complete", "failed"),
    (None, "invalid", "not applicable"),
    (None, "failed", "failed"),
])
def test_findings_say_why_nothing_leaked(rows, status, expected):
    from fedsim.page import verdict

    kind, why = verdict(rows, status, "keylock_spear needs a Linear" if status != "complete" else None)
    assert kind == expected and why


def test_a_finding_names_the_ceiling_beside_the_attack_so_its_shortfall_is_not_read_as_the_defense():
    from fedsim.page import verdict

    rows = _rows(attack=["spear"] * 2, identified=[0.0, 0.0], exact=[0.0, 0.0], psnr=[12.0, 14.0],
                 ceiling_psnr=[35.0, 37.0], ceiling_ssim=[0.93, 0.95], error=[None, None])
    kind, why = verdict(rows)     # the updates give recognisable images away: not the defense's verdict to claim
    assert kind == "attack fell short" and "SSIM 0.94" in why
    assert why.endswith("the updates' least-squares ceiling 36.0 dB (attack 13.0 dB)")
    kind, why = verdict(rows.assign(ceiling_psnr=[9.0, 11.0], ceiling_ssim=[0.2, 0.3]))
    assert kind == "defense held" and why.endswith("ceiling 10.0 dB (attack 13.0 dB)")
    kind, why = verdict(rows.assign(recovered_ssim=[0.99, 0.99]))    # the run's own threshold
    assert kind == "defense held"
    assert verdict(rows.drop(columns=["ceiling_psnr", "ceiling_ssim"])) == ("defense held",
                                                                           "nothing identified by an attack that ran "
                                                                           "to its end")


def test_an_attack_that_always_raised_gets_no_plot_and_a_note_saying_so(tmp_path):
    from fedsim.plots import make_plots

    df = _rows(run=["a", "a", "b", "b"], label=["x", "x", "y", "y"], attack=["spear", "spear", "other", "other"],
               defense=["none"] * 4, round=[1, 2, 1, 2], identified=[0.0, 0.0, 1.0, 1.0], exact=[0.0, 0.0, 1.0, 1.0],
               psnr=[5.0, 5.0, 100.0, 100.0], error=["RuntimeError: boom"] * 2 + [None] * 2,
               final_accuracy=[0.5] * 4, strength=[0.0] * 4, strength_knob=[None] * 4, seed=[0] * 4)
    notes: list[str] = []
    plots = make_plots(df, None, tmp_path, notes)
    assert [p.name for p in plots] == ["attack_per_round.png", "privacy_utility.png"]
    assert any(n.startswith("No plots for spear: every attack raised (RuntimeError: boom)") for n in notes)
    assert any("no defense was run at two or more strengths" in n for n in notes)


def _study_table():
    """A tidy table as a key-lock study writes it: FedAvg without and with the block (3 seeds each), two more
    attacker options, attacked at rounds 1 and 50; one attack (labels_only) scores no image metric."""
    rows = []
    accs = {("none", 0): 0.60, ("none", 1): 0.56, ("none", 2): 0.58,
            ("keylock", 0): 0.50, ("keylock", 1): 0.48, ("keylock", 2): 0.46}
    runs = [("none", None, s) for s in (0, 1, 2)] + [("keylock", "no_key", s) for s in (0, 1, 2)] + \
        [("keylock", "known_key", 0), ("keylock", "adaptive", 0)]
    for defense, attacker, seed in runs:
        run = f"{defense}-{attacker}-{seed}"
        label = "defense=none" if defense == "none" else f"defense=keylock, defense.attacker={attacker}"
        for rnd in (1, 50):
            ident = {None: 1.0, "no_key": 0.0, "known_key": 0.5, "adaptive": 0.25}[attacker]
            rows.append(dict(run=run, label=label, status="complete", defense=defense, seed=seed,
                             **{"defense.attacker": attacker}, attack="keylock_inversion", round=rnd, client=0,
                             identified=ident * (1 if rnd == 1 else 0.5), exact=0.0, psnr=10 + 20 * ident,
                             final_accuracy=accs[(defense, seed)], strength=0.0, strength_knob=None, error=None))
    return pd.DataFrame(rows)


def test_keylock_claim_is_one_table_of_accuracy_over_seeds_beside_each_attacker(tmp_path):
    from fedsim.page import keylock_table
    from fedsim.plots import keylock_plot, keylock_summary

    df = _study_table()
    table = keylock_summary(df)
    assert list(table["arm"]) == ["FedAvg, no key-lock", "key-lock, attacker no_key", "key-lock, attacker known_key",
                                  "key-lock, attacker adaptive"]
    fedavg = table.iloc[0]
    assert fedavg["seeds"] == 3 and fedavg["accuracy"] == pytest.approx(0.58)
    assert fedavg["accuracy_std"] == pytest.approx(0.02)
    known = table.iloc[2]
    assert (known["first_round"], known["last_round"]) == (1, 50)
    assert (known["first_identified"], known["last_identified"]) == (0.5, 0.25)
    page = keylock_table(df)
    assert "58.0% ± 2.0% (3 seeds)" in page and "48.0% ± 2.0% (3 seeds)" in page and "50% → 25%" in page
    assert keylock_plot(df, tmp_path / "keylock.png").exists()


def test_no_plot_has_an_empty_panel_and_every_frontier_point_names_its_setting(tmp_path, monkeypatch):
    import fedsim.plots as plots

    df = _study_table()
    extra = df[df["run"] == "none-None-0"].assign(attack="labels_only", identified=None, exact=None, psnr=None,
                                                  label_acc=1.0)
    df = pd.concat([df, extra.assign(psnr=12.0)], ignore_index=True)   # scores PSNR only: other panels say so
    drawn = {}
    save = plots._save

    def checked(fig, path):
        drawn[path.name] = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert plots.empty_panels(fig) == [], path.name   # each function fills or explains every panel itself
        save(fig, path)

    monkeypatch.setattr(plots, "_save", checked)
    notes: list[str] = []
    made = plots.make_plots(df, None, tmp_path, notes)
    assert {p.name for p in made} >= {"attack_per_round.png", "privacy_utility.png", "keylock.png"}
    assert "labels_only scores no identified" in drawn["attack_per_round.png"]
    assert {"none", "keylock attacker=no_key", "keylock attacker=adaptive"} <= set(drawn["privacy_utility.png"])


def test_the_first_screen_says_per_defense_what_leaked_its_epsilon_and_accuracy_cost():
    from fedsim.page import summary

    runs = pd.DataFrame([
        dict(run="a", label="defense=none", defense="none", seed=0, first_round=1, last_round=50,
             first_identified=1.0, last_identified=1.0, final_accuracy=0.60, attacks=2, attacks_raised=0),
        dict(run="b", label="defense=noise, defense.sigma=0.5", defense="noise", seed=0, first_round=1, last_round=50,
             first_identified=1.0, last_identified=0.25, final_accuracy=0.55, epsilon=12.5, attacks=2,
             attacks_raised=0)])
    tidy = pd.DataFrame({"run": ["a", "b"], "attack": ["spear", "spear"]})
    lines = summary(runs, {"b": "grids-b"}, tidy)
    assert len(lines) == 2 and lines[0].startswith("<b>No defense (against spear)</b>")
    assert ("sigma=0.5 (ε = 12.5): identified 100% at round 1, 25% at round 50, final accuracy 55.0% "
            "(-5.0 points against no defense) <a href='#grids-b'>grids</a>") in lines[1]
    # with the updates' least-squares ceiling recorded, it stands beside the attack's share, at both rounds
    runs = runs.assign(first_ceiling_psnr=[100.0, 39.9], last_ceiling_psnr=[100.0, 34.0])
    assert "25% at round 50 (least-squares ceiling 39.9 and 34.0 dB), final" in summary(runs, {}, tidy)[1]
