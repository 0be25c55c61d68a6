"""The ``refsd`` command line: ``refsd generate``, ``refsd trace``, ``refsd compare``, ``refsd export``,
``refsd info``, ``refsd samplers`` / ``refsd schedulers``, ``refsd sweep`` and ``refsd conformance``.

Exit status: 0 success / tensors match, 1 tensors diverge, 2 bad input (one ``refsd: error:`` line
on stderr, no traceback) or bad usage, 130 interrupted (Ctrl-C) and 143 terminated (SIGTERM), each
with one line and no partial file (writers are atomic, refsd.files), 141 when stdout is a closed pipe
(``refsd info ... | head``: quiet, as ``cat``; 128 + SIGPIPE).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from refsd import __version__, cli_signals
from refsd.cli_generate import add_generate_parser, add_trace_parser
from refsd.cli_signals import Terminated
from refsd.errors import RefsdError, WeightsError
from refsd.sweep.cli import add_conformance_parser, add_sweep_parser

EXAMPLES = """\
examples:
  refsd generate --demo --prompt "a red circle on a blue background" --out demo.png
      the packaged tiny model: one coloured shape on a coloured background, 64x64
  refsd generate --model v1-5-pruned-emaonly.safetensors --prompt "a photo of a cat" --out cat.png
  refsd generate --from-png cat.png --steps 30 --out cat30.png
  refsd generate --model sd_xl_base_1.0.safetensors --refiner sd_xl_refiner_1.0.safetensors \\
      --prompt "a lighthouse at dusk" --cfg 5 --out xl.png          (SDXL base + refiner, 1024x1024)
  refsd trace --demo --prompt "a red cube" --steps 1 --out trace.safetensors
      every layer's output by module path, for refsd compare against a port's trace
  refsd compare mine.safetensors golden/cases/unet/sd1_tiny_f32.safetensors
      first layer where my trace leaves the reference (the second file)
  refsd compare ldm_trace.safetensors golden/cases/unet/sd1_tiny_f32.safetensors --names ldm
      a port's trace in LDM / A1111 / ComfyUI module names (input_blocks.1.1, middle_block, ...)
  refsd export unet/sd1_tiny_f32 --names ldm --layout nhwc --out sd1_tiny_ldm.npz
      a golden case's weights, inputs, outputs and trace in a port's naming and layout
  refsd compare mine.safetensors ref.safetensors --atol 1e-4 --rtol 1e-4 --all
  refsd compare out.safetensors ref.safetensors --prefix out/ --images
  refsd info v1-5-pruned-emaonly.safetensors
  refsd info ./stable-diffusion-v1-5/          (a diffusers folder)
  refsd samplers                               (the sampler names each --parity runs; also: refsd schedulers)
  refsd samplers --parity diffusers            (one profile's, one per line)
  refsd convert-embedding style.pt style.safetensors   (opt-in: unpickles with torch, weights_only=True)

exit status: 0 ok / match, 1 tensors diverge, 2 error
"""

COMPARE_HELP = """\
Compare two named tensor sets, name by name in execution order, and report the first divergence.

B is the reference. Tensors are read with refsd.trace.load_trace: the trace/ tensors if the file has
any, else all of them (--prefix selects keys explicitly, e.g. out/). The execution order is A's
recorded trace_order, else B's (a golden case records it); with neither, and more than one tensor,
the first divergence cannot be told: error. --names renames A's module paths (LDM / A1111 / ComfyUI,
transformers 4, or a JSON map) to B's diffusers names. The tolerance is the golden case's own (its
metadata) unless --atol/--rtol are given, else 1e-5.

Divergence rule: a tensor diverges when max|a - b| > atol + rtol * max|b| and ||a - b|| / ||b|| > rtol
(float32 noise scales with a tensor's largest values and stays a tiny fraction of its norm, so
near-zero elements and normalised small groups do not raise false alarms), holds NaN, or the shapes
differ; max_rel = max|a - b| / max|b|, cosine = <a,b>/(|a||b|). --elementwise restores the per-element
test |a - b| <= atol + rtol * |b|. Names with no counterpart, or no names in common, are reported;
no names in common is an error (exit 2).
"""

COMPARE_EXAMPLES = """\
examples:
  refsd generate --demo --prompt "a red circle on a blue background" --out demo.png
      the packaged tiny model: one coloured shape on a coloured background, 64x64
  refsd generate --model v1-5-pruned-emaonly.safetensors --prompt "a photo of a cat" --out cat.png
  refsd generate --from-png cat.png --steps 30 --out cat30.png
  refsd trace --demo --prompt "a red cube" --steps 1 --out trace.safetensors
      every layer's output by module path, for refsd compare against a port's trace
  refsd compare mine.safetensors golden/cases/unet/sd1_tiny_f32.safetensors
  refsd compare ldm_trace.safetensors golden/cases/unet/sd1_tiny_f32.safetensors --names ldm --json
  refsd compare mine.safetensors ref.safetensors --atol 1e-4 --rtol 1e-4 --all
  refsd compare image.safetensors ref.safetensors --prefix out/ --images
"""

EXPORT_HELP = """\
Write a golden case's weights (param/), inputs (in/), outputs (out/) and trace (trace/), or a
checkpoint's weights, in a port's conventions: names diffusers or ldm (single-file keys as A1111 /
ComfyUI load them; traces as LDM module paths), layout nchw or nhwc (conv weights HWIO; linear
weights stay (out, in)), float32 or float16, as safetensors or .npz. A manifest (OUT.manifest.json)
records the source, the conventions, the golden's tolerance and metadata, the trace order and each
tensor's original key and transform. Nothing is written unless everything converts.
"""

EXPORT_EXAMPLES = """\
examples:
  refsd export unet/sd1_tiny_f32 --names ldm --layout nhwc --out sd1_tiny_ldm.npz
  refsd export golden/cases/vae/decode_tiny_f32.safetensors --names ldm --out vae_ldm.safetensors
  refsd export ./stable-diffusion-v1-5/ --names ldm --dtype float16 --out sd15_single_file.safetensors
"""

INFO_HELP = """\
Summarise a .safetensors file (tensor and parameter counts, dtypes, bytes, key prefixes, metadata),
or every .safetensors file in a diffusers folder (unet/, vae/, text_encoder/, ...). Reads headers only.

A Stable Diffusion checkpoint -- a single file with model.diffusion_model.* / first_stage_model.* /
cond_stage_model.* / conditioner.embedders.* keys, or a diffusers folder whose model_index.json lists
a unet -- is also loaded as refsd would load it: its architecture (sd1, sd1-inpaint, sd2, sd2-inpaint,
sdxl, sdxl-inpaint, sdxl-refiner) and each component's parameter count and dtypes are printed, and
a checkpoint refsd cannot load (unknown architecture, stray or missing keys, wrong shapes) is an
error. A textual-inversion embedding (emb_params, clip_l + clip_g, or one diffusers <token> key) gets
its layout, vector count, width, the base family it fits and how prompts name it. Other tensor files
(goldens, traces, single components) get the summary only.
"""

NAMES_HELP = {
    "samplers": "The sampler names (ComfyUI's) each parity profile runs: what `refsd generate --sampler` accepts\n"
                "under its --parity. A sampler that runs with only some schedulers says which.",
    "schedulers": "The scheduler names (ComfyUI's) each parity profile runs: what `refsd generate --scheduler`\n"
                  "accepts under its --parity. A scheduler that runs with only some samplers says which.",
}

INFO_EXAMPLES = """\
examples:
  refsd info v1-5-pruned-emaonly.safetensors
  refsd info ./stable-diffusion-v1-5/
  refsd info model.safetensors --depth 2      (group keys by two dotted components)
  refsd info embeddings/easynegative.safetensors      (a textual-inversion embedding)
"""


EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + 13, 128 + 2, 128 + 15


def main(argv: list[str] | None = None) -> int:
    """Run the ``refsd`` command line; return the exit status (module docstring)."""
    args = build_parser().parse_args(argv)
    restore = cli_signals.install()
    try:
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not as an "Exception ignored" at exit
        return status
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return _stopped("interrupted", EXIT_INTERRUPTED)
    except Terminated:
        return _stopped("terminated (SIGTERM)", EXIT_TERMINATED)
    except (RefsdError, OSError) as e:
        message = " ".join(str(e).split())  # one line, whatever the exception carried
        print(f"refsd: error: {message}", file=sys.stderr)
        return 2
    finally:
        restore()


def _stopped(what: str, status: int) -> int:
    """One line for a run stopped by a signal; no file is half-written (every writer is atomic). A
    progress bar still open (stopped inside its own set-up) is closed first, so the line starts a line."""
    bars = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(bars, "tqdm", None), "_instances", ())):  # tqdm's registry of open bars
        try:
            bar.close()
        except AttributeError:  # interrupted inside its __init__: nothing was drawn to close
            pass
    print(f"refsd: {what}; no partial file was left", file=sys.stderr, flush=True)
    return status


def _discard_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (tests capturing stdout): nothing to flush
        pass


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with one sub-parser per subcommand."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="refsd",
        description="Stable Diffusion on the Array API, verified tensor-for-tensor against the reference.",
        epilog=EXAMPLES,
        formatter_class=raw,
    )
    parser.add_argument("--version", action="version", version=f"refsd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_generate_parser(sub)
    add_trace_parser(sub)
    add_sweep_parser(sub)
    add_conformance_parser(sub)

    p = sub.add_parser("compare", help="first divergence between two tensor files",
                       description=COMPARE_HELP, epilog=COMPARE_EXAMPLES, formatter_class=raw)
    p.add_argument("a", metavar="A", help="the tensors to check (.safetensors)")
    p.add_argument("b", metavar="B", help="the reference (.safetensors), e.g. a golden case")
    p.add_argument("--atol", type=float, default=None,
                   help="absolute tolerance (default: the golden case's, else 1e-5)")
    p.add_argument("--rtol", type=float, default=None,
                   help="relative tolerance (default: the golden case's, else 1e-5)")
    p.add_argument("--names", default=None, metavar="SCHEME",
                   help="A's naming: ldm (CompVis/sgm/A1111/ComfyUI module paths), transformers4, diffusers, "
                        "or a .json map {\"port name\": \"diffusers name\"}; A is renamed to B's diffusers names")
    p.add_argument("--ref-names", default=None, metavar="SCHEME", help="B's naming, as --names (default diffusers)")
    p.add_argument("--elementwise", action="store_true",
                   help="fail a tensor on any element with |a-b| > atol + rtol*|b| (default: the divergence "
                        "rule above)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--worst", type=int, default=5, help="how many worst layers to name (default 5)")
    p.add_argument("--prefix", default=None,
                   help="read keys starting with PREFIX, stripped (default: trace/ if present, else all)")
    p.add_argument("--images", action="store_true", help="also report PSNR (automatic for uint8)")
    p.add_argument("--all", action="store_true", help="show every row, not only the failing ones")
    p.add_argument("--allow-missing", action="store_true",
                   help="names present on one side only do not make the comparison fail")
    p.add_argument("--max-rows", type=int, default=50, help="table rows shown at most (default 50)")
    p.set_defaults(run=_cmd_compare)

    p = sub.add_parser("export", help="a golden case or checkpoint in a port's naming, layout and dtype",
                       description=EXPORT_HELP, epilog=EXPORT_EXAMPLES, formatter_class=raw)
    p.add_argument("source", metavar="SOURCE",
                   help="a golden case id (unet/sd1_tiny_f32) or its file, or a checkpoint (.safetensors or diffusers folder)")
    p.add_argument("--out", required=True, help="the file to write (.safetensors or .npz); a .manifest.json goes beside it")
    p.add_argument("--names", choices=("diffusers", "ldm"), default=None,
                   help="key and trace naming (default: diffusers for a golden, ldm for a checkpoint)")
    p.add_argument("--layout", choices=("nchw", "nhwc"), default="nchw",
                   help="nchw: activations (B,C,H,W), conv OIHW; nhwc: (B,H,W,C), conv HWIO (default nchw)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="(default float32)")
    p.add_argument("--format", choices=("safetensors", "npz"), default=None,
                   help="(default: from --out's suffix, .npz or else safetensors)")
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser("info", help="summarise a .safetensors file or a diffusers folder",
                       description=INFO_HELP, epilog=INFO_EXAMPLES, formatter_class=raw)
    p.add_argument("path", metavar="PATH", help="a .safetensors file or a diffusers model folder")
    p.add_argument("--depth", type=int, default=1, help="dotted key components per prefix group (default 1)")
    p.set_defaults(run=_cmd_info)

    for kind in NAMES_HELP:
        p = sub.add_parser(kind, help=f"the {kind} each parity profile runs", description=NAMES_HELP[kind],
                           formatter_class=raw)
        p.add_argument("--parity", metavar="PROFILE", help="only this profile's names, one per line")
        p.set_defaults(run=_cmd_names, kind=kind)

    p = sub.add_parser("convert-embedding", help="convert a pickled A1111 .pt/.bin embedding to .safetensors",
                       description=CONVERT_EMBEDDING_HELP, formatter_class=raw)
    p.add_argument("src", metavar="IN", help="the .pt / .bin embedding (a pickle: convert only files you trust)")
    p.add_argument("dst", metavar="OUT", help="the .safetensors file to write")
    p.set_defaults(run=_cmd_convert_embedding)
    return parser


CONVERT_EMBEDDING_HELP = """\
Convert a textual-inversion embedding saved as a pickle (A1111's .pt, diffusers' learned_embeds.bin) to
.safetensors, the only format refsd reads. Opt-in, and the only refsd command that unpickles: it needs
torch and loads IN with torch.load(weights_only=True), torch's restricted unpickler (tensors, dicts,
numbers and strings; anything else is refused). OUT holds emb_params (A1111 / ComfyUI's layout), or
clip_l + clip_g (SDXL), or the diffusers token; it is written atomically. See docs/embeddings.md.
"""


def _cmd_convert_embedding(args) -> int:
    from refsd.text.embedding_pickle import convert_pickle

    emb = convert_pickle(args.src, args.dst)
    print(f"{args.dst}: {emb.layout} embedding, {emb.count} vector(s), fits {emb.architecture}")
    return 0


# --------------------------------------------------------------------------------------------
# samplers / schedulers


def _cmd_names(args) -> int:
    """``refsd samplers`` / ``refsd schedulers``: each profile's names, from its own checks
    (Profile.sampler_names / scheduler_names), so the list is what --sampler / --scheduler accept."""
    from refsd.pipelines.profiles import DEFAULT, get_profile, profiles

    if args.parity is not None:
        print("\n".join(_names(get_profile(args.parity), args.kind)))
        return 0
    blocks = []
    for p in profiles():
        names = _names(p, args.kind)
        title = f"{p.name}{' (the default)' if p.name == DEFAULT else ''}: {len(names)} {args.kind}"
        body = textwrap.fill(", ".join(names), width=100, initial_indent="  ", subsequent_indent="  ",
                             break_on_hyphens=False)
        blocks.append("\n".join([title, body, *_pair_notes(p, args.kind)]))
    print("\n\n".join(blocks))
    return 0


def _names(profile, kind: str) -> tuple[str, ...]:
    return profile.sampler_names() if kind == "samplers" else profile.scheduler_names()


def _pair_notes(profile, kind: str) -> list[str]:
    """Lines naming the pairs a profile limits: a name that runs with only some of the other kind's."""
    mine, other = _names(profile, kind), _names(profile, "schedulers" if kind == "samplers" else "samplers")
    notes = []
    for name in mine:
        ok = [o for o in other if (profile.runs(name, o) if kind == "samplers" else profile.runs(o, name))]
        if len(ok) < len(other):
            notes.append(f"  {name}: only with {', '.join(ok)}")
    return notes


# --------------------------------------------------------------------------------------------
# compare


def _cmd_compare(args) -> int:
    from refsd.compare import check_tolerances, compare

    # Given tolerances are checked before reading either file (None: the golden's own, or 1e-5).
    check_tolerances(0.0 if args.atol is None else args.atol, 0.0 if args.rtol is None else args.rtol)
    a_path, b_path = _file(args.a), _file(args.b)
    a, a_order, a_recorded = _read_side(a_path, args.prefix)
    b, b_order, b_recorded = _read_side(b_path, args.prefix)
    golden = _golden_meta(b_path)
    port_names = {}  # diffusers name -> A's own name, when --names renamed A
    a, a_order, b, b_order = _rename_sides(args, a, a_order, b, b_order, golden, port_names)
    common = [n for n in b if n in a]
    if not common:
        hint = "" if args.names or args.ref_names else " (a port's names? try --names ldm, or a .json map)"
        raise RefsdError(f"{a_path} and {b_path} have no tensor names in common: nothing to compare{hint}; "
                         f"e.g. {_names_hint(a)} vs {_names_hint(b)}")
    # A Rust or C++ port may write plain tensors (file order is alphabetical there): take the
    # reference's recorded execution order so "first" still means first executed.
    if a_recorded:
        order = a_order
    elif b_recorded:
        order = b_order
    elif len(common) > 1 and args.prefix in (None, "trace/"):  # a trace: "first" must mean first executed
        raise RefsdError(f"neither {a_path} nor {b_path} records the execution order (__metadata__ trace_order): "
                         "the first divergence cannot be told; write trace_order into the port's file "
                         "(golden/README.md) or compare against a golden case")
    else:
        order = a_order
    atol, rtol = args.atol, args.rtol
    if golden is not None:  # the case's own tolerance unless overridden
        atol = golden.get("atol", 1e-5) if atol is None else atol
        rtol = golden.get("rtol", 1e-5) if rtol is None else rtol
    atol = 1e-5 if atol is None else atol
    rtol = 1e-5 if rtol is None else rtol
    report = compare(a, b, order=order, atol=atol, rtol=rtol, images=args.images,
                     allow_missing=args.allow_missing, rule="elementwise" if args.elementwise else "scaled")
    first = report.first_divergence
    if args.json:
        out = report.as_dict(worst=args.worst)
        if port_names:
            out["first_divergence_port_name"] = port_names.get(first)
            for row in out["rows"]:
                row["port_name"] = port_names.get(row["name"])
        print(json.dumps(out, indent=1))
    else:
        text = report.format(max_rows=args.max_rows, only_failing=not args.all).splitlines()
        worst = [r for r in report.worst(args.worst) if not r.ok]
        if worst:
            text.insert(-2, "worst: " + ", ".join(
                f"{r.name} ({'shape' if r.ratio is None else f'{r.ratio:.3g}x bound'})" for r in worst))
        if first is not None and first in port_names:
            text.append(f"in {args.a}'s names: {port_names[first]}")
        print("\n".join(text))
    return 0 if report.ok else 1


def _read_side(path: Path, prefix: str | None) -> tuple[dict, list[str], bool]:
    """(tensors, names in order, whether the order was recorded): ``trace_order`` in the metadata, or
    the ``trace_order`` of a golden case's ``golden`` metadata."""
    from refsd.trace import load_trace, trace_order

    tensors, order = load_trace(path, prefix=prefix)
    recorded = trace_order(path, prefix=prefix)[1]
    golden = _golden_meta(path)
    kind = {None: "trace_order", "trace/": "trace_order", "out/": "outputs", "in/": "inputs"}.get(prefix)
    if not recorded and golden and kind and golden.get(kind):  # a golden lists each group in order
        listed = [n for n in golden[kind] if n in tensors]
        order = listed + [n for n in order if n not in set(listed)]
        recorded = True
    return tensors, order, recorded


def _golden_meta(path: Path) -> dict | None:
    """A golden case's ``golden`` metadata object (golden/README.md), or None for other files."""
    from refsd.weights import read_header

    return _golden_json(read_header(path))


def _rename_sides(args, a, a_order, b, b_order, golden, port_names: dict):
    """Apply ``--names`` to A and ``--ref-names`` to B: both end up in diffusers names. The layout a
    map needs comes from the diffusers-named side (and a golden's param keys)."""
    from refsd.weights.names import REFERENCE, best_map

    if not args.names and not args.ref_names:
        return a, a_order, b, b_order
    if args.names and args.ref_names and REFERENCE not in (args.names, args.ref_names):
        raise RefsdError("--names and --ref-names: one side must use diffusers names (the maps are built from it)")
    params = golden.get("params", []) if golden else []
    if args.names and args.names != REFERENCE:
        m = best_map(args.names, a, list(b) + list(params))
        port_names.update({m.to_reference(n): n for n in a})
        a, a_order = _renamed(a, a_order, m.to_reference, args.a, m)
    if args.ref_names and args.ref_names != REFERENCE:
        m = best_map(args.ref_names, b, list(a))
        b, b_order = _renamed(b, b_order, m.to_reference, args.b, m)
    return a, a_order, b, b_order


def _renamed(tensors, order, rename, path, m):
    """``tensors`` and ``order`` under ``rename``; RefsdError naming the first names no row covers."""
    new = {n: rename(n) for n in tensors}
    lost = [n for n, r in new.items() if r is None]
    if lost:
        raise RefsdError(f"{path}: {len(lost)} name(s) are not {m.scheme} {m.kind} module paths: "
                         f"{', '.join(lost[:5])}")
    return {new[n]: v for n, v in tensors.items()}, [new[n] for n in order]


def _names_hint(tensors, k: int = 3) -> str:
    names = list(tensors)[:k]
    return ", ".join(names) + (" ..." if len(tensors) > k else "") if names else "(no tensors)"


def _file(path: str) -> Path:
    """``path`` as an existing regular file, else a RefsdError naming it."""
    p = Path(path)
    if not p.exists():
        raise RefsdError(f"{path}: no such file")
    if not p.is_file():
        raise RefsdError(f"{path}: not a file")
    return p


# --------------------------------------------------------------------------------------------
# export


def _cmd_export(args) -> int:
    from refsd.export import export_checkpoint, export_golden
    from refsd.golden import manifest

    source = args.source
    case_id = source if source in manifest() else None
    if case_id is None:
        p = Path(source)
        if not p.exists():
            raise RefsdError(f"{source}: neither a golden case id nor an existing file or folder")
        meta = _golden_meta(p) if p.is_file() else None
        case_id = meta.get("id") if meta else None
    if case_id is not None:
        m = export_golden(case_id, args.out, names=args.names or "diffusers", layout=args.layout,
                          dtype=args.dtype, fmt=args.format)
    else:
        m = export_checkpoint(source, args.out, names=args.names or "ldm", layout=args.layout,
                              dtype=args.dtype, fmt=args.format)
    print(f"wrote {args.out}: {len(m['tensors'])} tensors, names {m['names']}, layout {m['layout']['name']}, "
          f"{m['dtype']}; manifest {args.out}.manifest.json")
    return 0


# --------------------------------------------------------------------------------------------
# info


def _cmd_info(args) -> int:
    p = Path(args.path)
    if not p.exists():
        raise RefsdError(f"{args.path}: no such file or directory")
    lines = describe_folder(p, depth=args.depth) if p.is_dir() else describe_file(p, depth=args.depth)
    if not any(line.lstrip().startswith(("architecture:", "kind:", "golden case:", "textual-inversion embedding:"))
               for line in lines):
        lines.append("architecture: none recognised (no model.diffusion_model / first_stage_model / "
                     "cond_stage_model / conditioner.embedders keys, no model_index.json with a unet): "
                     "not a Stable Diffusion checkpoint")
    print("\n".join(lines))
    return 0


def describe_folder(folder: Path, *, depth: int = 1) -> list[str]:
    """``describe_file`` for every ``*.safetensors`` under a (diffusers) folder, plus its model_index
    and, for a pipeline folder with a unet, the loaded checkpoint's architecture and components."""
    from refsd.weights.checkpoint import claims_checkpoint, load_checkpoint

    lines = [f"folder: {folder}"]
    index = folder / "model_index.json"
    if index.is_file():
        try:
            name = json.loads(index.read_text()).get("_class_name")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{index}: not a JSON object ({e})") from None
        if name:
            lines.append(f"pipeline: {name} (model_index.json)")
    files = sorted(f for f in folder.rglob("*.safetensors") if f.is_file())
    if not files:
        raise WeightsError(f"{folder}: no .safetensors files in it or its sub-folders")
    from refsd.pipelines.dit_files import dit_family, load_dit_files, summary

    if dit_family(folder) is not None:  # an SD3 / Flux pipeline folder (refsd.pipelines.dit_files)
        lines += summary(load_dit_files(folder))
    elif claims_checkpoint(folder):
        lines += load_checkpoint(folder).summary()
    for f in files:
        lines += ["", f"== {f.relative_to(folder)}"]
        lines += ["  " + line for line in describe_file(f, depth=depth)]
    return lines


def describe_file(path: Path, *, depth: int = 1) -> list[str]:
    """Lines summarising one safetensors file, from its header only (``FILE_SECTIONS`` in order)."""
    from refsd.weights import read_header

    header = read_header(path)
    lines = [f"file: {path} ({_bytes(path.stat().st_size)})"]
    for section in FILE_SECTIONS:
        lines += section(header, depth)
    return lines


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


def _counts(header, depth: int) -> list[str]:
    infos = header.tensors.values()
    params = sum(_numel(t.shape) for t in infos)
    nbytes = sum(t.end - t.start for t in infos)
    return [f"tensors: {len(header.tensors):,}", f"parameters: {params:,} ({_si(params)})",
            f"tensor bytes: {nbytes:,} ({_bytes(nbytes)})"]


def _dtypes(header, depth: int) -> list[str]:
    tensors, params = Counter(), Counter()
    for t in header.tensors.values():
        tensors[str(t.dtype)] += 1
        params[str(t.dtype)] += _numel(t.shape)
    parts = [f"{d} {tensors[d]:,} tensors / {_si(params[d])} params" for d, _ in tensors.most_common()]
    return ["dtypes: " + ("; ".join(parts) if parts else "-")]


def key_group(key: str, depth: int = 1) -> str:
    """The prefix a key is grouped under: a ``ns/`` namespace (golden files) + ``depth`` dotted parts.

    ``down_blocks.0.resnets.1.conv1.weight`` -> ``down_blocks``; ``param/conv_in.weight`` ->
    ``param/conv_in``; with depth 2, ``model.diffusion_model.input_blocks...`` -> ``model.diffusion_model``.
    """
    ns, slash, rest = key.partition("/")
    if not slash:
        ns, rest = "", key
    else:
        ns += "/"
    return ns + ".".join(rest.split(".")[:depth])


def _prefixes(header, depth: int) -> list[str]:
    params, tensors = Counter(), Counter()
    for key, t in header.tensors.items():
        g = key_group(key, depth)
        params[g] += _numel(t.shape)
        tensors[g] += 1
    if not params:
        return []
    width = max(len(g) for g in params)
    lines = ["key prefixes (tensors, parameters):"]
    for g in params:  # first-seen order: the file's own order
        lines.append(f"  {g:<{width}}  {tensors[g]:>6,}  {params[g]:>15,}")
    return lines


def _metadata(header, depth: int, limit: int = 80) -> list[str]:
    if not header.metadata:
        return ["metadata: -"]
    lines = ["metadata:"]
    for k, v in header.metadata.items():
        if k == "golden" and _golden_json(header) is not None:
            lines.append("  golden: a golden case's metadata (in full below)")
            continue
        v = " ".join(str(v).split())
        if len(v) > limit:
            v = f"{v[: limit - 3]}... ({len(v):,} chars)"
        lines.append(f"  {k}: {v}")
    return lines


def _golden_json(header) -> dict | None:
    """The ``golden`` metadata object of a safetensors header, or None (not a golden case)."""
    try:
        meta = json.loads(header.metadata.get("golden", ""))
    except json.JSONDecodeError:
        return None
    return meta if isinstance(meta, dict) and "id" in meta else None


def _golden(header, depth: int) -> list[str]:
    """A golden case (golden/README.md): what it is, then every metadata field, untruncated."""
    meta = _golden_json(header)
    if meta is None:
        return []
    op = meta.get("op", {}).get("name", "?")
    lines = [f"golden case: {meta['id']} (component {meta.get('component')}, refsd op {op!r}, "
             f"oracle {meta.get('oracle', {}).get('call', '?')})", "golden metadata:"]
    for k, v in meta.items():
        lines.append(f"  {k}: {json.dumps(v)}")
    return lines


def _checkpoint(header, depth: int) -> list[str]:
    """A single-file SD checkpoint: architecture and components as load_checkpoint sees them."""
    from refsd.weights.checkpoint import claims_checkpoint, load_checkpoint

    if not claims_checkpoint(header.path, header.tensors):
        return []
    return load_checkpoint(header.path).summary()


def _dit_part(header, depth: int) -> list[str]:
    """A lone T5 / CLIP text encoder or VAE, as SD3 / Flux take them (refsd.pipelines.dit_files)."""
    from refsd.weights.checkpoint import claims_checkpoint

    if claims_checkpoint(header.path, header.tensors):
        return []
    from refsd.pipelines.dit_files import describe_part

    return describe_part({k: t.shape for k, t in header.tensors.items()})


def _controlnet(header, depth: int) -> list[str]:
    """A ControlNet file (diffusers or lllyasviel keys): its kind and base architecture."""
    from refsd.weights.controlnet import controlnet_layout, load_controlnet

    if controlnet_layout(header.tensors) is None:
        return []
    return load_controlnet(header.path).summary()


def _embedding(header, depth: int) -> list[str]:
    """A textual-inversion embedding: layout, vectors, width, base family (refsd.text.embeddings)."""
    from refsd.text.embeddings import describe

    return describe(header)


def _adapter(header, depth: int) -> list[str]:
    """A T2I-Adapter, IP-Adapter or CLIP vision file: its kind and the base it serves (refsd.weights.adapters)."""
    from refsd.weights.adapters import describe

    return describe({k: tuple(t.shape) for k, t in header.tensors.items()})


def _lora(header, depth: int) -> list[str]:
    """A LoRA file: format, modules, ranks, alphas, base architecture (refsd.adapters.lora_info)."""
    from refsd.adapters.lora_info import describe_lora

    return describe_lora(header)


# Sections of describe_file, in print order; each (header, depth) -> lines.
FILE_SECTIONS: list[Callable] = [_counts, _dtypes, _prefixes, _metadata, _golden, _checkpoint, _dit_part, _embedding,
                                 _controlnet, _adapter, _lora]


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
