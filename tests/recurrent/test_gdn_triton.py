"""The Triton decoding step (``olmo_attn.recurrent.triton_step``) without a GPU: run under Triton's
CPU interpreter (``TRITON_INTERPRET=1``, in a subprocess, since Triton reads it when a kernel is
defined) against the eager step. Skipped where ``triton`` does not import (plain CPU installs);
on CUDA, ``test_gdn_gpu.py`` runs the compiled kernel."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not importable")

SCRIPT = r"""
import sys
import torch
sys.path.insert(0, "tests/recurrent")
from gdn_testing import gdr_inputs, rel_rms
from olmo_attn.recurrent import gated_delta_rule_step
from olmo_attn.recurrent.recurrent import step_kernel_failures

# (B, H, HV, Dk, Dv, input dtype, l2norm): GVA, non-power-of-two dims, several value blocks, bf16
CASES = [
    (3, 2, 4, 16, 32, torch.float32, True),
    (2, 1, 3, 24, 40, torch.bfloat16, True),
    (2, 2, 2, 128, 256, torch.float32, False),
    (1, 1, 1, 8, 300, torch.float16, True),
]
for B, H, HV, Dk, Dv, dt, l2 in CASES:
    inp = gdr_inputs(B, 5, H, HV, Dk, Dv, dtype=torch.float32, seed=Dk)
    s_eager = inp["h0"].clone().float()
    s_tri = s_eager.clone()
    ptr = s_tri.data_ptr()
    for t in range(5):  # five tokens in a row, in place
        args = [inp[n][:, t].to(dt) for n in ("q", "k", "v", "beta")]
        g = inp["g"][:, t]
        if t == 2:  # a non-contiguous q
            args[0] = torch.cat([args[0], args[0]], -1)[..., ::2]
        o_e, s_eager = gated_delta_rule_step(args[0], args[1], args[2], g, args[3], s_eager,
                                             use_qk_l2norm=l2, kernel="eager")
        o_t, s_tri = gated_delta_rule_step(args[0], args[1], args[2], g, args[3], s_tri,
                                           use_qk_l2norm=l2, kernel="triton")
        assert not step_kernel_failures(), step_kernel_failures()
        assert o_t.dtype == dt and o_t.shape == (B, HV, Dv)
        tol = 1e-6 if dt == torch.float32 else 8e-3
        assert rel_rms(o_t, o_e) < tol, (B, H, HV, Dk, Dv, dt, t, rel_rms(o_t, o_e))
        assert rel_rms(s_tri, s_eager) < 1e-6, (B, H, HV, Dk, Dv, dt, t)
    assert s_tri.data_ptr() == ptr  # in place
    # out of place: the old state is left alone
    old = s_tri.clone()
    o2, s2 = gated_delta_rule_step(args[0], args[1], args[2], g, args[3], s_tri, use_qk_l2norm=l2,
                                   kernel="triton", inplace=False)
    assert torch.equal(s_tri, old) and s2.data_ptr() != s_tri.data_ptr()
print("OK")
"""


def test_triton_step_matches_eager_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-3000:] + r.stderr[-3000:]
