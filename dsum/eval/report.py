"""Evaluation report: a Markdown file with the metric table (base, tuned, difference, 95% CI), box plots
of per-example scores, and the best and worst examples side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsum import rundir

BOX_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bertscore_f1", "similarity")


def box_plot(base: list[dict[str, float]] | None, tuned: list[dict[str, float]], path: Path) -> Path:
    """Per-example score distributions, base beside fine-tuned for each metric."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    keys = [k for k in BOX_METRICS if k in tuned[0]]
    fig, ax = plt.subplots(figsize=(1.8 * len(keys) + 2, 4))
    data, labels, positions = [], [], []
    for i, key in enumerate(keys):
        if base is not None:
            data.append([r[key] for r in base])
            labels.append(f"{key}\nbase")
            positions.append(3 * i)
        data.append([r[key] for r in tuned])
        labels.append(f"{key}\ntuned")
        positions.append(3 * i + 1)
    parts = ax.boxplot(data, positions=positions, widths=0.8, patch_artist=True)
    for patch, label in zip(parts["boxes"], labels, strict=True):
        patch.set_facecolor("#c6dbef" if label.endswith("base") else "#fdae6b")
    ax.set_xticks(positions, labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score per example")
    ax.set_title(f"Per-example scores ({len(tuned)} examples)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(
    out_dir: Path, summary: dict[str, Any], rows: list[dict[str, Any]], plot: Path | None, n_show: int = 3
) -> Path:
    """report.md in out_dir. rows: per example, with dialogue, references, tuned (and base) text and scores."""
    lines = [f"# Evaluation: {summary['run']}", ""]
    lines += [f"- split: `{summary['split']}` ({summary['examples']} examples, fingerprint `{summary['fingerprint']}`)"]
    lines += [f"- model: `{summary['model']}`, method: `{summary['method']}`", ""]
    lines += ["| metric | base | tuned | difference | 95% CI of difference |", "|---|---:|---:|---:|---|"]
    for key, m in summary["metrics"].items():
        base = "" if m.get("base") is None else f"{m['base']:.4f}"
        delta = "" if m.get("delta") is None else f"{m['delta']:+.4f}"
        ci = "" if m.get("ci_low") is None else f"[{m['ci_low']:+.4f}, {m['ci_high']:+.4f}]"
        lines.append(f"| {key} | {base} | {m['tuned']:.4f} | {delta} | {ci} |")
    lines.append("")
    if summary.get("judge"):
        lines += ["## LLM judge (1-5)", "", "| criterion | base | tuned |", "|---|---:|---:|"]
        for key, value in summary["judge"]["tuned"].items():
            b = summary["judge"].get("base", {}).get(key)
            lines.append(f"| {key} | {'' if b is None else format(b, '.2f')} | {value:.2f} |")
        lines.append("")
    for note in summary.get("notes", ()):  # what was skipped and how to turn it on
        lines += [f"_{note}_", ""]
    if plot is not None:
        lines += [f"![per-example scores]({plot.name})", ""]
    if rows and "rougeL" in rows[0].get("tuned_scores", {}):
        ranked = sorted(rows, key=lambda r: r["tuned_scores"]["rougeL"])
        for title, picked in (("Best examples", ranked[::-1][:n_show]), ("Worst examples", ranked[:n_show])):
            lines += [f"## {title} (by fine-tuned ROUGE-L)", ""]
            for r in picked:
                lines += _example(r)
    path = out_dir / rundir.REPORT
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _example(r: dict[str, Any]) -> list[str]:
    dialogue = r["dialogue"] if len(r["dialogue"]) < 600 else r["dialogue"][:600] + " …"
    out = ["<details><summary>dialogue</summary>", "", "```", dialogue, "```", "</details>", ""]
    out += ["| | summary | ROUGE-L |", "|---|---|---:|"]
    for i, ref in enumerate(r["references"], 1):
        out.append(f"| reference {i} | {_cell(ref)} | |")
    if "base" in r:
        out.append(f"| base | {_cell(r['base'])} | {r['base_scores']['rougeL']:.3f} |")
    out.append(f"| fine-tuned | {_cell(r['tuned'])} | {r['tuned_scores']['rougeL']:.3f} |")
    return out + [""]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "(empty)"
