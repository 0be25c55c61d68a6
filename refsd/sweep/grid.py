"""A sweep's grid file (TOML) -> validated, bounded list of cases.

The grid names what to vary and what to record; ``expand`` takes the product (models x prompts x
samplers x schedulers x sizes x steps x cfg x seeds) in that order, so case order and case ids are
stable across runs (resuming depends on it). Every value is checked before any model is loaded or
any worker started: a bad grid is ONE ``RefsdError`` line naming the key, and the number of cases
is bounded (``max_cases``, at most ``HARD_MAX_CASES``) before the product is materialised.

Grid reference: docs/sweeps.md. The pipeline checks are the pipelines' own
(``refsd.pipelines.core.check_settings`` on each model's facts, read from headers only), so a grid
that passes validation only fails in a worker for reasons of the run itself (NaN, memory, a
corrupt weight body).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from refsd.errors import RefsdError

HARD_MAX_CASES = 100_000
DEFAULT_MAX_CASES = 10_000
DEMO = "demo"  # the packaged tiny model (refsd.pipelines.demo), by name instead of a path
# refsd's pipeline tolerance against diffusers' pipelines, golden/tolerances.py ("pipeline", "float32");
# tests/test_sweep.py asserts the two agree (the golden table is not part of the installed package).
PIPELINE_TOLERANCE = (5e-4, 2e-5)

# [sweep] keys: name -> (kind, default); "list" keys take a value or a list of values.
SWEEP_KEYS = {
    "models": ("list", None), "prompts": ("list", None), "negative_prompt": ("str", ""),
    "samplers": ("list", ["euler"]), "schedulers": ("list", ["normal"]), "seeds": ("list", [0]),
    "sizes": ("list", None), "steps": ("list", [20]), "cfg": ("list", [7.5]), "parity": ("str", "diffusers"),
    "rng": ("str", "torch-cpu"), "backend": ("str", "numpy"), "dtype": ("str", "float32"),
    "attention": ("str", "sliced"), "clip_skip": ("int?", None), "skip_unsupported": ("bool", False),
    "max_cases": ("int", DEFAULT_MAX_CASES),
}
RECORD_KEYS = {"step_latents": ("bool", True), "image": ("bool", False), "trace": ("bool", False),
               "trace_steps": ("list", [])}
TOLERANCE_KEYS = {"atol": ("float", PIPELINE_TOLERANCE[0]), "rtol": ("float", PIPELINE_TOLERANCE[1])}
SECTIONS = {"sweep": SWEEP_KEYS, "record": RECORD_KEYS, "tolerance": TOLERANCE_KEYS}


@dataclass(frozen=True)
class Case:
    """One run of the grid: txt2img on one model with one set of settings."""

    id: str
    model: str  # the grid's model entry: "demo" or a path
    prompt: str
    prompt_index: int
    negative_prompt: str
    sampler: str
    scheduler: str
    width: int
    height: int
    steps: int
    cfg: float
    seed: int

    def params(self) -> dict:
        """The case's settings as stored in the pack (JSON-safe)."""
        return asdict(self)


@dataclass(frozen=True)
class Grid:
    """A validated grid file: the ``[sweep]``, ``[record]`` and ``[tolerance]`` tables."""

    sweep: dict
    record: dict
    tolerance: dict
    source: str = ""  # where it was read from (messages only)
    model_labels: dict = field(default_factory=dict)  # model entry -> the short name used in case ids

    def as_dict(self) -> dict:
        """The grid as stored in the pack manifest (a resumed sweep must have the same one)."""
        return {"sweep": self.sweep, "record": self.record, "tolerance": self.tolerance}

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of ``as_dict()``."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()

    def count(self) -> int:
        """The number of combinations before unsupported ones are skipped (no product built)."""
        s = self.sweep
        return math.prod(len(s[k]) for k in ("models", "prompts", "samplers", "schedulers", "sizes", "steps",
                                             "cfg", "seeds"))


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid TOML file (Python >= 3.11: tomllib)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise RefsdError("refsd sweep reads TOML grid files with tomllib: Python 3.11 or newer is needed") from None
    p = Path(path)
    if not p.is_file():
        raise RefsdError(f"{path}: no such grid file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RefsdError(f"{path}: not a valid TOML grid file ({e})") from None
    return grid_from_dict(data, source=str(p), base=p.parent)


def grid_from_dict(data: dict, *, source: str = "grid", base: Path | None = None) -> Grid:
    """Validate a grid given as nested dicts (the TOML's tables); model paths are taken relative to
    ``base`` (the grid file's folder) when relative."""
    if not isinstance(data, dict):
        raise RefsdError(f"{source}: a grid is a table with [sweep], [record], [tolerance]")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise RefsdError(f"{source}: unknown table [{unknown[0]}]; valid: {', '.join(SECTIONS)}")
    if "sweep" not in data:
        raise RefsdError(f"{source}: no [sweep] table (models, prompts, sizes, ...)")
    tables = {name: _table(source, name, data.get(name, {}), keys) for name, keys in SECTIONS.items()}
    s, r, t = tables["sweep"], tables["record"], tables["tolerance"]
    for key in ("models", "prompts", "sizes"):
        if s[key] is None:
            raise RefsdError(f"{source}: [sweep] {key} is required")
    _check_values(source, s, r, t, base)
    grid = Grid(s, r, t, source, _labels(source, s["models"]))
    n = grid.count()
    if n > s["max_cases"]:
        raise RefsdError(f"{source}: the grid has {n:,} cases, more than max_cases = {s['max_cases']:,} "
                         f"(raise [sweep] max_cases, at most {HARD_MAX_CASES:,}, or shrink the grid)")
    return grid


def _table(source: str, name: str, table, keys: dict) -> dict:
    """One table's values by kind, defaults filled in; lists for "list" keys."""
    if not isinstance(table, dict):
        raise RefsdError(f"{source}: [{name}] must be a table")
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise RefsdError(f"{source}: unknown key [{name}] {unknown[0]}; valid: {', '.join(keys)}")
    out = {}
    for key, (kind, default) in keys.items():
        v = table.get(key, default)
        where = f"{source}: [{name}] {key}"
        if kind == "list":
            v = v if isinstance(v, list) or v is None else [v]
            if v is not None and not v and key != "trace_steps":
                raise RefsdError(f"{where} is empty")
        elif kind == "str" and not isinstance(v, str):
            raise RefsdError(f"{where} must be a string, got {v!r}")
        elif kind == "bool" and not isinstance(v, bool):
            raise RefsdError(f"{where} must be true or false, got {v!r}")
        elif kind in ("int", "int?") and not (v is None and kind == "int?") and (
                isinstance(v, bool) or not isinstance(v, int)):
            raise RefsdError(f"{where} must be an integer, got {v!r}")
        elif kind == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise RefsdError(f"{where} must be a number >= 0, got {v!r}")
            v = float(v)
        out[key] = v
    return out


def _check_values(source: str, s: dict, r: dict, t: dict, base: Path | None) -> None:
    """Types and ranges of the list entries (the pipelines check the combinations later)."""
    def each(key, ok, what):
        for v in s[key]:
            if not ok(v):
                raise RefsdError(f"{source}: [sweep] {key} entry {v!r} is not {what}")

    each("models", lambda v: isinstance(v, str) and v, "a model path or \"demo\"")
    s["models"] = [v if v == DEMO or base is None or Path(v).is_absolute() else str(base / v) for v in s["models"]]
    each("prompts", lambda v: isinstance(v, str), "a string")
    each("samplers", lambda v: isinstance(v, str), "a sampler name")
    each("schedulers", lambda v: isinstance(v, str), "a scheduler name")
    each("seeds", lambda v: _is_int(v) and 0 <= v < 2**64, "an integer seed in [0, 2**64)")
    each("sizes", lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) and 8 <= x <= 8192 for x in v),
         "a [width, height] pair of integers in [8, 8192]")
    each("steps", lambda v: _is_int(v) and 1 <= v <= 1000, "a step count in [1, 1000]")
    each("cfg", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
         "a finite number")
    s["cfg"] = [float(v) for v in s["cfg"]]
    if not 1 <= s["max_cases"] <= HARD_MAX_CASES:
        raise RefsdError(f"{source}: [sweep] max_cases must be in [1, {HARD_MAX_CASES:,}], got {s['max_cases']}")
    for key in ("models", "prompts", "samplers", "schedulers", "seeds", "steps", "cfg"):
        dup = next((v for i, v in enumerate(s[key]) if v in s[key][:i]), None)
        if dup is not None:
            raise RefsdError(f"{source}: [sweep] {key} lists {dup!r} twice")
    if any(s["sizes"][i] in s["sizes"][:i] for i in range(len(s["sizes"]))):
        raise RefsdError(f"{source}: [sweep] sizes lists a size twice")
    for v in r["trace_steps"]:
        if not _is_int(v) or v < 0:
            raise RefsdError(f"{source}: [record] trace_steps entry {v!r} is not a UNet evaluation index >= 0")
    if r["trace_steps"] and not r["trace"]:
        raise RefsdError(f"{source}: [record] trace_steps needs trace = true")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _labels(source: str, models: list[str]) -> dict[str, str]:
    """Model entry -> a short label for case ids (the file or folder name without .safetensors)."""
    labels = {}
    for m in models:
        label = DEMO if m == DEMO else re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(m).name.removesuffix(".safetensors"))
        other = next((k for k, v in labels.items() if v == label), None)
        if other is not None:
            raise RefsdError(f"{source}: models {other!r} and {m!r} have the same name {label!r}: rename one")
        labels[m] = label
    return labels


def expand(grid: Grid) -> list[Case]:
    """The grid's cases, in a stable order (models outermost, seeds innermost)."""
    s = grid.sweep
    cases = []
    for model, (pi, prompt), sampler, scheduler, size, steps, cfg, seed in itertools.product(
            s["models"], enumerate(s["prompts"]), s["samplers"], s["schedulers"], s["sizes"], s["steps"], s["cfg"],
            s["seeds"]):
        w, h = size
        cid = (f"{grid.model_labels[model]}-{sampler}-{scheduler}-{w}x{h}-n{steps}-cfg{cfg:g}-seed{seed}-p{pi}")
        cases.append(Case(cid, model, prompt, pi, s["negative_prompt"], sampler, scheduler, w, h, steps, cfg, seed))
    return cases


def model_facts(grid: Grid) -> dict:
    """Each model entry's ModelFacts, read from headers / config files only (nothing loaded)."""
    from refsd.pipelines import demo
    from refsd.pipelines.facts import facts_from_configs, inspect_model

    facts = {}
    for m in grid.sweep["models"]:
        if m == DEMO:
            facts[m] = facts_from_configs(demo.NAME, "sd1", demo.CONFIGS)
        elif not Path(m).exists():
            raise RefsdError(f"{grid.source}: model {m}: no such file or directory")
        else:
            facts[m] = inspect_model(m)
    return facts


def validated_cases(grid: Grid, facts: dict | None = None) -> tuple[list[Case], list[tuple[Case, str]]]:
    """(cases to run, (case, why) skipped): every case checked by the pipelines' ``check_settings``
    on its model's facts. A case refsd cannot run is an error naming it, or skipped (and listed)
    with ``skip_unsupported = true``."""
    from refsd.pipelines.core import check_settings

    facts = model_facts(grid) if facts is None else facts
    s = grid.sweep
    keep, skipped = [], []
    for c in expand(grid):
        try:
            check_settings(facts[c.model], prompt=c.prompt, negative_prompt=c.negative_prompt, width=c.width,
                           height=c.height, steps=c.steps, cfg=c.cfg, sampler=c.sampler, scheduler=c.scheduler,
                           seed=c.seed, rng=s["rng"], batch_size=1, clip_skip=s["clip_skip"], parity=s["parity"])
        except RefsdError as e:
            if not s["skip_unsupported"]:
                raise RefsdError(f"{grid.source}: case {c.id}: {e} (set [sweep] skip_unsupported = true to skip "
                                 f"such combinations)") from None
            skipped.append((c, str(e)))
            continue
        keep.append(c)
    return keep, skipped
