"""The compiled FlexAttention at PyTorch's recompile limit: a ``CompileLimitWarning`` and the
uncompiled function (same math), where PyTorch alone would fall back to eager without a word
(the H200 ``--full`` run of 2026-12-03 met that: bit-level edge probes saw the switch)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo.config as dynamo_config

from olmo_attn.exceptions import CompileLimitWarning
from olmo_attn.ops import flex


def _f(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch):
    torch._dynamo.reset()
    g = torch.compile(_f, dynamic=False, backend="eager")
    monkeypatch.setattr(flex, "_compiled", g)
    monkeypatch.setattr(flex, "flex_attention_fn", lambda: _f)
    with dynamo_config.patch(recompile_limit=3):
        yield g
    torch._dynamo.reset()


def test_limit_warns_and_runs_uncompiled(compiled) -> None:
    seen = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for n in range(1, 7):
            x = torch.arange(n, dtype=torch.float32)
            torch.testing.assert_close(flex._call_flex(compiled, x), _f(x))
            seen.append(sum(issubclass(r.category, CompileLimitWarning) for r in w))
    assert seen == [0, 0, 0, 1, 2, 3]  # three shapes compiled, each later one warned about
    msg = str(next(r.message for r in w if issubclass(r.category, CompileLimitWarning)))
    assert "recompile_limit (3" in msg and "torch._dynamo.reset()" in msg
    assert dynamo_config.fail_on_recompile_limit_hit is False  # only patched around the call


def test_limit_as_error_fails_loudly(compiled) -> None:
    """What the conformance harness does: the warning is an error inside a case."""
    for n in range(1, 4):
        flex._call_flex(compiled, torch.ones(n))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileLimitWarning)
        with pytest.raises(CompileLimitWarning, match="uncompiled"):
            flex._call_flex(compiled, torch.ones(9))


def test_other_callables_pass_straight_through(compiled) -> None:
    assert flex._call_flex(_f, torch.ones(2)).tolist() == [3.0, 3.0]


def test_suppress_errors_keeps_pytorchs_own_behaviour(compiled) -> None:
    """``suppress_errors`` and ``fail_on_recompile_limit_hit`` exclude each other: left alone."""
    with dynamo_config.patch(suppress_errors=True), warnings.catch_warnings():
        warnings.simplefilter("error", CompileLimitWarning)
        for n in range(1, 7):
            assert flex._call_flex(compiled, torch.ones(n)).tolist() == [3.0] * n
