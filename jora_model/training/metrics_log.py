"""What a run reports of its steps: metrics.jsonl, TensorBoard events, and the loss curve at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


class MetricsLog:
    """metrics.jsonl (truncated back to the resumed step, so a resumed run has no duplicates) and
    TensorBoard events. Disabled (writes nothing) on every process but the one that writes outputs."""

    def __init__(self, work_dir: Path, resume_step: int, enabled: bool = True):
        self.path = work_dir / METRICS
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(work_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        self._tb.close()

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.path)


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
