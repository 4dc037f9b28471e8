"""A whole training run: one process, or one pipeline stage per process under torchrun.

Rank k runs stage k. Stage 0 reads the data; the last stage (the *writer*) owns the output
layer, gathers every stage's numbers once per epoch, and writes the run directory:
config.toml, partition.json, metrics.jsonl and model.pt.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from localloss_pp.config import Config, RunMode, lr_at_epoch, parse_profile, to_toml
from localloss_pp.data.datasets import build_sources, resolve_num_workers
from localloss_pp.data.registry import DatasetInfo, dataset_slug, resolve_dataset
from localloss_pp.errors import first_line
from localloss_pp.faults import fault_point
from localloss_pp.layout import Layout, layout_for, shard_bounds
from localloss_pp.models import (LocalModel, build_model, combine_digests, count_params,
                                 resolve_model, resolve_objective, state_digest)
from localloss_pp.models.objectives import reports_error
from localloss_pp.observe.metrics import (append_jsonl, log_blocks, log_epoch,
                                          merge_stage_summaries, read_jsonl, setup_logging,
                                          stage_summary)
from localloss_pp.observe.profiling import TraceWindow
from localloss_pp.observe.record import EpochRecord
from localloss_pp.result import RunResult
from localloss_pp.run.snapshots import SnapshotRecorder
from localloss_pp.observe.tensorboard import TensorBoardLog, tensorboard_dir
from localloss_pp.pipeline.build import build_stage, nhwc_boundary
from localloss_pp.pipeline.distributed import (DistEnv, all_agree, broadcast_from, gather_all,
                                               gather_to, init_distributed, replica_groups,
                                               shutdown, torchrun_world)
from localloss_pp.pipeline.partition import Partition, choose_partition
from localloss_pp.pipeline.replicas import ReplicaSync
from localloss_pp.pipeline.stage import StageRunner
from localloss_pp.pipeline.transport import config_fingerprint
from localloss_pp.pipeline.warmup import batch_sizes, warm_compiled
from localloss_pp.run.checkpoint import (CheckpointError, atomic_write_bytes, latest_checkpoint,
                                         load_model_state, load_units, save_model)
from localloss_pp.run.resume import (ResumePlan, kept_metrics, plan_resume, reconcile_metrics,
                                     records_start)
from localloss_pp.run.rundir import (RunDirLock, clean_run_dir, read_launch_mark,
                                     release_locks, write_launch_mark)
from localloss_pp.run.stage_checkpoint import StageCheckpointer

__all__ = ["RunResult", "run_training", "run_tag", "resolve_run_dir"]  # (RunResult: result.py)

log = logging.getLogger(__name__)


def run_tag(cfg: Config) -> str:
    """The reference's run-tag (docs/algorithm.md 6.6), used under --save-dir."""
    m, lo, d, o = cfg.model, cfg.loss, cfg.data, cfg.optim
    drop = f"drop{m.dropout}" + (f"_cutout{d.n_holes}x{d.length}" if d.cutout else "")
    return "_".join([
        m.nonlin, f"{m.num_layers}x{m.num_hidden}", lo.loss_sup + ("-bio" if lo.bio else ""),
        lo.loss_unsup, f"dimdec{m.dim_in_decoder}", f"alpha{lo.alpha}", f"beta{lo.beta}",
        f"bs{d.batch_size}", f"cpb{d.classes_per_batch}", drop, f"bn{int(m.batch_norm)}",
        o.optim, f"wd{o.weight_decay}", f"bp{int(lo.backprop)}", f"detach{int(lo.detach)}",
        f"lr{o.lr:.2e}"])


def resolve_run_dir(cfg: Config) -> Path:
    """--run-dir; else the reference's layout under --save-dir; else runs/<dataset>-<model>-<time>."""
    t = cfg.train
    if t.run_dir:
        return Path(t.run_dir)
    if t.save_dir:
        return (Path(t.save_dir) / dataset_slug(cfg.data.dataset) /
                f"{cfg.model.name}_mult{cfg.model.feat_mult:.1f}" / run_tag(cfg))
    # under torchrun the run id names it, so that a restarted attempt finds the same folder
    stamp = os.environ.get("TORCHELASTIC_RUN_ID", "")[:8] or \
        datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{dataset_slug(cfg.data.dataset)}-{cfg.model.name}-{stamp}"


def _check_last_batch(cfg: Config, num_train: int, num_test: int, num_replicas: int = 1) -> None:
    """BatchNorm1d cannot normalise a training batch of one example, and every replica needs
    at least one example of every batch: refuse such sizes up front."""
    has_fc_bn = cfg.model.batch_norm and (cfg.model.name == "mlp" or cfg.model.num_layers > 0)
    bs, R = cfg.data.batch_size, num_replicas
    if R == 1:
        if has_fc_bn and (bs == 1 or num_train % bs == 1):
            raise ValueError(f"with --batch-size {bs} a training batch of {num_train} examples "
                             "holds a single example, which BatchNorm1d cannot normalise; choose "
                             f"a batch size that does not leave one example over "
                             f"({num_train} % B != 1)")
        return
    need = 2 if has_fc_bn else 1
    for what, n in (("training", num_train), ("test", num_test)):
        sizes = {min(bs, n), n % bs or bs}
        smallest = min(sizes) // R
        floor = need if what == "training" else 1
        if smallest < floor:
            raise ValueError(
                f"--batch-size {bs} with --replicas {R}: a {what} batch of {min(sizes)} examples "
                f"({n} examples in all) leaves a replica with {smallest} example(s), but each "
                f"replica needs at least {floor}{' (BatchNorm1d)' if floor == 2 else ''} per "
                "batch; --batch-size is the global batch of a step, split across the replicas: "
                f"choose one of at least {floor * R} whose last batch is not smaller")


def _check_shared_run_dir(env, layout, nodes, run_dir: Path, writer: int) -> None:
    """The stages of replica 1 write their checkpoint parts into the run directory and the last
    stage completes them: when those stages are on several nodes the directory must be on a
    file system they all see. Refuse the run up front if it is not."""
    ranks = [layout.rank_of(k, 0) for k in range(layout.num_stages)]
    if len({nodes[q] for q in ranks}) < 2:
        return
    probe = run_dir / f".shared-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}-{writer}"
    if env.rank == writer:
        atomic_write_bytes(probe, b"1")
    all_agree(env, None)  # the probe exists from here on
    err = None
    if env.rank in ranks and not probe.exists():
        err = (f"run directory {run_dir} is not shared between the nodes of this run (stage "
               f"{layout.stage_of(env.rank) + 1} on node {env.node_rank} cannot see the files "
               "the last stage writes there); put --run-dir on a file system every node sees")
    all_agree(env, err)
    if env.rank == writer:
        probe.unlink(missing_ok=True)


def run_training(cfg: Config) -> RunResult | None:
    """Train as configured. Returns the result on the writer rank, None on the other ranks.

    The phases of a run, in order (docs/architecture.md, "Phases of a run"): launch checks (no
    process group yet), set-up collectives (with the resume state), links, epochs, finish. On an error the caller exits at
    once: no collective teardown."""
    _, world, _, _ = torchrun_world()
    layout = _check_launch(cfg, world)  # 1. launch checks: every rank refuses alike
    env = init_distributed(cfg.train)
    failed = True
    try:
        # 2. every collective of the set-up: the run directory checked and locked first, the
        # resume state loaded and checked before anything is written (a bad --resume leaves
        # the run directory untouched)
        run = _setup_collectives(cfg, env, layout)
        runner = _build_runner(cfg, env, run)  # 3. links, in chain order
        _train_epochs(cfg, env, run, runner)  # 4. epochs from the resume point
        result = _finish(cfg, env, run, runner)  # 5. model.pt, final line
        if run.tb is not None:
            run.tb.close()
        failed = False
    finally:
        release_locks(failed)  # a process that dies releases its lock anyway
    shutdown(env)
    log.debug("process group closed")
    return result


def _check_launch(cfg: Config, world: int) -> Layout:
    """The stages x replicas layout of a world of `world` processes, or a clear error; the
    model and objective names checked against their registries."""
    resolve_model(cfg.model)
    resolve_dataset(cfg.data)
    if not cfg.loss.backprop:
        entry = resolve_objective(cfg.loss)
        if cfg.train.compile and (cfg.loss.local_modules or not entry.layerwise):
            raise ValueError(f"--compile compiles the paper's per-layer blocks; the local "
                             f"modules of --loss-sup {entry.name} run eagerly: drop --compile")
    layout = layout_for(world, cfg.train.num_replicas)
    S, mode = layout.num_stages, RunMode.of(cfg)
    if S > 1 and mode != RunMode.LOCAL:
        flag = "--backprop" if mode == RunMode.BACKPROP else "--no-detach"
        raise ValueError(f"{flag} trains end to end and cannot be pipelined across {S} "
                         "stages; run it in one process, or data-parallel with --replicas "
                         f"{world} (one replica per process)")
    return layout


class DataSizes(NamedTuple):
    train_examples: int
    test_examples: int
    train_batches: int
    test_batches: int


class StartPoint(NamedTuple):
    """Where this attempt starts: the epoch, its batches already done and their statistics."""
    epoch: int = 1
    batches_done: int = 0
    stats: dict | None = None


@dataclass
class _Run:
    """What the set-up decided for this rank; read by the later phases."""
    layout: Layout
    stage_index: int
    replica: int
    writer: int            # the rank that writes metrics and model.pt (last stage, replica 1)
    mode: RunMode
    run_dir: Path
    info: DatasetInfo
    plan: ResumePlan
    sizes: DataSizes
    sources: tuple | None  # (train, test) batch sources on the first stage
    sync: ReplicaSync | None
    model: LocalModel
    names: list[str]
    part: Partition
    ckpt: StageCheckpointer
    config_toml: str
    start: StartPoint = StartPoint()
    tb: TensorBoardLog | None = None  # this stage's event files (replica 1), or None
    snapshots: SnapshotRecorder | None = None  # --snapshot-every (replica 1), or None

    @property
    def num_stages(self) -> int:
        return self.layout.num_stages

    @property
    def blocks(self):
        a, b = self.part.bounds[self.stage_index]
        return self.model.blocks[a:b]


def _lock_and_plan(cfg, env, run_dir: Path, writer: int) -> ResumePlan:
    """The writer (the one process that coordinates the run's files) checks the run directory,
    locks it and decides where the run starts, before any data or model is built; every rank
    gets its decision.

    Under torchrun a restarted attempt continues the run in `run_dir` only when this launch
    started or continued it (its mark, written by _write_run_files before any other file);
    otherwise it decides as the first attempt did. A refusal is final: every later attempt of
    the launch repeats it at once, so that a retry never continues or overwrites a run the
    launch was refused."""
    plan, err = None, None
    if env.rank == writer:
        launch = env.launch
        try:
            err = launch.refusal()
            if err is None:
                # a restarted attempt waits a little for its killed predecessor's lock
                RunDirLock(run_dir).acquire(wait_s=30.0 if launch.restarted else 0.0)
                own = launch.restarted and read_launch_mark(run_dir) == launch.id
                plan = dataclasses.asdict(plan_resume(cfg, run_dir, own))
        except Exception as exc:
            err = first_line(exc)
            try:
                launch.refuse(err)
            except Exception:  # the store is gone too: this attempt still refuses
                pass
    all_agree(env, err)
    return ResumePlan(**broadcast_from(env, plan, writer))


def _read_data(cfg, env, layout, nodes, stage_index: int, replica: int, cache_dir: Path):
    """The batch sources of this rank (None off the first stage) and the dataset's info (every
    rank: the first stage's, broadcast). The first stage of every replica reads its share of
    the data; on every node one of them first (it may extract or download the files, or
    decode an image folder into its cache), then the others."""
    R = layout.num_replicas
    readers = [layout.rank_of(0, i) for i in range(R)]
    first = {n: min(q for q in readers if nodes[q] == n) for n in {nodes[q] for q in readers}}
    sources, info = None, None
    for turn in (True, False):
        err = None
        try:
            if stage_index == 0 and (env.rank == first[nodes[env.rank]]) == turn:
                workers = resolve_num_workers(cfg.data.num_workers, env.device,
                                              env.local_world_size, env.threads)
                *sources, info = build_sources(cfg.data, cfg.train.seed, env.device, replica, R,
                                               workers, cache_dir)
                _check_last_batch(cfg, sources[0].num_examples, sources[1].num_examples, R)
                cpb, classes = cfg.data.classes_per_batch, info.num_classes
                if cpb > classes:
                    raise ValueError(f"--classes-per-batch {cpb}: {cfg.data.dataset} has only "
                                     f"{classes} classes; choose at most {classes} (0 = any "
                                     "classes in a batch)")
        except Exception as exc:  # every rank must hear of it, not only this one
            err = first_line(exc)
        all_agree(env, err)
    info = DatasetInfo.from_dict(broadcast_from(env, info.to_dict() if env.rank == 0 else None,
                                                0))
    return sources, info


def _setup_collectives(cfg: Config, env: DistEnv, layout: Layout) -> _Run:
    """Phase 2: run directory, data, resume plan, replica groups, model, partition, resume
    state, the writer's files and the shared-run-dir check. Every collective of the set-up
    happens here, before any point-to-point link exists."""
    R = layout.num_replicas
    S, k, r = layout.num_stages, layout.stage_of(env.rank), layout.replica_of(env.rank)
    if R > 1:
        setup_logging(k, S, logging.getLogger("localloss_pp").level, r, R)
    # the run directory, and this attempt's mark on its checkpoint parts
    run_dir, token = broadcast_from(env, [str(resolve_run_dir(cfg)), os.urandom(8).hex()]
                                    if env.rank == 0 else None, 0)
    run_dir = Path(run_dir)
    writer = layout.rank_of(S - 1, 0)
    plan = _lock_and_plan(cfg, env, run_dir, writer)
    where = gather_all(env, [env.node_rank, str(env.device)])
    nodes = [w[0] for w in where]
    sources, info = _read_data(cfg, env, layout, nodes, k, r, run_dir / "data-cache")
    sizes = DataSizes(*broadcast_from(env, [sources[0].num_examples, sources[1].num_examples,
                                            len(sources[0]), len(sources[1])]
                                      if env.rank == 0 else None, 0))
    if cfg.train.profile:
        _, first, steps = parse_profile(cfg.train.profile)
        if first + steps > sizes.train_batches:  # (every rank alike: no collective needed)
            raise ValueError(f"--profile {cfg.train.profile}: an epoch has "
                             f"{sizes.train_batches} training batches, fewer than START + STEPS "
                             f"= {first + steps}, so the window would not be traced; choose "
                             f"START + STEPS <= {sizes.train_batches}")
    sync = None
    if R > 1:
        group, object_group = replica_groups(env, layout)
        sync = ReplicaSync(group=group, object_group=object_group, replica=r, num_replicas=R,
                           stage_index=k, num_stages=S)
        sync.warm(env.device)  # the group's communicator made now, before any link
    model, names, part = _model_and_partition(cfg, env, info, S, sources)
    a, b = part.bounds[k]
    t = cfg.train
    model.setup_units(part.units_of(k), env.device, cfg.optim, replica=r,
                      precision=t.precision, channels_last=t.channels_last, compile=t.compile)
    ckpt = StageCheckpointer(cfg, run_dir, k, S, model.blocks[a:b],
                             model.output if k == S - 1 else None, part.counts, model.name,
                             sync, token)
    run = _Run(layout=layout, stage_index=k, replica=r, writer=writer, mode=RunMode.of(cfg),
               run_dir=run_dir, info=info, plan=plan, sizes=sizes, sources=sources, sync=sync,
               model=model, names=names, part=part,
               ckpt=ckpt, config_toml=to_toml(cfg))
    run.start = _resume(cfg, env, run)
    if env.rank == 0:
        _log_header(cfg, env, run, nodes, where)
    _write_run_files(env, run, cfg.data.dataset)
    fault_point("setup")
    _check_shared_run_dir(env, layout, nodes, run_dir, writer)
    return run


def _model_and_partition(cfg: Config, env: DistEnv, info, num_stages: int, sources):
    """The model (on the meta device), its blocks' names and its partition into stages, chosen
    on rank 0 (`auto` measures the first stage's data too) and broadcast."""
    model = build_model(cfg.model, cfg.loss, info.input_shape, info.num_classes, cfg.train.seed,
                        materialize=(), input_norm=(info.mean, info.std))
    names = [blk.describe() for blk in model.blocks]
    part, err = None, None
    if env.rank == 0:
        try:
            part = choose_partition(cfg, model, num_stages, info.input_shape, info.num_classes,
                                    env.device, names, source=sources[0])
        except Exception as exc:
            err = first_line(exc)
    all_agree(env, err)
    part = Partition(**broadcast_from(env, dataclasses.asdict(part) if part else None, 0))
    return model, names, part


def _write_run_files(env: DistEnv, run: _Run, dataset: str) -> None:
    """The first writes of the run, by the writer, once the resume state is known to be good:
    this launch's mark, the metrics records no checkpoint covers dropped, an interrupted
    attempt's leftovers cleaned, config.toml and partition.json. No stage writes a checkpoint
    part before this."""
    err = None
    if env.rank == run.writer:
        try:
            _check_same_data(run, dataset)
            keep, run.ckpt.records_from = kept_metrics(  # (raises before any change)
                run.run_dir, run.start.epoch,
                records_start(run.plan, run.run_dir, run.start.epoch))
            write_launch_mark(run.run_dir, env.launch.id)
            clean_run_dir(run.run_dir)
            if keep is not None:
                reconcile_metrics(run.run_dir, run.start.epoch, keep)
            atomic_write_bytes(run.run_dir / "config.toml", run.config_toml.encode())
            atomic_write_bytes(run.run_dir / "partition.json",
                               json.dumps(run.part.to_dict(), indent=2).encode())
            atomic_write_bytes(run.run_dir / "dataset.json",
                               json.dumps(run.info.to_dict(), indent=2).encode())
            log.info("run directory: %s", run.run_dir)
        except Exception as exc:
            err = first_line(exc)
    all_agree(env, err)


def _check_same_data(run: _Run, dataset: str) -> None:
    """A run continued from a checkpoint or a model.pt trains on the data it started on: an
    image folder whose file list changed since is refused (before anything is written)."""
    if run.plan.kind == "fresh" or not run.info.fingerprint:
        return
    source = Path(run.plan.path)
    if run.plan.kind == "model":
        from localloss_pp.run.checkpoint import read_model_file
        before = read_model_file(source).get("dataset", {}).get("fingerprint")
    else:
        saved = source.parent.parent / "dataset.json"
        before = json.loads(saved.read_text()).get("fingerprint") if saved.is_file() else None
    if before and before != run.info.fingerprint:
        raise ValueError(f"the image folder of --dataset {dataset} changed since the run "
                         f"in {source} started (files added, removed or modified): a resumed "
                         "run needs the same data; restore the folder, or train a new run in "
                         "another --run-dir")


def _log_header(cfg: Config, env: DistEnv, run: _Run, nodes, where) -> None:
    info, t = run.info, cfg.train
    S, R = run.num_stages, run.layout.num_replicas
    log.info("%s on %s (%d train / %d test images), %s mode, %d stage(s) x %d replica(s), "
             "device %s, %d thread(s) per process, %s", cfg.model.name, cfg.data.dataset,
             run.sizes.train_examples, run.sizes.test_examples, run.mode, S, R, env.device,
             env.threads,
             t.precision + (", channels-last" if t.channels_last else "") +
             (", compiled" if t.compile else ""))
    n_params = count_params(cfg.model, info.input_shape, info.num_classes)
    log.info("%d blocks; %s parameters (paper count)", len(run.names), f"{n_params:,}")
    for line in run.part.describe():
        log.info("%s", line)
    if env.world_size > 1:
        for line in run.layout.describe(nodes, [w[1] for w in where]):
            log.info("%s", line)
    if R > 1:
        log.info("global batch %d split across %d replicas (%s examples each)",
                 cfg.data.batch_size, R, "/".join(
                     str(hi - lo) for lo, hi in (shard_bounds(cfg.data.batch_size, i, R)
                                                  for i in range(R))))


def _resume(cfg: Config, env: DistEnv, run: _Run) -> StartPoint:
    """(first epoch, batches of it already done, statistics of those batches) from the resume
    plan: a checkpoint, a model.pt (--resume), or a fresh start; every rank agrees."""
    plan = run.plan
    start_epoch, start_seq = plan.start
    initial, err = None, None
    try:
        if plan.kind == "checkpoint":
            initial = run.ckpt.restore(plan)
        elif plan.kind == "model":
            state = load_model_state(run.model, plan.path, only=run.part.units_of(run.stage_index))
            start_epoch = state["epoch"] + 1
            if start_epoch > cfg.train.epochs:
                raise ValueError(f"{plan.path} was trained for {state['epoch']} epochs, "
                                 f"--epochs is {cfg.train.epochs}: raise --epochs to go on")
    except Exception as exc:
        err = first_line(exc)
    all_agree(env, err)
    if plan.kind != "fresh" and env.rank == 0:
        if start_epoch > cfg.train.epochs:
            log.info("all %d epochs are in %s: writing model.pt from it", cfg.train.epochs,
                     plan.path)
        else:
            log.info("resuming from %s at epoch %d%s", plan.path, start_epoch,
                     f", after batch {start_seq}" if start_seq else "")
    return StartPoint(start_epoch, start_seq, initial)


def _build_runner(cfg: Config, env: DistEnv, run: _Run) -> StageRunner:
    """Phase 3: this stage's links (chain order) and its runner, with what it reports to:
    TensorBoard and the profiler window (replica 1 of every stage)."""
    t, on_log, trace = cfg.train, None, None
    if t.tensorboard and run.replica == 0:  # every stage writes its own numbers
        run.tb = TensorBoardLog(tensorboard_dir(t.tensorboard, run.run_dir), run.stage_index,
                                writes_global=env.rank == run.writer,
                                batches_per_epoch=run.sizes.train_batches,
                                start=(run.start.epoch, run.start.batches_done),
                                per_batch=t.log_every > 0)
        if t.log_every:
            decoders = [reports_error(blk) for blk in run.blocks]
            on_log = lambda epoch, done, stats: run.tb.batch(  # noqa: E731
                epoch, done, *stats.summary(decoders))
    if t.snapshot_every and run.replica == 0:
        a, b = run.part.bounds[run.stage_index]
        units = list(run.model.blocks[a:b]) + ([run.model.output]
                                               if run.stage_index == run.num_stages - 1 else [])
        run.snapshots = SnapshotRecorder(run.run_dir, run.stage_index, units, t.snapshot_every,
                                         env.device, run.sizes.train_batches)
        run.snapshots.resume_from(run.start.epoch)
    if t.profile and run.replica == 0:
        trace = TraceWindow(parse_profile(t.profile), run.run_dir / "profile" /
                            f"stage{run.stage_index + 1}.json", env.device)
    if t.compile and run.blocks:  # every graph compiled now, by all stages at once
        seconds = warm_compiled(
            run.blocks, run.info.num_classes,
            batch_sizes(cfg.data.batch_size, run.sizes.train_examples,
                        run.sizes.test_examples, run.replica, run.layout.num_replicas),
            env.device, from_data=run.stage_index == 0, with_stats=t.print_stats,
            channels_last_input=run.stage_index > 0 and nhwc_boundary(
                cfg, run.model, run.part.bounds[run.stage_index][0]))
        log.info("blocks compiled on synthetic batches in %.1f s, before the links", seconds)
    return build_stage(cfg, env, run.model, run.part, run.stage_index,
                       fingerprint=config_fingerprint(run.config_toml), layout=run.layout,
                       replica=run.replica, mode=run.mode, num_classes=run.info.num_classes,
                       with_stats=t.print_stats and run.mode != RunMode.BACKPROP,
                       show_progress=t.progress and run.replica == 0,
                       check_every=1 if env.device.type == "cpu" else 50, sync=run.sync,
                       log_every=t.log_every if on_log else 0, on_log=on_log, trace=trace,
                       on_batch=run.snapshots.after_batch if run.snapshots else None)


def _train_epochs(cfg: Config, env: DistEnv, run: _Run, runner: StageRunner) -> None:
    """Phase 4: every epoch from the start point: train stream, eval stream, statistics
    gathered to the writer, the metrics record, the epoch-end checkpoint."""
    start = run.start
    for epoch in range(start.epoch, cfg.train.epochs + 1):
        skip = start.batches_done if epoch == start.epoch else 0
        _epoch(cfg, env, run, runner, epoch, skip, start.stats if skip else None)


def _epoch(cfg, env, run: _Run, runner: StageRunner, epoch: int, skip: int, initial):
    lr = lr_at_epoch(cfg.optim, epoch, cfg.train.epochs)
    runner.set_lr(lr)
    start = time.perf_counter()
    train_src, test_src = run.sources if run.sources else (None, None)
    if run.stage_index == 0:  # batches, augmentation: functions of (seed, epoch, replica, batch)
        was_nclass = train_src.class_sampler_active()
        train_src.set_epoch(epoch, skip)
        test_src.set_epoch(epoch)
        if was_nclass and not train_src.class_sampler_active():
            log.info("epoch %d: classes-per-batch sampler off, ordinary shuffling from now on",
                     epoch)
    if run.snapshots is not None:
        run.snapshots.begin(epoch, run.sizes.train_batches)
    tr = runner.train_epoch(epoch, train_src, run.sizes.train_batches, start_seq=skip,
                            initial=initial,
                            checkpoint_every=cfg.train.checkpoint_every,
                            on_checkpoint=lambda e, n, st: run.ckpt.save(e, n, st))
    if run.snapshots is not None:
        run.snapshots.end()
    te = runner.eval_epoch(epoch, test_src, run.sizes.test_batches)
    # the streams are drained: no receive is posted, no send in flight, from here to the next
    # epoch's first batch
    if run.sync is not None:  # statistics of the whole data; the replicas must agree
        tr.stats.load(run.sync.sum_stats(tr.stats))
        te.stats.load(run.sync.sum_stats(te.stats))
        agreed = run.sync.check_identical(runner.units)
        log.info("epoch %d: weights sha256 %s, identical on all %d replicas", epoch,
                 agreed[:16], run.layout.num_replicas)
    a, b = run.part.bounds[run.stage_index]
    with_stats = cfg.train.print_stats and run.mode != RunMode.BACKPROP
    summary = stage_summary(run.stage_index, run.names[a:b], [reports_error(blk)
                                                    for blk in run.blocks], tr, te, with_stats,
                            backprop=run.mode == RunMode.BACKPROP)
    gathered = gather_to(env, summary if run.replica == 0 else None, run.writer)
    rec = None
    if env.rank == run.writer:
        # (with replicas, check_identical raised unless their weights are identical)
        rec = merge_stage_summaries(epoch, lr, gathered[:run.num_stages],
                                    time.perf_counter() - start, run.layout.num_replicas)
        log_epoch(rec, cfg.train.epochs, run.num_stages)
        append_jsonl(run.run_dir / "metrics.jsonl", rec.to_json())
        fault_point("after-metrics-record", epoch)
    if run.tb is not None:
        run.tb.epoch(epoch, lr, summary, rec)
    if cfg.train.print_stats and run.replica == 0:
        log_blocks(summary)  # every stage logs its own blocks
    run.ckpt.save(epoch, None)  # after the metrics record: a resumed run never loses one
    if run.snapshots is not None:
        run.snapshots.flush()


def _finish(cfg: Config, env: DistEnv, run: _Run, runner: StageRunner) -> RunResult | None:
    """Phase 5: the stop message down the chain; the writer writes model.pt from the final
    checkpoint (every stage's part of it is on disk: the manifest says so). A run killed
    after that checkpoint, or after model.pt, is restarted into this phase alone."""
    runner.stop()
    if env.rank != run.writer:
        return None
    epochs = cfg.train.epochs
    # every epoch's record, this attempt's and those of the attempts before it
    records = [EpochRecord.from_json(r) for r in read_jsonl(run.run_dir / "metrics.jsonl")]
    rec = next((r for r in records if r.epoch == epochs), None)
    if rec is None:
        raise CheckpointError(f"{run.run_dir / 'metrics.jsonl'} has no record of epoch "
                              f"{epochs}, the last one; resume in a new --run-dir")
    fault_point("before-model")
    found = latest_checkpoint(run.run_dir, log)
    if found is None or found[1]["complete_epochs"] != epochs or found[1]["step"] is not None:
        raise CheckpointError(f"the final checkpoint (e{epochs:05d}-end) of {run.run_dir} is "
                              "missing or damaged; resume with --resume auto")
    folder, manifest = found
    indices = [u.index for u in run.model.units()]
    saved, _ = load_units(folder, manifest, indices)
    states = [saved[i]["state"] for i in indices]
    digest = combine_digests([state_digest(i, sd) for i, sd in zip(indices, states)])
    save_model(run.run_dir / "model.pt", run.model.name, states, run.config_toml, epochs, digest,
               dataset=run.info.to_dict())
    fault_point("after-model")
    log.info("final test error %.2f%%; model saved to %s", rec.test.error,
             run.run_dir / "model.pt")
    return RunResult.from_records(run.run_dir, digest, epochs, records)
