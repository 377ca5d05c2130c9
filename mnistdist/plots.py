"""PNG plots of a run (loss curves, accuracy curve, confusion matrix) from its metrics.jsonl,
into ``RUN_DIR/plots/``: matplotlib's object API on the Agg canvas (no pyplot), so no window,
no change to the process-wide backend, no global figure state."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mnistdist.model import NUM_CLASSES
from mnistdist.rundir import RunDir, read_metrics


def split_records(records: Sequence[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(training lines, evaluation lines) of metrics.jsonl: those with ``train_loss``, and those
    with ``test_acc`` or ``val_acc``. Values written as null (NaN/inf) stay None."""
    train = [r for r in records if "train_loss" in r and "step" in r]
    evals = [r for r in records if ("test_acc" in r or "val_acc" in r) and "step" in r]
    return train, evals


def last_confusion(evals: Sequence[dict[str, Any]]) -> list[list[int]] | None:
    """The ``confusion`` of the last evaluation line, when it has one."""
    return evals[-1]["confusion"] if evals and _is_confusion(evals[-1].get("confusion")) else None


def _is_confusion(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == NUM_CLASSES
            and all(isinstance(row, (list, tuple)) and len(row) == NUM_CLASSES for row in value))


def _xy(records: Sequence[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    pairs = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _save(fig: Any, path: Path) -> Path:
    """Render with the Agg canvas and write atomically (a reader never sees half a PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_loss(train: Sequence[dict], evals: Sequence[dict], path: Path, title: str = "") -> Path:
    """Training loss (per logging window), validation loss (per epoch, with a validation set)
    and test loss (per epoch, or at the end with a validation set) against optimizer steps."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for records, key, label, color in ((train, "train_loss", "train loss", "tab:blue"),
                                       (evals, "val_loss", "validation loss", "tab:purple"),
                                       (evals, "test_loss", "test loss", "tab:orange")):
        x, y = _xy(records, "step", key)
        if x and records is train:
            ax.plot(x, y, label=label, color=color, linewidth=1.2)
        elif x:
            ax.plot(x, y, "o-", label=label, color=color, linewidth=1.5, markersize=4)
    positive = [v for line in ax.get_lines() for v in line.get_ydata() if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    ax.set(xlabel="optimizer step", ylabel="loss", title=f"loss{f' - {title}' if title else ''}")
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend()
    return _save(fig, path)


def plot_accuracy(evals: Sequence[dict], path: Path, title: str = "") -> Path:
    """Test accuracy (%) after each epoch, annotated with the final value; with a validation
    set, the validation accuracy after each epoch and the test accuracy of the final model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    validated = any("val_acc" in r for r in evals)
    test_label = "test accuracy (final model)" if validated else "test accuracy"
    for key, label, color in (("val_acc", "validation accuracy", "tab:purple"), ("test_acc", test_label, "tab:green")):
        x, y = _xy(evals, "epoch", key)
        y = [100 * v for v in y]
        if x:
            ax.plot(x, y, "D" if key == "test_acc" and validated else "o-", color=color, linewidth=1.5,
                    markersize=5 if validated else 4, label=label)
            # With both, the test value is written left of its point, the validation value above.
            left = key == "test_acc" and validated
            ax.annotate(f"{y[-1]:.2f}%", (x[-1], y[-1]), textcoords="offset points",
                        xytext=(-8, -3) if left else (0, 8), ha="right" if left else "center", fontsize=9,
                        color=color if left else "black")
    if ax.get_lines():
        ax.legend(loc="best")
        ax.margins(x=0.08, y=0.12)
    what = "validation and test accuracy" if validated else "test accuracy"
    ax.set(xlabel="epoch", ylabel="accuracy (%)" if validated else "test accuracy (%)",
           title=f"{what}{f' - {title}' if title else ''}")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_confusion(confusion: Sequence[Sequence[int]], path: Path, title: str = "") -> Path:
    """10x10 counts, rows = true class, columns = predicted; colour = share of the true class
    (so the off-diagonal mistakes are visible next to the ~1000-image diagonal)."""
    import numpy as np
    from matplotlib.figure import Figure

    counts = np.asarray(confusion, dtype=np.int64)
    row_totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)
    correct, total = int(np.trace(counts)), int(counts.sum())
    fig = Figure(figsize=(6.4, 5.6))
    ax = fig.add_subplot()
    # sqrt makes small mistakes (a few tenths of a percent) visible while the diagonal saturates.
    image = ax.imshow(np.sqrt(shares), cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if shares[i, j] > 0.5 else "black")
    ticks = list(range(counts.shape[0]))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted class", ylabel="true class")
    acc = f"{100 * correct / total:.2f}% ({correct}/{total})" if total else "no samples"
    ax.set_title(f"confusion matrix, test accuracy {acc}{f' - {title}' if title else ''}", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_ticks([0, np.sqrt(0.01), np.sqrt(0.1), np.sqrt(0.5), 1.0])
    bar.set_ticklabels(["0", "1%", "10%", "50%", "100%"])
    bar.set_label("share of the true class")
    return _save(fig, path)


def write_run_plots(run_dir: Path, confusion: Sequence[Sequence[int]] | None = None,
                    out_dir: Path | None = None) -> list[Path]:
    """Write ``loss.png``, ``accuracy.png`` and ``confusion.png`` (into ``out_dir``, by default
    ``RUN_DIR/plots``); return their paths. ``confusion`` (10x10, rows = true class) wins over
    the last evaluation line's; without either, ``confusion.png`` is skipped. Raises
    FileNotFoundError when the run has no metrics.jsonl."""
    paths = RunDir(Path(run_dir))
    if not paths.metrics.is_file():
        raise FileNotFoundError(f"{paths.metrics}: no such file")
    train, evals = split_records(read_metrics(paths.root))
    if hasattr(confusion, "tolist"):  # a tensor or an array
        confusion = confusion.tolist()
    if confusion is None:
        confusion = last_confusion(evals)
    elif not _is_confusion(confusion):
        raise ValueError("confusion must be a 10x10 matrix (rows = true class)")
    out = Path(out_dir) if out_dir is not None else paths.plots
    out.mkdir(parents=True, exist_ok=True)
    title = paths.root.resolve().name
    written = [plot_loss(train, evals, out / "loss.png", title), plot_accuracy(evals, out / "accuracy.png", title)]
    if confusion is not None:
        written.append(plot_confusion(confusion, out / "confusion.png", title))
    return written
