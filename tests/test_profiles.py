"""Parity profiles as objects, the pipeline layout, and validation from model facts.

- no code outside refsd/pipelines/profiles/ compares a parity name (the profile objects hold the rules);
- docs/pipelines.md's profile table is the one the objects render;
- refsd/pipelines has no import cycle and no function-local import of its own modules;
- check_settings gives the same answer from a file's header (ModelFacts) as from the loaded Model.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from refsd.errors import RefsdError
from refsd.pipelines import get_profile, inspect_model, load_model
from refsd.pipelines import profiles as P
from refsd.pipelines.core import check_settings
from refsd.pipelines.demo import ensure_random

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "refsd"
NAMES = "|".join(P.PARITIES)
# a comparison with a parity name: `parity == ...`, `... != "comfyui"`, `x in ("diffusers", ...)`
COMPARE = re.compile(rf"\bparity\s*(==|!=|in\b|not\s+in\b)|(\w+)\s*(==|!=)\s*\"({NAMES})\"|(\w+)\s+in\s+\(\s*\"({NAMES})\"")
# operands that hold other vocabularies spelled like the profiles: refsd.text's prompt syntaxes and
# emphasis modes, the samplers' `sums` option
OTHER_VOCABULARY = {"syntax", "emphasis", "sums"}


def _comparisons(text: str) -> list[str]:
    hits = []
    for line in text.splitlines():
        for m in COMPARE.finditer(line):
            operand = m.group(2) or m.group(5)
            if operand not in OTHER_VOCABULARY:
                hits.append(line.strip())
    return hits


def test_no_parity_name_comparison_outside_profiles():
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        if "profiles" in path.relative_to(PKG).parts:
            continue
        hits = _comparisons(path.read_text())
        if hits:
            found[str(path.relative_to(ROOT))] = hits
    assert found == {}, "parity rules belong to refsd/pipelines/profiles (a Profile field or method)"


def test_the_grep_catches_what_it_should():
    assert _comparisons('if s.parity == "a1111":') and _comparisons("if parity != x:")
    assert _comparisons('ok = p in ("diffusers", "comfyui")') and _comparisons('name == "comfyui"')
    assert not _comparisons('if syntax == "comfyui":') and not _comparisons('s.profile.cfg_on == "eps"')


def test_docs_table_is_generated_from_the_objects():
    text = P.DOCS.read_text()
    assert P.BEGIN in text and P.END in text
    block = text[text.index(P.BEGIN):text.index(P.END) + len(P.END)]
    assert block == P.docs_block(), "docs/pipelines.md is stale: run python -m refsd.pipelines.profiles --write-docs"
    for p in P.profiles():
        assert f"`{p.name}`" in block.splitlines()[1]


def test_get_profile_once_by_name():
    d = get_profile("diffusers")
    assert get_profile(d) is d and P.PARITIES == ("diffusers", "comfyui", "a1111")
    with pytest.raises(RefsdError, match="unknown parity 'webui'; valid: diffusers, comfyui, a1111"):
        get_profile("webui")
    with pytest.raises(Exception):
        d.uint8 = "truncate"  # frozen
    assert (d.guided(1.0), d.guided(1.5), get_profile("comfyui").guided(0.5), get_profile("comfyui").guided(1.0)) == \
        (False, True, True, False)
    assert get_profile("a1111").seeds(7, 3) == [7, 8, 9] and d.seeds(7, 3) == [7, 7, 7]


def _targets(node, package: str) -> list[str]:
    """The refsd.pipelines modules an import statement loads (a submodule when the name is one)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if _module_path(f"{base}.{a.name}") else base for a in node.names]
    return [n for n in names if n.startswith("refsd.pipelines")]


def _module_imports(path: Path, module: str):
    """(module-level imports of refsd.pipelines.*, function-local ones) of a module."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    top, local = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if id(node) in inside:
                local += _targets(node, package)
            else:
                top.update(_targets(node, package))
    return top, local


def _module_path(name: str) -> Path | None:
    p = ROOT / Path(*name.split("."))
    return p / "__init__.py" if (p / "__init__.py").is_file() else p.with_suffix(".py") if p.with_suffix(".py").is_file() \
        else None


def test_pipelines_have_no_import_cycle_and_no_local_imports():
    graph, local = {}, {}
    for path in (PKG / "pipelines").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        graph[name], loc = _module_imports(path, name)
        if loc:
            local[name] = loc
    assert local == {}
    state = {}

    def visit(n, stack):
        state[n] = 1
        for m in graph.get(n, ()):
            if m == n:
                continue
            if state.get(m) == 1 and not n.startswith(m + "."):  # (a package's submodule importing the package)
                pytest.fail(f"import cycle: {' -> '.join(stack + [m])}")
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_public_api_and_no_shadowing():
    import refsd.pipelines as pipelines

    for name in ("txt2img", "img2img", "inpaint", "load_model", "Model"):
        assert callable(getattr(pipelines, name))
    modules = {p.stem for p in (PKG / "pipelines").iterdir()}
    assert not {"txt2img", "img2img", "inpaint"} & modules  # no function shadows a module of its name


def test_profiles_cli_prints_the_table():
    r = subprocess.run([sys.executable, "-m", "refsd.pipelines.profiles"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == P.render_table()


def test_check_settings_from_header_equals_loaded(tmp_path):
    """The same facts, hence the same verdicts, from a file's header as from the loaded model."""
    path = ensure_random(tmp_path)
    facts, model = inspect_model(path), load_model(path)
    assert facts == model.facts and facts.native_size == 512 and facts.text_encoder_layers == (2,)
    args = dict(prompt="x", negative_prompt=None, width=64, height=64, steps=4, cfg=7.0, sampler="euler",
                scheduler="normal", seed=1, rng="torch-cpu", batch_size=1, clip_skip=None, parity="comfyui")
    assert check_settings(facts, **args) == check_settings(model, **args)
    for bad, msg in (({"width": 60}, "width 60 is not a multiple of 8"), ({"clip_skip": 3}, "clip_skip 3 is out of range"),
                     ({"parity": "a1111", "strength": 0.5}, "img2img / inpainting under parity='a1111'"),
                     ({"micro": {"crop": (0, 0)}}, "micro-conditioning")):
        for m in (facts, model):
            with pytest.raises(RefsdError, match=re.escape(msg)):
                check_settings(m, **{**args, **bad})
