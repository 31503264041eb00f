"""The fit report of ``dwp fit-prior``: plain values (JSON), a Markdown table, a figure.

The report says what went in (inputs, the kernel bank per group), what came out (the
prior's kind, configuration and provenance: :meth:`dwp.priors.Prior.describe`) and how
well the prior fits data it was not fitted on (:class:`dwp.cli.kinds.Fit`).  The figure
shows the held-out scores as paired differences against the reference prior, per group:
the comparison the report is about, where the scores themselves differ between groups by
more than the differences do.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

from .._version import __version__
from ..kernel_bank import KernelBank
from .kinds import Fit, Kind

__all__ = ["bank_summary", "held_out_figure", "plain", "render_markdown"]


def plain(value: Any) -> Any:
    """``value`` with every non-finite float as ``None`` (JSON has no NaN: a standard error
    of one held-out kernel is NaN) and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def bank_summary(bank: KernelBank) -> dict[str, Any]:
    """The kernel bank per group, as plain values: its layers, its kernels (after pruning)
    and those collected, their mean norm; and how the bank was made."""
    norms = bank.norms()
    total = bank.metadata.get("total") or {}
    groups = {}
    for index, group in enumerate(bank.group_names):
        in_group = norms[bank.group == index]
        groups[group] = {
            "layers": [layer for layer, g in bank.layer_groups.items() if g == group],
            "kernels": len(in_group),
            "collected": int(total.get(group, len(in_group))),
            "mean_norm": float(in_group.mean()) if len(in_group) else None,
        }
    return {
        "kernels": len(bank),
        "kernel_shape": list(bank.kernel_shape),
        "sources": list(bank.source_names),
        "group_by": bank.metadata.get("group_by"),
        "min_norm": bank.metadata.get("min_norm"),
        "groups": groups,
    }


def _difference_rows(scores: Mapping[str, Any]) -> list[tuple[str, dict[str, dict]]]:
    """(label, prior -> paired difference ``{"mean", "se"}``) per row of the figure: each
    group and all groups for kernel scores, the held-out networks for weight scores."""
    if "groups" in scores:
        rows = [(group, entry["differences"]) for group, entry in scores["groups"].items()]
        if len(rows) > 1:
            rows.append(("all groups", scores["overall"]["differences"]))
        return rows
    return [(f"{scores['networks']} held-out networks", scores["differences"])]


def held_out_figure(scores: Mapping[str, Any]) -> bytes:
    """A PNG of held-out scores (:func:`dwp.priors.held_out_scores` or
    :func:`dwp.priors.weight_scores` with a reference): per row, each other prior's paired
    difference to the reference, mean ± standard error; right of zero is better.

    Uses matplotlib's object-oriented API only (the caller's pyplot state and backend are
    left alone).

    Raises
    ------
    ImportError
        matplotlib is not installed (it is optional: ``pip install 'dwp[plot]'``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _difference_rows(scores)
    names = list(rows[0][1])
    fig = Figure(figsize=(8.0, 1.4 + 0.35 * len(rows) * max(1, len(names))))
    ax = fig.subplots()
    height = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ys = [len(rows) - 1 - r + (i - (len(names) - 1) / 2) * height for r in range(len(rows))]
        means = [row[1][name]["mean"] for row in rows]
        # one kernel or network has no standard error (NaN): draw the point without a bar
        errors = [row[1][name]["se"] if math.isfinite(row[1][name]["se"]) else 0.0 for row in rows]
        ax.errorbar(means, ys, xerr=errors, fmt="o", capsize=3, label=name)
    ax.axvline(0.0, color="0.5", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)])
    unit = scores["unit"].replace("nats per ", "nats/")
    ax.set_xlabel(f"held-out log density − {scores['reference']} ({unit}, paired, mean ± s.e.)")
    ax.set_title(f"held-out fit against the {scores['reference']} (right of 0: better)", fontsize=9)
    # beside the axes: inside, it covers points of one row or another
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()


def render_markdown(
    report: Mapping[str, Any], kind: Kind, fit: Fit, bank: KernelBank | None
) -> str:
    """The human-readable report: what was fitted from what, the kernel bank per group, the
    held-out scores table and the notes (e.g. a figure skipped)."""
    prior = report["prior"]
    lines = [
        f"# dwp fit-prior: {prior['kind']} (`--kind {kind.name}`)",
        "",
        f"- command: `{report['command']}`",
        f"- prior file: `{report['outputs']['prior']}` (KL: {prior['kl_kind']}; dwp {__version__})",
    ]
    for name, value in report["inputs"].items():
        if value:
            shown = ", ".join(f"`{v}`" for v in value) if isinstance(value, list) else f"`{value}`"
            lines.append(f"- {name.replace('_', ' ')}: {shown}")
    lines.append(f"- seconds: {report['seconds']:.1f}")
    if bank is not None:
        made = report["bank"]
        shape = "x".join(map(str, made["kernel_shape"]))
        pruned = f", kernels of norm < {made['min_norm']:g} pruned" if made["min_norm"] else ""
        lines += [
            "",
            "## Kernel bank",
            "",
            f"{made['kernels']:,} kernels of {shape} from {len(made['sources'])} source(s), "
            f"grouped by {made['group_by']}{pruned}.",
            "",
            bank.summary(),
        ]
    lines += ["", "## Held-out fit" if fit.scores else "## Fit", "", fit.table]
    if fit.scored:
        lines += ["", f"Scored: {fit.scored}."]
    if report["notes"]:
        lines += ["", "## Notes", "", *(f"- {note}" for note in report["notes"])]
    return "\n".join(lines) + "\n"
