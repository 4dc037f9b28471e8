"""Which communication errors mean a lost neighbour, and which are this process's own."""
import pytest
import torch.distributed as dist

from localloss_pp.pipeline.transport import PeerLostError, guarded, is_peer_loss


def _raise(exc):
    def fn():
        raise exc
    return fn


@pytest.mark.parametrize("exc", [
    RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:6316"),
    RuntimeError("Connection reset by peer"),
    RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for "
                 "recv operation to complete"),
    dist.DistNetworkError("Broken pipe"),
    dist.DistBackendError("NCCL communicator was aborted on rank 1. Watchdog caught collective "
                          "operation timeout"),
])
def test_a_vanished_peer_becomes_peer_lost_with_its_cause(exc):
    assert is_peer_loss(exc)
    with pytest.raises(PeerLostError) as err:
        guarded("sending train batch 3 of epoch 1", _raise(exc),
                lost="lost stage 2/3 (rank 1) while")
    assert str(err.value).startswith("lost stage 2/3 (rank 1) while sending train batch 3")
    assert err.value.__cause__ is exc  # the backend's error is kept


@pytest.mark.parametrize("exc", [
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("Tensors must be CUDA and dense"),
    RuntimeError("input tensor has to be contiguous"),
    dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error "
                          "(run with NCCL_DEBUG=INFO for details)"),
    ValueError("Invalid destination rank: should be within the range of [0, 2)"),
])
def test_errors_of_this_process_keep_their_own_type_and_message(exc):
    assert not is_peer_loss(exc)
    with pytest.raises(type(exc)) as err:
        guarded("sending train batch 3 of epoch 1", _raise(exc), lost="lost stage 2/3 while")
    assert err.value is exc


@pytest.mark.parametrize("exc,reason", [
    (dist.DistStoreError("wait timeout after 5000ms, keys: /localloss-pp/attempt0/0//cpu//0/0"),
     "it did not answer within the timeout (--timeout-s): stopped, or never started"),
    (dist.DistStoreError("Timed out after 6 seconds waiting for clients. 1/2 clients joined."),
     "only 1 of 2 processes joined within the timeout (--timeout-s)"),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error "
                  "[127.0.0.1]:44321: Connection refused"),
     "Read error [127.0.0.1]:44321: Connection refused"),
])
def test_a_lost_peer_is_told_in_the_runs_terms_never_as_a_store_key(exc, reason):
    """A stage stopped during set-up used to be reported by the store key its peer waited for
    (/localloss-pp/attempt0/0//cpu//0/0), and one lost at shutdown by gloo's source line."""
    with pytest.raises(PeerLostError) as err:
        guarded("the shutdown", _raise(exc), lost="another stage stopped during")
    assert str(err.value) == f"another stage stopped during the shutdown: {reason}"
