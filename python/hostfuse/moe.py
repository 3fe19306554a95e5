"""Mixture-of-Experts dispatch and combine on tensors, for PyTorch code that
does not build programs::

    handle = hostfuse.moe.dispatch(x, topk_idx, topk_weights, num_experts=E)
    expert_out = my_experts(handle.recv_x, handle.recv_expert_counts)
    y = hostfuse.moe.combine(expert_out, handle, topk_weights)

``grouped_matmul`` computes the experts' GEMMs on those rows (with
silu(gate) * up as an epilogue if asked), as the GroupedMatmul node does.

Semantics are those of the MoeDispatch / MoeCombine nodes (docs/moe.md): rows
arrive expert-major (local expert 0's rows first), and combine returns, per
token, the weighted sum of its picks' expert outputs in pick order,
accumulated in fp32. Both backends give bit-identical results.

``group`` is any torch.distributed process group; when None, the default
group if torch.distributed is initialized, else the ranks of the launcher's
environment (torchrun, or a world of one). With ``backend="cuda"``, calls
after the first one with the same (num_experts, hidden size, dtype, top-k,
capacity) can be captured in ``torch.cuda.graph`` and replayed with new
routing: the first call agrees on the shapes with the other ranks and sets
up symmetric memory (sized for the largest token count any rank passes
then), which cannot happen inside a capture, so call once before capturing.
"""

import atexit

import torch

from . import _C

_runtimes = {}
# What recover() was told about rank masking; None: the variable
# HOSTFUSE_MOE_MASK_FAILED_RANKS decides.
_mask_failed_ranks = None


def release(group=None):
    """Drops the runtimes (and the cuda backend's symmetric memory) that
    dispatch and combine created for ``group`` (None: for every group). Call
    it before ``torch.distributed.destroy_process_group()``, so that no
    process group outlives its backend; it also runs at exit. A
    DispatchHandle keeps its runtime, and so the group, alive: drop the
    handles too, or the group lives on until they are collected (with Gloo,
    its worker threads may then still run at interpreter exit)."""
    for key in [k for k, (g, _) in _runtimes.items() if group is None or g is group]:
        del _runtimes[key]


atexit.register(release)


def backends():
    """The names of the MoE backends: 'collective' and 'cuda'."""
    return _C.moe_backends()


def _default_group(group):
    if group is not None:
        return group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def _runtime(backend, group):
    _check_backend(backend)
    key = (backend, id(group))
    entry = _runtimes.get(key)
    if entry is None:
        # The group is kept with its runtime so that its id stays unique.
        entry = (group, _C.MoeRuntime(backend, group, _mask_failed_ranks))
        _runtimes[key] = entry
    return entry[1]


def _check_tensor(name, value, optional=False):
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")


def _check_no_grad(call, **tensors):
    # The calls have no backward: refuse to drop gradients without a word.
    if not torch.is_grad_enabled():
        return
    for name, value in tensors.items():
        if value is not None and value.requires_grad:
            raise RuntimeError(
                f"hostfuse.moe.{call} is forward-only (it has no backward), but "
                f"{name} requires grad: call it under torch.no_grad() or "
                f"torch.inference_mode(), or pass {name}.detach()"
            )


def _check_backend(backend):
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in backends():
        names = ", ".join(repr(name) for name in backends())
        raise _C.Error(f"backend must be one of {names}, got {backend!r}")


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


class DispatchHandle:
    """What dispatch returns: the received rows and where they came from.

    recv_x [rows, H]: the rows this rank's experts compute, expert-major;
    fp8 (torch.float8_e4m3fn) with quantize="fp8_e4m3", and then
    recv_scales [rows, H / 128] fp32 holds one scale per 128 channels (else
    None): a row is about recv_x.float() * its block's scale.
    recv_weights [rows] (None without topk_weights): each row's weight.
    recv_src_rank, recv_src_token, recv_src_k [rows]: where each row came
    from. recv_expert_counts [L]: rows per local expert. n_tokens_to_rank,
    n_tokens_from_rank [R]: rows sent to and received from each rank.
    recv_layout_id [R + 1]: which dispatch made the layout (combine refuses
    the handle of another dispatch, docs/moe.md).
    """

    _FIELDS = (
        "recv_x",
        "recv_scales",
        "recv_weights",
        "recv_src_rank",
        "recv_src_token",
        "recv_src_k",
        "recv_expert_counts",
        "n_tokens_to_rank",
        "n_tokens_from_rank",
        "recv_layout_id",
    )

    def __init__(self, fields, runtime, site, num_tokens, num_experts):
        for name in self._FIELDS:
            setattr(self, name, fields[name])
        self._layout = fields
        self._runtime = runtime
        self._site = site
        self.num_tokens = num_tokens
        self.num_experts = num_experts

    def __repr__(self):
        rows = self.recv_x.shape[0]
        return (
            f"DispatchHandle(rows={rows}, experts={self.num_experts}, "
            f"tokens={self.num_tokens}, backend={self._runtime.backend!r})"
        )


def dispatch(
    x,
    topk_idx,
    topk_weights=None,
    *,
    num_experts,
    backend="collective",
    group=None,
    capacity=0,
    quantize="none",
):
    """Sends every token's row to the ranks of its top-k experts.

    x [T, H] fp32, bf16, fp16 or (collective backend only) fp64, H > 0;
    topk_idx [T, K] int64 or int32 (-1 masks a pick); topk_weights [T, K]
    fp32, fp64, bf16, fp16, fp8 or None; num_experts E, a multiple of the
    group's size (expert e lives on rank e // (E / R)). ``capacity`` (cuda
    backend only; the collective backend refuses any other than 0): rows
    per receiving rank, 0 for the worst case. Every rank of the group calls
    it, in the same order as its other MoE calls. Forward-only: there is no
    backward, and inputs that require grad under grad mode are refused.

    quantize="fp8_e4m3" sends the rows as fp8 e4m3 with one fp32 scale per
    128 channels (x fp32, bf16 or fp16, H a multiple of 128); both backends
    quantize to the same bits (docs/moe.md, "fp8 dispatch"). Combine then
    takes expert outputs in x's dtype as usual.
    """
    _check_tensor("x", x)
    _check_tensor("topk_idx", topk_idx)
    _check_tensor("topk_weights", topk_weights, optional=True)
    _check_int("num_experts", num_experts)
    _check_int("capacity", capacity)
    if quantize not in ("none", "fp8_e4m3"):
        raise ValueError(f"quantize must be 'none' or 'fp8_e4m3', got {quantize!r}")
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0 (0: the worst case), got {capacity}")
    _check_backend(backend)
    if capacity != 0 and backend != "cuda":
        raise ValueError(
            f"capacity ({capacity}) applies to backend='cuda' only; backend="
            f"{backend!r} returns exactly the rows received (pass 0)"
        )
    _check_no_grad("dispatch", x=x, topk_weights=topk_weights)
    group = _default_group(group)
    runtime = _runtime(backend, group)
    hidden = x.shape[-1] if x.dim() > 0 else 0
    picks = topk_idx.shape[-1] if topk_idx.dim() > 0 else 0
    site = f"E={num_experts} H={hidden} {x.dtype} K={picks} C={capacity} Q={quantize}"
    fields = runtime.dispatch(
        site, x, topk_idx, topk_weights, num_experts, capacity, quantize
    )
    num_tokens = x.shape[0] if x.dim() > 0 else 0
    handle = DispatchHandle(fields, runtime, site, num_tokens, num_experts)
    # combine(reduce="per_rank") checks that it is given these weights.
    handle._topk_weights = topk_weights
    return handle


def combine(expert_out, handle, topk_weights=None, reduce="per_pick"):
    """Sends the expert output rows back to their tokens' ranks and returns
    combined [T, H'] in expert_out's dtype. ``handle`` is what dispatch
    returned.

    reduce="per_pick" (the default): every pick's row goes back, and each
    token's rank sums weight * row over the token's picks in pick order,
    accumulated in fp32 and rounded once (weight 1 without topk_weights).

    reduce="per_rank": each expert's rank first sums, per token, its picks
    there (weighted with the weights dispatch carried, in pick order, in
    fp32, rounded to the dtype) and sends one row per (token, rank); the
    token's rank sums those in rank order in fp32 and rounds again. Fewer
    rows travel, at the cost of that extra rounding (docs/moe.md, "Combine
    modes"). ``topk_weights`` must then be the tensor given to dispatch, or
    None for an unweighted sum. Forward-only, as dispatch."""
    _check_tensor("expert_out", expert_out)
    if not isinstance(handle, DispatchHandle):
        raise TypeError(
            "handle must be what hostfuse.moe.dispatch returned, got "
            f"{type(handle).__name__}"
        )
    _check_tensor("topk_weights", topk_weights, optional=True)
    if reduce not in ("per_pick", "per_rank"):
        raise ValueError(f"reduce must be 'per_pick' or 'per_rank', got {reduce!r}")
    _check_no_grad("combine", expert_out=expert_out, topk_weights=topk_weights)
    recv_weights = None
    if reduce == "per_rank" and topk_weights is not None:
        if topk_weights is not handle._topk_weights:
            raise ValueError(
                "with reduce='per_rank' the experts' ranks weight the rows with "
                "the weights dispatch carried (handle.recv_weights), so "
                "topk_weights must be the tensor given to dispatch, or None"
            )
        recv_weights, topk_weights = handle.recv_weights, None
    return handle._runtime.combine(
        handle._site,
        expert_out,
        handle._layout,
        topk_weights,
        handle.num_tokens,
        handle.num_experts,
        reduce,
        recv_weights,
    )


def grouped_matmul(x, weights, counts, x_scales=None, *, epilogue="none"):
    """The experts' matmuls on dispatch's expert-major rows: rows
    [o_l, o_l + counts[l]) of x times weights[l], o_l the sum of the earlier
    counts, as the GroupedMatmul node computes them (docs/moe.md, "IR").

    x [rows, H] with the weights' dtype, or fp8 (torch.float8_e4m3fn) with
    its x_scales [rows, H / 128] fp32, as dispatch(quantize="fp8_e4m3")
    returns both; weights [L, H, N] on x's device; counts [L] integer
    (handle.recv_expert_counts), on x's device or the CPU. Rows past the
    counts' sum (the cuda backend's capacity padding) come back unspecified.
    epilogue="silu_mul" returns silu(gate) * up of the product's halves
    (columns [0, N/2) and [N/2, N)), [rows, N / 2], the values of
    ``F.silu(gate) * up`` on the bf16 product computed in fp32.

    On GPUs in bf16 it reads the counts on the device, so it can be
    captured in ``torch.cuda.graph``; on an H100 or H200 with weights
    stored K-major (``w.transpose(1, 2)`` of a contiguous [L, N, H], as
    nn.Linear keeps its weights) it runs hostfuse's own grouped GEMM, with
    the activation in its epilogue. Elsewhere it reads the counts on the
    host. Forward-only, as dispatch."""
    _check_tensor("x", x)
    _check_tensor("weights", weights)
    _check_tensor("counts", counts)
    _check_tensor("x_scales", x_scales, optional=True)
    if epilogue not in ("none", "silu_mul"):
        raise ValueError(f"epilogue must be 'none' or 'silu_mul', got {epilogue!r}")
    _check_no_grad("grouped_matmul", x=x, weights=weights, x_scales=x_scales)
    return _C.grouped_matmul_on_tensors(x, weights, counts, x_scales, epilogue)


def report_failure(device, backend="collective", group=None):
    """Tells the peers that this rank failed in code of its own and will not
    make the MoE call they make next: call it where the error is caught,
    before re-raising it. Their call (dispatch or combine on ``backend``
    over ``group``, with tensors on ``device``'s type) then raises at once,
    naming this rank, instead of waiting for it until the timeout. Blocks
    until the peers are in that call; never raises. With backend='cuda' it
    writes the failure into every peer's workspaces of this runtime (no
    wait): their kernels stop at once, and the workspaces refuse every
    call on every rank until each rank calls release(). HostIrEvaluator.run does this
    itself for its programs."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    _runtime(backend, _default_group(group)).publish_failure(device)


def recover(mask_failed_ranks=None):
    """Goes on with the ranks still alive after a rank of the launcher's
    communicator died or went silent: a dispatch or combine then raises
    hostfuse.Error naming it ("rank 2 did not answer the roll call"), and
    every later call raises at once. Every survivor calls recover(): it
    drops the runtimes of the failed communicator without waiting for any
    peer, and the survivors form a new one, renumbered in their old order.
    Returns ``(rank, size, former_ranks)``, where ``former_ranks[r]`` was the
    rank of new rank r. num_experts must stay divisible by the new size,
    unless ``mask_failed_ranks`` is True (None: the variable
    HOSTFUSE_MOE_MASK_FAILED_RANKS, default off): then later dispatch and
    combine calls keep the first world's expert placement, and a pick of an
    expert of a rank that did not survive acts as -1 (docs/moe.md, "Rank
    masking"); masked_ranks() names those ranks.
    HostIrEvaluators made before call ``reset_communicator()``; GraphRunners
    must be made anew. For the launcher's ranks only (torchrun or mpirun
    without torch.distributed); docs/moe.md, "When a rank fails", says what
    the store needs. Under torch.distributed, rebuild the group with torch
    and pass the new one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        raise RuntimeError(
            "hostfuse.moe.recover() recovers the launcher's communicator; "
            "torch.distributed is initialized: make a new process group over "
            "the surviving ranks and pass it as group="
        )
    if mask_failed_ranks is not None and not isinstance(mask_failed_ranks, bool):
        raise TypeError(
            "mask_failed_ranks must be a bool or None, got "
            f"{type(mask_failed_ranks).__name__}"
        )
    global _mask_failed_ranks
    release()
    survivors = _C.recover_world()
    _mask_failed_ranks = mask_failed_ranks
    return survivors


def masked_ranks():
    """The ranks of the launcher's first world (before any recover()) whose
    experts dispatch and combine treat as masked: those that did not survive,
    when recover() was asked to mask them; else []. Ascending."""
    return _C.masked_ranks(_mask_failed_ranks)


def check_status(backend="cuda", group=None):
    """Raises the first error the cuda backend recorded on the device during
    graph replays (eager calls raise at once). Waits for the device. Checks
    the runtime of ``backend`` over ``group``, or with group=None those
    over every group that dispatch or combine ran on; a group that no call
    ran on has nothing to report."""
    _check_backend(backend)
    for (name, _), (g, runtime) in list(_runtimes.items()):
        if name == backend and (group is None or g is group):
            runtime.check_status()
