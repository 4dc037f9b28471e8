"""Process-group setup and teardown from the torchrun environment; device and backend choice.

Rank r runs pipeline stage r (stage_index = rank); a run without torchrun is the one-stage run.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from localloss_pp.config import TrainConfig
from localloss_pp.pipeline.transport import guarded

__all__ = ["DistEnv", "Launch", "init_distributed", "shutdown", "torchrun_world", "all_agree",
           "gpu_identity", "local_gpu_identities", "gpus_shared", "payload_timeout",
           "import_before_process_group",
           "gather_to", "broadcast_from", "gather_all", "all_gather_json", "replica_groups"]

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    device: torch.device
    backend: str | None
    threads: int
    meta_group: object = None  # gloo group for headers, handshakes and metrics
    timeout: timedelta = timedelta(minutes=10)
    node_rank: int = 0  # torchrun's GROUP_RANK: which node (agent) this process runs on
    local_world_size: int = 1  # processes on this node (they share its cores)
    # this launch's identity, attempt and refusal (init_distributed: shared with torchrun)
    launch: "Launch" = field(default_factory=lambda: Launch(None))

    @property
    def staging(self) -> bool:
        """CUDA stages linked through gloo: activations travel through CPU memory."""
        return self.device.type == "cuda" and self.backend == "gloo"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def torchrun_world() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from torchrun's environment."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", str(rank)))
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    return rank, world, local_rank, local_world


def _pick_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec} asks for CUDA, but no CUDA device is available; "
                             "use --device cpu")
        count = torch.cuda.device_count()
        if spec == "cuda":
            spec = f"cuda:{local_rank % count}"
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {spec}: this machine has {count} CUDA device(s), "
                             f"numbered 0 to {count - 1}")
        torch.cuda.set_device(dev)  # before any NCCL call
        return dev
    return torch.device(spec)


def gpu_identity(device: torch.device) -> str:
    """What names a physical GPU across processes: its UUID (the same whatever
    CUDA_VISIBLE_DEVICES shows the process), else the visible list and index."""
    uuid_ = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid_ is not None:
        return str(uuid_)
    return f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')}#{device.index}"


def local_gpu_identities(store, node: int, local_rank: int, local_world: int,
                         mine: str) -> list[str]:
    """Every process's `gpu_identity` on this node, exchanged through the launch's store
    before any process group exists (each process sets its own key and reads the others')."""
    store.set(f"gpu/{node}/{local_rank}", mine)
    return [store.get(f"gpu/{node}/{r}").decode() for r in range(local_world)]


def gpus_shared(identities: list[str]) -> bool:
    """Whether two processes of a node run on the same physical GPU."""
    return len(set(identities)) < len(identities)


def payload_timeout(timeout_s: float) -> timedelta:
    """The NCCL payload group's timeout: longer than --timeout-s, so that a lost peer is
    detected on the host first (the gloo header it waits for, the send poll's deadline), in the
    run's terms with the stage named, before NCCL's watchdog would abort the process with its
    own message."""
    return timedelta(seconds=2 * timeout_s + 30)


def _choose_backend(train: TrainConfig, device: torch.device, world: int, local_rank: int,
                    local_world: int, identities: list[str] | None) -> str:
    """NCCL when every process of the node has a GPU of its own, else gloo with CPU staging.
    `identities` (the node's physical GPUs, one per process; None when not exchanged): a
    launcher that gives every process one GPU through CUDA_VISIBLE_DEVICES shows each a single
    "cuda:0", and only the identities tell that these are different GPUs."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if identities is not None:
        shared = gpus_shared(identities)
    else:  # no store to exchange through: more processes than GPUs, or one GPU named for all
        shared = device.type == "cuda" and local_world > 1 and (
            local_world > gpus or train.device.startswith("cuda:"))
    backend = train.backend
    if backend == "auto":
        backend = "gloo" if device.type != "cuda" or (shared and world > 1) else "nccl"
        if shared and world > 1 and local_rank == 0:
            log.warning("%d processes share GPUs on this node (%d GPU(s), --device %s): stages "
                        "are linked through gloo with CPU staging (for testing; NCCL needs one "
                        "GPU per process)", local_world, gpus, train.device)
        elif backend == "nccl" and local_world > gpus and local_rank == 0:
            log.info("each of the %d processes on this node sees its own GPU "
                     "(CUDA_VISIBLE_DEVICES): NCCL", local_world)
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("--backend nccl needs CUDA devices; use --backend gloo on CPU")
    if backend == "nccl" and world > 1 and shared:
        raise ValueError(f"{local_world} processes on this node share GPUs ({gpus} GPU(s), "
                         f"--device {train.device}): NCCL needs one GPU per process; launch at "
                         "most that many processes per node with --device cuda, or let stages "
                         "share GPUs with --backend gloo (CPU staging)")
    return backend


def init_distributed(train: TrainConfig) -> DistEnv:
    """Choose device, backend and threads; join the process group when launched by torchrun."""
    rank, world, local_rank, local_world = torchrun_world()
    device = _pick_device(train.device, local_rank)
    cores = os.cpu_count() or 1
    threads = train.threads_per_rank or max(1, cores // max(1, local_world))
    torch.set_num_threads(threads)
    node = int(os.environ.get("GROUP_RANK", "0"))
    env = DistEnv(rank, world, device, None, threads, node_rank=node,
                  local_world_size=local_world)
    timeout = timedelta(seconds=train.timeout_s)
    with _bounded_join(train.timeout_s, rank):
        # under torchrun even a one-process run shares its launch's store with its restarts
        store = _attempt_store(world, timeout)
        env.launch = Launch(store.underlying_store if store is not None else None)
        identities = None
        if store is not None and device.type == "cuda" and world > 1 and local_world > 1:
            identities = guarded("comparing GPUs", local_gpu_identities, store, node,
                                 local_rank, local_world, gpu_identity(device),
                                 lost="a stage failed or stopped while")
        backend = _choose_backend(train, device, world, local_rank, local_world, identities)
        if world > 1:
            kw = {} if store is None else dict(store=store, rank=rank, world_size=world)
            try:
                guarded("joining the process group", dist.init_process_group, backend,
                        timeout=timeout if backend == "gloo" else
                        payload_timeout(train.timeout_s),
                        lost="a stage failed or stopped while", **kw)
            except Exception as exc:
                if "EADDRINUSE" in str(exc):
                    raise ValueError(f"MASTER_PORT {os.environ.get('MASTER_PORT')} is in use "
                                     "by another program on this node; choose a free port "
                                     "(torchrun --master-port, or MASTER_PORT)") from exc
                raise
            env.backend = backend
            env.timeout = timeout
            env.meta_group = dist.new_group(backend="gloo", timeout=timeout) \
                if backend != "gloo" else dist.group.WORLD
    return env


_JOIN_GRACE_S = 5.0  # past --timeout-s, before the watchdog ends a join that hangs


@contextmanager
def _bounded_join(timeout_s: float, rank: int):
    """Joining the process group ends within --timeout-s (plus a grace period), whatever the
    other side does: a store client whose master is a program that accepts the connection and
    never answers waits forever in C++, where no Python timeout reaches. Past the limit this
    process reports what it waited for and exits (1)."""
    done = threading.Event()

    def watch():
        if done.wait(timeout_s + _JOIN_GRACE_S):
            return
        addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        log.error("error: rank %d could not join the process group at %s within --timeout-s "
                  "%g s: the store there did not answer (is another program listening on that "
                  "port, or was rank 0 not started?); check MASTER_ADDR and MASTER_PORT",
                  rank, addr, timeout_s)
        for handler in logging.getLogger("localloss_pp").handlers:
            handler.flush()
        os._exit(1)

    threading.Thread(target=watch, name="join-watchdog", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def replica_groups(env: DistEnv, layout) -> tuple:
    """(group, object group) of this rank's stage: the ranks that run the same stage in the
    other replicas. Every rank creates every group, in the same order. The object group is a
    gloo group (the main one when the backend is gloo)."""
    mine = (None, None)
    for k in range(layout.num_stages):
        ranks = layout.stage_ranks(k)
        group = dist.new_group(ranks, backend=env.backend, timeout=env.timeout
                               if env.backend == "gloo"
                               else payload_timeout(env.timeout.total_seconds()))
        objects = group if env.backend == "gloo" else \
            dist.new_group(ranks, backend="gloo", timeout=env.timeout)
        if env.rank in ranks:
            mine = (group, objects)
    return mine


def _attempt_store(world: int, timeout: timedelta):
    """Under torchrun, the agent's store with a per-attempt prefix: after a restart
    (--max-restarts) a plain env:// init can trip over keys of the failed attempt."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_PORT" not in env:
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"localloss-pp/attempt{env.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                            store)


class Launch:
    """One launch of the command: every attempt torchrun starts for it (--max-restarts) shares
    its id and learns of a refusal of an earlier attempt. Under torchrun both live in the
    agent's store, which outlives the attempts; a launch without the agent has one attempt."""

    _ID, _REFUSED = "localloss-pp/launch-id", "localloss-pp/refused"

    def __init__(self, store):
        env = os.environ
        self.store = store
        # torchrun's restart count (0 without torchrun)
        self.attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if store is not None:  # the first attempt to ask sets it; every later one reads it
            self.id = store.compare_set(self._ID, "", uuid.uuid4().hex).decode()
        else:  # no agent store to share: torchrun's run id (the same for every attempt)
            self.id = env.get("TORCHELASTIC_RUN_ID") or uuid.uuid4().hex

    @property
    def restarted(self) -> bool:
        return self.attempt > 0

    def refusal(self) -> str | None:
        """What an earlier attempt of this launch refused, if it refused."""
        if self.store is None or not self.store.check([self._REFUSED]):
            return None
        return self.store.get(self._REFUSED).decode()

    def refuse(self, message: str) -> None:
        """Record a refusal: final for every later attempt of this launch."""
        if self.store is not None:
            self.store.set(self._REFUSED, message)


def shutdown(env: DistEnv) -> None:
    """Leave the process group together (a barrier first, so no rank tears its links down while
    a neighbour still uses them)."""
    if env.distributed and dist.is_initialized():
        guarded("the shutdown", dist.barrier, group=env.meta_group)
        dist.destroy_process_group()


# --- set-up and per-epoch exchanges: JSON over tensors ---------------------------------------
# What the ranks exchange outside the data stream (errors, layouts, the resume plan, the
# partition, statistics, digests) is data: it travels as UTF-8 JSON in uint8 tensors, so no
# rank ever unpickles bytes another process sent (the *_object collectives would).
def _encode(obj) -> torch.Tensor:
    data = json.dumps(obj, allow_nan=True).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
        torch.zeros(0, dtype=torch.uint8)


def _decode(t: torch.Tensor, n: int):
    return json.loads(bytes(t[:n].numpy()).decode())


def all_gather_json(obj, group, what: str = "setup", lost: str | None = None) -> list:
    """Every member's JSON-serialisable `obj`, on every member of `group` (rank order)."""
    world = dist.get_world_size(group)
    mine = _encode(obj)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    kw = {"lost": lost} if lost else {}
    guarded(what, dist.all_gather, sizes, torch.tensor([mine.numel()], dtype=torch.int64),
            group=group, **kw)
    n = max(1, max(int(x) for x in sizes))
    buf = torch.zeros(n, dtype=torch.uint8)
    buf[:mine.numel()] = mine
    out = [torch.empty(n, dtype=torch.uint8) for _ in range(world)]
    guarded(what, dist.all_gather, out, buf, group=group, **kw)
    return [_decode(t, int(x)) for t, x in zip(out, sizes)]


def gather_all(env: DistEnv, obj) -> list:
    """Every rank's JSON-serialisable `obj`, on every rank (rank order)."""
    if not env.distributed:
        return [obj]
    return all_gather_json(obj, env.meta_group)


def all_agree(env: DistEnv, error: str | None) -> None:
    """Collective check after a setup step: if any rank failed, every rank raises its message."""
    if not env.distributed:
        if error:
            raise ValueError(error)
        return
    for rank, err in enumerate(gather_all(env, error)):
        if err:
            raise ValueError(err if rank == env.rank else f"(rank {rank}) {err}")


def gather_to(env: DistEnv, obj, dst: int) -> list | None:
    """Every rank's JSON-serialisable `obj` on rank `dst` (None elsewhere)."""
    if not env.distributed:
        return [obj]
    out = all_gather_json(obj, env.meta_group, "the gathering of results")
    return out if env.rank == dst else None


def broadcast_from(env: DistEnv, obj, src: int):
    """Rank `src`'s JSON-serialisable `obj` on every rank."""
    if not env.distributed:
        return obj
    data = _encode(obj) if env.rank == src else None
    size = torch.tensor([data.numel() if data is not None else 0], dtype=torch.int64)
    guarded("setup", dist.broadcast, size, src=src, group=env.meta_group)
    buf = data if data is not None else torch.empty(int(size), dtype=torch.uint8)
    if int(size):
        guarded("setup", dist.broadcast, buf, src=src, group=env.meta_group)
    return _decode(buf, int(size))


def import_before_process_group() -> None:
    """Import the modules that a run would otherwise import lazily after joining the process
    group (torchvision, and torch._dynamo through it, torch.compile and the profiler). Imported
    later, they kept references to the default group alive past destroy_process_group(), and
    gloo's threads were then torn down during interpreter finalisation, which aborted about
    one finished three-stage run in eight ("terminate called without an active exception")."""
    import torch._dynamo  # noqa: F401
    import torchvision  # noqa: F401
