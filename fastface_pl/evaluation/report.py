"""Printing the verification metrics that validation logs as ``val/<set>/<metric>``."""

from __future__ import annotations


def format_results(results: list[dict[str, float]]) -> tuple[str, dict[str, dict[str, float]]]:
    """A table of the verification metrics logged as ``val/<set>/<metric>``."""
    per_set: dict[str, dict[str, float]] = {}
    for metrics in results:
        for key, value in metrics.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "val":
                per_set.setdefault(parts[1], {})[parts[2].split("_dataloader_idx")[0]] = float(value)
    lines = [f"{'set':<16}{'accuracy':>12}{'± std':>10}{'TAR@FAR':>10}{'XNorm':>10}"]
    for name, m in per_set.items():
        lines.append(
            f"{name:<16}{100 * m.get('accuracy', float('nan')):>11.2f}%{100 * m.get('accuracy_std', float('nan')):>9.2f}%"
            f"{100 * m.get('tar_at_far', float('nan')):>9.2f}%{m.get('xnorm', float('nan')):>10.2f}"
        )
    return "\n".join(lines), per_set
