"""Aggregate a multi-seed study (baseline vs APT, several architectures) into tables and plots.

A *run* is one training run, written as a plain dict so it can round-trip through JSON::

    {"arch": "pi0", "method": "apt", "seed": 0,
     "success": {"seen": 0.8, "paraphrase": 0.3, ...},      # one success rate per evaluation split
     "instruction_sensitivity": 0.12, "action_error": 0.05,  # optional scalars
     "train_s": 31.2, "switch_step": 200,                    # switch_step is None for the baseline
     "gates": [{"step": 1, "stage": 1, "gates": {"site": {"attn": 0.0, "ff": 0.0}}}, ...]}

* :func:`aggregate` reduces runs to mean, sample std and n over seeds per (arch, method), including the
  headline ``held_out`` number (per-run average over every split but ``seen``).
* :func:`format_table` renders that summary as a GitHub markdown or fixed-width console table.
* :func:`format_outcome_table` renders where counterfactual episodes ended (success / the layout's habitual
  object / another object / nothing), from each run's optional ``"outcomes"`` (see
  :mod:`apt_studies.outcomes`).
* :func:`curve_records`, :func:`mean_curves` and :func:`format_curve_table` reduce the optional learning curves
  (``"curve": [{"step": 400, "seen": 0.7, "counterfactual": 0.3}, ...]``) to a mean over seeds per step.
* :func:`plot_success`, :func:`plot_outcomes`, :func:`plot_gates` and :func:`plot_curves` draw PNGs with
  matplotlib (optional ``examples`` extra).

Split names are read from the runs, not from :data:`~apt_studies.splits.EVAL_SPLITS`, so studies
with extra splits (e.g. ``user``) work unchanged.

Example:
    >>> runs = [
    ...     {"arch": "pi0", "method": "apt", "seed": seed, "instruction_sensitivity": 0.5,
    ...      "success": {"seen": 0.9, "paraphrase": rate}}
    ...     for seed, rate in enumerate([0.4, 0.6])
    ... ]
    >>> summary = aggregate(runs)
    >>> summary["pi0"]["apt"]["held_out"]["n"], summary["pi0"]["apt"]["seeds"]
    (2, [0, 1])
    >>> print(format_table(summary))
    | arch | method |   n |        seen |  paraphrase | held-out avg | instr. sensitivity |
    | :--- | :----- | --: | ----------: | ----------: | -----------: | -----------------: |
    | pi0  | apt    |   2 | 0.90 ± 0.00 | 0.50 ± 0.14 |  0.50 ± 0.14 |        0.50 ± 0.00 |
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CURVE_KEYS",
    "IN_DISTRIBUTION_SPLITS",
    "SCALAR_METRICS",
    "aggregate",
    "curve_records",
    "format_curve_table",
    "format_outcome_table",
    "format_table",
    "mean_curves",
    "plot_curves",
    "plot_gates",
    "plot_outcomes",
    "plot_success",
]

#: Splits excluded from the ``held_out`` headline average: they reuse the training layouts and wording.
IN_DISTRIBUTION_SPLITS: tuple[str, ...] = ("seen",)

#: Optional per-run scalars that :func:`aggregate` summarises whenever a run reports them.
SCALAR_METRICS: tuple[str, ...] = ("instruction_sensitivity", "action_error", "train_s", "eval_s")

_MISSING = "n/a"
_INSTALL_HINT = 'the plots of apt_studies.report need matplotlib: pip install "apt_lightning[bench]"'


# --------------------------------------------------------------------------------------------- aggregation


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std (ddof=1, so small seed counts are not over-confident; 0.0 for one value) and n."""
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, so the summary stays JSON-serialisable."""
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, (str, bytes)) else value


def _number(value: Any, what: str) -> float:
    try:
        return float(_plain(value))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a number, got {value!r}.") from err


def _split_order(success_dicts: Iterable[Mapping[str, Any]]) -> list[str]:
    """Union of split names, in the order of the first dict, then of first appearance."""
    order: dict[str, None] = {}
    for success in success_dicts:
        order.update(dict.fromkeys(success))
    return list(order)


def _seed_list(seeds: list[Any]) -> list[Any]:
    try:
        return sorted(seeds)
    except TypeError:  # mixed, unorderable seed labels: keep the order of the runs
        return seeds


def aggregate(
    runs: Sequence[Mapping[str, Any]], *, in_distribution: Iterable[str] = IN_DISTRIBUTION_SPLITS
) -> dict[str, Any]:
    """Summarise runs over seeds, per architecture and method.

    Seeds are the unit of variation, so every statistic is computed over runs (not episodes), and the
    headline ``held_out`` number averages splits *within* each run first: its std then measures
    seed-to-seed spread of the held-out score rather than the spread between splits.

    Args:
        runs: one dict per training run (see the module docstring). Required keys: ``arch``, ``method``,
            ``seed``, ``success``; ``instruction_sensitivity``, ``action_error`` and ``train_s`` are
            summarised when present (``None`` counts as absent).
        in_distribution: splits left out of ``held_out`` (default ``("seen",)``).

    Returns:
        ``{arch: {method: entry}}`` with archs and methods in order of first appearance (methods in the
        same global order under every arch). Each entry holds ``success`` (``{split: stats}``), ``held_out``,
        any of :data:`SCALAR_METRICS` and ``seeds``; ``stats`` is ``{"mean", "std", "n"}`` with std the
        sample std (ddof=1), 0.0 for a single seed. Seed counts may differ between entries and between splits
        of one entry (a split a run did not evaluate is not counted); keys with no value are omitted.

    Raises:
        ValueError: a run lacks a required key, has a non-numeric value, or repeats (arch, method, seed).
    """
    excluded = set(in_distribution)
    method_order: dict[Any, None] = {}
    groups: dict[Any, dict[Any, list[Mapping[str, Any]]]] = {}
    seen_keys: set[tuple[Any, Any, Any]] = set()
    for index, run in enumerate(runs):
        missing = [key for key in ("arch", "method", "seed", "success") if key not in run]
        if missing:
            raise ValueError(f"run {index} lacks required key(s) {missing}.")
        if not isinstance(run["success"], Mapping):
            raise ValueError(f"run {index}: 'success' must map split names to rates, got {run['success']!r}.")
        arch, method, seed = _plain(run["arch"]), _plain(run["method"]), _plain(run["seed"])
        if (arch, method, seed) in seen_keys:
            raise ValueError(f"duplicate run: arch={arch!r}, method={method!r}, seed={seed!r} appears twice.")
        seen_keys.add((arch, method, seed))
        method_order.setdefault(method)
        groups.setdefault(arch, {}).setdefault(method, []).append(run)

    splits = _split_order(run["success"] for run in runs)
    summary: dict[str, Any] = {}
    for arch, by_method in groups.items():
        summary[arch] = {}
        for method in (m for m in method_order if m in by_method):
            group = by_method[method]
            where = f"run (arch={arch!r}, method={method!r}"
            success: dict[str, Any] = {}
            for split in splits:
                values = [
                    _number(run["success"][split], f"{where}, seed={run['seed']!r}) success[{split!r}]")
                    for run in group
                    if run["success"].get(split) is not None
                ]
                if values:
                    success[split] = _stats(values)
            entry: dict[str, Any] = {"success": success}

            held_out = []
            for run in group:
                rates = [
                    _number(v, f"{where}, seed={run['seed']!r}) success[{s!r}]")
                    for s, v in run["success"].items()
                    if s not in excluded and v is not None
                ]
                if rates:
                    held_out.append(math.fsum(rates) / len(rates))
            if held_out:
                entry["held_out"] = _stats(held_out)

            for metric in SCALAR_METRICS:
                values = [
                    _number(run[metric], f"{where}, seed={run['seed']!r}) {metric}")
                    for run in group
                    if run.get(metric) is not None
                ]
                if values:
                    entry[metric] = _stats(values)
            outcomes = _outcome_stats(group, where)
            if outcomes:
                entry["outcomes"] = outcomes
            entry["seeds"] = _seed_list([_plain(run["seed"]) for run in group])
            summary[arch][method] = entry
    return summary


def _outcome_stats(group: Sequence[Mapping[str, Any]], where: str) -> dict[str, dict[str, Any]]:
    """``{split: {outcome: stats}}`` over the runs of a group that report ``outcomes`` for that split."""
    values: dict[str, dict[str, list[float]]] = {}
    for run in group:
        for split, rates in (run.get("outcomes") or {}).items():
            for outcome, rate in rates.items():
                number = _number(rate, f"{where}, seed={run['seed']!r}) outcomes[{split!r}][{outcome!r}]")
                values.setdefault(split, {}).setdefault(outcome, []).append(number)
    return {split: {o: _stats(v) for o, v in by_outcome.items()} for split, by_outcome in values.items()}


# ---------------------------------------------------------------------------------------------- the table


def _cell(stats: Mapping[str, Any] | None, digits: int) -> str:
    if not stats:
        return _MISSING
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _summary_splits(summary: Mapping[str, Any]) -> list[str]:
    return _split_order(entry.get("success", {}) for by_method in summary.values() for entry in by_method.values())


def _render(header: list[str], rows: list[list[str]], numeric: list[bool], fmt: str) -> str:
    """Aligned Markdown or plain-text table; ``numeric`` columns are right-aligned."""
    # GitHub needs at least "---" in a delimiter cell; the console table can be tighter.
    minimum = 3 if fmt == "markdown" else 1
    widths = [max(minimum, *(len(row[i]) for row in [header, *rows])) for i in range(len(header))]

    def pad(cells: Sequence[str]) -> list[str]:
        return [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=False)]

    if fmt == "text":
        lines = [pad(header), ["-" * w for w in widths], *(pad(row) for row in rows)]
        return "\n".join("  ".join(cells).rstrip() for cells in lines)
    rule = ["-" * (w - 1) + ":" if num else ":" + "-" * (w - 1) for w, num in zip(widths, numeric, strict=False)]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [pad(header), rule, *(pad(row) for row in rows)])


def format_table(summary: Mapping[str, Any], fmt: str = "markdown", *, digits: int = 2) -> str:
    """Render an :func:`aggregate` summary as a table, one row per (arch, method).

    Columns: arch, method, n (number of seeds, since counts may differ between rows), one per split in the
    summary's order, ``held-out avg`` and ``instr. sensitivity``. Cells read ``mean ± std``; ``n/a`` marks a
    value no run reported.

    Args:
        summary: output of :func:`aggregate` (or the same structure loaded back from JSON).
        fmt: ``"markdown"`` for a GitHub table (pasted into READMEs and PRs) or ``"text"`` for an aligned
            console table.
        digits: decimals of mean and std.

    Returns:
        The table, lines joined by ``\\n``, without a trailing newline.

    Raises:
        ValueError: ``fmt`` is neither ``"markdown"`` nor ``"text"``.
    """
    if fmt not in ("markdown", "text"):
        raise ValueError(f"fmt must be 'markdown' or 'text', got {fmt!r}.")
    splits = _summary_splits(summary)
    header = ["arch", "method", "n", *splits, "held-out avg", "instr. sensitivity"]
    numeric = [False, False] + [True] * (len(header) - 2)
    rows = []
    for arch, by_method in summary.items():
        for method, entry in by_method.items():
            success = entry.get("success", {})
            rows.append(
                [
                    str(arch),
                    str(method),
                    str(len(entry.get("seeds", []))),
                    *(_cell(success.get(split), digits) for split in splits),
                    _cell(entry.get("held_out"), digits),
                    _cell(entry.get("instruction_sensitivity"), digits),
                ]
            )
    return _render(header, rows, numeric, fmt)


def format_outcome_table(
    summary: Mapping[str, Any], split: str = "counterfactual", fmt: str = "markdown", *, digits: int = 2
) -> str:
    """Where the episodes of ``split`` ended, one row per (arch, method): fractions of all episodes, mean ± std.

    Columns: success, ``habitual`` (the layout's habitual object), ``other`` (another object), ``none``
    (reached nothing), and ``habitual share of failures`` (habitual / (1 - success), from the means). Rows
    without outcomes for ``split`` are left out.

    Raises:
        ValueError: ``fmt`` is neither ``"markdown"`` nor ``"text"``.
    """
    if fmt not in ("markdown", "text"):
        raise ValueError(f"fmt must be 'markdown' or 'text', got {fmt!r}.")
    classes = ["success", "habitual", "other", "none"]
    header = ["arch", "method", "n", *classes, "habitual share of failures"]
    numeric = [False, False] + [True] * (len(header) - 2)
    rows = []
    for arch, by_method in summary.items():
        for method, entry in by_method.items():
            stats = entry.get("outcomes", {}).get(split)
            if not stats:
                continue
            failed = 1.0 - stats.get("success", {}).get("mean", math.nan)
            share = stats.get("habitual", {}).get("mean", math.nan) / failed if failed > 0 else math.nan
            rows.append(
                [
                    str(arch),
                    str(method),
                    str(stats["success"]["n"] if "success" in stats else 0),
                    *(_cell(stats.get(c), digits) for c in classes),
                    _MISSING if math.isnan(share) else f"{share:.{digits}f}",
                ]
            )
    return _render(header, rows, numeric, fmt)


# ---------------------------------------------------------------------------------------------- the plots


def _matplotlib() -> tuple[Any, Any]:
    """Import matplotlib lazily (optional dependency) and only its object API, leaving pyplot's backend alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return Figure, FigureCanvasAgg


def _save(fig: Any, canvas_cls: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas_cls(fig)
    fig.savefig(path, dpi=120, format="png")
    return path


def _note_figure(figure_cls: Any, text: str) -> Any:
    fig = figure_cls(figsize=(6, 3))
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return fig


def _seed_label(counts: Iterable[int]) -> str:
    """``n=3 seeds``, or ``n=2–3 seeds`` when methods were run with different seed counts."""
    distinct = sorted(set(counts))
    if not distinct:
        return "n=0 seeds"
    if len(distinct) > 1:
        return f"n={distinct[0]}–{distinct[-1]} seeds"
    return f"n={distinct[0]} seed{'s' if distinct[0] != 1 else ''}"


def plot_success(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Grouped bar chart of success rate per split, one subplot per arch, one bar colour per method.

    Error bars are the std over seeds, so overlapping bars read directly as "not separated by this study".

    Args:
        summary: output of :func:`aggregate`.
        path: PNG file to write (parent folders are created).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ImportError: matplotlib is not installed.
    """
    figure_cls, canvas_cls = _matplotlib()
    from matplotlib.patches import Rectangle  # matplotlib is known to be importable here

    archs = list(summary)
    if not archs:
        return _save(_note_figure(figure_cls, "no runs to plot"), canvas_cls, path)
    splits = _summary_splits(summary)
    methods = list(dict.fromkeys(m for by_method in summary.values() for m in by_method))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig = figure_cls(figsize=(max(5.0, 1.3 * len(splits) + 1.5) * len(archs), 4.2), layout="constrained")
    axes = fig.subplots(1, len(archs), squeeze=False, sharey=True)[0]
    width = 0.8 / max(len(methods), 1)
    for ax, arch in zip(axes, archs, strict=False):
        by_method = summary[arch]
        present = [m for m in methods if m in by_method]
        for i, method in enumerate(present):
            success = by_method[method].get("success", {})
            xs = [j + (i - (len(present) - 1) / 2) * width for j in range(len(splits))]
            means = [success[s]["mean"] if s in success else math.nan for s in splits]
            stds = [success[s]["std"] if s in success else 0.0 for s in splits]
            ax.bar(xs, means, width, yerr=stds, capsize=3, color=colours[method], label=str(method))
        ax.set_xticks(range(len(splits)))
        ax.set_xticklabels([s.replace("_", "\n") for s in splits])
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("success rate")
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{arch} ({_seed_label(len(e.get('seeds', [])) for e in by_method.values())})")
    # One legend for the figure (colours are the same in every subplot), above the axes so no bar is hidden.
    fig.legend(
        handles=[Rectangle((0, 0), 1, 1, color=colours[m]) for m in methods],
        labels=[str(m) for m in methods],
        loc="outside upper center",
        ncols=len(methods),
        frameon=False,
    )
    return _save(fig, canvas_cls, path)


def _gate_curves(history: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float], list[float]]:
    """Steps, mean and max of |tanh(gate)| over every site and kind; entries with no gates are skipped."""
    steps, means, maxes = [], [], []
    for record in sorted(history, key=lambda r: r["step"]):
        values = [abs(float(v)) for kinds in record.get("gates", {}).values() for v in kinds.values()]
        if values:
            steps.append(float(record["step"]))
            means.append(math.fsum(values) / len(values))
            maxes.append(max(values))
    return steps, means, maxes


def plot_gates(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Gate opening over training, one subplot per arch, one colour per run.

    The thick line is the mean ``|tanh(gate)|`` over all fused sites and both kinds (``attn``, ``ff``), the
    thin one the max: together they show whether language enters broadly or through a single site. The dashed
    vertical line marks ``switch_step`` (start of Stage 2), before which the gates must stay at 0. Values are
    the ``tanh`` factors recorded by :class:`~apt_lightning.callbacks.GateMonitor`, so no ``tanh`` is re-applied.

    Args:
        runs: run dicts; those with an empty or missing ``gates`` history (the baseline) are skipped.
        path: PNG file to write (parent folders are created).

    Returns:
        ``path`` as a :class:`~pathlib.Path`. Without any gate history the figure holds a note instead.

    Raises:
        ImportError: matplotlib is not installed.
    """
    figure_cls, canvas_cls = _matplotlib()
    by_arch: dict[Any, list[Mapping[str, Any]]] = {}
    for run in runs:
        if run.get("gates"):
            by_arch.setdefault(run.get("arch", "?"), []).append(run)
    if not by_arch:
        return _save(_note_figure(figure_cls, "no gate history in these runs (baseline only?)"), canvas_cls, path)
    fig = figure_cls(figsize=(5.5 * len(by_arch), 4.0), layout="constrained")
    axes = fig.subplots(1, len(by_arch), squeeze=False, sharey=True)[0]
    for ax, (arch, arch_runs) in zip(axes, by_arch.items(), strict=False):
        switches: set[float] = set()
        for i, run in enumerate(arch_runs):
            steps, means, maxes = _gate_curves(run["gates"])
            colour = f"C{i % 10}"
            label = f"{run.get('method', '?')} seed {run.get('seed', '?')}"
            ax.plot(steps, means, color=colour, linewidth=1.8, label=label)
            ax.plot(steps, maxes, color=colour, linewidth=0.8, alpha=0.6)
            if run.get("switch_step") is not None:
                switches.add(float(run["switch_step"]))
        ax.plot([], [], color="black", linewidth=1.8, label="mean over sites")
        ax.plot([], [], color="black", linewidth=0.8, alpha=0.6, label="max over sites")
        for j, step in enumerate(sorted(switches)):
            ax.axvline(step, color="grey", linestyle="--", linewidth=1.0, label="switch to Stage 2" if j == 0 else None)
        ax.set_xlabel("global step")
        ax.set_ylabel("|tanh(gate)|")
        ax.grid(alpha=0.3)
        ax.set_title(f"{arch} ({_seed_label([len(arch_runs)])})")
        ax.legend(loc="upper left", fontsize="x-small")
    axes[0].set_ylim(bottom=0.0)  # after all subplots drew: the shared top must fit every arch's max
    return _save(fig, canvas_cls, path)


_OUTCOME_COLOURS = {"success": "#2ca02c", "habitual": "#d62728", "other": "#ff7f0e", "none": "#7f7f7f"}


def plot_outcomes(summary: Mapping[str, Any], path: str | os.PathLike[str], split: str = "counterfactual") -> Path:
    """Stacked bars of where the episodes of ``split`` ended, one bar per method, one subplot per arch.

    Each bar stacks the mean fractions of success, habitual object, other object and none (they sum to 1).

    Args:
        summary: output of :func:`aggregate` over runs that report ``outcomes``.
        path: PNG file to write (parent folders are created).
        split: which split's outcomes to draw.

    Returns:
        ``path`` as a :class:`~pathlib.Path`; a note instead when no run reports outcomes for ``split``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    figure_cls, canvas_cls = _matplotlib()
    archs = [a for a in summary if any(split in e.get("outcomes", {}) for e in summary[a].values())]
    if not archs:
        return _save(_note_figure(figure_cls, f"no run reports outcomes for {split!r}"), canvas_cls, path)
    methods = list(dict.fromkeys(m for a in archs for m, e in summary[a].items() if split in e.get("outcomes", {})))
    fig = figure_cls(figsize=(max(4.5, 1.1 * len(methods) + 1.5) * len(archs), 4.2), layout="constrained")
    axes = fig.subplots(1, len(archs), squeeze=False, sharey=True)[0]
    for ax, arch in zip(axes, archs, strict=False):
        present = [m for m in methods if split in summary[arch].get(m, {}).get("outcomes", {})]
        bottom = [0.0] * len(present)
        for outcome, colour in _OUTCOME_COLOURS.items():
            heights = [summary[arch][m]["outcomes"][split].get(outcome, {}).get("mean", 0.0) for m in present]
            ax.bar(range(len(present)), heights, 0.7, bottom=bottom, color=colour, label=outcome)
            bottom = [b + h for b, h in zip(bottom, heights, strict=False)]
        ax.set_xticks(range(len(present)))
        ax.set_xticklabels([m.replace("_", "\n") for m in present], fontsize="small")
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel(f"fraction of {split} episodes")
        ax.set_title(f"{arch} ({_seed_label(len(summary[arch][m].get('seeds', [])) for m in present)})")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=len(labels), frameon=False)
    return _save(fig, canvas_cls, path)


# --------------------------------------------------------------------------------------------- learning curves

#: Splits of a learning curve, in plot order.
CURVE_KEYS: tuple[str, ...] = ("seen", "counterfactual")


def curve_records(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The learning curves of ``runs`` alone (small enough to keep): one record per run that has a ``curve``."""
    keys = ("arch", "method", "seed", "trained_as", "guidance_scale", "switch_step", "steps")
    return [
        {**{k: _plain(run[k]) for k in keys if k in run}, "curve": [dict(p) for p in run["curve"]]}
        for run in runs
        if run.get("curve")
    ]


def mean_curves(runs: Sequence[Mapping[str, Any]]) -> dict[tuple[Any, Any], dict[str, Any]]:
    """``{(arch, method): {"steps": [...], "n": [...], split: [mean over seeds at each step]}}`` for each curve split.

    Runs without a ``curve`` are skipped; a step that only some seeds reached is averaged over those.
    """
    grouped: dict[tuple[Any, Any], dict[int, list[Mapping[str, Any]]]] = {}
    for run in runs:
        for point in run.get("curve") or []:
            key = (run.get("arch", "?"), run.get("method", "?"))
            grouped.setdefault(key, {}).setdefault(int(point["step"]), []).append(point)
    out: dict[tuple[Any, Any], dict[str, Any]] = {}
    for key, by_step in grouped.items():
        steps = sorted(by_step)
        entry: dict[str, Any] = {"steps": steps, "n": [len(by_step[s]) for s in steps]}
        for split in CURVE_KEYS:
            entry[split] = [
                math.fsum(_number(p[split], split) for p in by_step[s]) / len(by_step[s]) if by_step[s] else math.nan
                for s in steps
            ]
        out[key] = entry
    return out


def format_curve_table(runs: Sequence[Mapping[str, Any]], *, digits: int = 2) -> str:
    """Markdown table, one row per step, one ``seen / counterfactual`` column per (arch, method), seed means."""
    curves = mean_curves(runs)
    if not curves:
        return "(no learning curves)"
    steps = sorted({s for entry in curves.values() for s in entry["steps"]})
    header = ["step", *(f"{arch} {method}" for arch, method in curves)]
    rows = []
    for step in steps:
        cells = [str(step)]
        for entry in curves.values():
            if step in entry["steps"]:
                i = entry["steps"].index(step)
                cells.append(" / ".join(f"{entry[s][i]:.{digits}f}" for s in CURVE_KEYS))
            else:
                cells.append(_MISSING)
        rows.append(cells)
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)) + " |"]
    lines.append("| " + " | ".join("-" * (w - 1) + ":" for w in widths) + " |")
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "seen / counterfactual success, mean over seeds\n\n" + "\n".join(lines)


def plot_curves(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Learning curves: seen (left) and counterfactual (right) success against the optimiser step.

    One line per (arch, method), the mean over seeds (:func:`mean_curves`); colour is the method, line style the
    arch. A dashed grey line marks APT's ``switch_step`` when the runs have one.

    Args:
        runs: run dicts; those without a ``curve`` are skipped.
        path: PNG file to write (parent folders are created).

    Returns:
        ``path`` as a :class:`~pathlib.Path`; a note instead when no run has a curve.

    Raises:
        ImportError: matplotlib is not installed.
    """
    figure_cls, canvas_cls = _matplotlib()
    curves = mean_curves(runs)
    if not curves:
        return _save(
            _note_figure(figure_cls, "no learning curves in these runs (curve_every not set?)"), canvas_cls, path
        )
    methods = list(dict.fromkeys(method for _, method in curves))
    archs = list(dict.fromkeys(arch for arch, _ in curves))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    styles = {a: ("-", "--", ":", "-.")[i % 4] for i, a in enumerate(archs)}
    markers = {a: ("o", "s", "^", "D")[i % 4] for i, a in enumerate(archs)}
    switches = {float(r["switch_step"]) for r in runs if r.get("curve") and r.get("switch_step") is not None}
    seeds = {key: max(entry["n"]) for key, entry in curves.items()}
    fig = figure_cls(figsize=(11.0, 4.4), layout="constrained")
    axes = fig.subplots(1, len(CURVE_KEYS), squeeze=False, sharey=True)[0]
    for ax, split in zip(axes, CURVE_KEYS, strict=True):
        for (arch, method), entry in curves.items():
            ax.plot(
                entry["steps"],
                entry[split],
                color=colours[method],
                linestyle=styles[arch],
                marker=markers[arch],
                markersize=3.5,
                label=f"{arch} {method}",
            )
        for j, step in enumerate(sorted(switches)):
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.9, label="APT switch" if j == 0 else None)
        ax.set_xlabel("optimiser step")
        ax.set_title(f"{split} ({_seed_label(seeds.values())})")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("success rate")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small", frameon=False)
    return _save(fig, canvas_cls, path)
