"""The ``refsd`` command line: ``refsd generate``, ``refsd trace``, ``refsd compare`` and ``refsd info``.

Exit status: 0 success / tensors match, 1 tensors diverge, 2 bad input (one ``refsd: error:`` line
on stderr, no traceback) or bad usage.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from refsd import __version__
from refsd.cli_generate import add_generate_parser, add_trace_parser
from refsd.errors import RefsdError, WeightsError

EXAMPLES = """\
examples:
  refsd generate --demo --prompt "a red cube" --out demo.png
      the embedded tiny model (random weights: shows the pipeline working, not a picture)
  refsd generate --model v1-5-pruned-emaonly.safetensors --prompt "a photo of a cat" --out cat.png
  refsd generate --from-png cat.png --steps 30 --out cat30.png
  refsd generate --model sd_xl_base_1.0.safetensors --refiner sd_xl_refiner_1.0.safetensors \\
      --prompt "a lighthouse at dusk" --cfg 5 --out xl.png          (SDXL base + refiner, 1024x1024)
  refsd trace --demo --prompt "a red cube" --steps 1 --out trace.safetensors
      every layer's output by module path, for refsd compare against a port's trace
  refsd compare mine.safetensors golden/cases/unet/tiny.safetensors
      first layer where my trace leaves the reference (the second file)
  refsd compare mine.safetensors ref.safetensors --atol 1e-4 --rtol 1e-4 --all
  refsd compare out.safetensors ref.safetensors --prefix out/ --images
  refsd info v1-5-pruned-emaonly.safetensors
  refsd info ./stable-diffusion-v1-5/          (a diffusers folder)

exit status: 0 ok / match, 1 tensors diverge, 2 error
"""

COMPARE_HELP = """\
Compare two named tensor sets, name by name in execution order, and report the first divergence.

B is the reference. Tensors are read with refsd.trace.load_trace: the trace/ tensors if the file has
any, else all of them (--prefix selects keys explicitly, e.g. out/). The execution order is A's
recorded trace_order, else B's, else A's file order. A tensor fails when some element has
|a - b| > atol + rtol * |b|, holds NaN, or the shapes differ; max_rel = max|a - b| / max|b|.
"""

COMPARE_EXAMPLES = """\
examples:
  refsd generate --demo --prompt "a red cube" --out demo.png
      the embedded tiny model (random weights: shows the pipeline working, not a picture)
  refsd generate --model v1-5-pruned-emaonly.safetensors --prompt "a photo of a cat" --out cat.png
  refsd generate --from-png cat.png --steps 30 --out cat30.png
  refsd trace --demo --prompt "a red cube" --steps 1 --out trace.safetensors
      every layer's output by module path, for refsd compare against a port's trace
  refsd compare mine.safetensors golden/cases/unet/tiny.safetensors
  refsd compare mine.safetensors ref.safetensors --atol 1e-4 --rtol 1e-4 --all
  refsd compare image.safetensors ref.safetensors --prefix out/ --images
"""

INFO_HELP = """\
Summarise a .safetensors file (tensor and parameter counts, dtypes, bytes, key prefixes, metadata),
or every .safetensors file in a diffusers folder (unet/, vae/, text_encoder/, ...). Reads headers only.

A Stable Diffusion checkpoint -- a single file with model.diffusion_model.* / first_stage_model.* /
cond_stage_model.* / conditioner.embedders.* keys, or a diffusers folder whose model_index.json lists
a unet -- is also loaded as refsd would load it: its architecture (sd1, sd1-inpaint, sd2, sd2-inpaint,
sdxl, sdxl-inpaint, sdxl-refiner) and each component's parameter count and dtypes are printed, and
a checkpoint refsd cannot load (unknown architecture, stray or missing keys, wrong shapes) is an
error. Other tensor files (goldens, traces, single components) get the summary only.
"""

INFO_EXAMPLES = """\
examples:
  refsd info v1-5-pruned-emaonly.safetensors
  refsd info ./stable-diffusion-v1-5/
  refsd info model.safetensors --depth 2      (group keys by two dotted components)
"""


def main(argv: list[str] | None = None) -> int:
    """Run the ``refsd`` command line; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (RefsdError, OSError) as e:
        message = " ".join(str(e).split())  # one line, whatever the exception carried
        print(f"refsd: error: {message}", file=sys.stderr)
        return 2


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

    p = sub.add_parser("compare", help="first divergence between two tensor files",
                       description=COMPARE_HELP, epilog=COMPARE_EXAMPLES, formatter_class=raw)
    p.add_argument("a", metavar="A", help="the tensors to check (.safetensors)")
    p.add_argument("b", metavar="B", help="the reference (.safetensors), e.g. a golden case")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default 1e-5)")
    p.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance (default 1e-5)")
    p.add_argument("--prefix", default=None,
                   help="read keys starting with PREFIX, stripped (default: trace/ if present, else all)")
    p.add_argument("--images", action="store_true", help="also report PSNR (automatic for uint8)")
    p.add_argument("--all", action="store_true", help="show every row, not only the failing ones")
    p.add_argument("--allow-missing", action="store_true",
                   help="names present on one side only do not make the comparison fail")
    p.add_argument("--max-rows", type=int, default=50, help="table rows shown at most (default 50)")
    p.set_defaults(run=_cmd_compare)

    p = sub.add_parser("info", help="summarise a .safetensors file or a diffusers folder",
                       description=INFO_HELP, epilog=INFO_EXAMPLES, formatter_class=raw)
    p.add_argument("path", metavar="PATH", help="a .safetensors file or a diffusers model folder")
    p.add_argument("--depth", type=int, default=1, help="dotted key components per prefix group (default 1)")
    p.set_defaults(run=_cmd_info)
    return parser


# --------------------------------------------------------------------------------------------
# compare


def _cmd_compare(args) -> int:
    from refsd.compare import compare
    from refsd.trace import load_trace, trace_order

    a_path, b_path = _file(args.a), _file(args.b)
    a, a_order = load_trace(a_path, prefix=args.prefix)
    b, b_order = load_trace(b_path, prefix=args.prefix)
    # A Rust or C++ port may write plain tensors (file order is alphabetical there): fall back to
    # the reference's recorded execution order so "first" still means first executed.
    a_recorded = trace_order(a_path, prefix=args.prefix)[1]
    b_recorded = trace_order(b_path, prefix=args.prefix)[1]
    order = b_order if b_recorded and not a_recorded else a_order
    report = compare(a, b, order=order, atol=args.atol, rtol=args.rtol, images=args.images,
                     allow_missing=args.allow_missing)
    print(report.format(max_rows=args.max_rows, only_failing=not args.all))
    return 0 if report.ok else 1


def _file(path: str) -> Path:
    """``path`` as an existing regular file, else a RefsdError naming it."""
    p = Path(path)
    if not p.exists():
        raise RefsdError(f"{path}: no such file")
    if not p.is_file():
        raise RefsdError(f"{path}: not a file")
    return p


# --------------------------------------------------------------------------------------------
# info


def _cmd_info(args) -> int:
    p = Path(args.path)
    if not p.exists():
        raise RefsdError(f"{args.path}: no such file or directory")
    lines = describe_folder(p, depth=args.depth) if p.is_dir() else describe_file(p, depth=args.depth)
    if not any(line.startswith("architecture:") for line in lines):
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
    if claims_checkpoint(folder):
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
        v = " ".join(str(v).split())
        if len(v) > limit:
            v = f"{v[: limit - 3]}... ({len(v):,} chars)"
        lines.append(f"  {k}: {v}")
    return lines


def _checkpoint(header, depth: int) -> list[str]:
    """A single-file SD checkpoint: architecture and components as load_checkpoint sees them."""
    from refsd.weights.checkpoint import claims_checkpoint, load_checkpoint

    if not claims_checkpoint(header.path, header.tensors):
        return []
    return load_checkpoint(header.path).summary()


def _lora(header, depth: int) -> list[str]:
    """A LoRA file: format, modules, ranks, alphas, base architecture (refsd.adapters.lora_info)."""
    from refsd.adapters.lora_info import describe_lora

    return describe_lora(header)


# Sections of describe_file, in print order; each (header, depth) -> lines.
FILE_SECTIONS: list[Callable] = [_counts, _dtypes, _prefixes, _metadata, _checkpoint, _lora]


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
