"""Shared helpers of the Python tests: GPU markers and a torchrun launcher
for the multi-rank scripts in ranks/."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
RANKS = Path(__file__).resolve().parent / "ranks"
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

needs_gpu = pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU; none is visible")


def run_ranks(n, script, *args, timeout=300):
    """Runs `script` as `n` ranks with torchrun on this host; fails the test
    with every rank's output when any rank fails or it runs past `timeout`.
    Returns the combined output."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        "--tee=3",
        str(script),
        *map(str, args),
    ]
    env = dict(os.environ)
    env.setdefault("HOSTFUSE_COMM_TIMEOUT_S", "60")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{script.name} on {n} ranks ran past {timeout} s:\n{e.stdout}")
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(
            f"{script.name} on {n} ranks exited with {done.returncode}:\n"
            + output[-6000:]
        )
    return output
