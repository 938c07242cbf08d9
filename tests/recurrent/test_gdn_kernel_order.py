"""GatedDeltaNet's measured kernel order: the shipped table, the rule that derives it from
benchmark and conformance results, its writer, and the layer's ``backend="auto"`` walking it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from olmo_attn.recurrent import GatedDeltaNet
from olmo_attn.recurrent import fla as fla_mod
from olmo_attn.recurrent import kernel_order as ko

ROOT = Path(__file__).resolve().parents[2]


def _speed(subject: str, pas: str, shape: str, ms: float, docs: bool = False) -> dict:
    return {
        "subject": subject,
        "pass": pas,
        "shape": shape,
        "median_ms": ms,
        **({"n_docs": 5} if docs else {}),
    }


def test_shipped_order_for_hopper():
    # measured on the H200: fla's forward leads on rows, ours on documents and for training (fla
    # refuses its Hopper backward, so it follows unmeasured); an unmeasured architecture: ours first
    assert ko.kernel_order("sm_90", train=False, documents=False) == ("fla", "triton")
    assert ko.kernel_order("sm_90", train=False, documents=True) == ("triton", "fla")
    assert ko.kernel_order("sm_90", train=True, documents=False) == ("triton", "fla")
    assert ko.kernel_order("sm_80", train=True, documents=False) == ko.DEFAULT_ORDER
    assert ko.kernel_order(None, train=False, documents=False) == ko.DEFAULT_ORDER
    entry = ko.load_orders()["sm_90"]
    assert entry["_source"].startswith("benchmarks/gdn_order.py from ") and entry["excluded"] == {}


def test_derive_ranks_by_geometric_mean_and_excludes_failures():
    older = {"triton_speed": [_speed("fla", "fwd", "a", 9.0)]}
    res = {
        "triton_speed": [
            _speed("ours:triton", "fwd", "a", 1.0),
            _speed("fla", "fwd", "a", 4.0),  # replaces the older row
            _speed("ours:triton", "fwd", "b", 4.0),
            _speed("fla", "fwd", "b", 0.5),
            _speed("ours:triton", "fwd", "c", 2.0),  # fla did not run here: not a common shape
            _speed("ours:triton", "fwd+bwd", "a", 3.0),
            _speed("ours:triton", "fwd", "d", 2.0, docs=True),
            _speed("fla", "fwd", "d", 1.0, docs=True),
            _speed("sdpa[cudnn]", "fwd", "a", 0.1),  # not a GDN kernel
            {"subject": "ours:triton", "pass": "first call", "shape": "a"},
        ],
    }
    entry = ko.derive([older, res])
    # rows: triton sqrt(1 * 4) = 2, fla sqrt(4 * 0.5) = 1.41
    assert entry["infer_rows"] == ["fla", "triton"] and entry["_infer_rows_shapes"] == ["a", "b"]
    assert abs(entry["_infer_rows_ms"]["fla"] - 2**0.5) < 1e-3
    assert entry["infer_documents"] == ["fla", "triton"]
    assert entry["train_rows"] == ["triton", "fla"]  # fla did not run: after the measured
    assert entry["train_documents"] == list(ko.DEFAULT_ORDER) and entry["excluded"] == {}
    bad = {
        "triton_correctness": [{"case": "bench-8k", "kernel": "fla", "pass": False}],
        "results": [{"id": "gpu/gdn/triton/rule/float32", "family": "gdn", "backend": "triton",
                     "status": "failed", "message": "o over budget"}],
    }  # fmt: skip
    excluded = ko.derive([res, bad])["excluded"]
    assert set(excluded) == {"fla", "triton"} and "bench-8k" in excluded["fla"]
    assert "gpu/gdn/triton/rule/float32" in excluded["triton"]
    # gdn_bench names our Triton kernel "ours:triton"; "ours" (the PyTorch kernel) is not ranked
    ours_bad = {"triton_correctness": [{"case": "docs", "kernel": "ours:triton", "pass": False}],
                "correctness": [{"case": "small", "kernel": "ours", "pass": False}]}  # fmt: skip
    assert set(ko.derive([res, ours_bad])["excluded"]) == {"triton"}


def test_write_order_keeps_other_architectures_and_kernel_order_drops_excluded(tmp_path, monkeypatch):
    path = tmp_path / "order.json"
    path.write_text(json.dumps({"sm_80": {"infer_rows": ["fla", "triton"]}}))
    entry = {"infer_rows": ["fla", "triton"], "excluded": {"fla": "failed"}}
    assert ko.write_order("sm_90", entry, source="test", path=path) == path
    table = json.loads(path.read_text())
    assert set(table) == {"sm_80", "sm_90"} and table["sm_90"]["_source"] == "test"
    monkeypatch.setattr(ko, "load_orders", lambda: table)
    assert ko.kernel_order("sm_90", train=False, documents=False) == ("triton",)
    assert ko.kernel_order("sm_80", train=False, documents=False) == ("fla", "triton")


def test_gdn_order_cli_rederives_the_shipped_entry(tmp_path):
    inputs = [
        "benchmarks/results/h200-2026-12-04-gdn-speed.json",
        "benchmarks/results/h200-2026-12-04-r13-gdn-speed.json",
        "conformance/reports/NVIDIA_H200-2026-12-04-gdn-partial.json",
    ]
    r = subprocess.run(
        [sys.executable, "benchmarks/gdn_order.py", *inputs, "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    derived = json.loads(r.stdout)["sm_90"]
    shipped = ko.load_orders()["sm_90"]
    assert {k: v for k, v in shipped.items() if k != "_source"} == derived
    other = tmp_path / "a100.json"  # another architecture: refused, nothing written
    other.write_text(json.dumps({"env": {"sm": "8.0"}, "triton_speed": []}))
    r = subprocess.run([sys.executable, "benchmarks/gdn_order.py", inputs[0], str(other), "--out",
                        str(tmp_path / "o.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode != 0 and "one GPU architecture" in r.stderr and not (tmp_path / "o.json").exists()


def test_layer_auto_walks_the_measured_order(monkeypatch):
    m = GatedDeltaNet(d_model=32, n_heads=2)
    x = torch.randn(1, 4, 32)
    monkeypatch.setattr(fla_mod, "fla_available", lambda: True)
    monkeypatch.setattr(
        fla_mod,
        "fla_kernel_usable",
        lambda device, dtype, *, backward: (False, "refused") if backward else (True, None),
    )
    monkeypatch.setattr(GatedDeltaNet, "_ours_on_gpu", lambda self, x: True)
    seen = []

    def order(arch, *, train, documents):
        seen.append((train, documents))
        return ("fla", "triton") if not train and not documents else ("triton", "fla")

    monkeypatch.setattr(ko, "kernel_order", order)
    m.eval()
    assert m._choose(x, needs_grad=False) == (True, True)  # inference on rows: fla first
    assert m._choose(x, needs_grad=False, documents=True) == (False, True)  # documents: ours
    assert m._choose(x, needs_grad=True) == (False, True)  # training: ours
    m.train()  # no grad in training mode (a reentrant checkpoint's first pass): the training order
    assert m._choose(x, needs_grad=False) == (False, True)
    assert seen == [(False, False), (False, True), (True, False), (True, False)]
    monkeypatch.setattr(ko, "kernel_order", lambda arch, *, train, documents: ("fla", "triton"))
    assert m._choose(x, needs_grad=True) == (False, True)  # fla first, but its guard refuses: ours
    monkeypatch.setattr(GatedDeltaNet, "_ours_on_gpu", lambda self, x: False)
    assert m._choose(x, needs_grad=True) == (False, True)  # neither: our PyTorch kernel
    m.backend = "triton"
    assert m._choose(x, needs_grad=False) == (False, True)  # forced: no order consulted
