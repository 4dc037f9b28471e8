"""Logging, per-epoch statistics, JSONL metrics and the progress bar."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from .blocks import STAT_FIELDS

__all__ = ["setup_logging", "EpochStats", "append_jsonl", "read_jsonl", "progress",
           "NonFiniteLossError", "merge_stage_summaries", "stage_summary",
           "log_blocks", "log_epoch"]

log = logging.getLogger(__name__)

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
        """Add a batch's per-block stats (losses are batch means, `correct` a count). Device
        ops with a Python scalar only: no host-to-device copy, no synchronisation."""
        s = torch.stack(stats).to(torch.float64)
        self.blocks[:, :_I_CORRECT] += s[:, :_I_CORRECT] * batch_size
        self.blocks[:, _I_CORRECT] += s[:, _I_CORRECT]

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


# --- the per-epoch record of metrics.jsonl and its log lines ---------------------------------
def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _fmt_err(x) -> str:
    return "-" if x is None else f"{x:.2f}%"


def merge_stage_summaries(epoch: int, lr: float, summaries: list[dict], epoch_s: float) -> dict:
    """One metrics.jsonl record from the per-stage summaries (in stage order)."""
    last = summaries[-1]
    blocks = [b for s in summaries for b in s["blocks"]]
    rec = {"epoch": epoch, "lr": lr, "blocks": blocks}
    for split in ("train", "test"):
        g = dict(last[split])
        g["loss_local"] = sum(b[split]["loss"] for b in blocks)
        rec[split] = g
    train_s = last["train_times"]["wall_s"]
    rec.update(train_time_s=train_s, epoch_time_s=epoch_s,
               train_samples_per_s=rec["train"]["num_examples"] / train_s if train_s else None)
    rec["stages"] = [{"stage": s["stage"], "blocks": [b["index"] for b in s["blocks"]],
                      "train": s["train_times"], "test": s["test_times"]} for s in summaries]
    return rec


def stage_summary(k, names, has_decoder, tr, te, with_test_blocks, backprop=False) -> dict:
    tr_glob, tr_blocks = tr.stats.summary(has_decoder)
    te_glob, te_blocks = te.stats.summary(has_decoder)
    blocks = []
    if not backprop:
        for i, b in enumerate(tr_blocks):
            rec = {"index": b["index"], "name": names[i], "train": b}
            rec["test"] = te_blocks[i] if with_test_blocks else {
                "loss": 0.0, "loss_sim": None, "loss_pred": None, "error": None}
            blocks.append(rec)
    return {"stage": k, "train": tr_glob, "test": te_glob, "blocks": blocks,
            "train_times": tr.times.as_dict(), "test_times": te.times.as_dict()}


def log_blocks(summary: dict) -> None:
    for b in summary["blocks"]:
        a, t = b["train"], b["test"]
        log.info("  block %d %s: train sim %s pred %s error %s | test sim %s pred %s error %s",
                 b["index"], b["name"], _fmt(a["loss_sim"]), _fmt(a["loss_pred"]),
                 _fmt_err(a["error"]), _fmt(t["loss_sim"]), _fmt(t["loss_pred"]),
                 _fmt_err(t["error"]))


def log_epoch(rec: dict, epochs: int, num_stages: int) -> None:
    tr, te = rec["train"], rec["test"]
    log.info("epoch %d/%d lr %.2e | train loss_local %.4f loss_global %.4f error %.2f%% | "
             "test loss_global %.4f error %.2f%% | %.1fs", rec["epoch"], epochs, rec["lr"],
             tr["loss_local"], tr["loss_global"], tr["error"], te["loss_global"], te["error"],
             rec["epoch_time_s"])
    if num_stages > 1:
        parts = [f"{s['stage'] + 1}: busy {100 * s['train']['busy_fraction']:.0f}% "
                 f"recv-wait {s['train']['wait_recv_s']:.1f}s send-wait "
                 f"{s['train']['wait_send_s']:.1f}s" for s in rec["stages"]]
        log.info("  stages (train) %s | %.0f samples/s", "; ".join(parts),
                 rec["train_samples_per_s"] or 0)
