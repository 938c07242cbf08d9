"""The environment fingerprint and the capability table as the harness reports them."""

from __future__ import annotations

import torch

from conformance.hardware import NOT_VERIFIED, capability_rows, fingerprint, format_fingerprint
from olmo_attn.backends.capabilities import TABLE, unavailable_reason


def test_fingerprint_describes_machine_and_every_backend():
    fp = fingerprint()
    assert fp.torch == torch.__version__ and fp.python
    assert fp.arch == ("cpu" if fp.device == "cpu" else fp.arch) and fp.cpu_count >= 1
    assert [b.name for b in fp.backends] == list(TABLE)
    for b in fp.backends:
        assert b.available == (unavailable_reason(b.name) is None)
        assert b.version or b.reason, b  # a version, or the exact reason it is unavailable
        if not b.available:
            assert b.reason == unavailable_reason(b.name)
    assert set(fp.packages) == {"ring-flash-attn", "flash-linear-attention"}
    for p in fp.packages.values():
        assert p["version"] or p["reason"]
    d = fp.as_dict()
    assert d["backends"][0]["status"]


def test_unverified_backends_are_never_shown_as_verified():
    rows = {r["backend"]: r for r in capability_rows(fingerprint())}
    arch = fingerprint().arch  # verification is per architecture ("cpu" here: only torch)
    for name, spec in TABLE.items():
        assert rows[name]["verified"] == ("yes" if spec.verified_for(arch) else NOT_VERIFIED)
    for name in ("flash_2", "flash_3", "te"):
        if not TABLE[name].verified_for(arch):
            assert rows[name]["verified"] == NOT_VERIFIED
    assert rows["flash-linear-attention"]["verified"] == NOT_VERIFIED


def test_format_lines():
    lines = format_fingerprint(fingerprint())
    assert lines[0].startswith("device: ") and "torch: " in lines[1]
