"""README.md's demo table is the program's output (`python3 dev.py readme` writes it; experiments/readme.py)."""

from fedsim.experiments.readme import README, demo_jobs, demo_settings, rows, table_in, with_table


def test_the_readme_table_has_one_row_per_job_of_the_demos_grid_and_leads_with_identified():
    table = table_in(README.read_text())
    assert table.splitlines()[0].startswith("| setting | identified | exact |")
    settings = [setting.split(" (")[0] for setting in rows(table)]     # "(every attack raised)" annotates a row
    assert settings and sorted(settings) == sorted(set(demo_settings()))   # seeds of a setting: one row


def test_the_readme_rows_are_what_the_demo_prints_for_the_noise_1e_5_job(tmp_path):
    """The demo's own job (its preset, seed and budgets), run here: its row must be README's, cell for cell.
    (Only this job: the whole grid takes minutes; `python3 dev.py readme` regenerates every row.)"""
    from fedsim.api import run
    from fedsim.console import study_rows
    from fedsim.report import collect, runs_table

    job = next(j for j in demo_jobs() if "defense.sigma=1e-05" in j)
    run(["+experiment=spear_vs_defenses", *job], tmp_path / "job")
    runs = runs_table(collect(tmp_path))
    runs["label"] = "defense=noise, defense.clip=4, defense.sigma=1e-05"
    (printed,) = study_rows(runs)
    readme = rows(table_in(README.read_text()))["noise, clip=4, sigma=1e-05"]
    assert printed == readme
    first, last = (float(cell.rstrip("%")) for cell in printed[1].split(" → "))
    assert first >= 50 and last >= 50                  # the images are there at both ends of training
    assert printed[-1] == "1 → 50"                     # attacked at the first and the last round


def test_the_undefended_demo_model_has_learned_its_task():
    """README's undefended row: a final accuracy of a trained model (>= 50% on 8 classes, chance 12.5%), over the
    seeds the demo runs, and attack success at round 1 and at the last round."""
    from fedsim.console import STUDY_COLUMNS

    cells = rows(table_in(README.read_text()))["none"]
    acc = cells[STUDY_COLUMNS.index("final acc")]
    assert float(acc.split("%")[0]) >= 50 and "3 seeds" in acc
    assert " → " in cells[1] and cells[-1] == "1 → 50"


def test_the_table_is_spliced_between_the_markers_and_nowhere_else():
    text = "intro\n<!-- demo-table: python3 dev.py readme -->\n| old |\n<!-- /demo-table -->\nafter\n"
    new = with_table(text, "| setting |\n|---|\n| none |\n")
    assert new == "intro\n<!-- demo-table: python3 dev.py readme -->\n| setting |\n|---|\n| none |\n<!-- /demo-table -->\nafter\n"
    assert table_in(new) == "| setting |\n|---|\n| none |\n"
