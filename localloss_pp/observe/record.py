"""The epoch record: one line of metrics.jsonl, as a type.

One definition that every sink and reader uses by field name: the run writes it
(`metrics.merge_stage_summaries`, then `to_json`), the log lines, TensorBoard, `compare` and
`plot` read it (`from_json`). A block's numbers are the objective's named terms
(`BlockRecord.terms`: `loss_sim` and `loss_pred` for the paper's losses, `loss_pred` for DGL,
`loss_contrast` or `loss_pred` and `loss_recon` for InfoPro), its total `loss` and its
classifier's `error` (None without one). Fields marked `varies` are measurements of time that
differ between two runs computing the same numbers (`EpochRecord.varying()`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

__all__ = ["SplitTotals", "BlockRecord", "EpochRecord", "varies"]


def varies(**kw):
    """A field that differs between runs that compute the same numbers (a time)."""
    return field(metadata={"varies": True}, **kw)


@dataclass
class SplitTotals:
    """The whole network on the train or the test split of an epoch."""
    error: float             # % of the output layer's predictions that are wrong
    loss_global: float       # the output layer's loss, mean per example
    loss_local: float        # the sum of the blocks' local losses, mean per example
    num_examples: int


@dataclass
class BlockRecord:
    """One unit (a block, or a local module) on both splits: {"loss", its terms, "error"}."""
    index: int
    name: str
    train: dict
    test: dict

    @property
    def terms(self) -> list[str]:
        """The objective's loss terms, by name (in the objective's order in a record the run
        made; metrics.jsonl keeps its keys sorted)."""
        return [k for k in self.train if k.startswith("loss_")]


@dataclass
class EpochRecord:
    epoch: int
    lr: float
    train: SplitTotals
    test: SplitTotals
    blocks: list[BlockRecord]
    num_replicas: int = 1
    replicas_identical: bool | None = None  # written only with replicas (checked equal)
    train_time_s: float = varies(default=0.0)
    epoch_time_s: float = varies(default=0.0)
    train_samples_per_s: float | None = varies(default=None)
    stages: list[dict] = varies(default_factory=list)  # each stage's times of the epoch

    @classmethod
    def varying(cls) -> tuple[str, ...]:
        """The fields that are times: they differ between runs that compute the same."""
        return tuple(f.name for f in fields(cls) if f.metadata.get("varies"))

    def to_json(self) -> dict:
        out = asdict(self)
        if self.replicas_identical is None:
            del out["replicas_identical"]
        return out

    @classmethod
    def from_json(cls, d: dict) -> "EpochRecord":
        """A record read back from metrics.jsonl (a ValueError when a field is missing)."""
        try:
            return cls(**dict(
                d, train=SplitTotals(**d["train"]), test=SplitTotals(**d["test"]),
                blocks=[BlockRecord(**b) for b in d.get("blocks", [])]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"a metrics record of epoch {d.get('epoch')} does not have the "
                             f"fields of an epoch record ({exc})") from None
