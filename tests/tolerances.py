"""Tolerances for tests that compare two different computations of the same numbers.

Where a test compares the same kernels in the same order (another stage count, a resume, the
reference order of a stage's work), it asserts bit-identity with `torch.equal`, and nothing here
applies. Where it compares two *different* kernels or formulas (channels-last against contiguous
convolutions, a fused layer against its formula written out, a GPU against the CPU), the two differ
by rounding, and by how much depends on the dtype, on how many terms each output sums, on how
many such layers follow one another and on the values' magnitude; CPUs pick other kernels (other
summation orders) on other machines. So the tolerance is derived from those, never tuned to one
machine's draw:

    |actual - expected| <= eps(dtype) * terms * depth * headroom * max|expected|

`terms * eps` bounds the relative rounding of one summation of `terms` products (the classic
worst case; the typical error is nearer sqrt(terms) * eps), `depth` layers add theirs up, and the
bound is taken against the tensor's largest magnitude because a sum's error scales with the sizes
of its terms, not with its (possibly cancelled) result. `headroom` (HEADROOM) covers what the
bound leaves out (a normalisation dividing by a batch's standard deviation); each test says what
its `terms` and `depth` are.
"""
import torch

HEADROOM = 4.0  # for what the bound leaves out: a BatchNorm dividing by its batch's std


def assert_rounding_close(actual: torch.Tensor, expected: torch.Tensor, *, terms: int,
                          depth: int = 1, msg: str = "") -> None:
    """`actual` equals `expected` up to the rounding of two summation orders in `expected`'s
    dtype (no rtol: the bound is absolute, scaled by the tensor's largest magnitude, see the
    module docstring)."""
    assert actual.shape == expected.shape, f"{msg}shapes {tuple(actual.shape)} != " \
                                           f"{tuple(expected.shape)}"
    if not expected.numel():
        return
    scale = max(float(expected.detach().abs().max()), torch.finfo(torch.float32).tiny)
    atol = torch.finfo(expected.dtype).eps * terms * depth * HEADROOM * scale
    worst = float((actual.detach().float() - expected.detach().float()).abs().max())
    assert worst <= atol, (f"{msg}largest difference {worst:.3g} exceeds the rounding bound "
                           f"{atol:.3g} (terms={terms}, depth={depth}, headroom={HEADROOM})")
