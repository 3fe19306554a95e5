"""hostfuse: host-IR fusion and MoE expert parallelism for PyTorch programs.

Build a program in the style of nvFuser's frontend, print it, and run it::

    import torch, hostfuse as hf

    program = hf.Program()
    with program:
        tokens = program.define_scalar("tokens")
        x = program.define_tensor([tokens, 64], torch.float32, "x")
        w = program.define_tensor([32, 64], torch.float32, "w")
        h = hf.silu(hf.linear(x, w))
        program.add_output(hf.sum(h * h, 1))
    print(program)
    (out,) = hf.HostIrEvaluator(program).run([torch.randn(5, 64), torch.randn(32, 64)])

or use ``hostfuse.moe.dispatch`` / ``hostfuse.moe.combine`` on tensors.
docs/python.md has the whole API.
"""

import torch  # noqa: F401  (loads libtorch before hostfuse's libraries)

from . import _C
from ._C import (
    Error,
    Fusion,
    GraphRunner,
    HostIrEvaluator,
    MoeDispatchResult,
    Program,
    Scalar,
    TensorView,
    Val,
    abs,
    add,
    broadcast,
    cast,
    dequantize_fp8,
    div,
    eq,
    exp,
    find_capture_problems,
    ge,
    grouped_matmul,
    gt,
    le,
    linear,
    log,
    lt,
    matmul,
    max,
    maximum,
    minimum,
    moe_combine,
    moe_dispatch,
    mul,
    narrow,
    ne,
    neg,
    reciprocal,
    relu,
    rsqrt,
    run_fusion,
    sigmoid,
    silu,
    softmax,
    sqrt,
    sub,
    sum,
    tanh,
    topk,
    topk_softmax,
    where,
)
from . import kernel, moe

__version__ = "0.1.0"


def _binary(op, swap=False):
    if swap:
        return lambda self, other: op(other, self)
    return lambda self, other: op(self, other)


# Python operators on tensors of a program: x * y, x + 1.0, 2.0 / x, -x.
TensorView.__add__ = _binary(add)
TensorView.__radd__ = _binary(add, swap=True)
TensorView.__sub__ = _binary(sub)
TensorView.__rsub__ = _binary(sub, swap=True)
TensorView.__mul__ = _binary(mul)
TensorView.__rmul__ = _binary(mul, swap=True)
TensorView.__truediv__ = _binary(div)
TensorView.__rtruediv__ = _binary(div, swap=True)
TensorView.__neg__ = lambda self: neg(self)
TensorView.__lt__ = _binary(lt)
TensorView.__le__ = _binary(le)
TensorView.__gt__ = _binary(gt)
TensorView.__ge__ = _binary(ge)

__all__ = [name for name in dir() if not name.startswith("_")]
