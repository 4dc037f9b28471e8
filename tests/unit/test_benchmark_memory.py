"""The saved-activation meter of the benchmarks (benchmarks/memory.py): what it counts, what it
leaves out, and that its live count falls back to zero after backward."""
import threading

import torch
import torch.nn as nn

from benchmarks.memory import SavedActivationMeter, unique_bytes

B, N, K = 8, 16, 4


def _layer():
    torch.manual_seed(0)
    return nn.Linear(N, K)


def test_a_linear_layer_saves_its_input_and_not_its_weights():
    layer = _layer()
    meter = SavedActivationMeter(layer.parameters())
    with meter:
        loss = layer(torch.randn(B, N)).sum()
    assert meter.live == meter.peak == B * N * 4  # the input, for the weight's gradient
    loss.backward()
    assert meter.live == 0 and meter.peak == B * N * 4


def test_without_the_parameters_excluded_the_weight_counts_too():
    layer = _layer()
    meter = SavedActivationMeter()
    with meter:  # an input that needs a gradient: the matmul saves the weight for it
        layer(torch.randn(B, N, requires_grad=True)).sum().backward()
    assert meter.peak == B * N * 4 + K * N * 4
    meter = SavedActivationMeter(layer.parameters())
    with meter:
        layer(torch.randn(B, N, requires_grad=True)).sum().backward()
    assert meter.peak == B * N * 4


def test_two_forwards_before_one_backward_double_the_peak():
    layer = _layer()
    meter = SavedActivationMeter(layer.parameters())
    with meter:
        loss = layer(torch.randn(B, N)).sum() + layer(torch.randn(B, N)).sum()
    assert meter.peak == 2 * B * N * 4
    loss.backward()
    assert meter.live == 0
    meter.reset_peak()
    with meter:  # one forward, one backward, then the next: the peak stays at one
        for _ in range(2):
            layer(torch.randn(B, N)).sum().backward()
    assert meter.peak == B * N * 4 and meter.live == 0


def test_a_tensor_saved_twice_counts_once():
    layer = _layer()
    x = torch.randn(B, N, requires_grad=True)
    meter = SavedActivationMeter(layer.parameters())
    with meter:
        # x * x saves x twice; the second layer saves x again (a view of it, same storage)
        loss = (x * x).sum() + layer(x.view(B, N)).sum() + layer(x).sum()
    assert meter.peak == B * N * 4
    loss.backward()
    assert meter.live == 0


def test_the_live_count_falls_when_the_graph_is_dropped_without_backward():
    layer = _layer()
    meter = SavedActivationMeter(layer.parameters())
    with meter:  # relu saves its output: the meter must not keep that graph alive
        loss = torch.relu(layer(torch.randn(B, N))).sum()
    assert meter.live == B * N * 4 + B * K * 4
    del loss
    assert meter.live == 0


def test_excluded_buffers_and_bf16_weight_copies():
    layer = _layer()
    buffer = torch.randn(B, N)  # a receive buffer: counted with the buffers, not as saved
    meter = SavedActivationMeter(layer.parameters(), exclude=[buffer])
    with meter:
        layer(buffer).sum().backward()
    assert meter.peak == 0
    meter = SavedActivationMeter(layer.parameters())
    with meter, torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(B, N, requires_grad=True)).sum().backward()
    # autocast's bf16 copies of the input and of the weight are new storages: both counted
    assert meter.peak == B * N * 2 + K * N * 2 and meter.live == 0


def test_outside_the_context_nothing_is_counted_and_threads_are_safe():
    layer = _layer()
    meter = SavedActivationMeter(layer.parameters())
    layer(torch.randn(B, N)).sum().backward()
    assert meter.peak == 0

    def work():
        with meter:
            for _ in range(20):
                layer(torch.randn(B, N)).sum().backward()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert meter.live == 0 and B * N * 4 <= meter.peak <= 4 * B * N * 4


def test_unique_bytes_counts_each_storage_once():
    x = torch.zeros(B, N)
    assert unique_bytes([x, x[:2], x.t(), None, torch.zeros(3)]) == B * N * 4 + 12
