"""The progress bar, as a hook: loss and tokens per second of each step."""

from __future__ import annotations

from jora_model.training.hooks import StepEnd


class ProgressBar:
    def __init__(self, total: int, initial: int, progress: bool | None, enabled: bool):
        from tqdm import tqdm

        hidden = (not progress) if progress is not None else None  # None: tqdm decides (a terminal or not)
        self._bar = tqdm(total=total, initial=initial, unit="step", desc="train", disable=hidden if enabled else True)

    def __call__(self, event: StepEnd) -> None:
        self._bar.set_postfix(loss=f"{event.record['loss']:.4f}", tok_s=f"{event.record['tokens_per_s']:.0f}")
        self._bar.update()

    def close(self) -> None:
        self._bar.close()
