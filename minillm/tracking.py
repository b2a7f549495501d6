"""Run logging: ``metrics.jsonl`` (one JSON object per logged step), a human-readable ``train.log``, and
optional TensorBoard / Weights & Biases. Only rank 0 writes. Secrets (W&B key) come from the environment
and are never written anywhere by this module."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from .config import LoggingConfig


def get_logger(name: str = "minillm") -> logging.Logger:
    return logging.getLogger(name)


def setup_logging(output_dir: str | Path | None, is_main: bool, rank: int = 0) -> logging.Logger:
    """Console (rank 0 at INFO, other ranks at WARNING) plus ``output_dir/train.log`` on rank 0."""
    logger = get_logger()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if output_dir is not None and is_main:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(output_dir) / "train.log")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the information as text
    return value


class MetricsLogger:
    """Appends ``{"step": N, ...}`` lines to ``metrics.jsonl`` and mirrors them to the enabled trackers."""

    def __init__(self, output_dir: str | Path, cfg: LoggingConfig, is_main: bool, run_name: str | None = None,
                 config: dict | None = None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.is_main = is_main
        self._tb = None
        self._wandb = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError("logging.tensorboard=true needs `pip install tensorboard`") from e
            self._tb_dir = str(Path(output_dir) / "tensorboard")
            self._tb = SummaryWriter(self._tb_dir)
        if cfg.wandb:
            try:
                import wandb
            except ImportError as e:  # pragma: no cover
                raise ImportError("logging.wandb=true needs `pip install wandb` (key in WANDB_API_KEY)") from e
            self._wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or run_name,
                                     config=config, resume="allow")

    def truncate_after(self, step: int) -> None:
        """On resume, drop what was logged after the checkpoint's ``step`` so the run reads like one uninterrupted
        run: rows of ``metrics.jsonl`` (rewritten atomically; a line torn by a kill in the middle of its write is
        dropped too) and TensorBoard events (reopened with ``purge_step``, which hides the later events)."""
        if not self.is_main:
            return
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:  # empty, or torn by a kill during its write
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= step:
                    kept.append(line)
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(self._tb_dir, purge_step=step + 1)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line torn by a kill during its write (truncate_after drops it on resume)
            continue
    return rows
