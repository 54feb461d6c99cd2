"""Where training numbers go: a JSONL file, TensorBoard and a progress bar."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from memtron.config import Config, ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int, n_dense_params: int) -> float:
    """Training FLOPs per token: 6 per dense weight plus causal attention scores (the
    PaLM-appendix estimate). Memory lookups are gathers and are not counted."""
    attention = 6 * cfg.n_layers * cfg.d_model * seq_len  # 12 * L * d * s / 2 for causal
    return 6.0 * n_dense_params + attention


class MetricsLogger:
    """Appends one JSON record per event to ``metrics.jsonl``, mirrors scalars to TensorBoard and
    drives a progress bar with loss, tokens/s and ETA."""

    def __init__(self, run_dir: Path, cfg: Config, start_step: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._bar = None
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if start_step > 0:
            self._truncate_after(start_step)
        elif self.path.exists():
            self.path.unlink()
        # Held open for the whole run (closed in close()): one flushed line per record.
        self._file = open(self.path, "a") if cfg.logging.jsonl else None  # noqa: SIM115
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if cfg.logging.progress:
            self._bar = tqdm(total=cfg.train.steps, initial=start_step, unit="step",
                             dynamic_ncols=True, file=sys.stderr, leave=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records a killed run wrote after its last checkpoint."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
            self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self._bar.refresh()

    def print(self, text: str) -> None:
        """A console line that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self.enabled and self._file is not None:
            self._file.close()
