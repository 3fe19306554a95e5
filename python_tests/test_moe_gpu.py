"""The collective backend on CUDA tensors runs its own kernels around the
all-to-alls (checks, table rows, row metadata, the combine's sum) where CPU
tensors run ATen operations: both must give the same bits, and the same
error for the same bad input. One process, a world of one rank."""

import re

import pytest
import torch

import hostfuse as hf
import hostfuse.moe as moe
from conftest import needs_gpu
from test_moe import routing, scale_by_expert

FIELDS = ("recv_x", "recv_weights", "recv_src_rank", "recv_src_token", "recv_src_k",
          "recv_expert_counts", "n_tokens_to_rank", "n_tokens_from_rank")


def run(device, x, idx, w, experts):
    def on(t):
        return None if t is None else t.to(device)

    handle = moe.dispatch(on(x), on(idx), on(w), num_experts=experts, backend="collective")
    fields = {name: getattr(handle, name) for name in FIELDS}
    fields = {name: None if t is None else t.cpu() for name, t in fields.items()}
    # Word 0 is the call's number, which differs between the two runs.
    fields["fingerprints"] = handle.recv_layout_id[1:].cpu()
    y = scale_by_expert(handle.recv_x, handle.recv_expert_counts)
    fields["combined"] = moe.combine(y, handle, on(w)).cpu()
    return fields


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["f32", "bf16", "f16", "f64"])
@pytest.mark.parametrize("weights", [None, torch.float32, torch.bfloat16, torch.float64],
                         ids=["no_w", "w_f32", "w_bf16", "w_f64"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("hidden", [40, 37], ids=["H40", "H37"])  # 16-byte packs or not
def test_gpu_kernels_give_the_cpu_path_bits(dtype, weights, masked, idx_dtype, hidden):
    tokens, picks, experts = 37, 4, 8
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype)
    idx = routing(tokens, picks, experts, 12, masked, idx_dtype)
    w = None if weights is None else torch.rand(tokens, picks, generator=generator).to(weights)
    cpu = run("cpu", x, idx, w, experts)
    gpu = run("cuda", x, idx, w, experts)
    for name, value in cpu.items():
        if value is None:
            assert gpu[name] is None, name
        else:
            assert gpu[name].dtype == value.dtype, name
            assert torch.equal(gpu[name], value), name


@needs_gpu
def test_gpu_kernels_handle_no_rows_and_no_tokens():
    for tokens in (0, 3):
        x = torch.randn(tokens, 8)
        idx = torch.full((tokens, 2), -1, dtype=torch.int64)
        cpu = run("cpu", x, idx, torch.rand(tokens, 2), 4)
        gpu = run("cuda", x, idx, torch.rand(tokens, 2), 4)
        assert gpu["recv_x"].shape == (0, 8)
        assert torch.equal(gpu["combined"], cpu["combined"])
        assert torch.equal(gpu["combined"], torch.zeros(tokens, 8))


def error_text(call):
    with pytest.raises(hf.Error) as info:
        call()
    return str(info.value).split("\n")[0]


@needs_gpu
@pytest.mark.parametrize("bad", ["out_of_range", "duplicate", "both"])
def test_gpu_reports_the_first_bad_pick_like_the_cpu(bad):
    x = torch.randn(6, 8)
    idx = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2], [1, 3]])
    if bad in ("out_of_range", "both"):
        idx[4, 1] = 9
    if bad in ("duplicate", "both"):
        idx[2, 1] = 1
        idx[5, 0] = 3
    texts = [error_text(lambda d=d: moe.dispatch(x.to(d), idx.to(d), num_experts=4,
                                                 backend="collective"))
             for d in ("cpu", "cuda")]
    assert texts[0] == texts[1]
    expected = "at token 4, pick 1" if bad == "out_of_range" else "in token 2 (pick 1"
    assert expected in texts[0]


@needs_gpu
@pytest.mark.parametrize("corrupt", ["src_rank", "src_token", "counts", "repeat", "unordered"])
def test_gpu_checks_a_bad_layout_like_the_cpu(corrupt):
    x = torch.randn(5, 8)
    idx = routing(5, 2, 4, 3)
    texts = []
    for device in ("cpu", "cuda"):
        handle = moe.dispatch(x.to(device), idx.to(device), num_experts=4, backend="collective")
        if corrupt == "src_rank":
            handle.recv_src_rank[3] = 7
        elif corrupt == "src_token":
            handle.recv_src_token[2] = -4
        elif corrupt == "repeat":
            # Row 1 names row 0's (rank, token, pick) too.
            handle.recv_src_token[1] = handle.recv_src_token[0]
            handle.recv_src_k[1] = handle.recv_src_k[0]
        elif corrupt == "unordered":
            # The first two rows of an expert with two or more swap tokens.
            counts = handle.recv_expert_counts.tolist()
            expert = next(e for e, count in enumerate(counts) if count >= 2)
            first = sum(counts[:expert])
            tokens = handle.recv_src_token
            tokens[first], tokens[first + 1] = tokens[first + 1].item(), tokens[first].item()
        else:
            handle.recv_expert_counts[1] += 1
        texts.append(error_text(lambda: moe.combine(handle.recv_x, handle)))
    assert texts[0] == texts[1]
    assert "bad input on rank 0 of 1" in texts[0]


@needs_gpu
def test_gpu_fingerprints_a_layout_like_the_cpu():
    # Tokens 0 and 1 (experts 0 and 1) trade places: only the fingerprints
    # of the kernels tell, and they must give the CPU path's text.
    x = torch.randn(5, 8)
    idx = (torch.arange(5) % 2).unsqueeze(1)
    texts = []
    for device in ("cpu", "cuda"):
        handle = moe.dispatch(x.to(device), idx.to(device), num_experts=2, backend="collective")
        handle.recv_src_token[0], handle.recv_src_token[3] = 1, 0
        texts.append(error_text(lambda: moe.combine(handle.recv_x, handle)))
    # The texts name the dispatch's call number, which differs.
    texts = [re.sub(r"#\d+", "#N", text) for text in texts]
    assert texts[0] == texts[1]
    assert "that rank 0 did not send it" in texts[0]


@needs_gpu
def test_cuda_backend_refuses_the_handle_of_an_earlier_dispatch():
    # Both dispatches use one site (same shapes): the first handle is stale
    # once the second has run, and its combine would route the rows by the
    # second's metadata. The kernel compares the handle's epoch on the
    # device, and the workspace is unusable after it until release().
    x = torch.randn(6, 16, device="cuda")
    idx = routing(6, 2, 4, 3).cuda()
    try:
        first = moe.dispatch(x, idx, num_experts=4, backend="cuda")
        second = moe.dispatch(x, idx.roll(1, 0), num_experts=4, backend="cuda")
        assert first.recv_layout_id[0].item() == 1
        assert second.recv_layout_id[0].item() == 2
        text = error_text(lambda: moe.combine(first.recv_x, first))
        assert "the layout (recv_layout_id) is the one of dispatch #1" in text
        assert "but its latest dispatch is #2" in text
    finally:
        moe.release()
    handle = moe.dispatch(x, idx, torch.full((6, 2), 0.5, device="cuda"), num_experts=4,
                          backend="cuda")
    out = moe.combine(handle.recv_x, handle, torch.full((6, 2), 0.5, device="cuda"))
    torch.testing.assert_close(out, x)
    moe.release()
