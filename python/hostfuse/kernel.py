"""The CUDA C that a Fusion compiles to, and NVRTC compiles of it.

Works without a GPU: ``compile`` then emits PTX for ``compute_<arch>``, which
checks the generated source fully.
"""

from . import _C


def cuda_source(
    fusion,
    *,
    contiguous=False,
    vector_width=1,
    index32=False,
    pitched_rows=False,
    row_limited=False,
):
    """The CUDA C source generated for ``fusion`` (a ``hostfuse.Fusion``) and
    one signature: strided by default; ``contiguous`` (dense tensors) or
    ``pitched_rows`` (rows of unit stride some pitch apart), each with
    ``vector_width`` elements per access; ``index32`` for 32-bit indices;
    ``row_limited`` for the kernel that computes only the rows a device list
    of row counts covers (docs/kernels.md, "Kernel shapes")."""
    return _C.cuda_source(
        fusion,
        contiguous=contiguous,
        vector_width=vector_width,
        index32=index32,
        pitched_rows=pitched_rows,
        row_limited=row_limited,
    )


def compile(source, *, arch=90, cubin=False):
    """Compiles ``source`` with NVRTC for ``sm_<arch>`` (``cubin=True``) or
    ``compute_<arch>`` PTX; returns a dict with ``target``, ``image`` (bytes)
    and ``log``. A source that does not compile raises ``hostfuse.Error``
    with NVRTC's log."""
    return _C.compile_cuda(source, arch=arch, cubin=cubin)
