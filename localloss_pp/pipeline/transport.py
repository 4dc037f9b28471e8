"""The wire between consecutive stages: torch.distributed point-to-point messages.

Every message is a *meta* tensor (int64: a fixed header then the labels, padded to the maximum
batch size), followed for a batch by a *payload* tensor (the activation, padded to the maximum
batch size). Sizes are fixed for the whole run and agreed in a handshake at start, so the
receiver can post the receive of the next message while the current batch computes, and a
mismatch between the stages is a typed error naming both, never a hang or silent corruption.

Header: kind, epoch, sequence number, batch size, payload (1: a payload tensor follows), last
(1: the last batch of its stream). Kinds: TRAIN, EVAL batches; END_TRAIN, END_EVAL at the end of
an epoch's training and evaluation streams; STOP at the end of the run. End-of-stream markers
carry no payload: the receiver pre-posts a payload receive only after a batch that is not the
last of its stream, and otherwise posts it once a header has said that a payload follows. (A
sender that could not tell the last batch, `last` unknown, sends a marker a zero payload to
match the receive posted for it; the runs of this package always know it.)

Activations travel in their memory format: channels-last when both blocks at the boundary run
channels-last (`--channels-last`), so neither end copies them to NCHW and back.

The network's input: when a unit after the boundary reads it (an objective with `needs_input`,
such as InfoPro's reconstruction of the image), every batch carries a second tensor after the
activation, the *side* tensor: the input batch as the first stage fed it to its units (after
augmentation), float32, padded like the payload. Each stage passes it on. Its size is part of
the handshake.

Meta tensors travel over `meta_group` (gloo, CPU); payloads over `group` (NCCL on CUDA, gloo on
CPU). Gloo never copies a send buffer: the Work object and the tensors are kept until the send
has been waited for (dropping a gloo send Work cancels it), and at most `queue_depth` messages
are in flight per link (back-pressure).

Memory held per link, with P = max batch x activation size: the sender at most `queue_depth`
padded payloads in flight (P each; a full batch in channels-last or NCHW as produced is sent
without a copy, a short or converted one is one padded copy), the receiver two slots of P it
receives into alternately (on the device, or pinned host memory with CPU staging).

Set-up of a link (`Sender.connect` / `Receiver.connect`, called in chain order stage k -> k+1
after every set-up collective): the handshake on the meta group, then one small warm-up tensor
on the payload group, which creates NCCL's lazily built communicator of the pair while both
sides are known to be there. Receives are pre-posted one message ahead only inside a stream of
batches: after the last batch of a stream nothing is posted until the next `recv()`, so no
receive is pending during the collectives and checkpoint writes of an epoch's end.
"""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.distributed as dist

from localloss_pp.errors import first_line

__all__ = ["Kind", "TRAIN", "EVAL", "END_TRAIN", "END_EVAL", "STOP", "KIND_NAMES",
           "Message",
           "Sender", "Receiver", "ShapeMismatchError", "PeerLostError", "config_fingerprint",
           "guarded", "is_peer_loss"]


class Kind(IntEnum):
    """What a message is (its first header field)."""
    TRAIN = 1      # a training batch
    EVAL = 2       # an evaluation batch
    END_TRAIN = 3  # the end of an epoch's training stream
    END_EVAL = 4   # the end of an epoch's evaluation stream
    STOP = 5       # the end of the run


TRAIN, EVAL, END_TRAIN, END_EVAL, STOP = Kind
KIND_NAMES = {Kind.TRAIN: "train batch", Kind.EVAL: "eval batch",
              Kind.END_TRAIN: "end of training", Kind.END_EVAL: "end of evaluation",
              Kind.STOP: "stop"}
HEADER_LEN = 6  # kind, epoch, seq, batch size, payload follows, last batch of its stream
_MAGIC = 0x4C4C5050  # "LLPP"
_VERSION = 3
_SPEC_LEN = 13  # magic, version, stage, fingerprint, ndim, 4 dims, dtype, max batch, NHWC, side
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
    kind: Kind
    epoch: int
    seq: int
    labels: torch.Tensor | None = None          # on the host
    activation: torch.Tensor | None = None      # on this stage's device
    labels_device: torch.Tensor | None = None   # on this stage's device
    last: bool = False                          # the last batch of its stream
    side: torch.Tensor | None = None            # the network's input, if the link carries it


def _spec(stage_index: int, fingerprint: int, shape: tuple[int, ...], dtype: torch.dtype,
          max_batch: int, channels_last: bool, side_numel: int = 0) -> torch.Tensor:
    if len(shape) > 4:
        raise ValueError(f"activation shapes of more than 4 dims are not supported: {shape}")
    dims = list(shape) + [0] * (4 - len(shape))
    return torch.tensor([_MAGIC, _VERSION, stage_index, fingerprint, len(shape), *dims,
                         _DTYPES.index(dtype), max_batch, int(channels_last), side_numel],
                        dtype=torch.int64)


def _describe(spec: list[int]) -> str:
    shape = tuple(spec[5:5 + spec[4]])
    fmt = " channels-last" if spec[11] else ""
    side = f" with the network's input ({spec[12]} values)" if spec[12] else ""
    return (f"{shape} {str(_DTYPES[spec[9]]).replace('torch.', '')}{fmt} x {spec[10]} samples"
            f"{side}")


_PEER_LOSS = re.compile(r"Connection (closed|reset) by peer|Broken pipe|[Tt]imed out|[Tt]imeout|"
                        r"Socket Timeout|[Cc]onnection refused|aborted|Application timeout")


def is_peer_loss(exc: BaseException) -> bool:
    """Whether a backend error means that the other side is gone (crashed, killed, timed out),
    as opposed to a fault of this process (a wrong device, out of memory, a communicator that
    could not be created): the network and store errors of torch.distributed, and the closed
    connections and timeouts that gloo and NCCL report as RuntimeError/DistBackendError."""
    if isinstance(exc, (dist.DistNetworkError, dist.DistStoreError, TimeoutError,
                        ConnectionError)):
        return True
    return isinstance(exc, (RuntimeError, OSError)) and bool(_PEER_LOSS.search(str(exc)))


def _reason(exc: Exception) -> str:
    """The useful part of a backend error ("Connection closed by peer", "Timed out ..."), in
    the run's terms: never a store key or a source line of the backend."""
    text = first_line(exc)
    joined = re.search(r"(\d+)/(\d+) clients joined", text)
    if joined:
        return (f"only {joined.group(1)} of {joined.group(2)} processes joined within the "
                "timeout (--timeout-s)")
    if "keys:" in text or re.search(r"wait timeout|[Ss]ocket [Tt]imeout", text):
        return "it did not answer within the timeout (--timeout-s): stopped, or never started"
    m = re.search(r"(Connection (closed|reset) by peer|Timed out[^.]*|timed out[^.]*)", text)
    return m.group(1) if m else re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)[:200]


def guarded(what: str, fn, *args, lost: str = "another stage stopped during", **kw):
    """Run a communication call. A vanished peer (`is_peer_loss`) becomes a PeerLostError
    ("{lost} {what}: reason") with the backend's error as its cause; any other error is this
    process's own and propagates unchanged."""
    try:
        return fn(*args, **kw)
    except (RuntimeError, OSError) as exc:
        if not is_peer_loss(exc):
            raise
        raise PeerLostError(f"{lost} {what}: {_reason(exc)}") from exc


class _Link:
    def __init__(self, *, stage_index: int, num_stages: int, peer_rank: int, peer_stage: int,
                 sample_shape: tuple[int, ...], dtype: torch.dtype, max_batch: int,
                 device: torch.device, group, meta_group, staging: bool = False,
                 timeout_s: float = 600.0, channels_last: bool = False,
                 side_shape: tuple[int, ...] | None = None):
        self.stage_index, self.num_stages = stage_index, num_stages
        self.peer_rank, self.peer_stage = peer_rank, peer_stage
        self.shape, self.dtype, self.max_batch = tuple(sample_shape), dtype, max_batch
        self.device, self.group, self.meta_group = device, group, meta_group
        # staging: CUDA stages linked by gloo (several stages on one GPU): payloads travel
        # through pinned CPU memory
        self.staging = staging
        self.wire_device = torch.device("cpu") if staging else device
        self.timeout_s = timeout_s
        # the activation's memory format on the wire: channels-last only for images (C, H, W)
        self.channels_last = channels_last and len(self.shape) == 3
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        # what travels: (C, H, W), or (H, W, C) for channels-last: a channels-last batch seen
        # as (N, H, W, C) is contiguous, which every backend sends as it is
        self.wire_shape = ((*self.shape[1:], self.shape[0]) if self.channels_last
                           else self.shape)
        self._lost = f"lost {self._name(peer_stage)} (rank {peer_rank}) while"
        # the network's input travels along (float32, NCHW) when a later unit reads it
        self.side_shape = tuple(side_shape) if side_shape else None
        self.side_numel = 0 if side_shape is None else int(torch.Size(side_shape).numel())

    def _spec(self, stage_index: int, fingerprint: int) -> torch.Tensor:
        return _spec(stage_index, fingerprint, self.shape, self.dtype, self.max_batch,
                     self.channels_last, self.side_numel)

    def _side_buffer(self) -> torch.Tensor:
        return torch.zeros((self.max_batch, *self.side_shape), dtype=torch.float32,
                           device=self.wire_device)

    def _name(self, stage: int) -> str:
        return f"stage {stage + 1}/{self.num_stages}"

    def _issue(self, op, tensor, group, what: str):
        """isend/irecv to the peer; a broken connection becomes a PeerLostError."""
        return guarded(what, op, tensor, self.peer_rank, group=group, lost=self._lost)

    def _wait(self, work, what: str) -> None:
        guarded(what, work.wait, lost=self._lost)

    def _warm(self, op) -> None:
        """One small tensor over the payload group: on NCCL this creates the pair's lazily
        built communicator now, while both sides are in the set-up, not at the first batch."""
        probe = torch.zeros(1, dtype=self.dtype, device=self.wire_device)
        self._wait(self._issue(op, probe, self.group, "connecting"), "connecting")


class Sender(_Link):
    """Sending side of the link stage k -> k+1."""

    def __init__(self, *, queue_depth: int, **kw):
        super().__init__(**kw)
        self.queue_depth = queue_depth
        self.bytes = 0  # sent so far, headers included
        self._inflight: list[tuple[list, tuple, tuple]] = []
        # True after a batch not known to be the last of its stream: the receiver has posted a
        # payload receive for the next message, so a marker sent now must bring a payload
        self._owes_payload = False
        self._blank = None  # that zero payload, made only when needed
        self._blank_side = None

    def connect(self, fingerprint: int) -> None:
        """Handshake with the next stage, then warm the payload link."""
        self.handshake(fingerprint)
        self._warm(dist.isend)

    def handshake(self, fingerprint: int) -> None:
        spec = self._spec(self.stage_index, fingerprint)
        self._wait(self._issue(dist.isend, spec, self.meta_group, "handshaking"), "handshaking")
        ack = torch.zeros(2, dtype=torch.int64)
        self._wait(self._issue(dist.irecv, ack, self.meta_group, "handshaking"), "handshaking")
        if int(ack[0]) != 0:
            what = "config" if int(ack[0]) == 2 else "activation shape"
            raise ShapeMismatchError(
                f"{self._name(self.stage_index)} and {self._name(self.peer_stage)} disagree on "
                f"the {what}: this stage sends {_describe(spec.tolist())}; see the other "
                f"stage's message. Launch every rank with the same flags and config.")

    def _payload(self, activation: torch.Tensor) -> torch.Tensor:
        """The activation padded to the agreed batch, on the wire's device, contiguous in the
        wire's memory format (no copy for a full batch already in that format)."""
        bs = activation.size(0)
        if tuple(activation.shape[1:]) != self.shape or bs > self.max_batch:
            raise ShapeMismatchError(
                f"{self._name(self.stage_index)} produced an activation of shape "
                f"{tuple(activation.shape)}, but the link to {self._name(self.peer_stage)} "
                f"was agreed for (<= {self.max_batch}, {', '.join(map(str, self.shape))})")
        payload = _padded(activation.to(self.dtype), self.max_batch)
        payload = payload.contiguous(memory_format=self.memory_format)
        if self.channels_last:
            payload = payload.permute(0, 2, 3, 1)  # a view: (N, H, W, C), contiguous
        return self._staged(payload)

    def _side(self, side: torch.Tensor | None, bs: int) -> torch.Tensor:
        """The network's input batch, padded, float32, NCHW, on the wire's device."""
        if side is None or tuple(side.shape) != (bs, *self.side_shape):
            raise ShapeMismatchError(
                f"{self._name(self.stage_index)} must send the network's input of shape "
                f"({bs}, {', '.join(map(str, self.side_shape))}) with this batch to "
                f"{self._name(self.peer_stage)}, got "
                f"{None if side is None else tuple(side.shape)}")
        # always a copy: a received side tensor lives in the receiver's slot, which is
        # received into again while this send may still be in flight
        out = torch.zeros((self.max_batch, *self.side_shape), dtype=torch.float32,
                          device=side.device)
        out[:bs].copy_(side)
        return self._staged(out)

    def _staged(self, payload: torch.Tensor) -> torch.Tensor:
        if not self.staging:
            return payload
        # gloo sends from host memory: copy into pinned memory (same strides) and wait for that
        # copy only (staging is the one place where a stage waits for its GPU)
        host = torch.empty_like(payload, device="cpu", pin_memory=True)
        host.copy_(payload, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return host

    def send(self, kind: int, epoch: int, seq: int, activation: torch.Tensor | None = None,
             labels: torch.Tensor | None = None, last: bool | None = None,
             side: torch.Tensor | None = None) -> None:
        """Queue one message; blocks only while `queue_depth` earlier messages are in flight.
        `labels` are on the host (headers never wait for the device). For a batch, `last` says
        whether it is the last of its stream (None: not known; the marker then brings a
        zero payload); `side` is the network's input batch when the link carries it."""
        bs = 0 if activation is None else activation.size(0)
        extra = None
        if activation is None:  # a marker: a payload only if a receive was posted for one
            payload = self._zero_payload() if self._owes_payload else None
            if payload is not None and self.side_shape is not None:
                extra = self._zero_side()
            self._owes_payload = False
        else:
            if labels.device.type != "cpu":
                raise ValueError("Sender.send takes the labels on the host (no device sync)")
            payload = self._payload(activation)
            if self.side_shape is not None:
                extra = self._side(side, bs)
            self._owes_payload = not last
        meta = torch.zeros(HEADER_LEN + self.max_batch, dtype=torch.int64)
        meta[:HEADER_LEN] = torch.tensor([int(kind), epoch, seq, bs, int(payload is not None),
                                          int(bool(last))])
        if activation is not None:
            meta[HEADER_LEN:HEADER_LEN + bs] = labels
        what = f"sending {KIND_NAMES[kind]} {seq} of epoch {epoch}"
        works = [self._issue(dist.isend, meta, self.meta_group, what)]
        for tensor in (payload, extra):
            if tensor is not None:
                works.append(self._issue(dist.isend, tensor, self.group, what))
                self.bytes += tensor.numel() * tensor.element_size()
        # keep the Work objects and the tensors alive until the send has been waited for
        self._inflight.append((works, (meta, payload, extra), (kind, epoch, seq)))
        self.bytes += meta.numel() * 8
        while len(self._inflight) > self.queue_depth:
            self._retire()

    def _zero_side(self) -> torch.Tensor:
        if self._blank_side is None:
            self._blank_side = self._side_buffer()
        return self._blank_side

    def _zero_payload(self) -> torch.Tensor:
        if self._blank is None:
            self._blank = torch.zeros((self.max_batch, *self.wire_shape), dtype=self.dtype,
                                      device=self.wire_device)
        return self._blank

    def _retire(self) -> None:
        works, _, (kind, epoch, seq) = self._inflight.pop(0)
        what = f"sending {KIND_NAMES[kind]} {seq} of epoch {epoch}"
        if self.wire_device.type == "cuda" and len(works) > 1:
            self._poll(works[-1], what)  # the payload (or the side tensor after it)
        for work in works:
            self._wait(work, what)

    def _poll(self, work, what: str) -> None:
        """NCCL's wait() only orders streams: poll the payload's completion so that at most
        queue_depth sends (and their buffers) are really in flight. Only the NCCL work: a gloo
        work (the header) reports completion only after wait(). A send that the next stage
        does not take within the timeout is a lost peer, not an endless spin."""
        deadline = time.perf_counter() + self.timeout_s
        while not work.is_completed():
            if time.perf_counter() > deadline:
                raise PeerLostError(f"{self._lost} {what}: the send did not complete within "
                                    f"{self.timeout_s:g} s (--timeout-s)")
            time.sleep(1e-4)

    def drain(self) -> None:
        """Wait until every queued message has been delivered."""
        while self._inflight:
            self._retire()


class Receiver(_Link):
    """Receiving side of the link stage k-1 -> k. Inside a stream of batches the next message
    is always pre-posted; after the last batch of a stream, or a marker, nothing is posted
    until `recv()`."""

    def __init__(self, **kw):
        super().__init__(**kw)
        # on CUDA labels (and staged activations) are copied off these buffers into fresh
        # pinned blocks before they go to the device (_pinned_copy)
        self._meta = [torch.zeros(HEADER_LEN + self.max_batch, dtype=torch.int64)
                      for _ in range(2)]
        self._payload = [torch.empty((self.max_batch, *self.wire_shape), dtype=self.dtype,
                                     device=self.wire_device) for _ in range(2)]
        self._sides = [self._side_buffer() for _ in range(2)] if self.side_shape else None
        self._slot = 0
        self._pending = None  # (slot, works, payload posted)

    def connect(self, fingerprint: int) -> None:
        """Handshake with the previous stage, then warm the payload link."""
        self.handshake(fingerprint)
        self._warm(dist.irecv)

    def handshake(self, fingerprint: int) -> None:
        spec = torch.zeros(_SPEC_LEN, dtype=torch.int64)
        self._wait(self._issue(dist.irecv, spec, self.meta_group, "handshaking"), "handshaking")
        mine = self._spec(self.stage_index - 1, fingerprint)
        theirs = spec.tolist()
        if theirs[:2] != [_MAGIC, _VERSION]:
            code = 1
        elif theirs[3] != mine[3].item():
            code = 2
        else:
            code = 0 if theirs == mine.tolist() else 1
        ack = torch.tensor([code, 0], dtype=torch.int64)
        self._wait(self._issue(dist.isend, ack, self.meta_group, "handshaking"), "handshaking")
        if code == 2:
            raise ShapeMismatchError(
                f"{self._name(self.peer_stage)} and {self._name(self.stage_index)} run with "
                "different configs; launch every rank with the same flags and config")
        if code and theirs[:2] != [_MAGIC, _VERSION]:
            raise ShapeMismatchError(
                f"{self._name(self.peer_stage)} speaks another version of the stage protocol "
                "than this one: launch every rank with the same version of localloss-pp")
        if code:
            raise ShapeMismatchError(
                f"{self._name(self.peer_stage)} sends {_describe(theirs)}, but "
                f"{self._name(self.stage_index)} expects {_describe(mine.tolist())}")

    def _post(self, payload: bool) -> None:
        """Post the receive of the next message: its header, and its payload when one is
        known to follow (the previous batch was not the last of its stream)."""
        s = self._slot
        self._slot = 1 - s
        what = "posting the next receive"
        works = [self._issue(dist.irecv, self._meta[s], self.meta_group, what)]
        if payload:
            works += self._post_payload(s, what)
        self._pending = (s, works, payload)

    def _post_payload(self, slot: int, what: str) -> list:
        """The receives of a batch's payload (and side tensor) into `slot`."""
        works = [self._issue(dist.irecv, self._payload[slot], self.group, what)]
        if self._sides is not None:
            works.append(self._issue(dist.irecv, self._sides[slot], self.group, what))
        return works

    def settle(self) -> None:
        """Complete the pre-posted receive now (its message stays for the next recv()): no
        receive issued so far is left in flight."""
        if self._pending is not None:
            slot, works, payload = self._pending
            for work in works:
                self._wait(work, "waiting for the next message")
            self._pending = (slot, [], payload)

    def _header(self, slot: int) -> list[int]:
        header = self._meta[slot][:HEADER_LEN].tolist()
        kind, _, _, bs, has_payload, last = header
        batch = kind in (TRAIN, EVAL)
        if (kind not in KIND_NAMES or not 0 <= bs <= self.max_batch or has_payload not in (0, 1)
                or last not in (0, 1) or (batch and not has_payload)):
            raise ShapeMismatchError(f"{self._name(self.stage_index)} received a malformed "
                                     f"header {header} from {self._name(self.peer_stage)}")
        return header

    def recv(self, hold_after=None) -> Message:
        """The next message. Its tensors stay valid until the next call of recv(). The labels
        come on the host (`labels`) and on this stage's device (`labels_device`, copied
        asynchronously from pinned memory on CUDA). `hold_after(seq)` true: do not pre-post the
        next receive after this batch (a checkpoint follows it)."""
        if self._pending is None:
            self._post(payload=False)
        slot, works, posted = self._pending
        if works:  # the header (settle() may have completed the receive already)
            self._wait(works[0], "waiting for the next message")
        self._pending = None
        kind, epoch, seq, bs, has_payload, last = self._header(slot)
        payload_works = works[1:]  # the pre-posted payload receive, if any (and not settled)
        if has_payload and not posted:  # the first batch after a marker: its payload now
            payload_works = self._post_payload(slot, "receiving a payload")
        elif posted and not has_payload:
            raise ShapeMismatchError(
                f"{self._name(self.peer_stage)} sent a {KIND_NAMES[Kind(kind)]} without the "
                f"payload that {self._name(self.stage_index)} was told to expect")
        for work in payload_works:
            self._wait(work, "waiting for the next message")
        kind = Kind(kind)
        if kind not in (TRAIN, EVAL):  # the end of a stream: post nothing more for now
            return Message(kind, epoch, seq)
        if not last and (hold_after is None or not hold_after(seq)):
            self._post(payload=True)  # the next batch arrives while this one computes
        labels = self._meta[slot][HEADER_LEN:HEADER_LEN + bs]
        activation = self._payload[slot][:bs]
        side = self._sides[slot][:bs] if self._sides is not None else None
        if self.channels_last:  # (N, C, H, W) with channels-last strides, a view
            activation = activation.permute(0, 3, 1, 2)
        if self.device.type != "cuda":
            return Message(kind, epoch, seq, labels=labels, activation=activation,
                           labels_device=labels, last=bool(last), side=side)
        if self.staging:  # off the receive buffer at once: it is posted again next time
            activation = _pinned_copy(activation).to(self.device, non_blocking=True)
            if side is not None:
                side = _pinned_copy(side).to(self.device, non_blocking=True)
        return Message(kind, epoch, seq, labels=labels, activation=activation,
                       labels_device=_pinned_copy(labels).to(self.device, non_blocking=True),
                       last=bool(last), side=side)


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` with zero rows appended up to `rows` (itself when full)."""
    if t.size(0) == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.size(0), *t.shape[1:]))])


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of a host tensor in pinned memory from torch's caching host allocator, which
    keeps the block until the asynchronous device copies that read it have run."""
    out = torch.empty_like(t, pin_memory=True)  # same strides: a channels-last slot stays so
    out.copy_(t)
    return out
