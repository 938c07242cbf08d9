"""Write one GPU architecture's Gated DeltaNet kernel order (``olmo_attn/recurrent/kernel_order.json``)
from benchmark and conformance results of that architecture.

Inputs: ``benchmarks/gdn_bench.py`` JSON (its ``triton_speed`` rows rank the kernels, its
``triton_correctness`` / ``correctness`` rows exclude a kernel that failed against float64) and
conformance JSON reports (a failed ``gdn`` case of ``triton`` or ``fla`` excludes it). Later files
replace earlier rows of the same kernel, pass and shape. All inputs must come from one
architecture. The rule is :func:`olmo_attn.recurrent.kernel_order.derive`.

    python benchmarks/gdn_order.py benchmarks/results/h200-2026-12-04-r12-gdn-choices.json \\
        benchmarks/results/h200-2026-12-04-r13-gdn-speed.json \\
        conformance/reports/NVIDIA_H200-2026-12-04-gdn-partial.json
    python benchmarks/gdn_order.py RESULTS... --out /tmp/order.json     # elsewhere
    python benchmarks/gdn_order.py RESULTS... --dry-run                 # print the entry only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from olmo_attn.recurrent import kernel_order as ko  # noqa: E402


def arch_of(result: dict[str, Any]) -> str | None:
    """``sm_XY`` of a gdn_bench result (``env.sm``) or a conformance report (``fingerprint.arch``)."""
    fp = result.get("fingerprint") or {}
    if fp.get("arch"):
        return str(fp["arch"])
    sm = (result.get("env") or {}).get("sm")
    return f"sm_{str(sm).replace('.', '')}" if sm else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, help="gdn_bench and conformance JSON files")
    ap.add_argument(
        "--out", type=Path, default=None, help=f"order file (default {ko.ORDER_FILE.name} in the package)"
    )
    ap.add_argument("--dry-run", action="store_true", help="print the derived entry, write nothing")
    args = ap.parse_args(argv)
    results = [json.loads(p.read_text()) for p in args.results]
    arches = {arch_of(r) for r in results}
    if len(arches) != 1 or None in arches:
        raise SystemExit(f"the inputs must come from one GPU architecture, got {sorted(map(str, arches))}")
    (arch,) = arches
    entry = ko.derive(results)
    if not any(entry[f"_{slot}_ms"] for slot in ko.SLOTS):
        raise SystemExit("no triton_speed rows in the inputs: nothing to rank")
    if args.dry_run:
        print(json.dumps({arch: entry}, indent=2, sort_keys=True))
        return 0
    names = ", ".join(p.name for p in args.results)
    source = f"benchmarks/gdn_order.py from {names}"
    path = ko.write_order(str(arch), entry, source=source, path=args.out)
    print(
        f"{arch}: "
        + "; ".join(f"{s} {entry[s]}" for s in ko.SLOTS)
        + f"; excluded {entry['excluded']} -> {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
