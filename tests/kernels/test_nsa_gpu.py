"""The reference on a CUDA GPU (half precision against fp64; bf16 is only meaningful on the GPU), and the backend
on the GPU. The Triton path is tested in test_nsa_triton.py."""

import pytest
import torch

from nsa_compile import NSAConfig
from nsa_compile.kernels import nsa_reference
from tests.kernels.test_nsa import make, rel, spans

pytestmark = pytest.mark.gpu

CFG = NSAConfig(block_size=32, block_stride=16, selection_block_size=64, top_n=4, window_size=64)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)],
                         ids=["fp32", "bf16", "fp16"])
def test_reference_on_cuda_matches_fp64_forward_and_backward(dtype, tol):
    B, Hq, Hkv, T = 2, 28, 4, 1024
    # the same (rounded) inputs for both: the comparison measures the computation, not the input rounding
    q, k, v, gates = (t.to(dtype).double() for t in make(B, Hq, Hkv, T, T, D=128, seed=7))
    vm = spans(B, T, [[(40, 1000)], [(0, 300), (320, 1024)]])
    ref_in = [t.clone().requires_grad_() for t in (q, k, v, gates)]
    params = (None, None, CFG.block_size, CFG.block_stride, CFG.selection_block_size, CFG.top_n, CFG.window_size)
    ref = nsa_reference(*ref_in, vm, *params)
    go = torch.randn_like(ref)
    ref.backward(go)
    dev = [t.to("cuda", dtype).requires_grad_() for t in (q, k, v, gates)]
    out = nsa_reference(*dev, vm.cuda(), *params)
    out.backward(go.to("cuda", dtype))
    assert out.dtype == dtype
    assert rel(out.double().cpu(), ref.detach()) <= tol
    for a, b in zip(dev, ref_in):
        assert rel(a.grad.double().cpu(), b.grad) <= tol


def test_cuda_backend_on_tiny_qwen_bf16_dense_equivalent():
    import nsa_compile
    from nsa_compile.models import build_video_inputs, tiny_qwen2_5_vl

    torch._dynamo.reset()
    model, proc = tiny_qwen2_5_vl(num_layers=2, dtype=torch.bfloat16)
    model = model.cuda()
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (4, 224, 336, 3), generator=g, dtype=torch.uint8)
    inputs = {k: v.cuda() if torch.is_tensor(v) else v
              for k, v in build_video_inputs(proc, video, "What happens?").items()}
    with torch.no_grad():
        ref = model(**inputs).logits.float()
        compiled = nsa_compile.compile(model, CFG.dense_equivalent())
        out = compiled(**inputs).logits.float()
    assert len(compiled.nsa_report.rewritten_modules) == 2
    assert rel(out, ref) <= 1e-2
