"""The report's figures, drawn from the tidy table (`fedsim.report.tidy_table`) with matplotlib.

    attack_per_round.png     attack success per round, one line per job setting (seeds averaged)
    attack_vs_strength.png   attack success against each defense's strength, no-defense baseline dashed
    privacy_utility.png      final test accuracy against attack success, the Pareto frontier drawn through it
    sweep_<key>.png          attack success and attack time against any other swept number (batch size, width)
    keylock.png              key-lock's claim: final accuracy with and without the block (mean and spread over
                             seeds), beside attack success for each attacker option at the first and last round

Attack success is shown three ways: `identified` (fraction of the batch whose reconstruction picks out the true
sample among the client's data: what leaked), `exact` (fraction recovered exactly, the measure for exact attacks
such as SPEAR) and `psnr` (dB). A figure or a row of panels that has nothing to show (no defense strength swept,
one job, an attack with no scored reconstruction) is not drawn; `make_plots` says why in `notes`. A panel that
would be empty (a metric an attack does not score) says so in words instead of showing empty axes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

SUCCESS = (("identified", "identified (fraction of the batch)"), ("exact", "exact rate (fraction of the batch)"),
           ("psnr", "PSNR (dB)"))
RATES = ("identified", "exact")
MAX_LINES = 12
NOT_SWEEP = {"seed", "round", "client", "experiment", "attack", "defense", "data", "model", "runtime", "partition"}


def _plt():
    import matplotlib  # heavy: matplotlib loads only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib loads only when a figure is drawn

    return plt


def _attacks(df) -> list[str]:
    """Attacks with at least one scored reconstruction from a run that did not raise (the others have nothing to
    plot: a failure scored as recovering nothing would read as a defense holding)."""
    import pandas as pd  # heavy: pandas loads only when a table is built

    if "attack" not in df.columns:
        return []
    metrics = [m for m, _ in SUCCESS if m in df.columns]
    ran = df["error"].isna() | (df["error"].astype(str) == "") if "error" in df.columns else df["attack"].notna()
    return [a for a in df["attack"].dropna().unique()
            if any(pd.to_numeric(df.loc[(df["attack"] == a) & ran, m], errors="coerce").notna().any()
                   for m in metrics)]


def _metrics(df) -> list[tuple[str, str]]:
    import pandas as pd  # heavy: pandas loads only when a table is built

    return [(m, label) for m, label in SUCCESS
            if m in df.columns and pd.to_numeric(df[m], errors="coerce").notna().any()]


def per_job(df, metric: str, by: tuple[str, ...] = ()):
    """Mean of `metric` per run (over clients and rounds, or per `by`), keeping the run's descriptive columns."""
    import pandas as pd  # heavy: pandas loads only when a table is built

    d = df.copy()
    d[metric] = pd.to_numeric(d[metric], errors="coerce")
    keep = [c for c in ("label", "defense", "strength", "strength_knob", "final_accuracy", "seed") if c in d.columns]
    keys = ["run", "attack", *by]
    agg = {metric: "mean", **{c: "first" for c in keep}}
    return d.groupby(keys, dropna=False).agg(agg).reset_index()


def _over_seeds(frame, keys: list[str], metric: str):
    """Mean and standard deviation over seeds (over runs sharing `keys`)."""
    grouped = frame.groupby(keys, dropna=False)[metric]
    out = grouped.agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def make_plots(df, runs, folder: str | Path, notes: list[str] | None = None) -> list[Path]:
    """Every figure that applies to this table, as PNG files in `folder`. `notes` receives, in words, why a figure
    or an attack's panels were not drawn."""

    notes = notes if notes is not None else []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    if df.empty or "attack" not in df.columns:
        notes.append("No plots: no attack was recorded.")
        return []
    for attack in df["attack"].dropna().unique():
        if attack not in _attacks(df):
            part = df[df["attack"] == attack]
            errors = part["error"].dropna() if "error" in part.columns else part["attack"].iloc[0:0]
            why = (f"every attack raised ({str(errors.iloc[0])[:160]})" if len(errors) == len(part) and len(part)
                   else "it scored no reconstruction (no ground truth, or it returns no inputs)")
            notes.append(f"No plots for {attack}: {why}.")
    if not _metrics(df) or not _attacks(df):
        return []
    made = [attack_per_round(df, folder / "attack_per_round.png")]
    strength = attack_vs_strength(df, folder / "attack_vs_strength.png")
    if strength is None:
        notes.append("No plot against defense strength: no defense was run at two or more strengths.")
    utility = privacy_utility(df, folder / "privacy_utility.png")
    if utility is None:
        notes.append("No privacy-utility plot: no run recorded a final accuracy.")
    made += [strength, utility]
    made += sweep_plots(df, folder)
    if "defense" in df.columns and (df["defense"] == "keylock").any():
        lock = keylock_plot(df, folder / "keylock.png")
        if lock is None:
            notes.append("No key-lock plot: no key-lock run recorded a final accuracy.")
        made.append(lock)
    return [p for p in made if p is not None]


def attack_per_round(df, path: Path) -> Path | None:
    """Attack success against the round: how leakage changes as the model trains (rounds the schedule attacked)."""
    import pandas as pd  # heavy: pandas loads only when a table is built

    plt = _plt()
    attacks, metrics = _attacks(df), _metrics(df)
    fig, axes = plt.subplots(len(attacks), len(metrics), figsize=(5.2 * len(metrics) + 2.6, 3.4 * len(attacks)),
                             squeeze=False)
    for i, attack in enumerate(attacks):
        part = df[df["attack"] == attack]
        for j, (metric, ylabel) in enumerate(metrics):
            ax = axes[i][j]
            if pd.to_numeric(part[metric], errors="coerce").isna().all():
                _say_empty(ax, f"{attack} scores no {metric}")
                continue
            runs = per_job(part, metric, by=("round",))
            stats = _over_seeds(runs, ["label", "round"], metric)
            labels = _ordered_labels(runs)
            colors = _colors(len(labels))
            for k, label in enumerate(labels[:MAX_LINES]):
                line = stats[stats["label"] == label].sort_values("round")
                ax.plot(line["round"], line["mean"], marker="o", ms=3, color=colors[k], label=label)
            ax.set_xlabel("round")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{attack}: {metric} against the round", fontsize=10)
            ax.xaxis.get_major_locator().set_params(integer=True)
            if metric in RATES:
                ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
        handles, names = axes[i][0].get_legend_handles_labels()
        if handles:
            more = len(_ordered_labels(per_job(part, metrics[0][0]))) - MAX_LINES
            title = f"(+{more} more)" if more > 0 else None
            axes[i][-1].legend(handles, names, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                               title=title, title_fontsize=7)
    _save(fig, path)
    return path


def attack_vs_strength(df, path: Path) -> Path | None:
    """One column per defense whose strength varies; x its strength knob, y attack success, one line per attack."""
    import pandas as pd  # heavy: pandas loads only when a table is built

    if "strength" not in df.columns:
        return None
    defenses = []
    for defense, part in df[df["defense"] != "none"].groupby("defense"):
        if pd.to_numeric(part["strength"], errors="coerce").dropna().nunique() >= 2:
            defenses.append(defense)
    if not defenses:
        return None
    plt = _plt()
    metrics, attacks = _metrics(df), _attacks(df)
    colors = _colors(len(attacks))
    fig, axes = plt.subplots(len(metrics), len(defenses), figsize=(4.4 * len(defenses) + 1.5, 3.3 * len(metrics)),
                             squeeze=False)
    for j, defense in enumerate(defenses):
        part = df[df["defense"] == defense]
        knob = part["strength_knob"].dropna().iloc[0] if part["strength_knob"].notna().any() else "strength"
        for i, (metric, ylabel) in enumerate(metrics):
            ax = axes[i][j]
            drawn = False
            for k, attack in enumerate(attacks):
                mine = part[part["attack"] == attack]
                rounds = sorted(pd.to_numeric(mine["round"], errors="coerce").dropna().unique()) \
                    if "round" in mine.columns else []
                # a few attacked rounds (attack.rounds): one line per round, the fresh model to the trained one
                lines = [(f"{attack}, round {r:.0f}", mine[pd.to_numeric(mine["round"], errors="coerce") == r],
                          style) for r, style in zip(rounds, ("-", "--", ":"))] if 2 <= len(rounds) <= 3 \
                    else [(attack, mine, "-")]
                for name, rows, style in lines:
                    runs = per_job(rows, metric)
                    if runs.empty or runs[metric].isna().all():
                        continue
                    drawn = True
                    stats = _over_seeds(runs, ["strength"], metric).sort_values("strength")
                    ax.errorbar(stats["strength"], stats["mean"], yerr=stats["std"], marker="o", ms=4, capsize=3,
                                color=colors[k], ls=style, label=name)
                base = df[(df["defense"] == "none") & (df["attack"] == attack)]
                if not base.empty:
                    level = per_job(base, metric)[metric].mean()
                    ax.axhline(level, ls="-.", lw=0.8, color=colors[k], alpha=0.6, label=f"{attack}, no defense")
            if not drawn:
                _say_empty(ax, f"no {metric} scored against {defense}")
                continue
            _strength_axis(ax, part["strength"])
            ax.set_xlabel(knob)
            ax.set_ylabel(ylabel)
            if metric in RATES:
                ax.set_ylim(-0.03, 1.03)
            ax.set_title(f"{defense}: {metric} against {knob}", fontsize=10)
            ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    axes[0][-1].legend(handles, names, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    _save(fig, path)
    return path


def _strength_axis(ax, values) -> None:
    import pandas as pd  # heavy: pandas loads only when a table is built

    v = pd.to_numeric(values, errors="coerce").dropna()
    positive = v[v > 0]
    if len(positive) >= 2 and positive.max() / positive.min() >= 20:
        lowest = float(positive.min())
        if (v <= 0).any():
            ax.set_xscale("symlog", linthresh=lowest)
            ax.set_xlim(-0.3 * lowest, float(v.max()) * 1.6)
        else:
            ax.set_xscale("log")
        ticks = sorted(v.unique())
        if len(ticks) <= 10:  # label the strengths swept, not the axis' own decades
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t:g}" for t in ticks], fontsize=8)
            ax.minorticks_off()


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (attack success, accuracy) that no other point beats on both (lower success, higher accuracy)."""
    front: list[tuple[float, float]] = []
    best = -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def privacy_utility(df, path: Path) -> Path | None:
    """Final test accuracy (y) against attack success (x), one point per job setting, frontier drawn."""
    import pandas as pd  # heavy: pandas loads only when a table is built

    if "final_accuracy" not in df.columns or pd.to_numeric(df["final_accuracy"], errors="coerce").isna().all():
        return None
    plt = _plt()
    attacks, metrics = _attacks(df), _metrics(df)
    defenses = [d for d in df["defense"].dropna().unique()] if "defense" in df.columns else [None]
    colors = dict(zip(defenses, _colors(len(defenses))))
    fig, axes = plt.subplots(len(attacks), len(metrics), figsize=(5.0 * len(metrics) + 2.0, 3.8 * len(attacks)),
                             squeeze=False)
    for i, attack in enumerate(attacks):
        part = df[df["attack"] == attack]
        for j, (metric, xlabel) in enumerate(metrics):
            ax = axes[i][j]
            runs = per_job(part, metric)
            runs["final_accuracy"] = pd.to_numeric(runs["final_accuracy"], errors="coerce")
            points = runs.groupby(["label"], dropna=False).agg(
                x=(metric, "mean"), y=("final_accuracy", "mean"), defense=("defense", "first"),
                strength=("strength", "first")).reset_index().dropna(subset=["x", "y"])
            if points.empty:
                _say_empty(ax, f"no run has both a final accuracy and a scored {metric}")
                continue
            for defense, group in points.groupby("defense", dropna=False):
                ax.scatter(group["x"], group["y"], s=30, color=colors.get(defense, "grey"), label=str(defense),
                           zorder=3)
                for _, p in group.iterrows():   # every point names its defense and strength
                    ax.annotate(point_label(p["label"]), (p["x"], p["y"]), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
            front = pareto_front(list(zip(points["x"], points["y"])))
            if len(front) >= 2:
                fx, fy = zip(*front)
                ax.step(fx, fy, where="post", color="black", lw=1, alpha=0.6, label="frontier")
            ax.set_xlabel(f"{attack} {xlabel}  (lower: more private)")
            ax.set_ylabel("final test accuracy")
            ax.set_title(f"privacy-utility: {attack}, {metric}", fontsize=10)
            ax.grid(alpha=0.3)
        handles, names = axes[i][0].get_legend_handles_labels()
        if handles:
            axes[i][-1].legend(handles, names, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    _save(fig, path)
    return path


def swept_numbers(df) -> list[str]:
    """Numeric override columns that take several values and are not a defense's strength or the seed."""
    import pandas as pd  # heavy: pandas loads only when a table is built

    out = []
    for col in df.columns:
        if "." not in col or col.startswith(("defense.", "stats.")) or col in NOT_SWEEP:
            continue
        values = pd.to_numeric(df[col], errors="coerce")
        if values.notna().all() and values.nunique() >= 2:
            out.append(col)
    return out


def sweep_plots(df, folder: Path) -> list[Path]:
    """For each swept number (e.g. fl.batch_size): attack success and seconds against it, one line per setting of
    the other swept keys."""
    import pandas as pd  # heavy: pandas loads only when a table is built

    made = []
    for key in swept_numbers(df):
        others = [c for c in _varying_overrides(df) if c not in (key, "seed")]
        plt = _plt()
        panels = [*_metrics(df), ("seconds", "attack time per client (s)")]
        attacks = _attacks(df)
        fig, axes = plt.subplots(len(attacks), len(panels), figsize=(4.6 * len(panels) + 2.2, 3.4 * len(attacks)),
                                 squeeze=False)
        for i, attack in enumerate(attacks):
            part = df[df["attack"] == attack].copy()
            part["_group"] = (part[others].apply(lambda r: ", ".join(f"{k}={v}" for k, v in r.items()), axis=1)
                              if others else attack)
            groups = sorted(part["_group"].unique(), key=str)
            colors = _colors(len(groups))
            for j, (metric, ylabel) in enumerate(panels):
                ax = axes[i][j]
                runs = per_job(part.assign(_x=pd.to_numeric(part[key])), metric, by=("_x", "_group"))
                stats = _over_seeds(runs, ["_group", "_x"], metric)
                for k, group in enumerate(groups[:MAX_LINES]):
                    line = stats[stats["_group"] == group].sort_values("_x")
                    ax.errorbar(line["_x"], line["mean"], yerr=line["std"], marker="o", ms=4, capsize=3,
                                color=colors[k], label=group)
                ax.set_xlabel(key)
                ax.set_ylabel(ylabel)
                if metric in RATES:
                    ax.set_ylim(-0.03, 1.03)
                if metric == "seconds":
                    positive = stats["mean"][stats["mean"] > 0]
                    if len(positive) and positive.max() / positive.min() > 20:
                        ax.set_yscale("log")
                ax.set_title(f"{attack}: {metric} against {key}", fontsize=10)
                ax.grid(alpha=0.3)
            handles, names = axes[i][0].get_legend_handles_labels()
            if handles and len(groups) > 1:
                axes[i][-1].legend(handles, names, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        path = folder / f"sweep_{key.replace('/', '_')}.png"
        _save(fig, path)
        made.append(path)
    return made


def _varying_overrides(df) -> list[str]:
    """Override-like columns (dotted keys or config groups) that take more than one value across runs."""
    out = []
    skip = {"run", "status", "label", "strength", "strength_knob", "round", "client", "seed", "experiment"}
    for col in df.columns:
        if col in skip or col.startswith("stats.") or not ("." in col or col in ("attack", "defense", "data", "model")):
            continue
        if df.groupby("run")[col].first().astype(str).nunique() > 1:
            out.append(col)
    return out


def _ordered_labels(runs) -> list[str]:
    """Labels in a readable order: by defense, then strength, then name."""
    firsts = runs.groupby("label", dropna=False).agg(
        defense=("defense", "first"), strength=("strength", "first")).reset_index()
    firsts["_d"] = firsts["defense"].astype(str).map(lambda d: "" if d == "none" else d)
    firsts["_s"] = firsts["strength"].fillna(-np.inf)
    return list(firsts.sort_values(["_d", "_s", "label"])["label"])


def _colors(n: int) -> list:
    plt = _plt()
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(max(n, 1))]
    return [plt.get_cmap("viridis")(i / max(n - 1, 1)) for i in range(n)]


def point_label(label: str) -> str:
    """A setting's short name for a plot: `defense=noise, defense.clip=4, defense.sigma=1e-05` -> `noise
    clip=4 sigma=1e-05` (attack names and budgets left out: the panel names the attack)."""
    parts = [p.strip() for p in str(label).split(",")]
    kept = [p.replace("defense.", "").replace("defense=", "") for p in parts if not p.startswith("attack")]
    return " ".join(kept) or str(label)


def empty_panels(fig) -> list:
    """The figure's panels that show nothing: no line, point, bar or image, and no sentence saying why."""
    return [ax for ax in fig.axes
            if ax.get_visible() and not (ax.lines or ax.collections or ax.patches or ax.images or ax.texts)]


def _save(fig, path: Path) -> None:
    """Save a figure whose every panel shows data or says in words why it has none (never empty axes)."""
    for ax in empty_panels(fig):
        _say_empty(ax, f"{ax.get_title() or 'this panel'}: nothing to show")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)


def _say_empty(ax, text: str) -> None:
    """A panel with nothing to draw says why, in words, instead of showing empty axes."""
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, wrap=True, transform=ax.transAxes,
            color="#a33")
    ax.set_xticks([])
    ax.set_yticks([])


KEYLOCK_ATTACKERS = ("no_key", "known_key", "regress_key", "adaptive")


def keylock_summary(df):
    """Key-lock's claim as numbers: one row per arm, FedAvg without the block ("none") and with it, per attacker
    option: final accuracy (mean, spread over seeds, seeds), and the attack's identified rate and PSNR at the
    first and the last attacked round. Empty when the table has no key-lock run."""
    import pandas as pd  # heavy: pandas loads only when a table is built

    if "defense" not in df.columns or not (df["defense"] == "keylock").any():
        return pd.DataFrame()
    d = df.copy()
    attacker = d["defense_attacker"] if "defense_attacker" in d.columns else pd.Series([None] * len(d), index=d.index)
    if "defense.attacker" in d.columns:
        attacker = d["defense.attacker"].where(d["defense.attacker"].notna(), attacker)
    d["_arm"] = ["FedAvg, no key-lock" if dfn == "none" else f"key-lock, attacker {a}" if dfn == "keylock" else None
                 for dfn, a in zip(d["defense"], attacker)]
    d["_attacker"] = attacker
    d = d[d["_arm"].notna()]
    d["round"] = pd.to_numeric(d.get("round"), errors="coerce")
    rows = []
    for arm, part in d.groupby("_arm", sort=False):
        runs = part.groupby("run").agg(acc=("final_accuracy", "first"), seed=("seed", "first")
                                       if "seed" in part.columns else ("run", "first"))
        acc = pd.to_numeric(runs["acc"], errors="coerce").dropna()
        row = {"arm": arm, "defense": part["defense"].iloc[0], "attacker": part["_attacker"].iloc[0],
               "attack": ", ".join(sorted(part["attack"].dropna().astype(str).unique())),
               "accuracy": float(acc.mean()) if len(acc) else None,
               "accuracy_std": float(acc.std()) if len(acc) > 1 else None, "seeds": int(len(acc))}
        scored = part[part["round"].notna()]
        for when, number in (("first", scored["round"].min()), ("last", scored["round"].max())):
            at = scored[scored["round"] == number]
            row[f"{when}_round"] = None if pd.isna(number) else int(number)
            for metric in ("identified", "psnr"):
                values = pd.to_numeric(at.get(metric), errors="coerce").dropna() if metric in at else []
                row[f"{when}_{metric}"] = float(values.mean()) if len(values) else None
        rows.append(row)
    out = pd.DataFrame(rows)
    order = {"none": -1, **{a: i for i, a in enumerate(KEYLOCK_ATTACKERS)}}
    out["_o"] = [order.get("none" if d == "none" else a, 9) for d, a in zip(out["defense"], out["attacker"])]
    return out.sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)


def accuracy_by_seed(df, defense: str):
    """Final accuracy of `defense`'s runs, one value per seed (runs that differ only in the attacker option train
    identically: one of them stands for its seed)."""
    import pandas as pd  # heavy: pandas loads only when a table is built

    part = df[df["defense"] == defense]
    seed = part["seed"] if "seed" in part.columns else part["run"]
    per_run = part.assign(_seed=seed).groupby("run").agg(acc=("final_accuracy", "first"), seed=("_seed", "first"))
    return pd.to_numeric(per_run.groupby("seed")["acc"].first(), errors="coerce").dropna()


def keylock_plot(df, path: Path) -> Path | None:
    """Left: final accuracy of FedAvg without and with the key-lock block (bars: mean over seeds, ticks: spread,
    dots: each seed). Middle and right: the attack's identified rate and PSNR per attacker option, at the first and
    the last attacked round."""
    import pandas as pd  # heavy: pandas loads only when a table is built

    table = keylock_summary(df)
    if table.empty or table["accuracy"].isna().all():
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    acc = table.drop_duplicates("defense")       # training does not depend on the attacker option
    seeds = {defense: accuracy_by_seed(df, defense) for defense in acc["defense"]}
    names = ["FedAvg" if d == "none" else "FedAvg + key-lock" for d in acc["defense"]]
    ax = axes[0]
    colors = _colors(2)
    for k, (defense, name) in enumerate(zip(acc["defense"], names)):
        values = seeds[defense]
        if values.empty:
            continue
        ax.bar(k, values.mean(), yerr=values.std() if len(values) > 1 else 0, capsize=6, color=colors[k % 2],
               alpha=0.7)
        ax.scatter([k] * len(values), values, color="black", s=12, zorder=3)
        ax.annotate(f"{values.mean():.1%}" + (f" ± {values.std():.1%}" if len(values) > 1 else ""),
                    (k, max(values.max(), values.mean() + (values.std() if len(values) > 1 else 0))),
                    xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n}\n({len(seeds[d])} seeds)" for n, d in zip(names, acc["defense"])], fontsize=8)
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("utility: the same task and budget", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    several = table["attack"].nunique() > 1     # e.g. the demo: SPEAR without a defense, IG through the lock
    labels = [("no defense" if d == "none" else str(a)) + (f"\n({k})" if several else "")
              for d, a, k in zip(table["defense"], table["attacker"], table["attack"])]
    x = np.arange(len(table))
    for ax, metric, ylabel in ((axes[1], "identified", "identified (fraction of the batch)"),
                               (axes[2], "psnr", "PSNR (dB)")):
        first, last = table[f"first_{metric}"], table[f"last_{metric}"]
        if pd.to_numeric(first, errors="coerce").isna().all() and pd.to_numeric(last, errors="coerce").isna().all():
            _say_empty(ax, f"no {metric} scored")
            continue
        r1 = table["first_round"].dropna()
        r2 = table["last_round"].dropna()
        ax.bar(x - 0.2, pd.to_numeric(first, errors="coerce").fillna(0), 0.4, color="#90a4ae",
               label=f"round {int(r1.min()) if len(r1) else '?'} (fresh model)")
        ax.bar(x + 0.2, pd.to_numeric(last, errors="coerce").fillna(0), 0.4, color="#37474f",
               label=f"round {int(r2.max()) if len(r2) else '?'} (trained)")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=8, rotation=15)
        ax.set_ylabel(ylabel)
        if metric == "identified":
            ax.set_ylim(0, 1.03)
        attack = ", ".join(sorted(set(table["attack"]) - {""}))
        ax.set_title(f"{attack}: {metric} per attacker option", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    _save(fig, path)
    return path
