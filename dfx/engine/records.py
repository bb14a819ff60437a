"""Per-epoch records of a run: ``metrics.jsonl``, ``results.csv`` and ``results.png``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from dfx.files import save_figure, write_text_atomic


def tensorboard_writer_class():
    """TensorBoard's SummaryWriter, imported on demand (tensorboard is an optional extra).

    Training logs into ``<run>/tensorboard``; the run directory stays the source of truth
    (metrics.jsonl holds the same numbers).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from dfx.errors import UsageError

        raise UsageError('train.tensorboard: true needs the tensorboard package; pip install "dfx[tensorboard]" '
                         "(or pip install tensorboard), or set train.tensorboard: false") from None
    return SummaryWriter


def log_scalars(writer, values: dict, step: int) -> None:
    """Every numeric value of ``values`` to TensorBoard at ``step`` (a no-op without a writer)."""
    if writer is None:
        return
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(key, value, step)


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_rows(run_dir: Path, rows: list[dict]) -> None:
    """Rewrite metrics.jsonl and results.csv from ``rows`` (one dict per epoch)."""
    run_dir = Path(run_dir)
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text_atomic(run_dir / "results.csv", buf.getvalue())


def plot(run_dir: Path, rows: list[dict]) -> None:
    """results.png: training loss, validation metrics and learning rate against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    val_keys = sorted({k for r in rows for k in r if k.startswith("val/")})
    panels = [("train/loss", "train loss")] + [(k, k) for k in val_keys] + [("lr", "learning rate")]
    cols = min(4, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        pts = [(e, r[key]) for e, r in zip(epochs, rows) if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, Path(run_dir) / "results.png")
    plt.close(fig)
