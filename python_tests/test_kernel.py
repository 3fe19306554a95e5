"""Fusions compiled to CUDA C and through NVRTC. Without a GPU, NVRTC still
compiles to PTX for compute_90, which checks the generated source fully."""

import pytest
import torch

import hostfuse as hf
from conftest import needs_gpu


def rmsnorm_like():
    fusion = hf.Fusion()
    with fusion:
        x = fusion.define_tensor([None, 64], torch.float32, "x")
        w = fusion.define_tensor([64], torch.float32, "w")
        mean_square = hf.sum(x * x, 1, keep_dim=True) / 64.0
        fusion.add_output(x * hf.rsqrt(mean_square + 1e-6) * hf.broadcast(w, [True, False]))
    return fusion


def pointwise():
    fusion = hf.Fusion()
    with fusion:
        a = fusion.define_tensor([None, 8], torch.bfloat16)
        b = fusion.define_tensor([None, 8], torch.bfloat16)
        fusion.add_output(hf.silu(a) * b)
    return fusion


@pytest.mark.parametrize("make", [rmsnorm_like, pointwise], ids=["rmsnorm", "pointwise"])
def test_generated_source_is_a_kernel(make):
    source = hf.kernel.cuda_source(make())
    assert "__global__" in source
    assert source == hf.kernel.cuda_source(make())  # deterministic


def test_contiguous_vectorized_signature_changes_the_source():
    plain = hf.kernel.cuda_source(pointwise())
    vector = hf.kernel.cuda_source(pointwise(), contiguous=True, vector_width=8, index32=True)
    assert plain != vector


def test_pitched_rows_signature_addresses_rows_by_their_pitch():
    source = hf.kernel.cuda_source(pointwise(), pitched_rows=True, vector_width=8)
    assert "_pitch" in source and "row * " in source
    assert source != hf.kernel.cuda_source(pointwise(), contiguous=True, vector_width=8)
    binary = hf.kernel.compile(source, arch=90, cubin=False)
    assert b".entry" in binary["image"]
    with pytest.raises(hf.Error, match="both contiguous and of pitched rows; choose one"):
        hf.kernel.cuda_source(pointwise(), contiguous=True, pitched_rows=True)
    with pytest.raises(hf.Error, match="vector_width 8 needs contiguous or pitched_rows"):
        hf.kernel.cuda_source(pointwise(), vector_width=8)
    with pytest.raises(hf.Error, match="pitched_rows, for a fusion that cannot have it"):
        hf.kernel.cuda_source(rmsnorm_like(), pitched_rows=True)
    limited = hf.kernel.cuda_source(pointwise(), pitched_rows=True, vector_width=8,
                                    row_limited=True)
    assert "row_counts[g]" in limited and "numel_all" in limited
    assert b".entry" in hf.kernel.compile(limited, arch=90, cubin=False)["image"]
    with pytest.raises(hf.Error, match="row_limited, for a fusion that cannot have it"):
        hf.kernel.cuda_source(rmsnorm_like(), row_limited=True)


@pytest.mark.parametrize("make", [rmsnorm_like, pointwise], ids=["rmsnorm", "pointwise"])
def test_nvrtc_compiles_to_ptx_without_a_gpu(make):
    binary = hf.kernel.compile(hf.kernel.cuda_source(make()), arch=90, cubin=False)
    assert binary["target"] == "compute_90"
    assert b".entry" in binary["image"]


def test_nvrtc_error_carries_its_log():
    with pytest.raises(hf.Error, match="error") as info:
        hf.kernel.compile("__global__ void k() { undeclared_name = 1; }")
    assert "undeclared_name" in str(info.value)


@needs_gpu
def test_fusion_runs_on_the_gpu_like_aten():
    fusion = rmsnorm_like()
    program = hf.Program()
    with program:
        x = program.define_tensor([None, 64], torch.float32, "x")
        w = program.define_tensor([64], torch.float32, "w")
        program.add_output(hf.run_fusion(fusion, [x, w])[0])
    x = torch.randn(33, 64, device="cuda")
    w = torch.randn(64, device="cuda")
    (out,) = hf.HostIrEvaluator(program).run([x, w])
    expected = x * torch.rsqrt((x * x).sum(1, keepdim=True) / 64.0 + 1e-6) * w
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
