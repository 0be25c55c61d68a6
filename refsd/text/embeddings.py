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
refused by their content; refsd.text.embedding_pickle (``refsd convert-embedding``) converts one
with torch's restricted loader, on request only.

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

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refsd import xp as rxp
from refsd.errors import WeightsError
from refsd.files import sha256_file
from refsd.text.tokenizer import normalize

SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".bin")  # what A1111 and ComfyUI also look for
MAX_VECTORS = 75  # one 75-token chunk: A1111 cannot place a longer embedding
MAX_WIDTH = 8192  # wider than any CLIP text encoder
MAX_FILES = 10_000  # an --embedding-dir is listed, never walked without bound
WIDTHS = {768: "CLIP-L", 1024: "OpenCLIP-H", 1280: "OpenCLIP-bigG"}
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # SDXL's encoders -> the file's halves
HINT = ("refsd never unpickles: convert it once with `refsd convert-embedding {path} {out}` "
        "(torch.load(weights_only=True))")


class EmbeddingError(WeightsError):
    """An embedding file that is not one, does not fit the model, or a prompt naming an unknown one."""


# --------------------------------------------------------------------------------------------
# one embedding


@dataclass(frozen=True)
class Embedding:
    """One textual-inversion embedding. ``name``: the file's stem (A1111's prompt word, ComfyUI's
    ``embedding:name``); ``token``: the diffusers prompt token (a diffusers file's key, else the stem,
    as one passes ``token=`` to ``load_textual_inversion``); ``layout``: "emb_params" | "sdxl" | "token";
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
            family = f" ({WIDTHS[width]})" if width in WIDTHS else ""
            raise EmbeddingError(f"{where}: embedding vectors are {vec.shape[1]} wide (for {self.architecture}); this "
                                 f"model's {component}{family} needs {width}")
        return vec

    def short_hash(self) -> str:
        """A1111's ``shorthash``: the first 12 hex digits of the file's sha256 ('' without a file)."""
        if not self._hash:
            self._hash.append(sha256_file(self.path)[:12] if self.path is not None else "")
        return self._hash[0]


def fits(widths: dict[str, int]) -> str:
    """The base family an embedding's widths (by vectors key) fit."""
    if set(widths) == {"clip_l", "clip_g"}:
        known = widths == {"clip_l": 768, "clip_g": 1280}
        if known:
            return "SDXL (CLIP-L + OpenCLIP-bigG)"
        return f"an SDXL-layout model ({widths['clip_l']} + {widths['clip_g']})"
    width = next(iter(widths.values()))
    family = {768: "SD 1.x (CLIP-L)", 1024: "SD 2.x (OpenCLIP-H)", 1280: "an SDXL refiner (OpenCLIP-bigG)"}
    return family.get(width, f"a text encoder {width} wide (no released model)")


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
            raise EmbeddingError(f"{where}: unrecognised key {bad!r}; an SDXL embedding holds exactly clip_l and "
                                 f"clip_g")
        n_l, _ = _vectors(where, "clip_l", shapes["clip_l"])
        n_g, _ = _vectors(where, "clip_g", shapes["clip_g"])
        if n_l != n_g:
            raise EmbeddingError(f"{where}: clip_l has {n_l} vectors, clip_g {n_g}; they must agree")
        return "sdxl", {"clip_l": "clip_l", "clip_g": "clip_g"}
    if len(keys) != 1:
        raise EmbeddingError(f"{where}: unrecognised key {keys[1]!r}; an embedding holds one tensor (emb_params or "
                             f"a diffusers <token>) or clip_l + clip_g, not {len(keys)} tensors")
    _vectors(where, keys[0], shapes[keys[0]])
    return ("emb_params" if keys[0] == "emb_params" else "token"), {keys[0]: "*"}


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
    token = next(iter(keys)) if layout == "token" else name
    return Embedding(name, token, layout, vectors, path)


def refuse_pickle(path: Path) -> None:
    """EmbeddingError if ``path`` is a pickle (``.pt`` / ``.bin`` suffix or torch.save / pickle bytes),
    with the conversion command (refsd.weights.refuse_pickle does the recognising)."""
    from refsd.weights import refuse_pickle as _refuse

    try:
        _refuse(path)
    except WeightsError as e:
        out = path.with_suffix(SUFFIX)
        reason = str(e).split(";")[0].replace("pickle-based checkpoint", "pickled embedding")
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


def describe(header) -> list[str]:
    """``refsd info`` lines for an embedding file from its safetensors header (refsd.weights.Header):
    its layout, vectors, widths, the base family they fit and how prompts name it; [] if not one."""
    path = header.path
    try:
        layout, keys = recognise(path, {k: t.shape for k, t in header.tensors.items()})
    except EmbeddingError:
        return []
    shapes = {k: header.tensors[k].shape for k in keys}
    count = _vectors(path, *next(iter(shapes.items())))[0]
    kind = {"emb_params": "A1111 / ComfyUI (emb_params)", "sdxl": "SDXL (clip_l + clip_g)",
            "token": f"diffusers learned_embeds (token {next(iter(keys))!r})"}[layout]
    widths = {keys[k]: int(s[-1]) for k, s in shapes.items()}
    width = " + ".join(f"{k} {w}" for k, w in widths.items()) if layout == "sdxl" else str(widths["*"])
    return [f"textual-inversion embedding: {kind}", f"vectors: {count}", f"width: {width}", f"fits: {fits(widths)}",
            f"prompt: A1111 '{Path(path).stem}', ComfyUI 'embedding:{Path(path).stem}', diffusers "
            f"'{next(iter(keys)) if layout == 'token' else Path(path).stem}'"]


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
        self._tokens: dict[str, str] | None = None

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
        """diffusers prompt token -> stem, for every file (keys read from the headers only, once)."""
        from refsd.weights import read_header

        if self._tokens is not None:
            return self._tokens
        out = {}
        for name, path in self.files.items():
            if name in self._loaded:
                tok = self._loaded[name].token
            elif path.suffix.lower() != SUFFIX:
                continue  # a pickle's token is inside the pickle: named in check_diffusers_tokens' error
            else:
                layout, keys = recognise(path, {k: t.shape for k, t in read_header(path).tensors.items()})
                tok = next(iter(keys)) if layout == "token" else name
            if tok in out:
                raise EmbeddingError(f"{path}: token {tok!r} is also {self.files[out[tok]]}'s (diffusers refuses "
                                     f"a token twice)")
            out[tok] = name
        self._tokens = out
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
        """The ids of ``emb``'s vectors (rows appended on its first use). ``width`` None (a check of
        the prompt's names before the model is loaded): ids only, widths unchecked."""
        key = id(emb)
        if key not in self.ids_of:
            vec = emb.vectors[next(iter(emb.vectors))] if self.width is None else \
                emb.for_encoder(self.component, self.width, xl=self.xl)
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
    skipped: list = field(default_factory=list)  # diffusers: the folder's files of another width

    @classmethod
    def for_encoder(cls, embeddings: Embeddings, encoder, *, xl: bool) -> PromptEmbeddings:
        """For a refsd.pipelines.model.TextEncoder: ids past its config's vocab_size, its width."""
        cfg = encoder.config
        vectors = TokenVectors(cfg.vocab_size, encoder.component, cfg.hidden_size, xl=xl)
        return cls(embeddings, encoder.tokenizer, vectors)

    def unread(self) -> list[Path]:
        """The folder's files no diffusers token came from: pickles (never read) and files of another width."""
        pickles = [p for p in self.embeddings.files.values() if p is not None and p.suffix.lower() != SUFFIX]
        return [*pickles, *self.skipped]

    @property
    def used(self) -> dict:
        """The embeddings placed in any prompt so far, by name (shared by every encoder and prompt)."""
        return self.embeddings.placed

    def _place(self, emb: Embedding) -> list[int]:
        self.used.setdefault(emb.name, emb)
        return self.vectors.ids(emb)

    def fits(self, emb: Embedding) -> bool:
        """Whether ``emb`` fits this encoder (A1111 and diffusers' loading skip one that does not)."""
        if self.vectors.width is None:
            return True
        try:
            emb.for_encoder(self.vectors.component, self.vectors.width, xl=self.vectors.xl)
        except EmbeddingError:
            return False
        return True

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
                emb = self.embeddings.get(name)
                if self.fits(emb):  # A1111 skips (never registers) an embedding of another width: text
                    return self._place(emb), len(ids)
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
                if not self.fits(emb):  # another model's embedding: not loaded (diffusers would refuse it)
                    self.skipped.append(emb.path or emb.name)
                    continue
                ids = self.vectors.ids(emb)
                names = [tok] + [f"{tok}_{i}" for i in range(1, len(ids))]
                out += [(t, normalize(t), i) for t, i in zip(names, ids)]
            self._diffusers = out
        return self._diffusers

    def diffusers_ids(self, prompt: str, *, pad_token: int) -> list[int]:
        """The 77 ids diffusers' pipeline gives ``prompt`` with every file loaded by
        ``load_textual_inversion``: unknown ``<token>`` checked, multi-vector tokens expanded
        (``maybe_convert_prompt``), then the tokenizer call with the added tokens."""
        tokens = self.diffusers_tokens()
        check_diffusers_tokens(prompt, tokens, self.embeddings.folder or "the given embeddings", self.unread())
        added = {norm: i for _, norm, i in tokens}
        present = set(self.tokenizer.encode(prompt, added=added))
        prompt = expand_diffusers_prompt(prompt, tokens, {norm for _, norm, i in tokens if i in present})
        ids = self.tokenizer(prompt, pad_token=pad_token, added=added)
        self.note_diffusers_use(ids)
        return ids

    def note_diffusers_use(self, token_ids: list[int]) -> None:
        """Record the embeddings whose first vector's id a diffusers-tokenized prompt holds."""
        first = {i: name for tok, name in self.embeddings.tokens().items() for t, _, i in self.diffusers_tokens()
                 if t == tok}
        for i in token_ids:
            if i in first:
                emb = self.embeddings.get(first[i])
                self.used.setdefault(emb.name, emb)


def check_diffusers_tokens(prompt: str, tokens: list[tuple[str, str, int]], where, unread=()) -> None:
    """EmbeddingError for a ``<token>`` in the prompt that no loaded embedding adds (with embeddings
    given, a diffusers-style token is meant as one; diffusers would tokenize it as text)."""
    import re

    added = {norm for _, norm, _ in tokens}
    for word in re.findall(r"<[^<>|\s]+>", normalize(prompt)):
        if word not in added:
            known = ", ".join(sorted(t for t, _, _ in tokens if not re.search(r"_\d+$", t))[:8]) or "none"
            names = sorted(Path(p).name for p in unread)
            extra = f"; not loaded: {', '.join(names[:4])} (pickles, or another model's width)" if names else ""
            raise EmbeddingError(f"prompt names {word}, which no embedding in {where} adds (tokens: {known}){extra}")


def check_prompt_names(embeddings: Embeddings, prompts, syntax: str, *, xl: bool) -> None:
    """Before a model is loaded: every embedding the prompts name under ``syntax`` exists and is a
    readable embedding file (EmbeddingError naming it). Widths are checked when the model encodes."""
    from refsd.text.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_package()
    for prompt in prompts:
        if prompt:
            vectors = TokenVectors(len(tokenizer.encoder), "text_encoder", None, xl=xl)
            lookup = PromptEmbeddings(embeddings, tokenizer, vectors)
            if syntax == "diffusers":
                lookup.diffusers_ids(prompt, pad_token=tokenizer.eos)
            else:
                tokenizer.chunks(prompt, syntax=syntax, embeddings=lookup)
    embeddings.placed.clear()


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


# --------------------------------------------------------------------------------------------
# refsd generate: --embedding-dir and a PNG's "TI hashes"


def parse_ti_hashes(text: str, what: str) -> dict[str, str]:
    """A1111's ``TI hashes`` value ``name: hash, name: hash`` -> {name: hash}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, h = part.rpartition(":")
        if not sep or not name.strip() or not h.strip():
            raise EmbeddingError(f"{what}: TI hashes entry {part!r} is not 'name: hash'")
        out[name.strip()] = h.strip()
    return out


def for_job(folder, png_hashes: dict[str, str] | None, prompts, *, syntax: str, xl: bool,
            what: str = "the PNG", notes: list | None = None) -> Embeddings | None:
    """``refsd generate``'s embeddings, checked before the model loads: ``folder`` (--embedding-dir, or
    None); ``png_hashes``: a --from-png image's TI hashes, each of which must be in the folder (a file
    whose short hash differs adds a line to ``notes``: another file, or a .pt converted to
    .safetensors, whose bytes and so hash differ); every embedding the prompts name must exist
    (EmbeddingError naming it)."""
    if folder is None:
        if png_hashes:
            raise EmbeddingError(f"{what} used the embeddings {', '.join(png_hashes)}: pass --embedding-dir DIR (the "
                                 f"PNG names them and their hashes, not where their files are)")
        if syntax == "comfyui":  # embedding:name is never text under ComfyUI's rules
            check_prompt_names(Embeddings({}), prompts, syntax, xl=xl)
        return None
    embeddings = Embeddings.from_folder(folder)
    for name, expected in (png_hashes or {}).items():
        stems = {n.replace(":", "").replace(",", ""): n for n in embeddings.names()}
        if name not in stems:
            raise EmbeddingError(f"{what} used the embedding {name} (hash {expected}), which is not in {folder}")
        found = embeddings.get(stems[name])
        if found.short_hash() != expected and notes is not None:
            notes.append(f"note: {found.path} has hash {found.short_hash()}; {what} used a {name} with hash "
                         f"{expected} (another file, or a converted .pt): the image may differ")
    check_prompt_names(embeddings, prompts, syntax, xl=xl)
    return embeddings
