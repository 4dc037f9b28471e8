"""Logging, per-epoch statistics, JSONL metrics and the progress bar."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from .blocks import STAT_FIELDS

__all__ = ["setup_logging", "EpochStats", "append_jsonl", "read_jsonl", "progress",
           "NonFiniteLossError", "check_finite"]

_I_LOSS, _I_SIM, _I_PRED, _I_CORRECT = (STAT_FIELDS.index(n) for n in STAT_FIELDS)


class NonFiniteLossError(FloatingPointError):
    """A local or global loss became NaN or infinite; names the block and the step."""


class _StagePrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record):
        record.stage = self.prefix
        return True


def setup_logging(stage_index: int = 0, num_stages: int = 1, level=logging.INFO,
                  replica: int = 0, num_replicas: int = 1) -> None:
    """Send this package's log lines to stderr, each prefixed with `[stage k/S]` (1-based),
    `[stage k/S, replica r/R]` in a data-parallel run."""
    logger = logging.getLogger("localloss_pp")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    rep = f", replica {replica + 1}/{num_replicas}" if num_replicas > 1 else ""
    handler.addFilter(_StagePrefix(f"[stage {stage_index + 1}/{num_stages}{rep}]"))
    handler.setFormatter(logging.Formatter("%(stage)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def check_finite(stats: torch.Tensor, what: str, step: int) -> None:
    """Raise NonFiniteLossError if the loss entry of a stats vector is not finite."""
    if not bool(torch.isfinite(stats[_I_LOSS])):
        raise NonFiniteLossError(f"non-finite loss ({float(stats[_I_LOSS])}) in {what} at "
                                 f"step {step}; lower --lr or check the input data")


class EpochStats:
    """Sums over one epoch (train or test) of the per-block and global statistics.

    Block sums stay on the device (no synchronisation per batch) until `summary`.
    """

    def __init__(self, block_indices: list[int], device):
        self.block_indices = list(block_indices)
        self.blocks = torch.zeros(len(block_indices), len(STAT_FIELDS), dtype=torch.float64,
                                  device=device)
        self.glob = torch.zeros(2, dtype=torch.float64, device=device)  # loss*B, correct
        self.count = 0

    def load(self, state: dict) -> None:
        self.blocks.copy_(state["blocks"])
        self.glob.copy_(state["glob"])
        self.count = int(state["count"])

    def add_blocks(self, stats: list[torch.Tensor], batch_size: int) -> None:
        s = torch.stack(stats).to(torch.float64)
        scale = torch.tensor([batch_size, batch_size, batch_size, 1], dtype=torch.float64,
                             device=s.device)
        self.blocks += s * scale

    def add_global(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        correct = (logits.argmax(1) == y).sum()
        self.glob += torch.stack([loss.to(torch.float64) * y.size(0), correct.to(torch.float64)])

    def add_count(self, batch_size: int) -> None:
        self.count += batch_size

    def summary(self, has_decoder: list[bool]) -> tuple[dict, list[dict]]:
        """(global numbers, per-block numbers) averaged over the examples seen."""
        n = max(self.count, 1)
        blocks = self.blocks.cpu().tolist()
        g = self.glob.cpu().tolist()
        glob = {"loss_local": sum(b[_I_LOSS] for b in blocks) / n, "loss_global": g[0] / n,
                "error": 100.0 - 100.0 * g[1] / n, "num_examples": self.count}
        per_block = []
        for idx, b, dec in zip(self.block_indices, blocks, has_decoder):
            per_block.append({"index": idx, "loss": b[_I_LOSS] / n, "loss_sim": b[_I_SIM] / n,
                              "loss_pred": b[_I_PRED] / n,
                              "error": (100.0 - 100.0 * b[_I_CORRECT] / n) if dec else None})
        return glob, per_block


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def progress(iterable, *, total: int, enabled: bool, desc: str):
    """A tqdm bar on a terminal (when enabled), the plain iterable otherwise."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
