"""Building and printing programs from Python."""

import gc

import pytest
import torch

import hostfuse as hf


def mlp_program():
    program = hf.Program()
    with program:
        tokens = program.define_scalar("tokens")
        x = program.define_tensor([tokens, 8], torch.float32, "x")
        w = program.define_tensor([4, 8], torch.float32, "w")
        h = hf.silu(hf.linear(x, w))
        program.add_output(hf.sum(h * h, 1))
    return program


def test_printed_program_names_inputs_extents_and_ops():
    text = str(mlp_program())
    assert "input T0 'x': f32[tokens, 8]" in text
    assert "input T1 'w': f32[4, 8]" in text
    assert "linear(T0, T1)" in text
    assert "silu(" in text
    assert "output" in text and "f32[tokens]" in text


def test_none_size_is_a_symbolic_extent():
    program = hf.Program()
    with program:
        x = program.define_tensor([None, 3], torch.float32, "x")
    assert x.ndim == 2
    assert isinstance(x.shape[0], str) and x.shape[1] == 3


def test_shared_scalar_extent_prints_once_by_name():
    program = hf.Program()
    with program:
        tokens = program.define_scalar("tokens")
        a = program.define_tensor([tokens, 2], torch.float32, "a")
        b = program.define_tensor([tokens], torch.float32, "b")
    assert a.shape[0] == "tokens" and b.shape[0] == "tokens"
    assert a.extent(0) is tokens or str(a.extent(0)) == str(tokens)


def test_default_dtype_is_float32():
    program = hf.Program()
    with program:
        x = program.define_tensor([2])
    assert x.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                   torch.float64, torch.int64, torch.int32,
                                   torch.bool])
def test_define_tensor_keeps_dtype(dtype):
    program = hf.Program()
    with program:
        x = program.define_tensor([2, 2], dtype)
    assert x.dtype == dtype


@pytest.mark.parametrize(
    "build, op",
    [
        (lambda x, y: x + y, "add"),
        (lambda x, y: x - y, "sub"),
        (lambda x, y: x * y, "mul"),
        (lambda x, y: x / y, "div"),
        (lambda x, y: x + 2.0, "add"),
        (lambda x, y: 2.0 * x, "mul"),
        (lambda x, y: 1.0 / x, "div"),
        (lambda x, y: -x, "neg"),
    ],
)
def test_python_operators_build_ops(build, op):
    program = hf.Program()
    with program:
        x = program.define_tensor([3])
        y = program.define_tensor([3])
        program.add_output(build(x, y))
    assert f"{op}(" in str(program)


def test_cast_changes_dtype():
    program = hf.Program()
    with program:
        x = program.define_tensor([3], torch.float32)
        y = hf.cast(x, torch.bfloat16)
    assert y.dtype == torch.bfloat16


def test_inputs_and_outputs_lists():
    program = mlp_program()
    assert [v.name for v in program.inputs] == ["x", "w"]
    assert len(program.outputs) == 1


def test_values_keep_their_program_alive():
    out = mlp_program().outputs[0]
    gc.collect()
    assert "f32[tokens]" in str(out) or "T" in str(out)
    assert out.dtype == torch.float32


def test_topk_returns_values_and_indices():
    program = hf.Program()
    with program:
        x = program.define_tensor([5, 8])
        values, indices = hf.topk(x, 2)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape[1] == 2


def test_moe_dispatch_outputs_are_named_in_the_printout():
    program = hf.Program()
    with program:
        tokens = program.define_scalar("tokens")
        x = program.define_tensor([tokens, 16], torch.float32, "x")
        idx = program.define_tensor([tokens, 2], torch.int64, "idx")
        d = hf.moe_dispatch(x, idx, num_experts=4)
        program.add_output(hf.moe_combine(d.recv_x, d, num_tokens=x.extent(0)))
    text = str(program)
    for name in ("recv_x=", "recv_src_rank=", "recv_expert_counts=",
                 "n_tokens_from_rank="):
        assert name in text
    assert d.recv_weights is None


def test_fusion_prints_inside_the_program():
    fusion = hf.Fusion()
    with fusion:
        a = fusion.define_tensor([None, 4])
        fusion.add_output(hf.relu(a) * 2.0)
    program = hf.Program()
    with program:
        x = program.define_tensor([None, 4], name="x")
        (y,) = hf.run_fusion(fusion, [x])
        program.add_output(y)
    assert "relu" in str(fusion)
    assert "RunFusion" in str(program) or "run_fusion" in str(program).lower()


def test_grouped_matmul_builds():
    program = hf.Program()
    with program:
        x = program.define_tensor([None, 8])
        w = program.define_tensor([2, 8, 4])
        counts = program.define_tensor([2], torch.int64)
        y = hf.grouped_matmul(x, w, counts)
    assert y.shape[1] == 4


def test_building_outside_with_says_how_to_build():
    program = hf.Program()
    with program:
        x = program.define_tensor([2, 4], torch.float32, "x")
    with pytest.raises(hf.Error, match="with program:"):
        hf.linear(x, x)
