"""``refsd conformance REFERENCE --against OTHER``: where a port's outputs leave a reference pack's.

REFERENCE is a sweep pack (refsd.sweep.pack: refsd's, or diffusers' from ``--oracle diffusers``).
OTHER is a pack of the same grid, or the simpler port format: a folder with one
``<case id>.safetensors`` per case (directly or under ``cases/``) holding at least ``out/latents``
and optionally ``out/step.<i>``, ``out/image``, ``out/noise``, ``out/init_latents`` and
``trace/<module path>`` tensors, under the names of the reference's files.

For each of the reference's ok cases, every ``out/`` tensor both files hold is compared with
refsd.compare (pass: ``|other - ref| <= atol + rtol |ref|`` elementwise; the case's own atol/rtol,
i.e. the grid's ``[tolerance]``, unless overridden), and the traces, when both have them, in the
reference's execution order: the first failing layer is the case's first divergence (as
``refsd compare`` reports it). A case passes when it has ``out/latents`` and nothing fails. The report
(``conformance.json``, ``conformance.md``, ``error_vs_step.png`` when per-step latents exist) gives
pass/fail per case, the worst cases, the first divergent layer of each failing traced case, and the
counts and worst errors by sampler, scheduler, size and model.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path


from refsd.errors import RefsdError
from refsd.files import atomic_write
from refsd.sweep.pack import MANIFEST, read_manifest

AXES = ("sampler", "scheduler", "size", "model")


def _tensors(path: Path) -> tuple[dict, dict]:
    """(name -> NumPy array, copied out of the mapping, metadata) of a safetensors file (refsd's
    strict reader)."""
    from refsd.weights import SafeTensorsFile

    with SafeTensorsFile(path) as f:
        return {k: f.numpy(k).copy() for k in f.keys()}, dict(f.metadata)


def _other_files(other: Path) -> tuple[dict, dict]:
    """(case id -> path, case id -> error of a failed run) for OTHER: a pack or a plain folder."""
    if (other / MANIFEST).is_file():
        entries = read_manifest(other)["cases"]
        files = {cid: other / e["path"] for cid, e in entries.items() if e.get("status", "ok") == "ok"}
        failed = {cid: e.get("error", "failed") for cid, e in entries.items() if e.get("status") == "failed"}
        return files, failed
    found = {}
    for folder in (other, other / "cases"):
        for p in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            found.setdefault(p.name.removesuffix(".safetensors"), p)
    return found, {}


def compare_case(ref: dict, ref_meta: dict, other: dict, *, atol: float, rtol: float) -> dict:
    """One case's comparison: outputs, per-step errors, the traces' first divergence."""
    from refsd.compare import compare, compare_tensors

    outputs, steps = {}, {}
    for key, r in ref.items():
        if not key.startswith("out/") or key not in other:
            continue
        row = compare_tensors(key[4:], other[key], r, atol=atol, rtol=rtol)
        outputs[key[4:]] = {"max_abs": row.max_abs, "max_rel": row.max_rel, "ok": row.ok, "n_bad": row.n_bad}
        if key.startswith("out/step."):
            steps[int(key[len("out/step."):])] = row.max_abs
    res = {"outputs": outputs, "steps": [steps[i] for i in sorted(steps)], "first_divergence": None,
           "traced": False, "missing": [k[4:] for k in ref if k.startswith("out/") and k not in other]}
    ref_trace = {k[6:]: v for k, v in ref.items() if k.startswith("trace/")}
    other_trace = {k[6:]: v for k, v in other.items() if k.startswith("trace/")}
    if ref_trace and other_trace:
        report = compare(other_trace, ref_trace, order=ref_meta.get("trace_order") or list(ref_trace),
                         atol=atol, rtol=rtol, allow_missing=True)
        res["traced"] = True
        res["trace_failed"] = len(report.failed)
        first = report.first_divergence
        if first is not None:
            row = report[first]
            res["first_divergence"] = {"name": first, "max_abs": row.max_abs, "max_rel": row.max_rel,
                                       "verdict": report.verdict()}
    lat = outputs.get("latents")
    res["ok"] = lat is not None and all(o["ok"] for o in outputs.values()) and res["first_divergence"] is None
    res["latents_max_abs"] = None if lat is None else lat["max_abs"]
    res["worst_max_abs"] = max((o["max_abs"] for o in outputs.values() if o["max_abs"] is not None), default=None)
    return res


def conformance(reference: str | Path, against: str | Path, *, out: str | Path | None = None,
                atol: float | None = None, rtol: float | None = None, worst: int = 10) -> dict:
    """Compare OTHER's cases with the reference pack's; write the report into ``out`` (if given) and
    return it (the JSON's dict)."""
    from refsd.golden import load_case

    ref_root, other_root = Path(reference), Path(against)
    if not other_root.is_dir():
        raise RefsdError(f"--against {against}: no such folder")
    entries = read_manifest(ref_root)["cases"]
    files, failed = _other_files(other_root)
    rows = []
    for cid, entry in entries.items():
        if entry.get("status") != "ok":
            continue
        case = load_case(cid, ref_root)  # checks the sha256
        a = case.meta["atol"] if atol is None else atol
        r = case.meta["rtol"] if rtol is None else rtol
        row = {"id": cid, "params": entry.get("params", case.meta["op"]["kwargs"].get("case", {})), "atol": a,
               "rtol": r}
        if cid in failed:
            row.update(ok=False, status="failed run", error=failed[cid])
        elif cid not in files:
            row.update(ok=False, status="missing")
        else:
            other, _ = _tensors(files[cid])
            row.update(compare_case(case.tensors, case.meta, other, atol=a, rtol=r))
            row["status"] = "pass" if row["ok"] else "FAIL"
        rows.append(row)
    if not rows:
        raise RefsdError(f"{reference}: the pack has no finished cases to compare")
    report = _report(rows, str(ref_root), str(other_root), worst)
    if out is not None:
        write_report(report, Path(out))
    return report


def _axis_value(params: dict, axis: str) -> str:
    if axis == "size":
        return f"{params.get('width')}x{params.get('height')}"
    return str(params.get(axis))


def _report(rows: list[dict], reference: str, against: str, worst: int) -> dict:
    def key(r):  # failing first, then by the largest output error
        return (r["ok"], -(r.get("worst_max_abs") or (math.inf if not r["ok"] else 0.0)))

    ranked = sorted(rows, key=key)
    by = {}
    for axis in AXES:
        groups: dict = {}
        for r in rows:
            g = groups.setdefault(_axis_value(r["params"], axis), {"cases": 0, "passed": 0, "worst_max_abs": 0.0})
            g["cases"] += 1
            g["passed"] += bool(r["ok"])
            g["worst_max_abs"] = max(g["worst_max_abs"], r.get("worst_max_abs") or 0.0)
        by[axis] = groups
    n_ok = sum(bool(r["ok"]) for r in rows)
    summary = {"cases": len(rows), "passed": n_ok, "failed": len(rows) - n_ok,
               "missing": sum(r["status"] == "missing" for r in rows),
               "failed_runs": sum(r["status"] == "failed run" for r in rows)}
    return {"format": 1, "reference": reference, "against": against, "summary": summary,
            "worst": [r["id"] for r in ranked[:worst]], "by": by, "cases": rows}


def _num(v) -> str:
    return "-" if v is None else f"{v:.3e}"


def markdown(report: dict) -> str:
    """The report as Markdown: summary, failing cases with their first divergent layer, the worst
    cases, and the tables by sampler / scheduler / size / model."""
    s = report["summary"]
    lines = [f"# Conformance: {report['against']} vs {report['reference']}", "",
             f"{s['passed']} of {s['cases']} cases pass; {s['failed']} fail ({s['missing']} missing, "
             f"{s['failed_runs']} failed runs).", ""]
    by_id = {r["id"]: r for r in report["cases"]}
    failing = [r for r in report["cases"] if not r["ok"]]
    if failing:
        lines += ["## Failing cases", "", "| case | status | latents max_abs | worst output max_abs | first divergent layer |",
                  "|---|---|---|---|---|"]
        for r in failing:
            fd = r.get("first_divergence")
            layer = f"`{fd['name']}` (max_abs {_num(fd['max_abs'])})" if fd else ("-" if r.get("traced") else "no trace")
            lines.append(f"| {r['id']} | {r['status']} | {_num(r.get('latents_max_abs'))} | "
                         f"{_num(r.get('worst_max_abs'))} | {layer} |")
        lines.append("")
    lines += ["## Worst cases", "", "| case | ok | worst output max_abs | atol | rtol |", "|---|---|---|---|---|"]
    for cid in report["worst"]:
        r = by_id[cid]
        lines.append(f"| {cid} | {'pass' if r['ok'] else 'FAIL'} | {_num(r.get('worst_max_abs'))} | {r['atol']:g} | "
                     f"{r['rtol']:g} |")
    for axis, groups in report["by"].items():
        lines += ["", f"## By {axis}", "", f"| {axis} | cases | passed | worst max_abs |", "|---|---|---|---|"]
        for name, g in groups.items():
            lines.append(f"| {name} | {g['cases']} | {g['passed']} | {_num(g['worst_max_abs'])} |")
    return "\n".join(lines) + "\n"


def plot_png(report: dict, *, width: int = 720, height: int = 420) -> bytes | None:
    """Error vs step as a PNG (Pillow, no matplotlib): log10 max |other - ref| of the latents after
    each step, one line per case (failing cases red, passing grey); None when no case has per-step
    latents."""
    from PIL import Image, ImageDraw

    series = [(r["steps"], r["ok"]) for r in report["cases"] if r.get("steps")]
    if not series:
        return None
    floor = 1e-12
    logs = [[math.log10(max(v, floor)) if v is not None and math.isfinite(v) else 0.0 for v in s] for s, _ in series]
    lo, hi = math.floor(min(min(v) for v in logs)), math.ceil(max(max(v) for v in logs))
    hi = hi if hi > lo else lo + 1
    n = max(len(v) for v in logs)
    left, right, top, bottom = 70, 20, 30, 50
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)

    def xy(i, v):
        x = left + (width - left - right) * (i / max(n - 1, 1))
        return x, top + (height - top - bottom) * (hi - v) / (hi - lo)

    d.rectangle([left, top, width - right, height - bottom], outline="black")
    for e in range(lo, hi + 1):
        _, y = xy(0, e)
        d.line([left - 5, y, left, y], fill="black")
        d.text((8, y - 6), f"1e{e}", fill="black")
    for i in range(n):
        x, _ = xy(i, lo)
        d.line([x, height - bottom, x, height - bottom + 5], fill="black")
        d.text((x - 3, height - bottom + 8), str(i), fill="black")
    d.text((left, 8), "max |other - reference| of the latents after each step (log scale)", fill="black")
    d.text((width // 2 - 15, height - 18), "step", fill="black")
    for (_, ok), v in sorted(zip(series, logs), key=lambda t: not t[0][1]):  # failing cases drawn last, on top
        pts = [xy(i, e) for i, e in enumerate(v)]
        color = (150, 150, 150) if ok else (220, 30, 30)
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for x, y in pts:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _finite(v):
    """The report with non-finite floats (a NaN output's error) as null: strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def write_report(report: dict, out: Path) -> list[Path]:
    """conformance.json, conformance.md and (with per-step latents) error_vs_step.png in ``out``,
    each written atomically."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RefsdError(f"--out {out}: cannot create the report folder ({e})") from None
    text = json.dumps(_finite(report), indent=1)
    written = [atomic_write(out / "conformance.json", lambda f: f.write(text.encode())),
               atomic_write(out / "conformance.md", lambda f: f.write(markdown(report).encode()))]
    png = plot_png(report)
    if png is not None:
        written.append(atomic_write(out / "error_vs_step.png", lambda f: f.write(png)))
    return written
