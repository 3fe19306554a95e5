"""Every error path of the bindings: C++ errors arrive as hostfuse.Error
with the C++ message; wrong Python types as TypeError."""

import pytest
import torch

import hostfuse as hf


def two_input_program():
    program = hf.Program()
    with program:
        x = program.define_tensor([None, 4], torch.float32, "x")
        w = program.define_tensor([3, 4], torch.float32, "w")
        program.add_output(hf.linear(x, w))
    return program


def test_error_is_a_runtime_error():
    assert issubclass(hf.Error, RuntimeError)


def test_wrong_input_count_has_the_cpp_message():
    with pytest.raises(hf.Error, match="the program takes 2 inputs, but 1 were given"):
        hf.HostIrEvaluator(two_input_program()).run([torch.zeros(2, 4)])


def test_wrong_input_dtype_names_the_input():
    with pytest.raises(hf.Error, match="'w'") as info:
        hf.HostIrEvaluator(two_input_program()).run(
            [torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.float64)]
        )
    assert "f64" in str(info.value) or "Double" in str(info.value) or "double" in str(info.value)


def test_wrong_input_size_names_the_input():
    with pytest.raises(hf.Error, match="'w'"):
        hf.HostIrEvaluator(two_input_program()).run([torch.zeros(2, 4), torch.zeros(5, 4)])


def test_non_tensor_input_is_named_by_position():
    with pytest.raises(hf.Error, match="input 1 must be a torch.Tensor"):
        hf.HostIrEvaluator(two_input_program()).run([torch.zeros(2, 4), "w"])


def test_none_input_is_refused():
    with pytest.raises(hf.Error, match="input 0 must be a torch.Tensor"):
        hf.HostIrEvaluator(two_input_program()).run([None, torch.zeros(3, 4)])


def test_none_where_a_tensor_is_needed_in_a_builder():
    with pytest.raises(TypeError):
        hf.silu(None)


def test_wrong_type_in_a_builder():
    with pytest.raises(TypeError):
        hf.sum("x", 1)


def test_evaluator_needs_a_program():
    with pytest.raises(TypeError):
        hf.HostIrEvaluator(None)


def test_dtype_must_be_a_torch_dtype():
    program = hf.Program()
    with program:
        with pytest.raises(hf.Error, match="dtype must be a torch.dtype, got str"):
            program.define_tensor([2], "float32")


def test_unsupported_dtype_is_refused():
    program = hf.Program()
    with program:
        with pytest.raises(hf.Error):
            program.define_tensor([2], torch.complex64)


def test_size_of_a_wrong_type_is_refused():
    program = hf.Program()
    with program:
        with pytest.raises(hf.Error, match="a size must be an int, None"):
            program.define_tensor(["tokens", 2])


def test_bad_operand_shapes_raise_when_built():
    program = hf.Program()
    with program:
        a = program.define_tensor([3, 4])
        b = program.define_tensor([5, 6])
        with pytest.raises(hf.Error):
            hf.matmul(a, b)


def test_unknown_moe_backend_lists_the_known_ones():
    program = hf.Program()
    with program:
        x = program.define_tensor([None, 8])
        idx = program.define_tensor([None, 2], torch.int64)
        with pytest.raises(hf.Error, match="backend must be one of 'collective', 'cuda'"):
            hf.moe_dispatch(x, idx, num_experts=4, backend="nccl")


def test_moe_dispatch_needs_num_experts_by_keyword():
    program = hf.Program()
    with program:
        x = program.define_tensor([None, 8])
        idx = program.define_tensor([None, 2], torch.int64)
        with pytest.raises(TypeError):
            hf.moe_dispatch(x, idx, None, 4)


def test_run_fusion_refuses_a_program():
    program = hf.Program()
    with program:
        x = program.define_tensor([2])
        with pytest.raises(hf.Error, match="must be a hostfuse.Fusion"):
            hf.run_fusion(hf.Program(), [x])


def test_the_next_run_works_after_an_error():
    evaluator = hf.HostIrEvaluator(two_input_program())
    with pytest.raises(hf.Error):
        evaluator.run([torch.zeros(2, 4)])
    (out,) = evaluator.run([torch.ones(2, 4), torch.ones(3, 4)])
    assert torch.equal(out, torch.full((2, 3), 4.0))
