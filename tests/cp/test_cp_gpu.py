"""Context parallelism on CUDA GPUs over NCCL (skipped without 2+ GPUs).

The same case families as the CPU tests, in bf16 on the torch backend's CUDA kernels, at world size
2 and at every GPU of the machine (4 or 8 when lent): gathered output and gradients against the
float64 reference within the error budget (docs/judging.md). The lead runs these with
``python -m pytest tests/cp/test_cp_gpu.py -m multigpu`` on a multi-GPU kind.
"""

from __future__ import annotations

import pytest
import torch
from cp_testlib import Case, ModuleCase, check_reports, run_all

from conformance.distributed import run_distributed

N_GPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.multigpu,
    pytest.mark.skipif(N_GPU < 2, reason=f"needs 2+ CUDA GPUs, found {N_GPU}"),
]

DOCS = [100, 1, 259, 33, 119]  # 512 tokens, awkward lengths


def _cases(W: int) -> list[Case]:
    H = max(8, W)
    out = []
    for strategy in ("zig_zag", "llama3", "ulysses"):
        for extra in ({}, {"doc_lens": DOCS}, {"window": 96}, {"doc_lens": DOCS, "window": 64}):
            for hkv in (H, 2, 1):
                out.append(Case(strategy, T=512, Hq=H, Hkv=hkv, D=64, dtype="bfloat16", **extra))
    out.append(Case("llama3", T=512, Hq=H, Hkv=4, D=128, dtype="bfloat16", doc_lens=DOCS, head_stride=2))
    out.append(
        Case("zig_zag", T=512, Hq=H, Hkv=2, D=128, dtype="bfloat16", doc_lens=DOCS, length_multiple=16)
    )
    return out


def _module_cases(W: int) -> list[ModuleCase]:
    H = max(8, W)
    return [
        ModuleCase(s, T=512, Hq=H, Hkv=2, D=64, doc_lens=DOCS, dtype="float32")
        for s in ("zig_zag", "llama3", "ulysses")
    ]


@pytest.mark.parametrize("W", sorted({2, min(N_GPU, 8)}) if N_GPU >= 2 else [2])
def test_cp_bf16_on_nccl(W):
    results = run_distributed(run_all, W, backend="nccl", args=(_cases(W), _module_cases(W)), timeout_s=580)
    r0 = results[0]
    failures = check_reports(r0["backend"])
    failures += [f for r in results for f in r["a2a"] + r["errors"]]
    for rep in r0["module"]:
        for name, t in rep["tensors"].items():
            if not t["finite"] or t["err_single"] > 2e-4 * max(1.0, t["scale"]):
                failures.append(f"W={W} {rep['case']} {name}: max|cp - single| = {t['err_single']:.3e}")
    assert not failures, "\n".join(failures)
