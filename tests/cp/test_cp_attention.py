"""Context-parallel attention on gloo (CPU), world sizes 2 and 4, through the multi-process runner.

Every load balancer × style × mask (causal, packed documents, sliding window, both) × GQA (MHA,
GQA, MQA): the gathered CP output and gradients against the float64 reference
(``reference.twins``) and the single-process torch backend — float64 within 1e-10, float32 within
the error budget ``2·max|low − ref| + atol``. Plus ``Attention`` + RoPE + documents under CP
against the single-process module, the all-to-all transforms, and the typed errors. One spawned
group per world size runs everything (start-up dominates); world size 8 is marked ``slow``.
"""

from __future__ import annotations

import pytest
from cp_testlib import Case, ModuleCase, check_reports, run_all

from conformance.distributed import run_distributed

DOCS = [7, 1, 17, 15]  # awkward: a 1-token document, odd lengths (zig-zag pads every one)
MASKS = {
    "causal": {},
    "docs": {"doc_lens": DOCS},
    "window": {"window": 6},
    "docs_window": {"doc_lens": DOCS, "window": 6},
}
GQA = [(4, 4), (4, 2), (4, 1)]


def _backend_cases(W: int) -> list[Case]:
    H = max(4, W)  # Ulysses splits the query heads over the ranks
    gqa = [(H, H), (H, 2), (H, 1)]
    cases = []
    for strategy in ("zig_zag", "llama3", "ulysses"):
        for mask in MASKS.values():
            for hq, hkv in gqa:
                cases.append(Case(strategy, Hq=hq, Hkv=hkv, **mask))
            cases.append(Case(strategy, dtype="float32", Hq=H, **mask))  # budget check
            if strategy != "ulysses":  # ring on the independent test kernel
                cases.append(Case(strategy, kernel="dense", Hq=H, Hkv=1, **mask))
        cases.append(Case(strategy, B=2, T=37, Hq=H))  # batch > 1, a length that needs padding
        cases.append(Case(strategy, B=2, T=37, Hq=H, window=50))  # window wider than the sequence
        cases.append(Case(strategy, Hq=H, Hkv=H, doc_lens=DOCS, packed=True))  # packed qkv
    cases.append(Case("zig_zag", doc_lens=DOCS, length_multiple=16, Hq=H))  # the transformer's multiple
    cases.append(Case("zig_zag", doc_lens=DOCS, window=3, length_multiple=3, Hq=H))  # odd padding tail
    cases.append(Case("llama3", doc_lens=DOCS, length_multiple=16, Hq=H, Hkv=4, head_stride=2))
    cases.append(Case("llama3", doc_lens=[40], head_stride=2, Hq=H, Hkv=2))  # one document
    cases.append(Case("ulysses", doc_lens=[37], T=37, length_multiple=8, Hq=H))  # padding document
    cases.append(Case("zig_zag", doc_lens=[5, 1, 1, 33], window=2, Hq=H, Hkv=1, seed=3))
    return cases


def _module_cases(W: int) -> list[ModuleCase]:
    H = max(4, W)
    cases = []
    for strategy in ("zig_zag", "llama3", "ulysses"):
        cases.append(ModuleCase(strategy, doc_lens=DOCS, Hq=H))
        multiple = 2 * W if strategy == "ulysses" else 4  # Ulysses: a multiple of W, on the global length
        cases.append(ModuleCase(strategy, doc_lens=DOCS, window=6, Hq=H, Hkv=1, length_multiple=multiple))
    cases.append(ModuleCase("zig_zag", Hq=H))  # plain sequence, global positions
    cases.append(ModuleCase("ulysses", window=5, rope="complex", Hq=H))
    cases.append(ModuleCase("llama3", doc_lens=[40], rope=None, Hq=H))
    cases.append(ModuleCase("zig_zag", doc_lens=DOCS, dtype="float32", Hq=H))
    return cases


@pytest.fixture(scope="module", params=[2, 4, pytest.param(8, marks=pytest.mark.slow)], ids=lambda w: f"W{w}")
def cp_run(request):
    W = request.param
    results = run_distributed(run_all, W, args=(_backend_cases(W), _module_cases(W)), timeout_s=600)
    return W, results


def test_backend_matrix_matches_reference_and_single_process(cp_run):
    W, results = cp_run
    reports = results[0]["backend"]
    assert len(reports) == len(_backend_cases(W))
    failures = check_reports(reports)
    # the single-process torch backend agrees too (same kernels, different summation order): in low
    # precision both sit within the budget of the reference, so within twice it of each other
    for rep in reports:
        for name, t in rep["tensors"].items():
            if rep["dtype"] == "float64":
                bound = 1e-10 * max(1.0, t["scale"])
            else:
                bound = 2 * (2 * t["err_low"] + t["atol"])
            if t["err_single"] > bound:
                failures.append(f"W={W} {rep['case']} {name}: max|cp - single| = {t['err_single']:.3e}")
    assert not failures, "\n".join(failures)


def test_module_with_rope_and_documents_matches_single_process(cp_run):
    W, results = cp_run
    failures = []
    for rep in results[0]["module"]:
        tol = 1e-10 if rep["dtype"] == "float64" else 5e-5
        for name, t in rep["tensors"].items():
            if not t["finite"]:
                failures.append(f"W={W} {rep['case']} {name}: NaN/Inf")
            elif t["err_single"] > tol * max(1.0, t["scale"]):
                failures.append(f"W={W} {rep['case']} {name}: max|cp - single| = {t['err_single']:.3e}")
        ref_tol = 1e-10 if rep["dtype"] == "float64" else 5e-5
        if rep["tensors"]["out"]["err_ref"] > ref_tol:
            failures.append(f"W={W} {rep['case']}: out vs reference {rep['tensors']['out']['err_ref']:.3e}")
    assert not failures, "\n".join(failures)


def test_all_to_all_transforms(cp_run):
    _, results = cp_run
    fails = [f for r in results for f in r["a2a"]]
    assert not fails, "\n".join(fails)


def test_typed_errors(cp_run):
    _, results = cp_run
    fails = [f for r in results for f in r["errors"]]
    assert not fails, "\n".join(fails)
