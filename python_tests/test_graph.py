"""GraphRunner from Python: one CUDA graph per input signature, replayed."""

import pytest
import torch

import hostfuse as hf
from conftest import needs_gpu


def program():
    p = hf.Program()
    with p:
        tokens = p.define_scalar("tokens")
        x = p.define_tensor([tokens, 16], torch.float32, "x")
        w = p.define_tensor([8, 16], torch.float32, "w")
        p.add_output(hf.sum(hf.silu(hf.linear(x, w)), 1))
    return p


def test_graph_runner_refuses_cpu_inputs_by_name():
    runner = hf.GraphRunner(program())
    with pytest.raises(hf.Error, match="CUDA"):
        runner.run([torch.zeros(2, 16), torch.zeros(8, 16)])


def test_capture_problems_of_a_capturable_program_are_empty():
    assert hf.find_capture_problems(program(), torch.device("cuda", 0)) == []


def test_devices_may_be_given_as_strings_as_torch_takes_them():
    assert hf.find_capture_problems(program(), "cuda:0") == []
    evaluator = hf.HostIrEvaluator(program(), device="cpu")
    (out,) = evaluator.run([torch.ones(3, 16), torch.zeros(8, 16)])
    assert out.shape == (3,)
    hf.GraphRunner(program(), device="cuda:0")  # made without a GPU; runs need one
    with pytest.raises(RuntimeError, match="cuda:x"):
        hf.HostIrEvaluator(program(), device="cuda:x")
    with pytest.raises(hf.Error, match="device must be a torch.device or a string"):
        hf.find_capture_problems(program(), None)


def test_capture_problems_name_the_collective_moe_node():
    p = hf.Program()
    with p:
        x = p.define_tensor([None, 8])
        idx = p.define_tensor([None, 2], torch.int64)
        d = hf.moe_dispatch(x, idx, num_experts=2)
        p.add_output(d.recv_x)
    problems = hf.find_capture_problems(p, torch.device("cuda", 0))
    assert problems and any("MoeDispatch" in problem for problem in problems)


@needs_gpu
def test_replays_match_the_evaluator():
    p = program()
    runner = hf.GraphRunner(p, copy_outputs=True)
    evaluator = hf.HostIrEvaluator(p)
    w = torch.randn(8, 16, device="cuda")
    for step in range(5):
        x = torch.randn(12, 16, device="cuda")
        (got,) = runner.run([x, w])
        (want,) = evaluator.run([x, w])
        torch.testing.assert_close(got, want)
    assert runner.num_graphs == 1 and runner.num_replays >= 4
