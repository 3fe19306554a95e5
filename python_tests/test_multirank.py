"""hostfuse.moe and MoE programs on several ranks, launched with torchrun:
1, 2 and 3 CPU ranks over Gloo; with GPUs, one rank per GPU with the cuda
backend inside torch.cuda.graph."""

import re

import pytest

from conftest import GPUS, RANKS, REPO, needs_gpu, run_ranks


def oks(output):
    return re.findall(r"rank \d+: ok, \d+ checks", output)


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_moe_on_cpu_ranks(ranks):
    output = run_ranks(ranks, RANKS / "moe_ranks.py", "--device", "cpu")
    assert len(oks(output)) == ranks, output[-3000:]


@needs_gpu
def test_cuda_backend_graph_replays_are_bit_identical_to_collective():
    output = run_ranks(GPUS, RANKS / "moe_ranks.py", "--device", "cuda",
                       "--replays", "100")
    assert len(oks(output)) == GPUS, output[-3000:]


def test_moe_layer_example_on_two_cpu_ranks():
    output = run_ranks(2, REPO / "examples" / "python" / "moe_layer.py", "--cpu",
                       "--steps", "3")
    assert "check: OK" in output, output[-3000:]
