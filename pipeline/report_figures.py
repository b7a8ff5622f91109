"""The report's data model (a DAG node as read from the store) and its figures (matplotlib, Agg, PNG)."""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

STATUS_COLORS = {"complete": "#2e7d32", "external": "#1565c0", "stale": "#ef6c00", "running": "#6a1b9a",
                 "failed": "#c62828", "pending": "#757575", "gated": "#f9a825", "blocked": "#8d6e63"}
CURVE_PRIORITY = ("loss", "eval_loss", "reward_mean", "kl", "learning_rate", "lr", "grad_norm")
MAX_CURVES = 12


@dataclass
class Node:
    name: str
    kind: str
    parents: dict[str, str]
    fingerprint: str | None
    status: str
    manifest: dict = field(default_factory=dict)
    path: Path | None = None


@dataclass
class Figure:
    key: str
    title: str
    png: bytes


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, tight: bool = True) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight" if tight else None)
    _plt().close(fig)
    return buffer.getvalue()


def plot_dag(nodes: list[Node]) -> bytes:
    """Nodes in layers (longest path from base), arrows parent -> child, colored by status."""
    plt = _plt()
    depth: dict[str, int] = {}
    for node in nodes:  # topological order
        depth[node.name] = 1 + max((depth[p] for p in node.parents.values() if p in depth), default=-1)
    layers: dict[int, list[str]] = {}
    for node in nodes:
        layers.setdefault(depth[node.name], []).append(node.name)
    pos = {name: (d, -(i - (len(names) - 1) / 2)) for d, names in layers.items() for i, name in enumerate(names)}
    width = max(4.0, 1.9 * len(layers))
    height = max(1.8, 1.0 * max(len(v) for v in layers.values()))
    # dpi fixed and no tight crop: the arrows are clipped to the boxes as placed by the first draw
    fig, ax = plt.subplots(figsize=(width, height), dpi=90)
    fig.subplots_adjust(0, 0, 1, 1)
    by_name = {n.name: n for n in nodes}
    boxes = {}
    for name, (x, y) in pos.items():
        node = by_name[name]
        color = STATUS_COLORS.get(node.status, "#757575")
        boxes[name] = ax.text(x, y, f"{name}\n{node.kind} · {node.status}", ha="center", va="center", fontsize=9,
                              color="white", zorder=3,
                              bbox={"boxstyle": "round,pad=0.4", "facecolor": color, "edgecolor": "none"})
    ax.set_xlim(-0.6, max(layers) + 0.6)
    ys = [y for _, y in pos.values()]
    ax.set_ylim(min(ys) - 0.7, max(ys) + 0.7)
    fig.canvas.draw()  # places the boxes, so that arrows can be clipped to their edges
    for node in nodes:
        for parent in dict.fromkeys(node.parents.values()):
            skip = depth[node.name] - depth[parent] > 1  # bend edges that jump a layer around the boxes between
            bend = 0.3 if pos[parent][1] < pos[node.name][1] else -0.3  # outwards: down from below, else up
            ax.annotate("", xy=pos[node.name], xytext=pos[parent], zorder=2,
                        arrowprops={"arrowstyle": "-|>", "color": "#555", "lw": 1.1, "mutation_scale": 12,
                                    "patchA": boxes[parent].get_bbox_patch(), "patchB": boxes[node.name].get_bbox_patch(),
                                    "connectionstyle": f"arc3,rad={bend if skip else 0.0}"})
    ax.axis("off")
    return _png(fig, tight=False)


def _ordered_curves(curves: dict[str, list]) -> list[str]:
    names = [n for n in curves if len(curves[n]) > 0]
    first = [n for n in CURVE_PRIORITY if n in names]
    return (first + sorted(n for n in names if n not in first))[:MAX_CURVES]


def plot_curves(stage: str, curves: dict[str, list]) -> bytes:
    """One small panel per curve (value against step)."""
    plt = _plt()
    names = _ordered_curves(curves)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        points = [p for p in curves[name] if is_finite_number(p.get("value"))]
        steps = [p.get("step") or 0 for p in points]
        ax.plot(steps, [p["value"] for p in points], marker="o" if len(points) < 20 else None, ms=3, lw=1.4)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{stage}: training curves", fontsize=11)
    fig.tight_layout()
    return _png(fig)


def reward_kl_curves(curves: dict[str, list]) -> tuple[str, str] | None:
    """The (reward, kl) curve names of an RL stage: reward_mean and kl, else any *reward* and *kl*."""
    if "reward_mean" in curves and "kl" in curves:
        return "reward_mean", "kl"
    rewards = sorted(n for n in curves if "reward" in n.lower() and "std" not in n.lower())
    kls = sorted(n for n in curves if re.search(r"(^|[_/])kl($|[_/])", n.lower()) and "coef" not in n.lower())
    return (rewards[0], kls[0]) if rewards and kls else None


def plot_reward_kl(stage: str, curves: dict[str, list], reward: str, kl: str) -> bytes:
    """Left: reward and KL over steps; right: reward against KL, colored by step."""
    plt = _plt()
    r = {p["step"]: p["value"] for p in curves[reward] if is_finite_number(p.get("value"))}
    k = {p["step"]: p["value"] for p in curves[kl] if is_finite_number(p.get("value"))}
    steps = sorted(set(r) & set(k))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    left.plot(sorted(r), [r[s] for s in sorted(r)], color="#2e7d32", label=reward)
    left.set_xlabel("step")
    left.set_ylabel(reward, color="#2e7d32")
    twin = left.twinx()
    twin.plot(sorted(k), [k[s] for s in sorted(k)], color="#c62828", label=kl)
    twin.set_ylabel(kl, color="#c62828")
    left.set_title(f"{stage}: {reward} and {kl} over steps", fontsize=10)
    right.plot([k[s] for s in steps], [r[s] for s in steps], color="#999", lw=0.8)
    points = right.scatter([k[s] for s in steps], [r[s] for s in steps], c=steps, cmap="viridis", s=18, zorder=3)
    fig.colorbar(points, ax=right, label="step")
    right.set_xlabel(kl)
    right.set_ylabel(reward)
    right.set_title(f"{stage}: {reward} against {kl}", fontsize=10)
    right.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_bars(title: str, groups: list[str], series: dict[str, list[tuple[float, float, float] | None]],
              ylabel: str, reference_line: float | None = None) -> bytes:
    """Grouped bars (one group per model, one bar per series) with asymmetric error bars (value, low, high)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(groups) * max(1, len(series)) ** 0.5 + 2), 3.4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ys = [v[0] if v else 0.0 for v in values]
        err = [[max(0.0, v[0] - v[1]) if v else 0.0 for v in values], [max(0.0, v[2] - v[0]) if v else 0.0 for v in values]]
        ax.bar(xs, ys, width=width * 0.95, label=name, yerr=err, capsize=3)
    if reference_line is not None:
        ax.axhline(reference_line, color="#555", ls="--", lw=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8, ncols=min(4, len(series)))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def eval_figures(node: Node) -> list[Figure]:
    metrics = node.manifest.get("metrics") or {}
    models = list(metrics)
    figures = []
    tasks = list(dict.fromkeys(t for m in metrics.values() for t in (m.get("tasks") or {})))
    for task in tasks:
        categories = list(dict.fromkeys(c for m in metrics.values()
                                        for c in ((m.get("tasks") or {}).get(task, {}).get("categories") or {})))
        series: dict[str, list] = {"all": [], **{c: [] for c in categories}}
        for model in models:
            result = (metrics[model].get("tasks") or {}).get(task)
            series["all"].append(_with_ci(result, "accuracy"))
            for c in categories:
                series[c].append(_with_ci((result or {}).get("categories", {}).get(c), "accuracy"))
        figures.append(Figure(f"{node.name}-accuracy-{task}", f"{task}: verifier accuracy (95% Wilson CI)",
                              plot_bars(f"{node.name}: {task} accuracy", models, series, "accuracy")))
    if any(m.get("win_rate") for m in metrics.values()):
        series = {"win rate": [_with_ci(m.get("win_rate"), "win_rate") for m in metrics.values()]}
        reference = (node.manifest.get("eval") or {}).get("reference")
        figures.append(Figure(f"{node.name}-win-rate", f"win rate against {reference} (reward model; ties half; 95% CI)",
                              plot_bars(f"{node.name}: win rate vs {reference}", models, series, "win rate", 0.5)))
    return figures


def _with_ci(result: dict | None, key: str) -> tuple[float, float, float] | None:
    if not result or not is_finite_number(result.get(key)):
        return None
    low, high = result.get("ci") or [result[key], result[key]]
    return result[key], low if is_finite_number(low) else result[key], high if is_finite_number(high) else result[key]


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
