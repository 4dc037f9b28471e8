"""The wire between consecutive stages: torch.distributed point-to-point messages.

Every message is two tensors sent in this order: a *meta* tensor (int64: a fixed header then the
labels, padded to the maximum batch size) and a *payload* tensor (the activation, padded to the
maximum batch size). Sizes are fixed for the whole run and agreed in a handshake at start, so the
receiver can post the receive of the next message while the current batch computes, and a
mismatch between the stages is a typed error naming both, never a hang or silent corruption.

Header: kind, epoch, sequence number, batch size. Kinds: TRAIN, EVAL batches; END_TRAIN, END_EVAL
at the end of an epoch's training and evaluation streams; STOP at the end of the run.

Meta tensors travel over `meta_group` (gloo, CPU); payloads over `group` (NCCL on CUDA, gloo on
CPU). Gloo never copies a send buffer: the Work object and the tensors are kept until the send
has been waited for (dropping a gloo send Work cancels it), and at most `queue_depth` messages
are in flight per link (back-pressure).
"""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import first_line

__all__ = ["TRAIN", "EVAL", "END_TRAIN", "END_EVAL", "STOP", "KIND_NAMES", "Message",
           "Sender", "Receiver", "ShapeMismatchError", "PeerLostError", "config_fingerprint",
           "guarded"]

TRAIN, EVAL, END_TRAIN, END_EVAL, STOP = 1, 2, 3, 4, 5
KIND_NAMES = {TRAIN: "train batch", EVAL: "eval batch", END_TRAIN: "end of training",
              END_EVAL: "end of evaluation", STOP: "stop"}
HEADER_LEN = 4
_MAGIC = 0x4C4C5050  # "LLPP"
_SPEC_LEN = 11  # magic, version, stage, fingerprint, ndim, 4 dims, dtype, max batch
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


class ShapeMismatchError(RuntimeError):
    """Two consecutive stages disagree on the activation they exchange (or on the config)."""


class PeerLostError(RuntimeError):
    """A neighbouring stage stopped answering (it crashed, was killed or timed out)."""


def config_fingerprint(text: str) -> int:
    """A 62-bit number identifying a resolved config, compared in the handshake."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2


@dataclass
class Message:
    kind: int
    epoch: int
    seq: int
    labels: torch.Tensor | None = None
    activation: torch.Tensor | None = None


def _spec(stage_index: int, fingerprint: int, shape: tuple[int, ...], dtype: torch.dtype,
          max_batch: int) -> torch.Tensor:
    if len(shape) > 4:
        raise ValueError(f"activation shapes of more than 4 dims are not supported: {shape}")
    dims = list(shape) + [0] * (4 - len(shape))
    return torch.tensor([_MAGIC, 1, stage_index, fingerprint, len(shape), *dims,
                         _DTYPES.index(dtype), max_batch], dtype=torch.int64)


def _describe(spec: list[int]) -> str:
    shape = tuple(spec[5:5 + spec[4]])
    return f"{shape} {str(_DTYPES[spec[9]]).replace('torch.', '')} x {spec[10]} samples"


def _reason(exc: Exception) -> str:
    """The useful part of a backend error ("Connection closed by peer", "Timed out ...")."""
    text = first_line(exc)
    m = re.search(r"(Connection (closed|reset) by peer|Timed out[^.]*|timed out[^.]*)", text)
    return m.group(1) if m else text[:200]


def guarded(what: str, fn, *args, lost: str = "another stage stopped during", **kw):
    """Run a communication call; a vanished peer (the backend's error: connection closed, timed
    out) becomes a PeerLostError ("{lost} {what}: reason") instead of a backend trace."""
    try:
        return fn(*args, **kw)
    except (RuntimeError, OSError) as exc:
        raise PeerLostError(f"{lost} {what}: {_reason(exc)}") from None


class _Link:
    def __init__(self, *, stage_index: int, num_stages: int, peer_rank: int, peer_stage: int,
                 sample_shape: tuple[int, ...], dtype: torch.dtype, max_batch: int,
                 device: torch.device, group, meta_group, staging: bool = False):
        self.stage_index, self.num_stages = stage_index, num_stages
        self.peer_rank, self.peer_stage = peer_rank, peer_stage
        self.shape, self.dtype, self.max_batch = tuple(sample_shape), dtype, max_batch
        self.device, self.group, self.meta_group = device, group, meta_group
        # staging: CUDA stages linked by gloo (several stages on one GPU): payloads travel
        # through CPU memory, copied synchronously on both sides
        self.staging = staging
        self.wire_device = torch.device("cpu") if staging else device
        self.wait_s = 0.0
        self._lost = f"lost {self._name(peer_stage)} (rank {peer_rank}) while"

    def _name(self, stage: int) -> str:
        return f"stage {stage + 1}/{self.num_stages}"

    def _issue(self, op, tensor, group, what: str):
        """isend/irecv to the peer; a broken connection becomes a PeerLostError."""
        return guarded(what, op, tensor, self.peer_rank, group=group, lost=self._lost)

    def _wait(self, work, what: str) -> None:
        start = time.perf_counter()
        try:
            guarded(what, work.wait, lost=self._lost)
        finally:
            self.wait_s += time.perf_counter() - start


class Sender(_Link):
    """Sending side of the link stage k -> k+1."""

    def __init__(self, *, queue_depth: int, **kw):
        super().__init__(**kw)
        self.queue_depth = queue_depth
        self.bytes = 0  # sent so far, headers included
        self._inflight: list[tuple[list, tuple, tuple]] = []
        self._blank = torch.zeros((self.max_batch, *self.shape), dtype=self.dtype,
                                  device=self.wire_device)

    def handshake(self, fingerprint: int) -> None:
        spec = _spec(self.stage_index, fingerprint, self.shape, self.dtype, self.max_batch)
        self._wait(dist.isend(spec, self.peer_rank, group=self.meta_group), "handshaking")
        ack = torch.zeros(2, dtype=torch.int64)
        self._wait(dist.irecv(ack, self.peer_rank, group=self.meta_group), "handshaking")
        if int(ack[0]) != 0:
            what = "config" if int(ack[0]) == 2 else "activation shape"
            raise ShapeMismatchError(
                f"{self._name(self.stage_index)} and {self._name(self.peer_stage)} disagree on "
                f"the {what}: this stage sends {_describe(spec.tolist())}; see the other "
                f"stage's message. Launch every rank with the same flags and config.")

    def send(self, kind: int, epoch: int, seq: int, activation: torch.Tensor | None = None,
             labels: torch.Tensor | None = None) -> None:
        """Queue one message; blocks only while `queue_depth` earlier messages are in flight."""
        bs = 0 if activation is None else activation.size(0)
        meta = torch.zeros(HEADER_LEN + self.max_batch, dtype=torch.int64)
        meta[:HEADER_LEN] = torch.tensor([kind, epoch, seq, bs])
        if activation is None:
            payload = self._blank
        else:
            if tuple(activation.shape[1:]) != self.shape or bs > self.max_batch:
                raise ShapeMismatchError(
                    f"{self._name(self.stage_index)} produced an activation of shape "
                    f"{tuple(activation.shape)}, but the link to {self._name(self.peer_stage)} "
                    f"was agreed for (<= {self.max_batch}, {', '.join(map(str, self.shape))})")
            meta[HEADER_LEN:HEADER_LEN + bs] = labels.to("cpu", torch.int64)
            payload = activation.to(self.wire_device, self.dtype)
            if bs < self.max_batch:
                payload = torch.cat([payload, self._blank[: self.max_batch - bs]])
            payload = payload.contiguous()
        what = f"sending {KIND_NAMES[kind]} {seq} of epoch {epoch}"
        works = [self._issue(dist.isend, meta, self.meta_group, what),
                 self._issue(dist.isend, payload, self.group, what)]
        # keep the Work objects and both tensors alive until the send has been waited for
        self._inflight.append((works, (meta, payload), (kind, epoch, seq)))
        self.bytes += meta.numel() * 8 + payload.numel() * payload.element_size()
        while len(self._inflight) > self.queue_depth:
            self._retire()

    def _retire(self) -> None:
        works, _, (kind, epoch, seq) = self._inflight.pop(0)
        what = f"sending {KIND_NAMES[kind]} {seq} of epoch {epoch}"
        if self.wire_device.type == "cuda":
            # NCCL's wait() only orders streams; poll the payload's completion so that at most
            # queue_depth sends (and their buffers) are really in flight. Only the NCCL work:
            # a gloo work (the header) reports completion only after wait().
            start = time.perf_counter()
            while not works[1].is_completed():
                time.sleep(1e-4)
            self.wait_s += time.perf_counter() - start
        for work in works:
            self._wait(work, what)

    def drain(self) -> None:
        """Wait until every queued message has been delivered."""
        while self._inflight:
            self._retire()


class Receiver(_Link):
    """Receiving side of the link stage k-1 -> k; the next message is always pre-posted."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._meta = [torch.zeros(HEADER_LEN + self.max_batch, dtype=torch.int64)
                      for _ in range(2)]
        self._payload = [torch.empty((self.max_batch, *self.shape), dtype=self.dtype,
                                     device=self.wire_device) for _ in range(2)]
        self._slot = 0
        self._pending = None

    def handshake(self, fingerprint: int) -> None:
        spec = torch.zeros(_SPEC_LEN, dtype=torch.int64)
        self._wait(dist.irecv(spec, self.peer_rank, group=self.meta_group), "handshaking")
        mine = _spec(self.stage_index - 1, fingerprint, self.shape, self.dtype, self.max_batch)
        theirs = spec.tolist()
        if theirs[:2] != [_MAGIC, 1]:
            code = 1
        elif theirs[3] != mine[3].item():
            code = 2
        else:
            code = 0 if theirs == mine.tolist() else 1
        ack = torch.tensor([code, 0], dtype=torch.int64)
        self._wait(dist.isend(ack, self.peer_rank, group=self.meta_group), "handshaking")
        if code == 2:
            raise ShapeMismatchError(
                f"{self._name(self.peer_stage)} and {self._name(self.stage_index)} run with "
                "different configs; launch every rank with the same flags and config")
        if code:
            raise ShapeMismatchError(
                f"{self._name(self.peer_stage)} sends {_describe(theirs)}, but "
                f"{self._name(self.stage_index)} expects {_describe(mine.tolist())}")
        self._post()

    def _post(self) -> None:
        s = self._slot
        what = "posting the next receive"
        self._pending = (s, [self._issue(dist.irecv, self._meta[s], self.meta_group, what),
                             self._issue(dist.irecv, self._payload[s], self.group, what)])

    def recv(self) -> Message:
        """The next message. Its tensors stay valid until the next call of recv()."""
        slot, works = self._pending
        for work in works:
            self._wait(work, "waiting for the next message")
        kind, epoch, seq, bs = self._meta[slot][:HEADER_LEN].tolist()
        if kind not in KIND_NAMES or not 0 <= bs <= self.max_batch:
            raise ShapeMismatchError(f"{self._name(self.stage_index)} received a malformed "
                                     f"header {[kind, epoch, seq, bs]} from "
                                     f"{self._name(self.peer_stage)}")
        self._pending = None
        if kind != STOP:
            self._slot = 1 - slot
            self._post()
        if kind not in (TRAIN, EVAL):
            return Message(kind, epoch, seq)
        activation = self._payload[slot][:bs]
        if self.staging:  # a synchronous copy: the CPU buffer is free again when it returns
            activation = activation.to(self.device)
        return Message(kind, epoch, seq, labels=self._meta[slot][HEADER_LEN:HEADER_LEN + bs],
                       activation=activation)
