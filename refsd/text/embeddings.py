"""Textual-inversion embeddings: the files people share, and the token vectors they put into a prompt.

An embedding is one or more learned vectors that take the place of token-embedding rows before the
CLIP transformer. refsd reads three safetensors layouts, recognised by their keys and shapes (never
by the file name):

- ``emb_params`` (n, width): A1111 / ComfyUI safetensors embeddings (what A1111's ``.pt`` becomes
  as safetensors; Civitai's SD 1.x / 2.x files);
- ``clip_l`` (n, 768) + ``clip_g`` (n, 1280): SDXL embeddings, one half per text encoder (A1111
  ``load_from_file`` "SDXL embedding"; ComfyUI ``load_embed`` with ``embed_key`` clip_l / clip_g);
- one ``<token>`` key, (width,) or (n, width): diffusers ``learned_embeds.safetensors`` (the textual
  inversion training script's output; diffusers ``load_textual_inversion`` takes the key as the token).

Widths are checked against the text encoder that receives them (768 CLIP-L, 1024 OpenCLIP-H, 1280
OpenCLIP-bigG), with one line naming the file on a mismatch. A1111's ``.pt`` / ``.bin`` pickles are
refused by their content; ``convert_pickle`` (``refsd convert-embedding``) converts one with
``torch.load(weights_only=True)``, on request only.

How a prompt names an embedding depends on the profile (see ``PromptEmbeddings``, docs/embeddings.md):
A1111 matches the file's stem as a word, on token ids (``EmbeddingDatabase.find_embedding_at_position``);
ComfyUI takes ``embedding:name`` (``comfy/sd1_clip.py`` ``SDTokenizer.tokenize_with_weights``,
``load_embed``); diffusers adds ``<token>`` (and ``<token>_1``, ... for more vectors) to the tokenizer
(``TextualInversionLoaderMixin.load_textual_inversion``, ``maybe_convert_prompt``). The vectors get
token ids past the vocabulary (``TokenVectors``): diffusers' own ids (it resizes the embedding matrix
and appends rows), a placeholder for the A1111 / ComfyUI rules, which insert the vectors at positions.

References (read for this port):
- AUTOMATIC1111/stable-diffusion-webui@22ecb78b modules/textual_inversion/textual_inversion.py
  (EmbeddingDatabase.load_from_file, register_embedding_by_name, find_embedding_at_position,
  Embedding.set_hash: shorthash = sha256(file)[:12]); modules/sd_hijack_clip.py (tokenize_line:
  placeholders, multi-vector embeddings kept in one chunk; forward: "TI hashes").
- Comfy-Org/ComfyUI comfy/sd1_clip.py (load_embed, SDTokenizer._try_get_embedding,
  tokenize_with_weights in its word-splitting form, as refsd's ComfyUI chunker;
  SDClipModel.process_tokens; clip_model.py pooled output at the first EOS).
- diffusers 0.42.1 loaders/textual_inversion.py.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refsd import xp as rxp
from refsd.errors import RefsdError, WeightsError
from refsd.text.tokenizer import normalize

SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".bin")  # what A1111 and ComfyUI also look for
MAX_VECTORS = 75  # one 75-token chunk: A1111 cannot place a longer embedding
MAX_WIDTH = 8192  # wider than any CLIP text encoder
MAX_FILES = 10_000  # an --embedding-dir is listed, never walked without bound
WIDTHS = {768: "CLIP-L", 1024: "OpenCLIP-H", 1280: "OpenCLIP-bigG"}
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # SDXL's encoders -> the file's halves
LAYOUTS = ("a1111", "sdxl", "diffusers")
HINT = "refsd never unpickles: convert it once with `refsd convert-embedding {path} {out}` (torch.load(weights_only=True))"


class EmbeddingError(WeightsError):
    """An embedding file that is not one, does not fit the model, or a prompt naming an unknown one."""


# --------------------------------------------------------------------------------------------
# one embedding


@dataclass(frozen=True)
class Embedding:
    """One textual-inversion embedding. ``name``: the file's stem (A1111's prompt word, ComfyUI's
    ``embedding:name``); ``token``: the diffusers prompt token (a diffusers file's key, else the stem,
    as one passes ``token=`` to ``load_textual_inversion``); ``layout``: "a1111" | "sdxl" | "diffusers";
    ``vectors``: the file's tensors as float32 (n, width), by key ("*" for single-tensor files,
    "clip_l" / "clip_g" for SDXL)."""

    name: str
    token: str
    layout: str
    vectors: dict[str, np.ndarray]
    path: Path | None = None
    _hash: list = field(default_factory=list, repr=False, compare=False)

    @property
    def count(self) -> int:
        """Vectors per encoder (tokens the embedding takes in a chunk)."""
        return next(iter(self.vectors.values())).shape[0]

    @property
    def architecture(self) -> str:
        """The base family the widths fit."""
        return fits({k: v.shape[1] for k, v in self.vectors.items()})

    def for_encoder(self, component: str, width: int, *, xl: bool) -> np.ndarray:
        """The (n, width) vectors for text encoder ``component`` of ``width`` (EmbeddingError naming
        the file when they do not fit). SDXL models take the clip_l / clip_g halves of an SDXL file."""
        where = self.path or self.name
        if self.layout == "sdxl":
            key = SDXL_KEYS.get(component) if xl else None
            if key is None:
                raise EmbeddingError(f"{where}: an SDXL embedding (clip_l + clip_g); this model's {component} is "
                                     f"{WIDTHS.get(width, width)} ({width} wide), not an SDXL base's")
            vec = self.vectors[key]
        else:
            vec = self.vectors["*"]
        if vec.shape[1] != width:
            raise EmbeddingError(f"{where}: embedding vectors are {vec.shape[1]} wide ({self.architecture}); this "
                                 f"model's {component} ({WIDTHS.get(width, '?')}) needs {width}")
        return vec

    def short_hash(self) -> str:
        """A1111's ``shorthash``: the first 12 hex digits of the file's sha256 ('' without a file)."""
        if not self._hash:
            self._hash.append(_sha256(self.path)[:12] if self.path is not None else "")
        return self._hash[0]


def fits(widths: dict[str, int]) -> str:
    """The base family an embedding's widths (by vectors key) fit."""
    if set(widths) == {"clip_l", "clip_g"}:
        known = widths == {"clip_l": 768, "clip_g": 1280}
        return "SDXL (CLIP-L + OpenCLIP-bigG)" if known else f"an SDXL-layout model ({widths['clip_l']} + {widths['clip_g']})"
    width = next(iter(widths.values()))
    family = {768: "SD 1.x (CLIP-L)", 1024: "SD 2.x (OpenCLIP-H)", 1280: "an SDXL refiner (OpenCLIP-bigG)"}
    return family.get(width, f"a text encoder {width} wide (no released model)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _vectors(where, key: str, shape: tuple) -> tuple[int, int]:
    """(n, width) of one tensor's shape, checked (EmbeddingError naming the file and key). Any width up
    to MAX_WIDTH passes here (tiny test models too); ``Embedding.for_encoder`` checks it against the
    text encoder that receives the vectors."""
    if len(shape) == 1:
        shape = (1, *shape)
    if len(shape) != 2:
        raise EmbeddingError(f"{where}: tensor {key!r} has shape {list(shape)}; an embedding is (vectors, width)")
    n, width = shape
    if not 1 <= width <= MAX_WIDTH:
        raise EmbeddingError(f"{where}: tensor {key!r} is {width} wide; text encoders are 768 (CLIP-L), 1024 "
                             f"(OpenCLIP-H) or 1280 (OpenCLIP-bigG) wide")
    if not 1 <= n <= MAX_VECTORS:
        raise EmbeddingError(f"{where}: tensor {key!r} has {n} vectors; an embedding has 1 to {MAX_VECTORS}")
    return n, width


def recognise(where, shapes: dict[str, tuple]) -> tuple[str, dict[str, str]]:
    """The layout of a file from its keys and shapes: (layout, {file key -> vectors key}).

    Raises EmbeddingError naming the first key that does not belong to any layout. Nothing is read
    but the shapes, so the sizes are known before a byte of data is.
    """
    keys = list(shapes)
    if not keys:
        raise EmbeddingError(f"{where}: no tensors; not an embedding")
    if "clip_l" in shapes or "clip_g" in shapes:
        extra = [k for k in keys if k not in ("clip_l", "clip_g")]
        if extra or len(keys) != 2:
            bad = extra[0] if extra else ("clip_g" if "clip_l" in shapes else "clip_l") + " (missing)"
            raise EmbeddingError(f"{where}: unrecognised key {bad!r}; an SDXL embedding holds exactly clip_l and clip_g")
        n_l, _ = _vectors(where, "clip_l", shapes["clip_l"])
        n_g, _ = _vectors(where, "clip_g", shapes["clip_g"])
        if n_l != n_g:
            raise EmbeddingError(f"{where}: clip_l has {n_l} vectors, clip_g {n_g}; they must agree")
        return "sdxl", {"clip_l": "clip_l", "clip_g": "clip_g"}
    if len(keys) != 1:
        raise EmbeddingError(f"{where}: unrecognised key {keys[1]!r}; an embedding holds one tensor (emb_params or "
                             f"a diffusers <token>) or clip_l + clip_g, not {len(keys)} tensors")
    _vectors(where, keys[0], shapes[keys[0]])
    return ("a1111" if keys[0] == "emb_params" else "diffusers"), {keys[0]: "*"}


def from_tensors(name: str, tensors: dict, *, path: Path | None = None) -> Embedding:
    """An Embedding from a file's tensors (host arrays by key), recognised by ``recognise``."""
    where = path or name
    layout, keys = recognise(where, {k: tuple(np.shape(v)) for k, v in tensors.items()})
    vectors = {}
    for key, slot in keys.items():
        a = np.asarray(tensors[key]).astype(np.float32)
        a = a.reshape(1, -1) if a.ndim == 1 else a
        if not np.all(np.isfinite(a)):
            raise EmbeddingError(f"{where}: tensor {key!r} holds NaN or infinite values")
        vectors[slot] = a
    token = next(iter(keys)) if layout == "diffusers" else name
    return Embedding(name, token, layout, vectors, path)


def refuse_pickle(path: Path) -> None:
    """EmbeddingError if ``path`` is a pickle (``.pt`` / ``.bin`` suffix or torch.save / pickle bytes),
    with the conversion command (refsd.weights.refuse_pickle does the recognising)."""
    from refsd.weights import refuse_pickle as _refuse

    try:
        _refuse(path)
    except WeightsError as e:
        out = path.with_suffix(SUFFIX)
        reason = str(e).split(";")[0]
        raise EmbeddingError(f"{reason}; {HINT.format(path=path, out=out)}") from None


def load_embedding(path, *, name: str | None = None) -> Embedding:
    """Read one embedding file (safetensors only; pickles are refused with the conversion command)."""
    from refsd.weights import SafeTensorsFile

    path = Path(path)
    refuse_pickle(path)
    with SafeTensorsFile(path) as f:
        recognise(path, {k: f.info(k).shape for k in f.keys()})  # sizes checked before any data is read
        tensors = {k: np.array(f.numpy(k)) for k in f.keys()}
    return from_tensors(name or path.stem, tensors, path=path)


def describe(path) -> list[str] | None:
    """``refsd info`` lines for an embedding file (from its header), or None if it is not one."""
    from refsd.weights import read_header

    header = read_header(path)
    try:
        layout, keys = recognise(path, {k: t.shape for k, t in header.tensors.items()})
    except EmbeddingError:
        return None
    shapes = {k: header.tensors[k].shape for k in keys}
    count = _vectors(path, *next(iter(shapes.items())))[0]
    kind = {"a1111": "A1111 / ComfyUI (emb_params)", "sdxl": "SDXL (clip_l + clip_g)",
            "diffusers": f"diffusers learned_embeds (token {next(iter(keys))!r})"}[layout]
    widths = {keys[k]: int(s[-1]) for k, s in shapes.items()}
    width = " + ".join(f"{k} {w}" for k, w in widths.items()) if layout == "sdxl" else str(widths["*"])
    return [f"textual-inversion embedding: {kind}", f"vectors: {count}", f"width: {width}", f"fits: {fits(widths)}",
            f"prompt: A1111 '{Path(path).stem}', ComfyUI 'embedding:{Path(path).stem}', diffusers "
            f"'{next(iter(keys)) if layout == 'diffusers' else Path(path).stem}'"]


# --------------------------------------------------------------------------------------------
# a folder of embeddings


class Embeddings:
    """The embeddings a run may use: the ``.safetensors`` files of a folder (and its subfolders, as
    A1111 walks them), by stem, read on first use. ``Embeddings.of([...])`` wraps loaded ones.

    Order (diffusers' token ids follow it): files sorted by their path relative to the folder.
    """

    def __init__(self, files: dict[str, Path], folder: Path | None = None, loaded: dict[str, Embedding] | None = None):
        self.folder = folder
        self.files = dict(files)  # stem -> path, in order
        self._loaded = dict(loaded or {})
        self.placed: dict[str, Embedding] = {}  # what prompts used, in order (PNG "TI hashes")

    @classmethod
    def from_folder(cls, folder) -> Embeddings:
        folder = Path(folder)
        if not folder.is_dir():
            raise EmbeddingError(f"--embedding-dir {folder}: not a folder")
        found: list[Path] = []
        for root, dirs, names in os.walk(folder, followlinks=False):
            dirs.sort()
            found += [Path(root) / n for n in sorted(names) if Path(n).suffix.lower() in (SUFFIX, *PICKLE_SUFFIXES)]
            if len(found) > MAX_FILES:
                raise EmbeddingError(f"--embedding-dir {folder}: more than {MAX_FILES} embedding files")
        files: dict[str, Path] = {}
        for p in sorted(found, key=lambda q: (q.suffix.lower() != SUFFIX, str(q.relative_to(folder)))):
            files.setdefault(p.stem, p)  # a .safetensors wins over a .pt of the same name
        return cls(files, folder)

    @classmethod
    def of(cls, embeddings) -> Embeddings:
        """Embeddings already loaded (``from_tensors`` / ``load_embedding``), in the given order."""
        items = list(embeddings)
        return cls({e.name: e.path for e in items}, None, {e.name: e for e in items})

    def __len__(self) -> int:
        return len(self.files)

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> Embedding:
        """The embedding whose stem is ``name`` (read now if not yet)."""
        if name not in self._loaded:
            self._loaded[name] = load_embedding(self.files[name], name=name)
        return self._loaded[name]

    def comfy_lookup(self, name: str) -> Embedding | None:
        """ComfyUI ``load_embed``: ``name`` as a path inside the folder, as given or with .safetensors /
        .pt / .bin appended; a name leaving the folder finds nothing. None when absent."""
        if self.folder is None:
            return self.get(name) if name in self.files else None
        base = self.folder.resolve()
        path = (base / name).resolve()
        if os.path.commonpath((base, path)) != str(base):
            return None
        for p in (path, *(Path(f"{path}{ext}") for ext in (SUFFIX, *PICKLE_SUFFIXES))):
            if p.is_file():
                key = p.stem if self.files.get(p.stem) == p else str(p)
                if key not in self._loaded:
                    self._loaded[key] = load_embedding(p)
                return self._loaded[key]
        return None

    def tokens(self) -> dict[str, str]:
        """diffusers prompt token -> stem, for every file (keys read from the headers only)."""
        from refsd.weights import read_header

        out = {}
        for name, path in self.files.items():
            if name in self._loaded:
                tok = self._loaded[name].token
            else:
                refuse_pickle(path)
                layout, keys = recognise(path, {k: t.shape for k, t in read_header(path).tensors.items()})
                tok = next(iter(keys)) if layout == "diffusers" else name
            if tok in out:
                raise EmbeddingError(f"{path}: token {tok!r} is also {self.files[out[tok]]}'s (diffusers refuses "
                                     f"a token twice)")
            out[tok] = name
        return out

    def ti_hashes(self) -> str | None:
        """A1111's "TI hashes" value for the embeddings prompts used: ``name: shorthash, ...`` (names
        without ':' and ','), or None when none was used."""
        parts = [f"{e.name.replace(':', '').replace(',', '')}: {e.short_hash()}" for e in self.placed.values()
                 if e.short_hash()]
        return ", ".join(parts) or None


# --------------------------------------------------------------------------------------------
# token ids for embedding vectors


class TokenVectors:
    """Ids past the tokenizer's vocabulary for embedding vectors, for one text encoder: vector j of
    the k-th embedding placed gets ``base + row``. ``table(like)`` is the (rows, width) array the
    text encoder appends to its token-embedding matrix (refsd.text.clip.embeddings)."""

    def __init__(self, base: int, component: str, width: int, *, xl: bool):
        self.base, self.component, self.width, self.xl = base, component, width, xl
        self.rows: list[np.ndarray] = []
        self.ids_of: dict[int, list[int]] = {}

    def ids(self, emb: Embedding) -> list[int]:
        """The ids of ``emb``'s vectors (rows appended on its first use)."""
        key = id(emb)
        if key not in self.ids_of:
            vec = emb.for_encoder(self.component, self.width, xl=self.xl)
            start = self.base + sum(r.shape[0] for r in self.rows)
            self.rows.append(vec)
            self.ids_of[key] = list(range(start, start + vec.shape[0]))
        return self.ids_of[key]

    def table(self, like):
        """(rows, width) in ``like``'s dtype on its device, or None when no embedding was placed."""
        if not self.rows:
            return None
        return rxp.asarray(np.concatenate(self.rows, axis=0), like=like, dtype=like.dtype)

    def placeholder_ids(self, ids: list[int]) -> list[int]:
        """``ids`` with embedding ids replaced by 0, A1111's placeholder (for the pooling position)."""
        return [0 if i >= self.base else i for i in ids]


@dataclass
class PromptEmbeddings:
    """What a tokenizer's chunker needs to place embeddings of ``embeddings`` for one text encoder:
    the profile's lookup (``a1111_match``, ``comfy_ids``, ``diffusers_tokens``) and the ids they get
    (``vectors``). ``used`` collects the embeddings placed, in order (PNG "TI hashes")."""

    embeddings: Embeddings
    tokenizer: object
    vectors: TokenVectors
    _a1111: dict | None = None
    _diffusers: list | None = None

    @classmethod
    def for_encoder(cls, embeddings: Embeddings, encoder, *, xl: bool) -> PromptEmbeddings:
        """For a refsd.pipelines.model.TextEncoder: ids past its config's vocab_size, its width."""
        cfg = encoder.config
        return cls(embeddings, encoder.tokenizer, TokenVectors(cfg.vocab_size, encoder.component, cfg.hidden_size, xl=xl))

    @property
    def used(self) -> dict:
        """The embeddings placed in any prompt so far, by name (shared by every encoder and prompt)."""
        return self.embeddings.placed

    def _place(self, emb: Embedding) -> list[int]:
        self.used.setdefault(emb.name, emb)
        return self.vectors.ids(emb)

    # A1111: stems matched on token ids (EmbeddingDatabase.register_embedding_by_name / find_embedding_at_position)
    def a1111_match(self, tokens: list[int], position: int) -> tuple[list[int], int] | None:
        """(vector ids, tokens consumed) when an embedding's name starts at ``tokens[position]``:
        the longest name first, as A1111 sorts its ids_lookup."""
        if self._a1111 is None:
            lookup: dict[int, list] = {}
            for name in self.embeddings.names():
                ids = self.tokenizer.encode(name)
                if ids:
                    lookup.setdefault(ids[0], []).append((ids, name))
            self._a1111 = {k: sorted(v, key=lambda x: len(x[0]), reverse=True) for k, v in lookup.items()}
        for ids, name in self._a1111.get(tokens[position], ()):
            if tokens[position:position + len(ids)] == ids:
                return self._place(self.embeddings.get(name)), len(ids)
        return None

    # ComfyUI: embedding:name (SDTokenizer._try_get_embedding)
    def comfy_ids(self, name: str) -> tuple[list[int], str]:
        """(vector ids, leftover text) for ``embedding:name``; a trailing comma is retried without it and
        kept as text, as ComfyUI does. An unknown name is an error (ComfyUI warns and drops it)."""
        emb = self.embeddings.comfy_lookup(name)
        leftover = ""
        if emb is None:
            stripped = name.strip(",")
            if len(stripped) < len(name):
                emb = self.embeddings.comfy_lookup(stripped)
                leftover = f"{name[len(stripped):]} "
        if emb is None:
            where = self.embeddings.folder or "the given embeddings"
            raise EmbeddingError(f"prompt names embedding:{name}, which is not in {where}")
        return self._place(emb), leftover

    # diffusers: added tokens (load_textual_inversion, maybe_convert_prompt)
    def diffusers_tokens(self) -> list[tuple[str, str, int]]:
        """(added token, its normalized form, id) for every vector of every embedding, in load order:
        ``token``, ``token_1``, ... as load_textual_inversion adds them. Ids follow the folder's order
        (every file is loaded, as diffusers' tokenizer holds every loaded token)."""
        if self._diffusers is None:
            out = []
            for tok, name in self.embeddings.tokens().items():
                emb = self.embeddings.get(name)
                ids = self.vectors.ids(emb)
                names = [tok] + [f"{tok}_{i}" for i in range(1, len(ids))]
                out += [(t, normalize(t), i) for t, i in zip(names, ids)]
            self._diffusers = out
        return self._diffusers

    def note_diffusers_use(self, token_ids: list[int]) -> None:
        """Record the embeddings whose first vector's id a diffusers-tokenized prompt holds."""
        first = {i: name for tok, name in self.embeddings.tokens().items() for t, _, i in self.diffusers_tokens()
                 if t == tok}
        for i in token_ids:
            if i in first:
                emb = self.embeddings.get(first[i])
                self.used.setdefault(emb.name, emb)


def expand_diffusers_prompt(prompt: str, tokens: list[tuple[str, str, int]], found: set[str]) -> str:
    """diffusers ``_maybe_convert_prompt``: each multi-vector token found in the prompt (its normalized
    form, as the tokenizer reports it) is replaced in the raw text by ``token token_1 ... token_{n-1}``.
    Only tokens whose text is already normalized are expanded (the tokenizer reports the normalized
    form, which diffusers looks up among the added tokens)."""
    added = {t for t, _, _ in tokens}
    for tok in sorted(found):
        if tok in added and f"{tok}_1" in added:
            parts, i = [tok], 1
            while f"{tok}_{i}" in added:
                parts.append(f"{tok}_{i}")
                i += 1
            prompt = prompt.replace(tok, " ".join(parts))
    return prompt


# --------------------------------------------------------------------------------------------
# A1111 .pt -> safetensors (opt-in; the only place torch and unpickling appear)


def convert_pickle(src, dst) -> Embedding:
    """Convert an A1111 ``.pt`` / ``.bin`` embedding (or a diffusers learned_embeds.bin) to safetensors
    with ``torch.load(weights_only=True)`` (torch's restricted unpickler: tensors, dicts, numbers and
    strings only). Writes ``emb_params`` (or clip_l + clip_g, or the diffusers token) atomically."""
    from refsd.weights import save_safetensors

    src, dst = Path(src), Path(dst)
    if Path(dst).suffix.lower() != SUFFIX:
        raise EmbeddingError(f"{dst}: the output must be a {SUFFIX} file")
    try:
        import torch
    except ImportError:
        raise EmbeddingError("refsd convert-embedding needs torch (pip install torch); refsd itself does not") from None
    if not src.is_file():
        raise EmbeddingError(f"{src}: no such file")
    try:
        data = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's restricted unpickler refuses anything but plain data
        raise EmbeddingError(f"{src}: torch.load(weights_only=True) refused it ({' '.join(str(e).split())[:200]}); "
                             f"not converted") from None
    tensors = _pickle_tensors(src, data, torch)
    emb = from_tensors(dst.stem, tensors, path=None)
    save_safetensors(dst, {k: np.ascontiguousarray(v) for k, v in tensors.items()})
    return emb


def _pickle_tensors(src: Path, data, torch) -> dict[str, np.ndarray]:
    """The embedding tensors of a loaded A1111 / diffusers pickle, as A1111's load_from_file reads them."""
    if isinstance(data, dict) and "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{src}: string_to_param must hold one tensor (A1111: 'embedding file has "
                                 f"multiple terms in it')")
        return {"emb_params": next(iter(params.values())).detach().float().numpy()}
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return {k: v.detach().float().numpy() for k, v in data.items()}
    raise EmbeddingError(f"{src}: neither an A1111 embedding (string_to_param) nor a dict of tensors")


def attach_embeddings(model, embeddings):
    """``model`` (refsd.pipelines.Model) with textual-inversion embeddings its prompts may name:
    an Embeddings, a folder (``--embedding-dir``) or a list of Embedding. The weights are shared."""
    from dataclasses import replace

    if embeddings is not None and not isinstance(embeddings, Embeddings):
        if isinstance(embeddings, (str, os.PathLike)):
            embeddings = Embeddings.from_folder(embeddings)
        else:
            embeddings = Embeddings.of(embeddings)
    return replace(model, embeddings=embeddings)
