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


@pytest.mark.parametrize("reduce, mode", [("auto", "per_pick"), ("per_rank", "per_rank")])
def test_moe_layer_example_on_two_cpu_ranks(reduce, mode):
    # auto on CPUs is per_pick (the collective backend's faster mode).
    output = run_ranks(2, REPO / "examples" / "python" / "moe_layer.py", "--cpu",
                       "--steps", "3", "--reduce", reduce)
    assert f"reduce={mode}," in output, output[-3000:]
    assert "check: OK" in output, output[-3000:]


def test_moe_layer_example_with_hostfuse_grouped_gemms_on_two_cpu_ranks():
    output = run_ranks(2, REPO / "examples" / "python" / "moe_layer.py", "--cpu",
                       "--steps", "3", "--grouped-gemm", "hostfuse")
    assert "grouped_gemm=hostfuse," in output, output[-3000:]
    assert "check: OK" in output, output[-3000:]


def run_plain_ranks(script):
    """Runs ``script`` as 3 ranks in plain processes (torchrun would stop the
    survivors when a rank dies); returns their exit codes and output."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = []
    for rank in range(3):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="3", LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE="3", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), HOSTFUSE_COMM_TIMEOUT_S="20",
                   OMP_NUM_THREADS="1")
        ranks.append(subprocess.Popen(
            [sys.executable, str(RANKS / script)], env=env,
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in ranks:
            outputs.append(process.communicate(timeout=120)[0])
    finally:
        for process in ranks:
            process.kill()
    return [p.returncode for p in ranks], "\n".join(outputs)


def test_survivors_of_a_killed_rank_recover():
    codes, output = run_plain_ranks("recover_ranks.py")
    assert codes == [0, 0, -9], output[-3000:]
    assert len(re.findall(r"rank [01]: recovered, ok", output)) == 2, output[-3000:]


def test_survivors_mask_the_experts_of_a_killed_rank():
    codes, output = run_plain_ranks("mask_ranks.py")
    assert codes == [0, -9, 0], output[-3000:]
    assert len(re.findall(r"rank [02]: masked, ok", output)) == 2, output[-3000:]
