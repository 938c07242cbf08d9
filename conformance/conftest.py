"""pytest options for the conformance cases (``pytest conformance``).

Options (or the environment variables in brackets, for runs that pass ``conformance`` among other
paths): ``--conformance-tier`` [``OLMO_ATTN_CONFORMANCE_TIER``] (default: config, cpu, multiproc,
plus gpu / multigpu where CUDA is available), ``--conformance-full`` [``OLMO_ATTN_CONFORMANCE_FULL=1``],
``--conformance-backends`` [``OLMO_ATTN_CONFORMANCE_BACKENDS``], ``--conformance-seed``
[``OLMO_ATTN_CONFORMANCE_SEED``]. Use pytest's own ``-k`` to filter by case id.
"""

from __future__ import annotations


def pytest_addoption(parser):
    group = parser.getgroup("conformance", "olmo-attn conformance cases")
    group.addoption(
        "--conformance-tier", default=None, help="tiers: config,cpu,multiproc,gpu,multigpu or all"
    )
    group.addoption("--conformance-full", action="store_true", default=None, help="the full matrix")
    group.addoption("--conformance-backends", default=None, help="comma-separated backends (default: all)")
    group.addoption("--conformance-seed", type=int, default=None, help="seed of shapes and inputs")
