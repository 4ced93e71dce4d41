"""Printing the verification metrics that validation logs as ``val/<set>/<metric>``."""

from __future__ import annotations


def format_results(results: list[dict[str, float]]) -> tuple[str, dict[str, dict[str, float]]]:
    """A table of the verification metrics logged as ``val/<set>/<metric>``: accuracy ± std (10 folds),
    VAL@FAR ± std (FAR 1e-3, InsightFace's ``calculate_val``) and XNorm, in percent where rates."""
    per_set: dict[str, dict[str, float]] = {}
    for metrics in results:
        for key, value in metrics.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "val":
                per_set.setdefault(parts[1], {})[parts[2].split("_dataloader_idx")[0]] = float(value)
    nan = float("nan")
    lines = [f"{'set':<16}{'accuracy':>12}{'± std':>10}{'VAL@FAR':>10}{'± std':>10}{'XNorm':>10}"]
    for name, m in per_set.items():
        lines.append(
            f"{name:<16}{100 * m.get('accuracy', nan):>11.2f}%{100 * m.get('accuracy_std', nan):>9.2f}%"
            f"{100 * m.get('val_at_far', nan):>9.2f}%{100 * m.get('val_at_far_std', nan):>9.2f}%"
            f"{m.get('xnorm', nan):>10.2f}"
        )
    return "\n".join(lines), per_set
