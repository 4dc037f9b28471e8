"""Activation memory per rank, measured the same way for every benchmark variant.

Two figures per rank (benchmarks/worker.py writes both for every variant):

- saved activations (`SavedActivationMeter`): the bytes of the tensors that autograd saves for
  backward, live at any moment and their peak, seen through
  `torch.autograd.graph.saved_tensors_hooks`. Every tensor saved by every op run inside the
  meter's context is counted, by its underlying storage (each storage once, however many ops
  or views save it; bytes = the storage's nbytes), from the moment it is saved until autograd
  drops it (the graph node is freed after its backward). Not counted: the storages of the
  model's parameters and buffers (weights saved by matmuls are not activation memory; a bf16
  copy that autocast makes of a weight is a new storage and is counted), and the storages
  named with `exclude`: the worker names the input batches (data that the caller holds for
  the step whatever the variant; a micro-batch is a view of the global batch, whose whole
  storage would count otherwise) and the receive buffers (counted with the buffers instead,
  so that a stage input saved in its receive buffer is not counted twice). The same on the
  CPU and on a GPU.
- buffer bytes: what a rank holds to talk to its neighbours outside autograd's saved tensors:
  receive buffers (read from the transport's or the pipeline stage's objects where their
  attributes exist, else computed from the shapes they are allocated with, marked
  "measured": false) and the tensors held for sends in flight (`SendWatch`,
  `ChunkOutputWatch`: sampled from the objects during the run, counting only storages that
  autograd does not hold saved at that moment). DDP's gradient buckets (`ddp_bucket_bytes`).

The sum of the two peaks is the activation memory of a rank (the two peaks need not fall at
the same moment, so the sum is an upper bound of the simultaneous total, by at most the
smaller of the two).
"""
from __future__ import annotations

import math
import threading

import torch


def _storage_of(t: torch.Tensor):
    """(key, nbytes) of the storage under `t`: key = (data pointer, device); (None, 0) for a
    tensor without memory (meta, empty). Tensors without a storage (wrapper subclasses) are
    keyed by identity and sized by their elements."""
    if t.device.type == "meta":
        return None, 0
    try:
        s = t.untyped_storage()
        ptr, nbytes = s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return ("tensor", id(t)), t.numel() * t.element_size()
    if not ptr or not nbytes:
        return None, 0
    return (ptr, str(t.device)), nbytes


class _Saved:
    """What autograd keeps for one saved tensor while the meter is on: the tensor and the key
    of its storage. Autograd drops it when the graph node is freed (after its backward, or when
    the graph goes out of scope); that releases its count."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor, key, meter):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        if self.key is not None:
            try:
                self.meter._release(self.key)
            except Exception:  # interpreter shutdown: nothing left to count
                pass


class SavedActivationMeter:
    """Bytes of the tensors autograd saves for backward inside this context: `live` (now) and
    `peak` (the most live at any moment since the start or the last `reset_peak`).

    Each storage counts once (keyed by data pointer and device, reference-counted over the
    saved tensors that use it; bytes = the storage's nbytes). The storages of `params` (pass
    the model's parameters and buffers) and of `exclude` are never counted; `exclude` later
    adds tensors that must stay alive for the whole measured run (receive buffers), never
    transient ones, whose address a later activation could reuse. Thread-safe: autograd drops
    saved tensors in its engine threads too. Usable as a context manager several times."""

    def __init__(self, params=(), exclude=()):
        self._lock = threading.RLock()
        self._refs: dict = {}  # storage key -> [saved tensors using it, nbytes]
        self._excluded: set = set()
        self.live = 0
        self.peak = 0
        self._contexts: list = []
        self.exclude(params)
        self.exclude(exclude)

    # --- what is not counted --------------------------------------------------------------
    def exclude(self, tensors) -> None:
        """Never count these tensors' storages (from now on; any count they hold now is
        dropped from `live`)."""
        for t in tensors:
            key, _ = _storage_of(t)
            if key is None:
                continue
            with self._lock:
                self._excluded.add(key)
                entry = self._refs.pop(key, None)
                if entry is not None:
                    self.live -= entry[1]

    # --- the hooks ----------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> _Saved:
        # keep the data without its grad_fn: a saved output (relu's, batch norm's statistics)
        # holding its own node would be a reference cycle through autograd that keeps a graph
        # whose backward never runs alive for good (autograd itself saves outputs so too)
        t = t.detach()
        key, nbytes = _storage_of(t)
        if key is None:
            return _Saved(t, None, self)
        with self._lock:
            if key in self._excluded:
                return _Saved(t, None, self)
            entry = self._refs.get(key)
            if entry is None:
                self._refs[key] = [1, nbytes]
                self.live += nbytes
                if self.live > self.peak:
                    self.peak = self.live
            else:
                entry[0] += 1
        return _Saved(t, key, self)

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def _release(self, key) -> None:
        with self._lock:
            entry = self._refs.get(key)
            if entry is None:  # excluded after it was saved
                return
            entry[0] -= 1
            if entry[0] == 0:
                del self._refs[key]
                self.live -= entry[1]

    # --- reading ------------------------------------------------------------------------------
    def reset_peak(self) -> None:
        """Start a new peak from what is live now (after the warm-up batches)."""
        with self._lock:
            self.peak = self.live

    def untracked_bytes(self, tensors) -> int:
        """Bytes of the distinct storages of `tensors` that this meter neither counts as saved
        right now nor excludes: memory held outside autograd's saved tensors (sends in flight,
        outputs kept for a later send or backward)."""
        seen, total = set(), 0
        with self._lock:
            for t in tensors:
                if not isinstance(t, torch.Tensor):
                    continue
                key, nbytes = _storage_of(t)
                if key is None or key in seen or key in self._excluded or key in self._refs:
                    continue
                seen.add(key)
                total += nbytes
        return total

    def __enter__(self):
        ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        ctx.__enter__()
        self._contexts.append(ctx)
        return self

    def __exit__(self, *exc):
        return self._contexts.pop().__exit__(*exc)


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages of `tensors` (None entries skipped)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key, nbytes = _storage_of(t)
        if key is not None and key not in seen:
            seen.add(key)
            total += nbytes
    return total


class _Peak:
    def __init__(self):
        self.peak = 0

    def note(self, value: int) -> None:
        self.peak = max(self.peak, value)

    def reset(self) -> None:
        self.peak = 0


# --- the local pipeline's transport (localloss_pp/pipeline/transport.py) ----------------------
def receiver_buffers(receiver) -> list | None:
    """The tensors a transport Receiver receives into, allocated once for the run: two header
    slots (int64, header + labels of the largest batch) and two payload slots (the largest
    batch's activation); None if this version of the Receiver keeps them elsewhere."""
    if receiver is None:
        return []
    meta, payload = getattr(receiver, "_meta", None), getattr(receiver, "_payload", None)
    if not isinstance(meta, list) or not isinstance(payload, list):
        return None
    return list(meta) + list(payload)


def _link_payload_bytes(link) -> int:
    return link.max_batch * math.prod(link.shape) * torch.empty((), dtype=link.dtype)\
        .element_size()


def _link_meta_bytes(link) -> int:
    from localloss_pp.pipeline.transport import HEADER_LEN
    return (HEADER_LEN + link.max_batch) * 8


def analytic_receiver_bytes(receiver) -> int:
    """What a Receiver allocates, from its shapes: two header slots and two payload slots."""
    if receiver is None:
        return 0
    return 2 * (_link_meta_bytes(receiver) + _link_payload_bytes(receiver))


def analytic_sender_bytes(sender) -> int:
    """What a Sender holds at most, from its shapes: `queue_depth` headers and padded payloads
    in flight (an upper bound: a full batch is sent without a copy, from the activation)."""
    if sender is None:
        return 0
    return sender.queue_depth * (_link_meta_bytes(sender) + _link_payload_bytes(sender))


class SendWatch:
    """Peak bytes a transport Sender holds for its sends in flight (header and payload tensors
    kept until the send has been waited for, and its zero payload for markers), read from the
    Sender before and after every send. Storages that autograd holds saved at that moment are
    left out (the meter counts them), and so is the activation just sent: it is this batch's
    own output, sent without a copy, which the stage's local losses hold saved until their
    backward. `measured` is False when this Sender keeps its sends elsewhere (then `peak` is
    `analytic_sender_bytes`)."""

    def __init__(self, sender, meter: SavedActivationMeter):
        self.meter, self.sender = meter, sender
        self._peak = _Peak()
        self.measured = sender is None or isinstance(getattr(sender, "_inflight", None), list)
        if sender is None or not self.measured:
            return
        real = sender.send

        def send(kind, epoch, seq, activation=None, labels=None, last=None, **side):
            self._sample()
            real(kind, epoch, seq, activation, labels, last, **side)  # side: the network's input
            self._sample(activation)

        sender.send = send  # this instance only: the runner calls self.sender.send

    def _held(self) -> list:
        held = [t for _, tensors, _ in self.sender._inflight for t in tensors]
        return held + [getattr(self.sender, "_blank", None)]

    def _sample(self, activation=None) -> None:
        held = self._held()
        if activation is not None:
            key = _storage_of(activation)[0]
            held = [t for t in held if not isinstance(t, torch.Tensor)
                    or _storage_of(t)[0] != key]
        self._peak.note(self.meter.untracked_bytes(held))

    def reset(self) -> None:
        self._peak.reset()

    @property
    def peak(self) -> int:
        if not self.measured:
            return analytic_sender_bytes(self.sender)
        return self._peak.peak


# --- torch.distributed.pipelining ----------------------------------------------------------
def stage_recv_buffers(stages, remote_prev, remote_next) -> list | None:
    """The receive buffers of torch.distributed.pipelining stages, read from the stage objects
    (after the first step, which allocates them): per micro-batch, the activation received
    from the previous stage (`args_recv_info[mb]`, `_RecvInfo.buffer`) and the gradient
    received from the next (`grad_recv_info[mb]`). Only links to another rank: a stage fed by
    a stage on the same rank (V-shaped placement) points its "buffer" at that stage's output
    instead, which is an activation. None if the stage objects have no such attributes (another
    torch version): then use `analytic_stage_buffer_bytes`."""
    out = []
    for stage, prev, nxt in zip(stages, remote_prev, remote_next):
        fwd, bwd = getattr(stage, "args_recv_info", None), getattr(stage, "grad_recv_info", None)
        if not isinstance(fwd, dict) or not isinstance(bwd, dict):
            return None
        for infos, wanted in ((fwd, prev), (bwd, nxt)):
            if not wanted:
                continue
            for entry in infos.values():
                for info in (entry if isinstance(entry, (tuple, list)) else (entry,)):
                    if getattr(info, "is_root_arg", False):
                        continue
                    buf = getattr(info, "buffer", None)
                    if isinstance(buf, torch.Tensor):
                        out.append(buf)
    return out


def analytic_stage_buffer_bytes(in_bytes, out_bytes, microbatches: int) -> int:
    """What the stages allocate for receives, from the shapes: per micro-batch one activation
    buffer per stage input from another rank and one gradient buffer per stage output to
    another rank (`in_bytes`, `out_bytes`: per stage, per micro-batch, 0 for a local link)."""
    return microbatches * (sum(in_bytes) + sum(out_bytes))


class ChunkOutputWatch:
    """Peak bytes of the micro-batch outputs that torch.distributed.pipelining stages keep
    (`fwd_cache`: the output and inputs of every micro-batch until its backward; `output_chunks`
    on the last stage), sampled after every forward of a micro-batch; storages that the meter
    counts as saved or excludes (receive buffers) are left out. `measured` is False when the
    stages have no `fwd_cache` (then `peak` is 0)."""

    def __init__(self, stages, meter: SavedActivationMeter):
        self.stages, self.meter = list(stages), meter
        self._peak = _Peak()
        self.measured = all(isinstance(getattr(s, "fwd_cache", None), dict) for s in stages)
        if not self.measured:
            return
        for stage in self.stages:
            real = stage.forward_one_chunk

            def forward_one_chunk(*a, _real=real, **kw):
                out = _real(*a, **kw)
                self._sample()
                return out

            stage.forward_one_chunk = forward_one_chunk  # the schedule calls the instance's

    def _held(self) -> list:
        # iterative walk (a recursive closure would be a reference cycle that keeps the
        # tensors alive until the garbage collector runs)
        held, todo = [], [list(s.fwd_cache.values()) for s in self.stages]
        todo += [getattr(s, "output_chunks", []) for s in self.stages]
        while todo:
            obj = todo.pop()
            if isinstance(obj, torch.Tensor):
                held.append(obj)
            elif isinstance(obj, (tuple, list)):
                todo.extend(obj)
            elif isinstance(obj, dict):
                todo.extend(obj.values())
        return held

    def _sample(self) -> None:
        self._peak.note(self.meter.untracked_bytes(self._held()))

    def reset(self) -> None:
        self._peak.reset()

    @property
    def peak(self) -> int:
        return self._peak.peak


# --- DDP ---------------------------------------------------------------------------------------
def ddp_bucket_bytes(ddp) -> tuple[int, bool]:
    """(bytes, measured) of DDP's gradient buckets: the sizes of the reducer's buckets (read
    after the first backward, which builds them; the reducer's `_get_zeros_like_grad_buckets`
    gives GradBuckets of their sizes), else analytic: the gradient bytes of the parameters (a
    bucket holds a copy of every gradient unless gradient_as_bucket_view)."""
    reducer = getattr(ddp, "reducer", None)
    try:
        buffers = [b.buffer() for b in reducer._get_zeros_like_grad_buckets()]
        total = sum(b.numel() * b.element_size() for b in buffers)
        if total:
            return total, True
    except (AttributeError, RuntimeError, TypeError):
        pass
    return sum(p.numel() * p.element_size() for p in ddp.module.parameters()
               if p.requires_grad), False
