"""Programs run by HostIrEvaluator on CPU tensors, checked against ATen
computed directly from the same inputs."""

import pytest
import torch

import hostfuse as hf


def run(build, *inputs):
    """Builds a program whose inputs have the inputs' shapes and dtypes and
    whose outputs build(*values) returns; runs it."""
    program = hf.Program()
    with program:
        values = [program.define_tensor(list(t.shape), t.dtype) for t in inputs]
        outputs = build(*values)
        if not isinstance(outputs, (tuple, list)):
            outputs = [outputs]
        for output in outputs:
            program.add_output(output)
    return hf.HostIrEvaluator(program).run(list(inputs))


def rand(*shape, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype)


UNARY = {
    "neg": torch.neg,
    "abs": torch.abs,
    "relu": torch.relu,
    "exp": torch.exp,
    "log": lambda t: torch.log(t),
    "sqrt": lambda t: torch.sqrt(t),
    "rsqrt": lambda t: torch.rsqrt(t),
    "reciprocal": torch.reciprocal,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": torch.nn.functional.silu,
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_matches_aten(name):
    x = rand(4, 5, seed=1)
    if name in ("log", "sqrt", "rsqrt"):
        x = x.abs() + 0.1
    (out,) = run(getattr(hf, name), x)
    torch.testing.assert_close(out, UNARY[name](x))


BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
}


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_matches_aten(name):
    a, b = rand(3, 4, seed=2), rand(3, 4, seed=3)
    (out,) = run(getattr(hf, name), a, b)
    torch.testing.assert_close(out, BINARY[name](a, b))


@pytest.mark.parametrize("name", ["lt", "le", "gt", "ge", "eq", "ne"])
def test_comparison_selects_with_where(name):
    a, b = rand(6, seed=4), rand(6, seed=5)
    b[0] = a[0]
    (out,) = run(lambda x, y: hf.where(getattr(hf, name)(x, y), x, y), a, b)
    torch.testing.assert_close(out, torch.where(getattr(torch, name)(a, b), a, b))


def test_scalar_operands_on_both_sides():
    x = rand(5, seed=6)
    (a, b, c) = run(lambda t: (t + 1.5, 2.0 - t, 3.0 / (t * t + 1.0)), x)
    torch.testing.assert_close(a, x + 1.5)
    torch.testing.assert_close(b, 2.0 - x)
    torch.testing.assert_close(c, 3.0 / (x * x + 1.0))


def test_reductions_softmax_and_cast():
    x = rand(4, 7, seed=7)
    s, m, p, h = run(
        lambda t: (hf.sum(t, 1), hf.max(t, 0, keep_dim=True), hf.softmax(t, 1),
                   hf.cast(t, torch.bfloat16)),
        x,
    )
    torch.testing.assert_close(s, x.sum(1))
    torch.testing.assert_close(m, x.max(0, keepdim=True).values)
    torch.testing.assert_close(p, torch.softmax(x, 1))
    assert h.dtype == torch.bfloat16 and torch.equal(h, x.to(torch.bfloat16))


def test_matmul_and_linear_with_bias():
    x, w, b = rand(5, 8, seed=8), rand(3, 8, seed=9), rand(3, seed=10)
    (lin,) = run(lambda x, w, b: hf.linear(x, w, b), x, w, b)
    torch.testing.assert_close(lin, x @ w.T + b)
    (mm,) = run(hf.matmul, x, w.T.contiguous())
    torch.testing.assert_close(mm, x @ w.T)


def test_broadcast_adds_a_dimension():
    x, v = rand(3, 4, seed=11), rand(4, seed=12)
    (out,) = run(lambda x, v: x * hf.broadcast(v, [True, False]), x, v)
    torch.testing.assert_close(out, x * v)


def test_topk_matches_torch_topk():
    x = rand(6, 10, seed=13)
    values, indices = run(lambda t: hf.topk(t, 3), x)
    expected = torch.topk(x, 3)
    torch.testing.assert_close(values, expected.values)
    assert torch.equal(indices, expected.indices)


def test_topk_softmax_matches_torch():
    logits = rand(6, 10, seed=18)
    weights, indices = run(lambda t: hf.topk_softmax(t, 3), logits)
    top = torch.topk(torch.softmax(logits, -1), 3)
    assert torch.equal(indices, top.indices)
    torch.testing.assert_close(weights, top.values / top.values.sum(-1, keepdim=True))
    raw, _ = run(lambda t: hf.topk_softmax(t, 3, renormalize=False), logits)
    torch.testing.assert_close(raw, top.values)


def test_grouped_matmul_matches_a_loop_over_groups():
    x, w = rand(7, 8, seed=14), rand(3, 8, 5, seed=15)
    counts = torch.tensor([2, 0, 5])
    (out,) = run(hf.grouped_matmul, x, w, counts)
    expected = torch.cat([x[:2] @ w[0], x[2:7] @ w[2]])
    torch.testing.assert_close(out, expected)


def test_grouped_matmul_silu_mul_epilogue_is_the_product_then_the_activation():
    x = rand(9, 16, seed=20, dtype=torch.bfloat16)
    w = rand(3, 16, 12, seed=21, dtype=torch.bfloat16)
    counts = torch.tensor([2, 0, 5])  # rows 7 and 8 are padding
    (act,) = run(
        lambda a, b, c: hf.grouped_matmul(a, b, c, epilogue="silu_mul"), x, w, counts
    )
    (product,) = run(hf.grouped_matmul, x, w, counts)
    assert act.shape == (9, 6) and act.dtype == torch.bfloat16
    # The same values as the product followed by the activation on its
    # bf16 halves, computed in fp32.
    gate, up = product[:, :6].float(), product[:, 6:].float()
    assert torch.equal(act, (torch.nn.functional.silu(gate) * up).to(torch.bfloat16))
    # And close to the whole computation in fp32.
    full = torch.cat([x[:2].float() @ w[0].float(), x[2:7].float() @ w[2].float()])
    expected = torch.nn.functional.silu(full[:, :6]) * full[:, 6:]
    torch.testing.assert_close(act[:7].float(), expected, rtol=3e-2, atol=3e-2)
    with pytest.raises(hf.Error, match="epilogue must be 'none' or 'silu_mul'"):
        run(lambda a, b, c: hf.grouped_matmul(a, b, c, epilogue="gelu"), x, w, counts)
    with pytest.raises(hf.Error, match="known even number"):
        run(
            lambda a, b, c: hf.grouped_matmul(a, b, c, epilogue="silu_mul"),
            x,
            w[:, :, :5].contiguous(),
            counts,
        )


def test_narrow_halves_are_views_a_fusion_reads_in_place():
    fusion = hf.Fusion()
    with fusion:
        gate = fusion.define_tensor([None, 4])
        up = fusion.define_tensor([None, 4])
        fusion.add_output(hf.silu(gate) * up)
    x = rand(5, 8, seed=19)

    def build(v):
        gate, up = hf.narrow(v, 1, 0, 4), hf.narrow(v, -1, 4, 4)
        return gate, hf.run_fusion(fusion, [gate, up])[0]

    view, act = run(build, x)
    assert view._is_view() and view.data_ptr() == x.data_ptr()
    torch.testing.assert_close(act, torch.nn.functional.silu(x[:, :4]) * x[:, 4:])
    program = hf.Program()
    with program:
        v = program.define_tensor([5, 8])
        with pytest.raises(hf.Error, match="a slice of length 4 from 6 in dim 1 does not fit"):
            hf.narrow(v, 1, 6, 4)


def test_run_fusion_on_cpu_matches_aten():
    fusion = hf.Fusion()
    with fusion:
        a = fusion.define_tensor([None, 4])
        b = fusion.define_tensor([4])
        fusion.add_output(hf.relu(a) * hf.broadcast(b, [True, False]) + 1.0)
    x, y = rand(3, 4, seed=16), rand(4, seed=17)
    (out,) = run(lambda x, y: hf.run_fusion(fusion, [x, y])[0], x, y)
    torch.testing.assert_close(out, torch.relu(x) * y + 1.0)


def test_run_fusion_with_row_counts_computes_the_counted_rows():
    # On CPUs every row is computed; a GPU kernel computes only the counted
    # ones (the rest is unspecified), so only those are compared.
    fusion = hf.Fusion()
    with fusion:
        a = fusion.define_tensor([None, 4])
        fusion.add_output(hf.relu(a) * 2.0)
    x, counts = rand(6, 4, seed=20), torch.tensor([2, 1])
    program = hf.Program()
    with program:
        xv = program.define_tensor([6, 4])
        cv = program.define_tensor([2], torch.int64)
        program.add_output(hf.run_fusion(fusion, [xv], row_counts=cv)[0])
    assert ", row_counts=" in str(program)
    (out,) = hf.HostIrEvaluator(program).run([x, counts])
    torch.testing.assert_close(out[:3], torch.relu(x[:3]) * 2.0)


def test_symbolic_extent_takes_every_size():
    program = hf.Program()
    with program:
        tokens = program.define_scalar("tokens")
        x = program.define_tensor([tokens, 3])
        program.add_output(hf.sum(x * x, 1))
    evaluator = hf.HostIrEvaluator(program)
    for n in (1, 4, 9):
        x = rand(n, 3, seed=n)
        (out,) = evaluator.run([x])
        torch.testing.assert_close(out, (x * x).sum(1))


def test_outputs_are_torch_tensors_sharing_no_copy_of_the_inputs():
    x = rand(4, seed=18)
    program = hf.Program()
    with program:
        t = program.define_tensor([4])
        program.add_output(t)
    (out,) = hf.HostIrEvaluator(program).run([x])
    assert out.data_ptr() == x.data_ptr()


def test_program_stays_editable_after_an_evaluator_took_it():
    program = hf.Program()
    with program:
        x = program.define_tensor([3])
        program.add_output(x * 2.0)
    first = hf.HostIrEvaluator(program)
    with program:
        program.add_output(x + 1.0)
    second = hf.HostIrEvaluator(program)
    t = rand(3, seed=19)
    assert len(first.run([t])) == 1
    assert len(second.run([t])) == 2
