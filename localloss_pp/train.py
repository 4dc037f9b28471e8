"""A whole training run: one process, or one pipeline stage per process under torchrun.

Rank k runs stage k. Stage 0 reads the data; the last stage (the *writer*) owns the output
layer, gathers every stage's numbers once per epoch, and writes the run directory:
config.toml, partition.json, metrics.jsonl and model.pt.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import torch

from .checkpoint import atomic_write_bytes, load_model_state, save_model, unit_states
from .config import Config, first_line, lr_at_epoch, to_toml
from .globalmode import GlobalRunner
from .blocks import derive_seed
from .data import DATASETS, build_loaders
from .distributed import DistEnv, all_agree, broadcast_from, gather_to, init_distributed, \
    gather_all, replica_groups, shutdown, torchrun_world
from .metrics import append_jsonl, setup_logging
from .models import build_model, combine_digests, count_params, unit_digest
from .partition import choose_partition
from .replicas import Layout, ReplicaSync, layout_for, shard_bounds
from .resume import StageCheckpointer, plan_resume, reconcile_metrics
from .stage import StageRunner
from .transport import Receiver, Sender, config_fingerprint

__all__ = ["RunResult", "run_training", "run_tag", "resolve_run_dir", "merge_stage_summaries",
           "build_links"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    digest: str
    test_error: float
    train_error: float
    epochs: int


def run_tag(cfg: Config) -> str:
    """The reference's run-tag (SPEC.md 6.6), used under --save-dir."""
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
        return (Path(t.save_dir) / cfg.data.dataset /
                f"{cfg.model.name}_mult{cfg.model.feat_mult:.1f}" / run_tag(cfg))
    # under torchrun the run id names it, so that a restarted attempt finds the same folder
    stamp = os.environ.get("TORCHELASTIC_RUN_ID", "")[:8] or \
        datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.data.dataset}-{cfg.model.name}-{stamp}"


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


def _mode(cfg: Config) -> str:
    if cfg.loss.backprop:
        return "backprop"
    return "local" if cfg.loss.detach else "nodetach"


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


def _stage_summary(k, names, has_decoder, tr, te, with_test_blocks, backprop=False) -> dict:
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


def _log_blocks(summary: dict) -> None:
    for b in summary["blocks"]:
        a, t = b["train"], b["test"]
        log.info("  block %d %s: train sim %s pred %s error %s | test sim %s pred %s error %s",
                 b["index"], b["name"], _fmt(a["loss_sim"]), _fmt(a["loss_pred"]),
                 _fmt_err(a["error"]), _fmt(t["loss_sim"]), _fmt(t["loss_pred"]),
                 _fmt_err(t["error"]))


def _log_epoch(rec: dict, epochs: int, num_stages: int) -> None:
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


def run_training(cfg: Config) -> RunResult | None:
    """Train as configured. Returns the result on the writer rank, None on the other ranks."""
    _, world, _, _ = torchrun_world()
    layout = _check_launch(cfg, world)  # before joining: every rank refuses alike
    env = init_distributed(cfg.train)
    result = _run(cfg, env, layout)  # on an error the caller exits at once: no collective teardown
    shutdown(env)
    log.debug("process group closed")
    return result


def build_links(cfg, env, model, part, k, S, fingerprint, layout=None, replica=0):
    """Sender and receiver of stage k of `replica` (None at the ends), handshaken with the
    neighbours. Activations travel in bf16 under --precision bf16."""
    (a, b) = part.bounds[k]
    layout = layout or Layout(S, 1)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    lo, hi = shard_bounds(cfg.data.batch_size, 0, layout.num_replicas)  # the largest share
    common = dict(stage_index=k, num_stages=S, dtype=dtype,
                  max_batch=hi - lo, device=env.device,
                  group=None, meta_group=env.meta_group, staging=env.staging)
    receiver = sender = None
    if k > 0:
        receiver = Receiver(peer_rank=layout.rank_of(k - 1, replica), peer_stage=k - 1,
                            sample_shape=model.blocks[a].in_shape, **common)
        receiver.handshake(fingerprint)
    if k < S - 1:
        sender = Sender(peer_rank=layout.rank_of(k + 1, replica), peer_stage=k + 1,
                        queue_depth=cfg.train.queue_depth,
                        sample_shape=model.blocks[b - 1].out_shape, **common)
        sender.handshake(fingerprint)
    return sender, receiver


def _check_launch(cfg: Config, world: int) -> Layout:
    """The stages x replicas layout of a world of `world` processes, or a clear error."""
    layout = layout_for(world, cfg.train.num_replicas)
    S, mode = layout.num_stages, _mode(cfg)
    if S > 1 and mode != "local":
        flag = "--backprop" if mode == "backprop" else "--no-detach"
        raise ValueError(f"{flag} trains end to end and cannot be pipelined across {S} "
                         "stages; run it in one process, or data-parallel with --replicas "
                         f"{world} (one replica per process)")
    return layout


def _run(cfg: Config, env: DistEnv, layout: Layout) -> RunResult | None:
    R = layout.num_replicas
    S, k, r = layout.num_stages, layout.stage_of(env.rank), layout.replica_of(env.rank)
    writer, mode = layout.rank_of(S - 1, 0), _mode(cfg)
    if R > 1:
        logger = logging.getLogger("localloss_pp")
        setup_logging(k, S, logger.level, r, R)
    info = DATASETS[cfg.data.dataset]
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    run_dir = broadcast_from(env, resolve_run_dir(cfg) if env.rank == 0 else None, 0)
    where = gather_all(env, (env.node_rank, str(env.device)))
    nodes = [w[0] for w in where]
    # the first stage of every replica reads its shard of the data; on every node one of them
    # first (it may extract or download the files), then the others
    readers = [layout.rank_of(0, i) for i in range(R)]
    first = {n: min(q for q in readers if nodes[q] == n) for n in {nodes[q] for q in readers}}
    loaders, plan = None, None
    for turn in (True, False):
        err = None
        try:  # every file-system decision is taken on rank 0 and shared
            if turn and env.rank == 0:
                plan = plan_resume(cfg, run_dir, restarted)
            if k == 0 and (env.rank == first[nodes[env.rank]]) == turn:
                loaders = build_loaders(cfg.data, cfg.train.seed, env.device.type == "cuda",
                                        r, R)
                _check_last_batch(cfg, len(loaders[0].dataset), len(loaders[1].dataset), R)
        except Exception as exc:  # every rank must hear of it, not only this one
            err = first_line(exc)
        all_agree(env, err)
    plan = broadcast_from(env, plan, 0)
    sizes = broadcast_from(env, [len(loaders[0].dataset), len(loaders[1].dataset),
                                 len(loaders[0]), len(loaders[1])] if env.rank == 0 else None, 0)
    sync = None
    if R > 1:
        group, object_group = replica_groups(env, layout)
        sync = ReplicaSync(group=group, object_group=object_group, replica=r, num_replicas=R,
                           stage_index=k, num_stages=S)

    model = build_model(cfg.model, cfg.loss, info.input_shape, info.num_classes, cfg.train.seed,
                        materialize=())
    names = [b.describe() for b in model.blocks]
    part, err = None, None
    if env.rank == 0:
        try:
            part = choose_partition(cfg, model, S, info.input_shape, info.num_classes,
                                    env.device, names)
        except Exception as exc:
            err = first_line(exc)
    all_agree(env, err)
    part = broadcast_from(env, part, 0)
    a, b = part.bounds[k]
    keep = part.units_of(k)
    t = cfg.train
    model.setup_units(keep, env.device, cfg.optim, replica=r, precision=t.precision,
                      channels_last=t.channels_last, compile=t.compile)
    ckpt = StageCheckpointer(cfg, run_dir, k, S, model.blocks[a:b],
                             model.output if k == S - 1 else None, part.counts, model.name,
                             sync)
    start_epoch, start_seq = plan.start
    initial = data_state = None
    err = None
    try:
        if plan.kind == "checkpoint":
            initial, data_state = ckpt.restore(plan)
        elif plan.kind == "model":
            state = load_model_state(model, plan.path, only=keep)
            start_epoch = state["epoch"] + 1
            if start_epoch > cfg.train.epochs:
                raise ValueError(f"{plan.path} was trained for {state['epoch']} epochs, "
                                 f"--epochs is {cfg.train.epochs}: raise --epochs to go on")
    except Exception as exc:
        err = first_line(exc)
    all_agree(env, err)
    if plan.kind != "fresh" and env.rank == 0:
        log.info("resuming from %s at epoch %d%s", plan.path, start_epoch,
                 f", after batch {start_seq}" if start_seq else "")

    config_toml = to_toml(cfg)
    sender, receiver = build_links(cfg, env, model, part, k, S, config_fingerprint(config_toml),
                                   layout, r)
    if env.rank == 0:
        n_params = count_params(cfg.model, info.input_shape, info.num_classes)
        log.info("%s on %s (%d train / %d test images), %s mode, %d stage(s) x %d replica(s), "
                 "device %s, %d thread(s) per process, %s", cfg.model.name, cfg.data.dataset,
                 sizes[0], sizes[1], mode, S, R, env.device, env.threads, t.precision +
                 (", channels-last" if t.channels_last else "") +
                 (", compiled" if t.compile else ""))
        log.info("%d blocks; %s parameters (paper count)", len(names), f"{n_params:,}")
        for line in part.describe():
            log.info("%s", line)
        if env.world_size > 1:
            for line in layout.describe(nodes, [w[1] for w in where]):
                log.info("%s", line)
        if R > 1:
            log.info("global batch %d split across %d replicas (%s examples each)",
                     cfg.data.batch_size, R, "/".join(
                         str(hi - lo) for lo, hi in (shard_bounds(cfg.data.batch_size, i, R)
                                                      for i in range(R))))
    if env.rank == writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        reconcile_metrics(run_dir, start_epoch)
        atomic_write_bytes(run_dir / "config.toml", config_toml.encode())
        atomic_write_bytes(run_dir / "partition.json",
                           json.dumps(part.to_dict(), indent=2).encode())
        log.info("run directory: %s", run_dir)
    _check_shared_run_dir(env, layout, nodes, run_dir, writer)

    blocks = model.blocks[a:b]
    has_decoder = [hasattr(blk, "decoder_y") for blk in blocks]
    with_stats = cfg.train.print_stats and mode != "backprop"
    runner = (StageRunner if mode == "local" else partial(GlobalRunner, mode=mode))(
        blocks=blocks, output=model.output if k == S - 1 else None, stage_index=k,
        num_stages=S, device=env.device, num_classes=info.num_classes, sender=sender,
        receiver=receiver, with_stats=with_stats, show_progress=t.progress and r == 0,
        check_every=1 if env.device.type == "cpu" else 50, sync=sync)
    train_dl, test_dl = loaders[:2] if loaders else (None, None)
    rec = None
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        lr = lr_at_epoch(cfg.optim, epoch)
        runner.set_lr(lr)
        start = time.perf_counter()
        skip = start_seq if epoch == start_epoch else 0
        if k == 0:
            batches = train_dl.batch_sampler
            was_nclass = batches.class_sampler_active()
            batches.set_epoch(epoch, skip)
            if was_nclass and not batches.class_sampler_active():
                log.info("epoch %d: classes-per-batch sampler off, ordinary shuffling from now on",
                         epoch)
            if skip:  # mid-epoch resume: the augmentation stream goes on where it stopped
                torch.set_rng_state(data_state["torch_rng"])
            else:  # the augmentation stream of every epoch: a function of (seed, epoch, replica)
                torch.manual_seed(derive_seed(cfg.train.seed, epoch, "augment" if r == 0
                                              else f"augment/replica{r}"))
        tr = runner.train_epoch(epoch, train_dl, sizes[2], start_seq=skip,
                                initial=initial if skip else None,
                                checkpoint_every=cfg.train.checkpoint_every,
                                on_checkpoint=lambda e, n, st: ckpt.save(e, n, st))
        te = runner.eval_epoch(epoch, test_dl, sizes[3])
        if sync is not None:  # statistics of the whole data; the replicas must agree
            tr.stats.load(sync.sum_stats(tr.stats))
            te.stats.load(sync.sum_stats(te.stats))
            agreed = sync.check_identical(runner.units)
            log.info("epoch %d: weights sha256 %s, identical on all %d replicas", epoch,
                     agreed[:16], R)
        summary = _stage_summary(k, names[a:b], has_decoder, tr, te, with_stats,
                                 backprop=mode == "backprop")
        gathered = gather_to(env, summary if r == 0 else None, writer)
        if env.rank == writer:
            rec = merge_stage_summaries(epoch, lr, gathered[:S], time.perf_counter() - start)
            rec["num_replicas"] = R
            if R > 1:
                rec["replicas_identical"] = True  # check_identical raised otherwise
            _log_epoch(rec, cfg.train.epochs, S)
            append_jsonl(run_dir / "metrics.jsonl", rec)
        if cfg.train.print_stats and r == 0:
            _log_blocks(summary)  # every stage logs its own blocks
        ckpt.save(epoch, None)  # after the metrics record: a resumed run never loses one
    runner.stop()
    mine = None
    if r == 0:
        mine = [(u.index, unit_digest(u), s)
                for u, s in zip(runner.units, unit_states(runner.units))]
    everything = gather_to(env, mine, writer)
    if env.rank != writer:
        return None
    units = sorted((u for part_units in everything[:S] for u in part_units), key=lambda u: u[0])
    digest = combine_digests([u[1] for u in units])
    save_model(run_dir / "model.pt", model.name, [u[2] for u in units], config_toml,
               cfg.train.epochs, digest)
    log.info("final test error %.2f%%; model saved to %s", rec["test"]["error"],
             run_dir / "model.pt")
    return RunResult(run_dir, digest, rec["test"]["error"], rec["train"]["error"],
                     cfg.train.epochs)
