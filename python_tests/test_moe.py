"""hostfuse.moe on one process (a world of one rank): dispatch and combine
against references computed from the inputs, and their errors."""

import pytest
import torch

import hostfuse as hf
import hostfuse.moe as moe


def routing(tokens, picks, experts, seed, masked=False, dtype=torch.int64):
    generator = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(experts, generator=generator)[:picks]
                       for _ in range(tokens)])
    if masked:
        idx[torch.rand(tokens, picks, generator=generator) < 0.3] = -1
    return idx.to(dtype)


def scale_by_expert(recv_x, counts):
    """The test's experts: expert e multiplies its rows by 1 + e / 4."""
    experts = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    return recv_x * (1 + experts.to(recv_x.dtype) / 4).unsqueeze(1)


@pytest.mark.parametrize("weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_round_trip_matches_the_reference(weights, masked, idx_dtype):
    tokens, hidden, picks, experts = 9, 16, 3, 6
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1))
    idx = routing(tokens, picks, experts, 2, masked, idx_dtype)
    w = torch.rand(tokens, picks, generator=torch.Generator().manual_seed(3)) if weights else None
    handle = moe.dispatch(x, idx, w, num_experts=experts)
    valid = idx >= 0
    assert handle.recv_x.shape == (int(valid.sum()), hidden)
    assert torch.equal(handle.recv_expert_counts,
                       torch.bincount(idx[valid].long(), minlength=experts))
    # Every received row is its source token's row.
    assert torch.equal(handle.recv_x, x[handle.recv_src_token])
    out = moe.combine(scale_by_expert(handle.recv_x, handle.recv_expert_counts), handle, w)
    factor = torch.where(valid, 1 + idx.to(torch.float64) / 4, torch.zeros(()))
    if weights:
        factor = factor * w.to(torch.float64)
    expected = (x.to(torch.float64) * factor.sum(1, keepdim=True)).to(x.dtype)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_handle_has_every_named_field():
    x = torch.randn(4, 8)
    handle = moe.dispatch(x, routing(4, 2, 4, 5), torch.rand(4, 2), num_experts=4)
    for name in ("recv_x", "recv_weights", "recv_src_rank", "recv_src_token",
                 "recv_src_k", "recv_expert_counts", "n_tokens_to_rank",
                 "n_tokens_from_rank", "recv_layout_id"):
        assert isinstance(getattr(handle, name), torch.Tensor), name
    assert handle.recv_layout_id.shape == (2,)
    assert handle.recv_weights.dtype == torch.float32
    assert handle.n_tokens_to_rank.tolist() == [8]
    assert "DispatchHandle(rows=8" in repr(handle)


def test_bf16_rows_combine_in_fp32_and_round_once():
    x = torch.randn(5, 32).to(torch.bfloat16)
    idx = routing(5, 2, 4, 6)
    w = torch.rand(5, 2)
    handle = moe.dispatch(x, idx, w, num_experts=4)
    out = moe.combine(handle.recv_x, handle, w)
    expected = (x.float() * w[:, :1] + x.float() * w[:, 1:]).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


@pytest.mark.parametrize("weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_per_rank_combine_on_one_rank_equals_per_pick(weights, masked):
    # One rank: each token's partial is its whole sum, and rounding it to
    # bf16 a second time changes nothing.
    x = torch.randn(17, 64, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    idx = routing(17, 4, 8, 12, masked)
    w = torch.rand(17, 4, generator=torch.Generator().manual_seed(13)) if weights else None
    handle = moe.dispatch(x, idx, w, num_experts=8)
    expert_out = scale_by_expert(handle.recv_x, handle.recv_expert_counts)
    per_pick = moe.combine(expert_out, handle, w)
    per_rank = moe.combine(expert_out, handle, w, reduce="per_rank")
    assert torch.equal(per_pick, per_rank)


def test_per_rank_combine_refuses_weights_other_than_the_dispatchs():
    x = torch.randn(4, 8)
    idx = routing(4, 2, 4, 14)
    w = torch.rand(4, 2)
    handle = moe.dispatch(x, idx, w, num_experts=4)
    with pytest.raises(ValueError, match="topk_weights must be the tensor given to dispatch"):
        moe.combine(handle.recv_x, handle, w.clone(), reduce="per_rank")
    with pytest.raises(ValueError, match="reduce must be 'per_pick' or 'per_rank'"):
        moe.combine(handle.recv_x, handle, w, reduce="per_token")
    # Without weights: an unweighted sum (2 picks, identity experts).
    assert torch.equal(moe.combine(handle.recv_x, handle, reduce="per_rank"), 2 * x)


def test_per_rank_combine_in_a_program_prints_its_mode():
    program = hf.Program()
    with program:
        tokens = program.define_scalar("tokens")
        xv = program.define_tensor([tokens, 8], torch.float32, "x")
        iv = program.define_tensor([tokens, 2], torch.int64, "idx")
        wv = program.define_tensor([tokens, 2], torch.float32, "w")
        d = hf.moe_dispatch(xv, iv, wv, num_experts=4)
        program.add_output(hf.moe_combine(d.recv_x * 3.0, d, wv, num_tokens=xv.extent(0),
                                          reduce="per_rank"))
    assert "reduce=per_rank" in str(program)
    assert "recv_weights=" in str(program).split("MoeCombine(")[1]
    x = torch.randn(5, 8)
    w = torch.rand(5, 2)
    (out,) = hf.HostIrEvaluator(program).run([x, routing(5, 2, 4, 15), w])
    torch.testing.assert_close(out, 3.0 * x * w.sum(1, keepdim=True))


def reference_fp8(x):
    """fp8 dispatch's quantizer (docs/moe.md, "fp8 dispatch") in torch ops."""
    blocks = x.float().view(x.shape[0], -1, 128)
    scales = blocks.abs().amax(-1).clamp_min(1e-4) / torch.full((), 448.0)
    q = (blocks / scales.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(x.shape[0], -1), scales


def test_fp8_dispatch_rows_are_the_quantized_source_rows():
    x = (torch.randn(11, 256, generator=torch.Generator().manual_seed(21)) * 3).to(torch.bfloat16)
    idx = routing(11, 3, 6, 22, masked=True)
    handle = moe.dispatch(x, idx, num_experts=6, quantize="fp8_e4m3")
    assert handle.recv_x.dtype == torch.float8_e4m3fn
    assert handle.recv_scales.shape == (handle.recv_x.shape[0], 2)
    q, scales = reference_fp8(x[handle.recv_src_token])
    assert torch.equal(handle.recv_x.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(handle.recv_scales, scales)
    plain = moe.dispatch(x, idx, num_experts=6)
    assert plain.recv_scales is None
    assert torch.equal(handle.recv_src_token, plain.recv_src_token)
    # Dequantized rows, through combine (identity experts, K = 3 picks).
    rows = (handle.recv_x.float().view(-1, 2, 128) * handle.recv_scales.unsqueeze(2))
    out = moe.combine(rows.view(-1, 256).to(torch.bfloat16), handle)
    expected = moe.combine(plain.recv_x, plain)
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.07, atol=0.05)


def test_fp8_dispatch_refuses_a_hidden_size_it_cannot_scale():
    with pytest.raises(hf.Error, match="H a multiple of 128"):
        moe.dispatch(torch.randn(4, 96), routing(4, 2, 4, 23), num_experts=4,
                     quantize="fp8_e4m3")
    with pytest.raises(ValueError, match="quantize must be 'none' or 'fp8_e4m3'"):
        moe.dispatch(torch.randn(4, 128), routing(4, 2, 4, 23), num_experts=4,
                     quantize="fp4")


def test_fp8_dispatch_in_a_program_feeds_grouped_matmul():
    program = hf.Program()
    with program:
        tokens = program.define_scalar("tokens")
        xv = program.define_tensor([tokens, 128], torch.bfloat16, "x")
        iv = program.define_tensor([tokens, 2], torch.int64, "idx")
        wv = program.define_tensor([tokens, 2], torch.float32, "w")
        ev = program.define_tensor([4, 128, 128], torch.bfloat16, "expert_w")
        d = hf.moe_dispatch(xv, iv, wv, num_experts=4, quantize="fp8_e4m3")
        y = hf.grouped_matmul(d.recv_x, ev, d.recv_expert_counts, x_scales=d.recv_scales)
        program.add_output(hf.moe_combine(y, d, wv, num_tokens=xv.extent(0)))
    text = str(program)
    assert "quantize=fp8_e4m3" in text and "x_scales=" in text
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(24)).to(torch.bfloat16)
    idx = routing(6, 2, 4, 25)
    w = torch.rand(6, 2, generator=torch.Generator().manual_seed(26))
    expert_w = (torch.randn(4, 128, 128, generator=torch.Generator().manual_seed(27)) / 16).to(torch.bfloat16)
    (out,) = hf.HostIrEvaluator(program).run([x, idx, w, expert_w])
    q, scales = reference_fp8(x)
    deq = (q.float().view(6, 1, 128) * scales.unsqueeze(2)).view(6, 128).to(torch.bfloat16)
    expected = sum(w[:, k:k + 1] * torch.bmm(deq.float().unsqueeze(1),
                                             expert_w[idx[:, k]].float()).squeeze(1)
                   for k in range(2))
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_dequantize_fp8_in_a_program_matches_the_formula():
    program = hf.Program()
    with program:
        rows = program.define_scalar("rows")
        qv = program.define_tensor([rows, 256], torch.float8_e4m3fn, "q")
        sv = program.define_tensor([rows, 2], torch.float32, "scales")
        program.add_output(hf.dequantize_fp8(qv, sv, torch.bfloat16))
    assert "dequantize_fp8(" in str(program)
    g = torch.Generator().manual_seed(28)
    codes = torch.randint(0, 254, (5, 256), generator=g, dtype=torch.uint8)
    codes += (codes >= 0x7F).to(torch.uint8)  # no NaN codes
    row_scales = torch.rand(5, 2, generator=g) + 0.5
    q = codes.view(torch.float8_e4m3fn)
    (out,) = hf.HostIrEvaluator(program).run([q, row_scales])
    expected = (q.float() * row_scales.repeat_interleave(128, 1)).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    other = hf.Program()
    with other:
        not_fp8 = other.define_tensor([4, 256], torch.float32, "x")
        scales = other.define_tensor([4, 2], torch.float32, "scales")
        with pytest.raises(hf.Error, match="DequantizeFp8: x .* must be f8e4m3"):
            hf.dequantize_fp8(not_fp8, scales, torch.bfloat16)
    # With row counts: printed; on the CPU every row is still computed.
    limited = hf.Program()
    with limited:
        qv = limited.define_tensor([5, 256], torch.float8_e4m3fn, "q")
        sv = limited.define_tensor([5, 2], torch.float32, "scales")
        cv = limited.define_tensor([2], torch.int64, "counts")
        limited.add_output(hf.dequantize_fp8(qv, sv, torch.bfloat16, row_counts=cv))
    assert ", row_counts=" in str(limited)
    (counted,) = hf.HostIrEvaluator(limited).run([q, row_scales, torch.tensor([1, 2])])
    assert torch.equal(counted[:3], expected[:3])


def test_check_status_checks_the_runtimes_of_the_calls_made(monkeypatch):
    # Stand-ins for the runtimes that dispatch made over two groups: no
    # GPU needed to see which ones check_status asks.
    class Runtime:
        def __init__(self):
            self.checks = 0

        def check_status(self):
            self.checks += 1

    ep_group, tp_group, unused = object(), object(), object()
    cuda_ep, cuda_tp, collective_ep = Runtime(), Runtime(), Runtime()
    runtimes = {("cuda", id(ep_group)): (ep_group, cuda_ep),
                ("cuda", id(tp_group)): (tp_group, cuda_tp),
                ("collective", id(ep_group)): (ep_group, collective_ep)}
    monkeypatch.setattr(moe, "_runtimes", dict(runtimes))
    moe.check_status()
    assert (cuda_ep.checks, cuda_tp.checks, collective_ep.checks) == (1, 1, 0)
    moe.check_status(group=ep_group)
    assert (cuda_ep.checks, cuda_tp.checks, collective_ep.checks) == (2, 1, 0)
    moe.check_status("collective", group=ep_group)
    assert collective_ep.checks == 1
    # A group without calls has nothing to report, and gets no runtime.
    moe.check_status(group=unused)
    assert moe._runtimes == runtimes
    with pytest.raises(TypeError, match="backend must be a str"):
        moe.check_status(7)


def test_backends_are_listed():
    assert moe.backends() == ["collective", "cuda"]


@pytest.mark.parametrize(
    "call, error, text",
    [
        (lambda x, i: moe.dispatch("x", i, num_experts=4), TypeError, "x must be a torch.Tensor"),
        (lambda x, i: moe.dispatch(x, None, num_experts=4), TypeError, "topk_idx must be a torch.Tensor"),
        (lambda x, i: moe.dispatch(x, i, [1.0], num_experts=4), TypeError, "topk_weights must be a torch.Tensor or None"),
        (lambda x, i: moe.dispatch(x, i, num_experts=4.0), TypeError, "num_experts must be an int"),
        (lambda x, i: moe.dispatch(x, i, num_experts=4, backend=3), TypeError, "backend must be a str"),
        (lambda x, i: moe.dispatch(x, i, num_experts=4, backend="nccl"), hf.Error, "backend must be one of"),
        (lambda x, i: moe.dispatch(x, i, num_experts=0), hf.Error, "num_experts"),
        (lambda x, i: moe.dispatch(x, i * 0 + 7, num_experts=4), hf.Error, "expert"),
        (lambda x, i: moe.dispatch(x.double(), i, num_experts=4, backend="cuda"), hf.Error, "x is on the CPU, but backend=cuda needs it on that rank's own GPU"),
        (lambda x, i: moe.combine(x, "handle"), TypeError, "handle must be what hostfuse.moe.dispatch returned"),
        (lambda x, i: moe.dispatch(x, i, num_experts=4, capacity=-1), ValueError, "capacity must be >= 0"),
        (lambda x, i: moe.dispatch(x, i, num_experts=4, capacity=8), ValueError,
         r"capacity \(8\) applies to backend='cuda' only"),
        (lambda x, i: moe.dispatch(x.requires_grad_(), i, num_experts=4), RuntimeError,
         "dispatch is forward-only .* x requires grad"),
        (lambda x, i: moe.dispatch(x, i, torch.rand(4, 2, requires_grad=True), num_experts=4),
         RuntimeError, "topk_weights requires grad"),
        (lambda x, i: moe.check_status("nccl"), hf.Error, "backend must be one of 'collective', 'cuda', got 'nccl'"),
    ],
    ids=["x_str", "idx_none", "weights_list", "experts_float", "backend_int",
         "backend_unknown", "experts_zero", "expert_out_of_range", "cuda_on_cpu",
         "handle_str", "capacity_negative", "capacity_collective", "x_requires_grad",
         "weights_require_grad", "check_status_backend"],
)
def test_errors_name_the_argument(call, error, text):
    x = torch.randn(4, 8)
    idx = routing(4, 2, 4, 7)
    with pytest.raises(error, match=text):
        call(x, idx)


def test_grouped_matmul_on_tensors_is_a_matmul_per_expert_with_its_epilogue():
    # A whole layer on tensors: dispatch, the experts' GEMMs with the
    # activation as the first one's epilogue, combine; against the layer
    # token by token.
    tokens, hidden, inter, picks, experts = 7, 16, 8, 2, 3
    gen = torch.Generator().manual_seed(40)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    idx = routing(tokens, picks, experts, 41)
    w = torch.rand(tokens, picks, generator=gen)
    gate_up = (torch.randn(experts, hidden, 2 * inter, generator=gen) / 4).to(torch.bfloat16)
    down = (torch.randn(experts, inter, hidden, generator=gen) / 3).to(torch.bfloat16)
    handle = moe.dispatch(x, idx, w, num_experts=experts)
    counts = handle.recv_expert_counts
    product = moe.grouped_matmul(handle.recv_x, gate_up, counts)
    act = moe.grouped_matmul(handle.recv_x, gate_up, counts, epilogue="silu_mul")
    assert product.shape == (handle.recv_x.shape[0], 2 * inter)
    assert act.shape == (handle.recv_x.shape[0], inter) and act.dtype == torch.bfloat16
    # The epilogue: F.silu(gate) * up on the bf16 product, in fp32.
    gate, up = product.float().chunk(2, dim=-1)
    assert torch.equal(act, (torch.nn.functional.silu(gate) * up).to(torch.bfloat16))
    out = moe.combine(moe.grouped_matmul(act, down, counts), handle, w)
    expected = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for k in range(picks):
            e = int(idx[t, k])
            h = x[t].float() @ gate_up[e].float()
            y = (torch.nn.functional.silu(h[:inter]) * h[inter:]) @ down[e].float()
            expected[t] += w[t, k] * y
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    "call, error, text",
    [
        (lambda x, w, c: moe.grouped_matmul(x, w, c, epilogue="gelu"), ValueError,
         "epilogue must be 'none' or 'silu_mul'"),
        (lambda x, w, c: moe.grouped_matmul(x, [1.0], c), TypeError, "weights must be a torch.Tensor"),
        (lambda x, w, c: moe.grouped_matmul(x, w.double(), c), hf.Error,
         "x is Float but weights are Double"),
        (lambda x, w, c: moe.grouped_matmul(x, w[:, :, :5], c, epilogue="silu_mul"), hf.Error,
         "epilogue=silu_mul needs an even N"),
        (lambda x, w, c: moe.grouped_matmul(x, w, c.float()), hf.Error,
         "counts must be an integer"),
        (lambda x, w, c: moe.grouped_matmul(x, w, c.to(torch.complex64)), hf.Error,
         "counts must be an integer"),
        (lambda x, w, c: moe.grouped_matmul(x, w, c[:1]), hf.Error,
         r"counts \[1\] do not match the 2 groups of weights \[2, 8, 6\]"),
        (lambda x, w, c: moe.grouped_matmul(x, w.to("meta"), c), hf.Error,
         "weights are on meta but x is on cpu"),
        (lambda x, w, c: moe.grouped_matmul(x, w, c + 3), hf.Error, "does not fit the 5 rows of x"),
        (lambda x, w, c: moe.grouped_matmul(x, w, c, torch.ones(5, 1)), hf.Error,
         "it takes no x_scales"),
        (lambda x, w, c: moe.grouped_matmul(x, w.requires_grad_(), c), RuntimeError,
         "grouped_matmul is forward-only .* weights requires grad"),
        (lambda x, w, c: moe.grouped_matmul(x.to(torch.float8_e4m3fn), w, c,
                                            torch.ones(5, 1, requires_grad=True)),
         RuntimeError, "grouped_matmul is forward-only .* x_scales requires grad"),
    ],
    ids=["epilogue", "weights_list", "dtypes", "odd_n", "float_counts", "complex_counts",
         "short_counts", "weights_on_meta", "counts_past_rows", "scales_without_fp8",
         "weights_require_grad", "scales_require_grad"],
)
def test_grouped_matmul_errors_name_the_argument(call, error, text):
    x = torch.randn(5, 8)
    w = torch.randn(2, 8, 6)
    counts = torch.tensor([2, 3])
    with pytest.raises(error, match=text):
        call(x, w, counts)


def test_combine_refuses_expert_outputs_that_require_grad_but_not_under_no_grad():
    x = torch.randn(4, 8)
    idx = routing(4, 2, 4, 8)
    handle = moe.dispatch(x, idx, num_experts=4)
    out = handle.recv_x * torch.ones(8, requires_grad=True)  # an expert's output
    with pytest.raises(RuntimeError, match="combine is forward-only .* expert_out requires grad"):
        moe.combine(out, handle)
    with torch.no_grad():
        assert torch.equal(moe.combine(out, handle), moe.combine(handle.recv_x, handle))


def test_a_call_after_an_error_works():
    x = torch.randn(4, 8)
    idx = routing(4, 2, 4, 8)
    with pytest.raises(hf.Error):
        moe.dispatch(x, idx * 0 + 9, num_experts=4)
    handle = moe.dispatch(x, idx, num_experts=4)
    assert torch.equal(moe.combine(handle.recv_x, handle), 2 * x)


def test_the_mask_switch_without_a_lost_rank_masks_nothing():
    program = hf.Program()
    with program:
        tokens = program.define_scalar("tokens")
        xv = program.define_tensor([tokens, 8], torch.float32, "x")
        iv = program.define_tensor([tokens, 2], torch.int64, "idx")
        wv = program.define_tensor([tokens, 2], torch.float32, "w")
        d = hf.moe_dispatch(xv, iv, wv, num_experts=4)
        program.add_output(hf.moe_combine(d.recv_x * 2.0, d, wv, num_tokens=xv.extent(0)))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    idx = routing(5, 2, 4, 5, masked=True)
    w = torch.rand(5, 2, generator=torch.Generator().manual_seed(6))
    masking = hf.HostIrEvaluator(program, mask_failed_ranks=True)
    plain = hf.HostIrEvaluator(program, mask_failed_ranks=False)
    assert torch.equal(masking.run([x, idx, w])[0], plain.run([x, idx, w])[0])
    assert masking.masked_ranks() == []
    assert hf.GraphRunner(program, mask_failed_ranks=True).masked_ranks() == []
    assert moe.masked_ranks() == []


def test_recover_refuses_a_mask_setting_that_is_not_a_bool():
    with pytest.raises(TypeError, match="mask_failed_ranks must be a bool or None"):
        moe.recover(mask_failed_ranks="yes")


def even_odd_handle(x):
    """Token t to expert t % 2 of 2 (one rank): expert 0 holds tokens 0, 2,
    4, expert 1 tokens 1, 3."""
    idx = (torch.arange(x.shape[0]) % 2).unsqueeze(1).to(x.device)
    return moe.dispatch(x, idx, num_experts=2)


def test_combine_refuses_a_handle_with_tokens_swapped_across_experts():
    # Both experts' rows stay in order and every (rank, token, pick) is
    # named once: only the dispatch's fingerprint tells that tokens 0 and 1
    # changed places.
    x = torch.randn(5, 8)
    handle = even_odd_handle(x)
    handle.recv_src_token[0], handle.recv_src_token[3] = 1, 0
    with pytest.raises(hf.Error, match="names rows from rank 0 .* that rank 0 did not send it"):
        moe.combine(handle.recv_x, handle)
    fresh = even_odd_handle(x)
    assert torch.equal(moe.combine(fresh.recv_x, fresh), x)


def test_combine_refuses_a_handle_with_tokens_swapped_in_one_expert():
    x = torch.randn(5, 8)
    handle = even_odd_handle(x)
    handle.recv_src_token[0], handle.recv_src_token[1] = 2, 0
    with pytest.raises(hf.Error, match=r"row 1 of the layout \(local expert 0, rank 0, token 0\) "
                                       "does not come after the row before it"):
        moe.combine(handle.recv_x, handle)
