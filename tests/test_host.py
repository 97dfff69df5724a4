"""to_host: frames reach the host unchanged, through page-locked memory from a GPU."""
import pytest
import torch

from worldmodel.inference.host import to_host


def test_cpu_tensor_is_returned_as_is():
    t = torch.randint(0, 256, (3, 8, 6, 3), dtype=torch.uint8)
    out = to_host(t)
    assert out.device.type == "cpu" and torch.equal(out, t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copy_is_pinned_and_exact_for_a_strided_view():
    t = torch.randint(0, 256, (4, 16, 12, 3), dtype=torch.uint8, device="cuda")
    view = t.permute(0, 2, 1, 3)  # not contiguous
    expected = view.cpu()
    out = to_host(view)  # no synchronize after: to_host returns once the copy has landed
    assert out.is_pinned() and out.is_contiguous() and out.shape == view.shape
    assert torch.equal(out, expected)
