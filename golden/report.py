"""Measure refsd's error on every golden case and backend: the numbers behind golden/tolerances.py.

    python -m golden.report                  # print the table (markdown)
    python -m golden.report --update-readme  # also rewrite the table in golden/README.md

This is the consumer side (it runs refsd); capture.py, the producer, never imports refsd.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

from refsd import golden
from refsd import xp as rxp
from refsd.errors import BackendError

README = Path(__file__).resolve().parent / "README.md"
BACKENDS = ("numpy", "array-api-strict", "torch")


def measure(backends=BACKENDS) -> dict:
    """(component/op, dtype) -> {backend: (max_abs, max_rel, worst_ratio, n_results)}; model cases
    (text encoders, VAE, UNet: they carry ``param/`` tensors) are keyed component/case instead."""
    table: dict = defaultdict(dict)
    for name in backends:
        try:
            xp, device = rxp.backend(name)
        except BackendError as e:
            print(f"skipping {name}: {e}", file=sys.stderr)
            continue
        for cid in golden.manifest():
            case = golden.load_case(cid)
            # Model cases (they carry their weights) get a row per configuration, the rest per op.
            model = any(k.startswith("param/") for k in case.tensors)
            what = cid.split("/", 1)[1].rsplit("_", 1)[0] if model else case.meta["op"]["name"]
            key = (f"{case.meta['component']}/{what}", case.meta["dtype"])
            for r in golden.run_case(case, xp, device):
                a, rel, w, n = table[key].get(name, (0.0, 0.0, 0.0, 0))
                table[key][name] = (max(a, r.max_abs), max(rel, r.max_rel), max(w, r.worst_ratio), n + 1)
    return table


def markdown(table: dict) -> str:
    backends = sorted({b for row in table.values() for b in row}, key=BACKENDS.index)
    head = "| op | dtype | " + " | ".join(f"{b} max abs (rel)" for b in backends) + " | worst / tolerance |"
    lines = [head, "|" + "---|" * (len(backends) + 3)]
    for (op, dt), row in sorted(table.items()):
        cells = [f"{row[b][0]:.2e} ({row[b][1]:.1e})" if b in row else "-" for b in backends]
        worst = max(v[2] for v in row.values())
        lines.append(f"| {op} | {dt} | " + " | ".join(cells) + f" | {worst:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m golden.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--update-readme", action="store_true", help="rewrite the measured table in golden/README.md")
    args = ap.parse_args(argv)
    text = markdown(measure())
    print(text)
    if args.update_readme:
        block = f"<!-- measured:begin (python -m golden.report --update-readme) -->\n{text}\n<!-- measured:end -->"
        readme = README.read_text()
        pattern = re.compile(r"<!-- measured:begin.*?<!-- measured:end -->|MEASURED_TABLE", re.S)
        README.write_text(pattern.sub(lambda _: block, readme, count=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
