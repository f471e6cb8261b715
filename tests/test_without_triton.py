"""Without triton (macOS, Windows, a CPU-only install): ``import gkl_kernels`` and every CPU entry
point work on the plain-PyTorch path, nothing imports triton, and ``backend="triton"`` is a clear
error. Run in a subprocess whose ``import triton`` fails (``sys.modules["triton"] = None``), with
``TRITON_INTERPRET=1`` still set, as this suite sets it."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.torch_only  # runs no Triton code

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # import triton raises ImportError
    import torch
    import gkl_kernels
    from gkl_kernels import SparseTeacher

    torch.manual_seed(0)
    s, t = torch.randn(6, 40, requires_grad=True), torch.randn(6, 40)
    labels = torch.tensor([0, 1, -100, 3, 4, 5])
    losses = [
        gkl_kernels.gkl_loss(s, t, labels=labels),
        gkl_kernels.gkl_loss(s, t, weights=torch.rand(40, 40)),
        gkl_kernels.jsd_loss(s, t, beta=0.3, labels=labels),
        gkl_kernels.gkl_loss(s, SparseTeacher(*t.log_softmax(-1).topk(5, dim=-1)[::-1])),
        gkl_kernels.vocab_parallel_jsd_loss(s, t),
        gkl_kernels.GKLLoss()(s, t),
    ]
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    ht, wt = torch.randn(6, 8), torch.randn(40, 8)
    losses += [
        gkl_kernels.fused_linear_gkl(h, w, ht, wt, labels=labels),
        gkl_kernels.FusedLinearDistillationLoss()(h, w, ht, wt, labels),
        gkl_kernels.FusedLinearJSDLoss()(h, w, ht, wt, labels),
    ]
    sum(losses).backward()
    assert all(torch.isfinite(x) for x in losses) and s.grad is not None and w.grad is not None
    assert sys.modules["triton"] is None, "something replaced the blocked triton"
    assert not [name for name in sys.modules if name.startswith("triton.")]
    try:
        gkl_kernels.gkl_loss(s, t, backend="triton")
    except ValueError as error:
        assert "needs triton, which is not installed" in str(error), error
    else:
        raise AssertionError("backend='triton' ran without triton")
    print("ok")
""")


def test_every_cpu_entry_point_runs_without_triton():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=Path(__file__).parents[1],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
