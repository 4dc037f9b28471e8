"""The wire between two stages, on its own: a real Sender and Receiver in two processes over
gloo. End-of-stream markers carry no payload when the last batch of the stream is known (the
receiver posts no payload receive after it), and one of the right size when it is not; a batch
after a marker gets its payload receive on demand; channels-last activations travel as they
are, without a copy to NCHW and back; a receiver expecting another memory format is told so."""
import json
import os

import pytest

from launch import free_port, spawn

SHAPE = (3, 4, 5)  # C, H, W
MAX_BATCH = 6


def _acts(torch, n, seed, channels_last):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=g)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _link_options(rank: int, port: int) -> dict:
    """A two-process gloo group joined, and the Sender/Receiver options of a CPU link."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    meta = dist.new_group(backend="gloo")
    return dict(num_stages=2, sample_shape=SHAPE, dtype=torch.float32, max_batch=MAX_BATCH,
                device=torch.device("cpu"), group=None, meta_group=meta, timeout_s=30)


def _finish(result: dict, out: str) -> None:
    """Write what this rank saw; leave the group (not after a refused handshake: the other
    side has gone)."""
    import torch.distributed as dist
    with open(out, "w") as fh:
        json.dump(result, fh)
    if "error" not in result:
        dist.destroy_process_group()


def _pair(rank: int, port: int, out: str, send_cl: bool, recv_cl: bool) -> None:
    common = _link_options(rank, port)
    import torch

    from localloss_pp.pipeline.transport import (END_EVAL, END_TRAIN, EVAL, STOP, TRAIN,
                                                 Receiver, Sender, ShapeMismatchError)
    result = {}
    try:
        if rank == 0:
            link = Sender(stage_index=0, peer_rank=1, peer_stage=1, queue_depth=2,
                          channels_last=send_cl, **common)
            link.connect(7)
            sizes = []

            def send(*a, **kw):
                before = link.bytes
                link.send(*a, **kw)
                sizes.append(link.bytes - before)
            full = _acts(torch, MAX_BATCH, 1, send_cl)
            result["full_batch_copied"] = link._payload(full).data_ptr() != full.data_ptr()
            labels = torch.arange(MAX_BATCH)
            # a stream whose last batch is known: a payload-free marker
            send(TRAIN, 1, 0, full, labels, last=False)
            send(TRAIN, 1, 1, _acts(torch, 4, 2, send_cl), labels[:4], last=True)
            send(END_TRAIN, 1, 2)
            # a stream whose last batch is not known: the marker brings a zero payload
            send(EVAL, 1, 0, _acts(torch, 5, 3, send_cl), labels[:5])
            send(END_EVAL, 1, 1)
            send(STOP, 0, 0)
            link.drain()
            result["sizes"] = sizes
            result["made_blank"] = link._blank is not None
        else:
            link = Receiver(stage_index=1, peer_rank=0, peer_stage=0, channels_last=recv_cl,
                            **common)
            link.connect(7)
            got = []
            for _ in range(6):
                msg = link.recv()
                entry = {"kind": int(msg.kind), "seq": msg.seq, "last": msg.last,
                         "posted": link._pending is not None and link._pending[2]}
                if msg.activation is not None:
                    a = msg.activation
                    entry.update(
                        bs=a.size(0), labels=msg.labels.tolist(),
                        nhwc=a.is_contiguous(memory_format=torch.channels_last),
                        values=a.contiguous().flatten().tolist())
                got.append(entry)
            result["got"] = got
    except ShapeMismatchError as exc:
        result["error"] = str(exc)
    _finish(result, out)


@pytest.mark.parametrize("channels_last", [pytest.param(False, marks=pytest.mark.slow), True])
def test_markers_carry_no_payload_and_activations_keep_their_format(tmp_path, channels_last):
    import torch
    port = free_port()
    outs = [str(tmp_path / f"rank{r}.json") for r in range(2)]
    codes = spawn(_pair, 2, lambda r: (r, port, outs[r], channels_last, channels_last), 120)
    assert codes == [0, 0]
    sent, got = (json.load(open(o)) for o in outs)
    header = (6 + MAX_BATCH) * 8
    payload = MAX_BATCH * 3 * 4 * 5 * 4
    # batches: header + padded payload; the known end: a header only; the unknown one: a
    # payload too; STOP after a marker: a header only
    assert sent["sizes"] == [header + payload, header + payload, header,
                             header + payload, header + payload, header]
    assert sent["made_blank"]
    assert not sent["full_batch_copied"]  # a full batch goes out in the format it has
    kinds = [(g["kind"], g["seq"]) for g in got["got"]]
    assert kinds == [(1, 0), (1, 1), (3, 2), (2, 0), (4, 1), (5, 0)]
    b0, b1, _, e0, _, _ = got["got"]
    assert (b0["last"], b1["last"], e0["last"]) == (False, True, False)
    assert b0["posted"] and not b1["posted"] and e0["posted"]  # no receive posted after a last
    for entry, n, seed in ((b0, 6, 1), (b1, 4, 2), (e0, 5, 3)):
        assert entry["bs"] == n and entry["labels"] == list(range(n))
        assert entry["nhwc"] == channels_last
        assert entry["values"] == _acts(torch, n, seed, False).flatten().tolist()


def test_a_receiver_expecting_another_memory_format_is_told_so(tmp_path):
    port = free_port()
    outs = [str(tmp_path / f"rank{r}.json") for r in range(2)]
    codes = spawn(_pair, 2, lambda r: (r, port, outs[r], True, False), 120)
    assert codes == [0, 0]
    sent, got = (json.load(open(o)) for o in outs)
    assert "channels-last" in got["error"] and "expects (3, 4, 5) float32 x 6" in got["error"]
    assert "disagree on the activation shape" in sent["error"]


IMAGE = (1, 6, 6)  # the network's input that travels beside the activation


def _side_pair(rank: int, port: int, out: str, send_side: bool, recv_side: bool) -> None:
    common = _link_options(rank, port)
    import torch

    from localloss_pp.pipeline.transport import (END_TRAIN, STOP, TRAIN, Receiver, Sender,
                                                 ShapeMismatchError)
    result = {}
    g = torch.Generator().manual_seed(5)
    images = [torch.randn(n, *IMAGE, generator=g) for n in (6, 3, 2)]
    try:
        if rank == 0:
            link = Sender(stage_index=0, peer_rank=1, peer_stage=1, queue_depth=2,
                          side_shape=IMAGE if send_side else None, **common)
            link.connect(7)
            labels = torch.arange(MAX_BATCH)
            sizes = []
            for seq, (img, last) in enumerate(zip(images, (False, False, None))):
                before = link.bytes
                link.send(TRAIN, 1, seq, _acts(torch, img.size(0), seq, False),
                          labels[:img.size(0)], last=last, side=img)
                sizes.append(link.bytes - before)
            before = link.bytes
            link.send(END_TRAIN, 1, 3)  # after a batch of unknown end: payload and side owed
            sizes.append(link.bytes - before)
            link.send(STOP, 0, 0)
            link.drain()
            result["sizes"] = sizes
        else:
            link = Receiver(stage_index=1, peer_rank=0, peer_stage=0,
                            side_shape=IMAGE if recv_side else None, **common)
            link.connect(7)
            result["sides"] = [link.recv().side.flatten().tolist() for _ in images]
            result["kinds"] = [int(link.recv().kind), int(link.recv().kind)]
    except ShapeMismatchError as exc:
        result["error"] = str(exc)
    _finish(result, out)


def test_the_networks_input_travels_beside_the_activation_when_asked(tmp_path):
    import torch
    port = free_port()
    outs = [str(tmp_path / f"rank{r}.json") for r in range(2)]
    assert spawn(_side_pair, 2, lambda r: (r, port, outs[r], True, True), 120) == [0, 0]
    sent, got = (json.load(open(o)) for o in outs)
    g = torch.Generator().manual_seed(5)
    images = [torch.randn(n, *IMAGE, generator=g) for n in (6, 3, 2)]
    assert got["sides"] == [img.flatten().tolist() for img in images]
    assert got["kinds"] == [3, 5]
    header, payload = (6 + MAX_BATCH) * 8, MAX_BATCH * 3 * 4 * 5 * 4
    side = MAX_BATCH * 36 * 4  # padded like the payload, float32
    assert sent["sizes"] == [header + payload + side] * 4  # the owed marker brings both


@pytest.mark.slow
def test_a_receiver_expecting_the_networks_input_is_told_it_does_not_come(tmp_path):
    port = free_port()
    outs = [str(tmp_path / f"rank{r}.json") for r in range(2)]
    assert spawn(_side_pair, 2, lambda r: (r, port, outs[r], False, True), 120) == [0, 0]
    got = json.load(open(outs[1]))
    assert "with the network's input (36 values)" in got["error"]
