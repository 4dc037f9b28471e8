"""Tolerances for tests that compare two different computations of the same numbers.

Where a test compares the same kernels in the same order (another stage count, a resume, the
reference order of a stage's work), it asserts bit-identity with `torch.equal`, and nothing here
applies. Where it compares two *different* kernels or formulas (channels-last against contiguous
convolutions, a fused layer against its formula written out, bf16 against fp32), the two differ
by rounding, and by how much depends on the dtype, on how many terms each output sums, on how
many such layers follow one another and on the values' magnitude; CPUs pick other kernels (other
summation orders) on other machines. So the tolerance is derived from those, never tuned to one
machine's draw:

    |actual - expected| <= eps(dtype) * terms * depth * headroom * max|expected|

`terms * eps` bounds the relative rounding of one summation of `terms` products (the classic
worst case; the typical error is nearer sqrt(terms) * eps), `depth` layers add theirs up, and the
bound is taken against the tensor's largest magnitude because a sum's error scales with the sizes
of its terms, not with its (possibly cancelled) result. `headroom` covers what the bound leaves
out (a normalisation dividing by a batch's standard deviation); each test that uses it says why
its value is what it is.
"""
import torch


def rounding_atol(expected: torch.Tensor, *, terms: int, depth: int = 1,
                  headroom: float = 4.0, dtype: torch.dtype | None = None) -> float:
    """The absolute tolerance for `expected` computed two ways in `dtype` (default: its own)."""
    eps = torch.finfo(dtype or expected.dtype).eps
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    return eps * terms * depth * headroom * max(scale, torch.finfo(torch.float32).tiny)


def assert_rounding_close(actual: torch.Tensor, expected: torch.Tensor, *, terms: int,
                          depth: int = 1, headroom: float = 4.0, msg: str = "") -> None:
    """`actual` equals `expected` up to the rounding of two summation orders (no rtol: the
    bound is absolute, scaled by the tensor's largest magnitude, see the module docstring)."""
    assert actual.shape == expected.shape, f"{msg}shapes {tuple(actual.shape)} != " \
                                           f"{tuple(expected.shape)}"
    atol = rounding_atol(expected, terms=terms, depth=depth, headroom=headroom)
    worst = float((actual.detach().float() - expected.detach().float()).abs().max()) \
        if expected.numel() else 0.0
    assert worst <= atol, (f"{msg}largest difference {worst:.3g} exceeds the rounding bound "
                           f"{atol:.3g} (terms={terms}, depth={depth}, headroom={headroom})")
