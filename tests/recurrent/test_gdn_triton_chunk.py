"""Our fused Triton chunk kernels (``olmo_attn.recurrent.triton_chunk``) without a GPU: run under
Triton's CPU interpreter (``TRITON_INTERPRET=1``, in a subprocess, since Triton reads it when a
kernel is defined) against the float64 PyTorch chunked kernel (itself checked against the
token-by-token reference in ``test_gdn_kernels.py``): outputs, final state and every gradient, rows
and documents of odd lengths, grouped value heads, negative eigenvalues, initial state; exact
document isolation (NaN planted in one document). float32 and float16 inputs: the interpreter's
bfloat16 ``tl.dot`` is broken (it multiplies the raw bits), so bfloat16 is checked on the GPU
(``test_gdn_gpu.py``, ``scripts/gpu/gdn_check.sh``). Skipped where ``triton`` does not import."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from olmo_attn.recurrent.triton_chunk import chunk_plan, n_slots_for

ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not importable"
)

PRELUDE = r"""
import sys
import torch
sys.path.insert(0, "tests/recurrent")
from gdn_testing import gdr_inputs, lengths_to_cu, rel_rms
from olmo_attn.recurrent import chunk_gated_delta_rule

NAMES = ("q", "k", "v", "g", "beta", "h0")


def run(kernel, inp, cu, dt, *, l2=True, h0=True, final=True, scale=None):
    lv = {n: (inp[n].detach().clone().to(dt if n not in ("g", "h0") else torch.float32).requires_grad_()
              if inp[n] is not None else None) for n in NAMES}
    if not h0:
        lv["h0"] = None
    o, f = chunk_gated_delta_rule(*[lv[n] for n in NAMES[:5]], initial_state=lv["h0"], output_final_state=True,
                                  use_qk_l2norm=l2, cu_seqlens=cu, kernel=kernel, scale=scale)
    gen = torch.Generator().manual_seed(5)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
    if final:
        loss = loss + (f.double() * torch.randn(f.shape, generator=gen, dtype=torch.float64)).sum()
    loss.backward()
    out = {"o": o, "final": f}
    out.update({n: lv[n].grad for n in NAMES if lv[n] is not None})
    return out


def compare(inp, cu, dt, tol, **kw):
    ref = run("torch", inp, cu, torch.float64, **kw)
    got = run("triton", inp, cu, dt, **kw)
    for n in ref:
        err = rel_rms(got[n], ref[n])
        assert got[n].shape == ref[n].shape, (n, got[n].shape, ref[n].shape)
        assert err < tol[n] if isinstance(tol, dict) else err < tol, (n, err, dt, kw)
    return got
"""

QUICK = (
    PRELUDE
    + r"""
# rows, GVA (HV = 2 H), negative eigenvalues, initial state, two chunks + a partial one, float32
inp = gdr_inputs(1, 140, 1, 2, 16, 32, seed=1)
compare(inp, None, torch.float32, 1e-5)
print("OK")
"""
)

# every kernel choice of ``FUSED`` (and a narrower value tile) against float64: documents, GVA,
# float32 and float16
SPLIT = (
    PRELUDE
    + r"""
from olmo_attn.recurrent import triton_chunk as tc
lens = [37, 64, 65, 20]
inp = gdr_inputs(1, sum(lens), 1, 2, 16, 32, n_seq=len(lens), seed=7)
fused = compare(inp, lengths_to_cu(lens), torch.float32, 1e-5)
tc.FUSED.update(prep=False, out=False)
split = compare(inp, lengths_to_cu(lens), torch.float32, 1e-5)
tc.FUSED.update(prep=True, out=True)
tc.TILES["state_out_values"] = 256  # value tiles of 16: two programs per head
narrow = compare(inp, lengths_to_cu(lens), torch.float32, 1e-5)
for n in fused:
    assert rel_rms(split[n], fused[n]) < 1e-5 and rel_rms(narrow[n], fused[n]) < 1e-5, n
# no grad: the output written by the recurrence (no states kept), at both tile widths
for width in (256, 8192):
    tc.TILES["state_out_values"] = width
    with torch.no_grad():
        x = {n: t.float() for n, t in inp.items()}
        o, f = chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"],
                                      output_final_state=True, use_qk_l2norm=True, cu_seqlens=lengths_to_cu(lens),
                                      kernel="triton")
    assert rel_rms(o, fused["o"]) < 1e-5 and rel_rms(f, fused["final"]) < 1e-5, width
# the recurrences' chunk spans computed from the sequence bounds or loaded from the plan: same bits
lens0 = [37, 0, 64, 65, 20, 0]
inp0 = gdr_inputs(1, sum(lens0), 1, 2, 16, 32, n_seq=len(lens0), seed=9)
spans = {}
for flag in (True, False):
    tc.FUSED["seq_offsets"] = flag
    spans[flag] = run("triton", inp0, lengths_to_cu(lens0), torch.float32)
for n in spans[True]:
    assert torch.equal(spans[True][n], spans[False][n]), n
BUD = {"o": 5e-3, "final": 5e-3, "q": 8e-3, "k": 8e-3, "v": 8e-3, "h0": 8e-3, "g": 2e-2, "beta": 2e-2}
compare(inp, lengths_to_cu(lens), torch.float16, BUD)
# one value head per q/k head: the L2-norm backward inside _dqkwg / _wy_bwd; states recomputed in
# the backward instead of kept; _wy_bwd's value products in the input dtype
inp = gdr_inputs(2, 100, 2, 2, 16, 32, seed=8)
kept = compare(inp, None, torch.float32, 1e-5)
tc.FUSED["keep_states"] = False
again = compare(inp, None, torch.float32, 1e-5)
tc.FUSED["keep_states"] = True
for n in kept:
    assert rel_rms(again[n], kept[n]) < 1e-5, n
compare(inp, None, torch.float16, BUD)
tc.FUSED["wy_lowp"] = False
compare(inp, None, torch.float16, BUD)
compare(gdr_inputs(1, 200, 2, 2, 16, 32, n_seq=3, seed=9), lengths_to_cu([30, 70, 100]), torch.float16, BUD)
print("OK")
"""
)

# _wy_bwd's key tiles: one tile per row (Dk 40 in a tile of 64) as the yardstick against three
# tiles of 16 (the last one partial), the L2-norm backward inside and outside it; each against
# float64, float32 and float16
CHOICES = (
    PRELUDE
    + r"""
from olmo_attn.recurrent import triton_chunk as tc
BUD = {"o": 5e-3, "final": 5e-3, "q": 8e-3, "k": 8e-3, "v": 8e-3, "h0": 8e-3, "g": 2e-2, "beta": 2e-2}
lens = [37, 64, 65, 20]
cu = lengths_to_cu(lens)
gva = gdr_inputs(1, sum(lens), 1, 2, 40, 32, n_seq=len(lens), seed=7)
one = gdr_inputs(2, 100, 2, 2, 40, 32, seed=8)
tc.TILES["wy_key_tile"] = 64  # one key tile per row as the yardstick
base = {"gva": compare(gva, cu, torch.float32, 1e-5), "one": compare(one, None, torch.float32, 1e-5)}
tc.TILES["wy_key_tile"] = 16
for name, inp, c in (("gva", gva, cu), ("one", one, None)):
    got = compare(inp, c, torch.float32, 1e-5)
    for n in got:
        assert rel_rms(got[n], base[name][n]) < 1e-5, (name, n)
    compare(inp, c, torch.float16, BUD)
tc.TILES["wy_key_tile"] = 32
# the prep's W and U from T read back as one tile, or by _wu after it, each also storing the
# read-out's intra-chunk matrix P for _out and the no-grad recurrence (pre_p): same as the
# registers' block sums to float32 rounding, with grad and without
def no_grad_out(inp, c):
    with torch.no_grad():
        x = {n: t.float() for n, t in inp.items()}
        return chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["h0"],
                                      output_final_state=True, use_qk_l2norm=True, cu_seqlens=c, kernel="triton")
ng = {"gva": no_grad_out(gva, cu), "one": no_grad_out(one, None)}
for mode in (1, 2):
    for pre_p in (False, True):
        tc.TILES["prep_wu"], tc.FUSED["pre_p"] = mode, pre_p
        for name, inp, c in (("gva", gva, cu), ("one", one, None)):
            got = compare(inp, c, torch.float32, 1e-5)
            for n in got:
                assert rel_rms(got[n], base[name][n]) < 1e-5, (mode, pre_p, name, n)
            o, f = no_grad_out(inp, c)
            assert rel_rms(o, ng[name][0]) < 1e-5 and rel_rms(f, ng[name][1]) < 1e-5, (mode, pre_p, name)
        compare(one, None, torch.float16, BUD)
tc.FUSED["pre_p"] = False
tc.TILES["prep_wu"] = 0
try:
    tc.FUSED["pre_p"] = True  # needs W, U as one tile
    compare(one, None, torch.float32, 1e-5)
    raise AssertionError("pre_p with the block-sum prep ran")
except ValueError as e:
    assert "prep_wu" in str(e), e
tc.FUSED["pre_p"] = False
# _dqkwg over key tiles (three of 16, the last partial; dg summed over them in _wy_bwd, the q
# L2-norm backward then outside it) against one tile per row
tc.TILES["dqkwg_key_tile"] = 16
for name, inp, c in (("gva", gva, cu), ("one", one, None)):
    got = compare(inp, c, torch.float32, 1e-5)
    for n in got:
        assert rel_rms(got[n], base[name][n]) < 1e-5, ("dqkwg tiles", name, n)
    compare(inp, c, torch.float16, BUD)
tc.TILES["dqkwg_key_tile"] = 128
tc.FUSED["prep"] = False
compare(one, None, torch.float16, BUD)
print("OK")
"""
)

FULL = (
    PRELUDE
    + r"""
# documents of odd lengths (empty, one token, exactly a chunk, a chunk plus one), float32
lens = [37, 0, 1, 64, 65, 20]
inp = gdr_inputs(1, sum(lens), 1, 2, 16, 32, n_seq=len(lens), seed=2)
compare(inp, lengths_to_cu(lens), torch.float32, 1e-5)
# several rows, no l2 norm, no initial state, no final-state gradient, custom scale, dims not powers of 2
inp = gdr_inputs(2, 70, 2, 2, 24, 40, seed=3, neg_eig=False)
inp["q"], inp["k"] = inp["q"] * 0.2, inp["k"] * 0.2
compare(inp, None, torch.float32, 1e-5, l2=False, h0=False, final=False, scale=0.3)
# float16 inputs: flash-linear-attention's budgets
BUD = {"o": 5e-3, "final": 5e-3, "q": 8e-3, "k": 8e-3, "v": 8e-3, "h0": 8e-3, "g": 2e-2, "beta": 2e-2}
lens = [50, 79]
inp = gdr_inputs(1, sum(lens), 1, 2, 32, 32, n_seq=2, seed=4)
compare(inp, lengths_to_cu(lens), torch.float16, BUD)

# document isolation: NaN in one token's v (document 1) or a perturbed document 1 leaves every other
# document's outputs, final states and gradients bit-identical
lens = [70, 45, 64, 9]
cu = lengths_to_cu(lens)
inp = gdr_inputs(1, sum(lens), 1, 2, 16, 32, n_seq=len(lens), seed=6)
clean = run("triton", inp, cu, torch.float32)
keep = torch.ones(sum(lens), dtype=torch.bool)
keep[70:115] = False
for what in ("nan", "perturb"):
    bad = {n: (t.clone() if t is not None else None) for n, t in inp.items()}
    if what == "nan":
        bad["v"][0, 80, 1, 3] = float("nan")
    else:
        bad["k"][0, 70:115] += 1.0
        bad["g"][0, 70:115] -= 0.5
    got = run("triton", bad, cu, torch.float32)
    for n in ("o", "q", "k", "v", "g", "beta"):
        assert torch.equal(got[n][0, keep], clean[n][0, keep]), (what, n)
    for n in ("final", "h0"):
        assert torch.equal(got[n][[0, 2, 3]], clean[n][[0, 2, 3]]), (what, n)
    if what == "nan":
        # contained per document (and value column), not per token: inside its chunk a NaN also reaches earlier tokens
        # (a zero of the triangular matrices times NaN in the chunk products)
        assert torch.isnan(got["o"][0, 80:115, 1, 3]).all() and not torch.isnan(got["o"][0, :, 0]).any()
print("OK")
"""
)


def _run(script: str, timeout: int) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-3000:] + r.stderr[-3000:]


@needs_triton
def test_triton_chunk_matches_float64_under_the_interpreter():
    _run(QUICK, 300)


@needs_triton
def test_triton_chunk_fused_and_split_forward_kernels_agree():
    _run(SPLIT, 600)


@needs_triton
def test_triton_chunk_key_tiles_match_float64_and_one_tile():
    _run(CHOICES, 600)


@needs_triton
@pytest.mark.slow
def test_triton_chunk_documents_dtypes_isolation_under_the_interpreter():
    _run(FULL, 900)


def test_chunk_plan_slots_never_straddle_documents():
    lens = [37, 0, 1, 64, 65, 200, 0]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    n_slots = n_slots_for(sum(lens), len(lens), True, sum(lens))
    start, length, off = chunk_plan(cu, n_slots)
    assert start.shape == length.shape == (n_slots,) and off.shape == (len(lens) + 1,)
    covered = torch.zeros(sum(lens), dtype=torch.int32)
    for n in range(len(lens)):
        a, b = int(off[n]), int(off[n + 1])
        assert b - a == -(-lens[n] // 64)
        for s in range(a, b):
            lo, ln = int(start[s]), int(length[s])
            assert 0 < ln <= 64 and int(cu[n]) <= lo and lo + ln <= int(cu[n + 1])
            covered[lo : lo + ln] += 1
    assert bool((covered == 1).all())
    assert bool((length[int(off[-1]) :] == 0).all())
    # rows without documents: exactly B * ceil(T / 64) slots
    cu_rows = torch.arange(0, 3 * 100 + 1, 100, dtype=torch.int32)
    start, length, off = chunk_plan(cu_rows, n_slots_for(300, 3, False, 100))
    assert length.tolist() == [64, 36] * 3 and off.tolist() == [0, 2, 4, 6]


def test_chunk_plan_is_computed_once_per_offsets_tensor():
    from olmo_attn.recurrent import triton_chunk as tc

    cu = torch.tensor([0, 70, 200, 256], dtype=torch.int32)
    n = n_slots_for(256, 3, True, 256)
    first = tc._plan_for(cu, n)
    assert tc._plan_for(cu, n) is first  # forward and backward of one step share the plan
    for got, want in zip(first, chunk_plan(cu, n)):
        assert torch.equal(got, want)
    same_values = cu.clone()
    assert tc._plan_for(same_values, n) is not first  # another tensor: its own plan
    cu[1] = 64  # changed in place: the version counter moves, the plan is rebuilt
    for got, want in zip(tc._plan_for(cu, n), chunk_plan(cu, n)):
        assert torch.equal(got, want)
    assert not torch.equal(tc._plan_for(cu, n)[1], first[1])


def test_recurrence_value_tiles_fill_the_multiprocessors():
    from olmo_attn.recurrent import triton_chunk as tc

    # B=1, 16 heads, Dv=256 at 64 columns: 64 programs; 128 still fit 132 SMs, 256 do not
    assert tc._fill_sms(64, rows=16, Dv=256, sms=132) == 32
    assert tc._fill_sms(64, rows=32, Dv=256, sms=132) == 64  # B=2: already one wave
    assert tc._fill_sms(64, rows=1, Dv=256, sms=132) == 16  # never below 16 columns
    assert tc._fill_sms(64, rows=16, Dv=256, sms=0) == 64  # off CUDA (interpreter): unchanged
    old = tc.TILES["fill_sms"]
    try:
        tc.TILES["fill_sms"] = 0
        assert tc._fill_sms(64, rows=16, Dv=256, sms=132) == 64
    finally:
        tc.TILES["fill_sms"] = old
