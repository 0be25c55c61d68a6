"""Parity profiles: the rules that make "same seed" mean the same image as diffusers, ComfyUI or A1111.

One frozen ``Profile`` per convention (``base.Profile``: every rule a field or a method), registered
by its module: ``diffusers`` (the default and golden oracle), ``comfyui``, ``a1111``. Look one up once
with ``get_profile(name)`` and pass the object on. The schedule machinery each profile's ``plan``
uses lives beside it: ``diffusers_tables`` (diffusers' float32 tables), ``diffusers_plans``
(diffusers' scheduler classes as plans), ``comfyui.comfyui_plan``, ``a1111.a1111_plan``.

A new profile (e.g. ``invokeai``) is one new module here that builds a Profile and calls ``register``:
every module of this package is imported below, so it registers itself. docs/pipelines.md's profile table is generated from the objects
(``render_table``); ``python -m refsd.pipelines.profiles --write-docs`` rewrites it.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from refsd.pipelines.profiles.base import Plan, Profile, get_profile, names, profiles, tail_start
from refsd.pipelines.profiles.diffusers_plans import DIFFUSERS_SAMPLERS, DIFFUSERS_SCHEDULERS

for _m in pkgutil.iter_modules(__path__):  # each profile module registers its Profile when imported
    if _m.name != "__main__":
        importlib.import_module(f"{__name__}.{_m.name}")

PARITIES = names()
DEFAULT = "diffusers"
DOCS = Path(__file__).resolve().parents[3] / "docs" / "pipelines.md"
BEGIN, END = "<!-- profiles table: begin (generated) -->", "<!-- profiles table: end -->"

__all__ = ["DEFAULT", "DIFFUSERS_SAMPLERS", "DIFFUSERS_SCHEDULERS", "PARITIES", "Plan", "Profile", "get_profile",
           "names", "profiles", "render_table", "tail_start"]


def render_table() -> str:
    """The markdown table of every registered profile's rules (``Profile.describe``), rows in the
    order of the first profile's fields."""
    cols = [p.describe() for p in profiles()]
    rows = list(dict.fromkeys(r for c in cols for r in c))
    out = ["| rule | " + " | ".join(f"`{p.name}`" for p in profiles()) + " |",
           "|---|" + "---|" * len(cols)]
    for r in rows:
        out.append(f"| {r} | " + " | ".join(c.get(r, "").replace("|", "\\|") for c in cols) + " |")
    return "\n".join(out)


def docs_block() -> str:
    return f"{BEGIN}\n{render_table()}\n{END}"


def write_docs(path: Path = DOCS) -> bool:
    """Replace the table between the markers in ``path``; True when the file changed."""
    text = path.read_text()
    a, b = text.index(BEGIN), text.index(END) + len(END)
    new = text[:a] + docs_block() + text[b:]
    if new != text:
        path.write_text(new)
    return new != text
