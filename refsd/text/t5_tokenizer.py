"""T5's SentencePiece Unigram tokenizer, exact with transformers 5 ``T5TokenizerFast`` (the tokenizers-backed
``T5Tokenizer``), read from a diffusers ``tokenizer_3`` (SD3) / ``tokenizer_2`` (Flux) folder.

What transformers 5 builds for T5, whichever file it reads (``tokenizer.json`` when present, else
``spiece.model``), and what this module does step by step:

1. special tokens (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``<extra_id_0..99>``) are cut out of the RAW
   text, leftmost-longest, and map straight to their ids; the pieces between are tokenized separately;
2. normalizer ``Precompiled``: SentencePiece's ``precompiled_charsmap`` (T5: ``nmt_nfkc``, NFKC plus
   whitespace / control-character rules), a double-array trie over UTF-8 keys and a blob of
   NUL-terminated replacements, applied per extended grapheme cluster as tokenizers' spm_precompiled
   does: a cluster of fewer than 6 bytes is replaced by the replacement of the *shortest* key that is a
   prefix of it (the rest of the cluster is dropped: tokenizers' rule, not SentencePiece's longest
   match); otherwise each character by itself (``_precompiled``);
3. pre-tokenizer ``WhitespaceSplit`` (Unicode White_Space, removed) then ``Metaspace`` (replacement
   ``▁``, prepend_scheme "always", split): each word gets a leading ``▁`` unless it has one and is
   split before every ``▁``;
4. model ``Unigram``: the Viterbi best segmentation of each piece by the vocabulary's log-probability
   scores (float64 sums; ties keep the earlier split point); a character no piece starts with becomes
   ``<unk>`` scored min_score - 10, and consecutive unknowns fuse into one ``<unk>``;
5. ``</s>`` appended; with ``max_length``, truncated to max_length - 1 tokens before it and padded with
   ``<pad>``: diffusers' ``tokenizer(prompt, padding="max_length", max_length=..., truncation=True)``.

transformers 5 rebuilds that pipeline from the vocabulary and charsmap of either file, ignoring a
tokenizer.json's own normalizer / pre-tokenizer sections (older files list a ``Replace(" {2,}")``
too), so this module reads only the vocabulary, the charsmap and the special tokens.

Grapheme clusters follow UAX #29 for the rules that can form a cluster under 6 bytes (CR LF, controls,
Extend / ZWJ / SpacingMark, Prepend, Hangul syllables, regional-indicator pairs) from Python's
``unicodedata``; the emoji-ZWJ and Indic-conjunct rules (GB11, GB9c) only join clusters of 6 bytes or
more, which are normalized character by character either way. Known difference: characters assigned
after the running Python's Unicode version (3.11: Unicode 14) get no grapheme property.

Loading parses ``tokenizer.json`` with ``json`` and ``spiece.model`` (a ModelProto protobuf) by hand:
no code runs, sentencepiece is not imported.

References: transformers v5 models/t5/tokenization_t5.py (T5Tokenizer.__init__: Unigram, Precompiled,
WhitespaceSplit + Metaspace, TemplateProcessing "$A </s>"), tokenization_utils_tokenizers.py
(convert_to_native_format: vocabulary and charsmap taken from tokenizer.json), convert_slow_tokenizer.py
(SentencePieceExtractor); huggingface/spm_precompiled src/lib.rs (DoubleArray::common_prefix_search,
Precompiled::transform / normalize_string); huggingface/tokenizers models/unigram/model.rs
(encode_optimized, K_UNK_PENALTY = 10, fuse_unk), pre_tokenizers/metaspace.rs, added_vocabulary.rs;
google/sentencepiece src/sentencepiece_model.proto (field numbers); Unicode UAX #29 (grapheme clusters).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import unicodedata
from pathlib import Path

from refsd.errors import RefsdError
from refsd.text.tokenizer import _WS, _split_special

PAD, EOS, UNK = 0, 1, 2  # T5's ids (SentencePiece trainer settings pad_id 0, eos_id 1, unk_id 2)
SPACE = "\u2581"  # "▁", SentencePiece's whitespace symbol
UNK_PENALTY = 10.0  # tokenizers' K_UNK_PENALTY: an unknown character scores min_score - 10
EXTRA_IDS = 100  # T5's sentinel tokens <extra_id_0> .. <extra_id_99>, appended after the pieces in reverse
MAX_FILE_BYTES = 64 << 20  # a T5 tokenizer.json is ~2.4 MB, spiece.model ~0.8 MB
SD3_MAX_SEQUENCE_LENGTH = 256  # diffusers StableDiffusion3Pipeline default max_sequence_length
FLUX_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline default (Flux-schnell: 256)

_WS_SPLIT = re.compile(f"[{_WS}]+")

# --------------------------------------------------------------------------------------------
# grapheme clusters (UAX #29, the rules that matter for clusters under 6 bytes)

# Other_Grapheme_Extend and the emoji modifiers (Grapheme_Cluster_Break=Extend beyond Mn / Me).
_EXTEND_MORE = ((0x09BE, 0x09BE), (0x09D7, 0x09D7), (0x0B3E, 0x0B3E), (0x0B57, 0x0B57), (0x0BBE, 0x0BBE),
                (0x0BD7, 0x0BD7), (0x0CC2, 0x0CC2), (0x0CD5, 0x0CD6), (0x0D3E, 0x0D3E), (0x0D57, 0x0D57),
                (0x0DCF, 0x0DCF), (0x0DDF, 0x0DDF), (0x1B35, 0x1B35), (0x200C, 0x200C), (0x302E, 0x302F),
                (0xFF9E, 0xFF9F), (0x1133E, 0x1133E), (0x11357, 0x11357), (0x114B0, 0x114B0), (0x114BD, 0x114BD),
                (0x115AF, 0x115AF), (0x11930, 0x11930), (0x1D165, 0x1D165), (0x1D16E, 0x1D172),
                (0x1F3FB, 0x1F3FF), (0xE0020, 0xE007F))
# Spacing combining marks (Mc) that are not SpacingMark (UAX #29 table 2 exceptions).
_NOT_SPACING = ((0x102B, 0x102C), (0x1038, 0x1038), (0x1062, 0x1064), (0x1067, 0x106D), (0x1083, 0x1083),
                (0x1087, 0x108C), (0x108F, 0x108F), (0x109A, 0x109C), (0x1A61, 0x1A61), (0x1A63, 0x1A64),
                (0xAA7B, 0xAA7B), (0xAA7D, 0xAA7D), (0x11720, 0x11721))
_PREPEND = ((0x0600, 0x0605), (0x06DD, 0x06DD), (0x070F, 0x070F), (0x0890, 0x0891), (0x08E2, 0x08E2),
            (0x0D4E, 0x0D4E), (0x110BD, 0x110BD), (0x110CD, 0x110CD), (0x111C2, 0x111C3), (0x1193F, 0x1193F),
            (0x11941, 0x11941), (0x11A3A, 0x11A3A), (0x11A84, 0x11A89), (0x11D46, 0x11D46))
# Unassigned default-ignorable code points (Grapheme_Cluster_Break=Control).
_IGNORABLE_CN = ((0x2065, 0x2065), (0xFFF0, 0xFFF8), (0xE0000, 0xE0000), (0xE0002, 0xE001F),
                 (0xE0080, 0xE00FF), (0xE01F0, 0xE0FFF))


def _in(cp: int, ranges) -> bool:
    return any(a <= cp <= b for a, b in ranges)


def _break_class(ch: str) -> str:
    """The Grapheme_Cluster_Break value of ``ch`` among those the rules below use."""
    cp = ord(ch)
    if cp < 0x80:
        return "CR" if ch == "\r" else "LF" if ch == "\n" else "Control" if cp < 0x20 or cp == 0x7F else "Other"
    if cp == 0x200D:
        return "ZWJ"
    if _in(cp, _PREPEND):
        return "Prepend"
    if _in(cp, _EXTEND_MORE):
        return "Extend"
    if 0x1F1E6 <= cp <= 0x1F1FF:
        return "RI"
    if 0x1100 <= cp <= 0x115F or 0xA960 <= cp <= 0xA97C:
        return "L"
    if 0x1160 <= cp <= 0x11A7 or 0xD7B0 <= cp <= 0xD7C6:
        return "V"
    if 0x11A8 <= cp <= 0x11FF or 0xD7CB <= cp <= 0xD7FB:
        return "T"
    if 0xAC00 <= cp <= 0xD7A3:
        return "LV" if (cp - 0xAC00) % 28 == 0 else "LVT"
    if cp in (0x0E33, 0x0EB3):
        return "SpacingMark"
    cat = unicodedata.category(ch)
    if cat in ("Mn", "Me"):
        return "Extend"
    if cat == "Mc":
        return "Other" if _in(cp, _NOT_SPACING) else "SpacingMark"
    if cat in ("Cc", "Zl", "Zp", "Cf") or (cat == "Cn" and _in(cp, _IGNORABLE_CN)):
        return "Control"
    return "Other"


_HANGUL_JOINS = {("L", "L"), ("L", "V"), ("L", "LV"), ("L", "LVT"), ("LV", "V"), ("LV", "T"), ("V", "V"),
                 ("V", "T"), ("LVT", "T"), ("T", "T")}


def graphemes(text: str) -> list[str]:
    """Extended grapheme clusters of ``text`` (UAX #29 GB3-GB9b, GB6-GB8 Hangul, GB12-13 regional
    indicators; see the module docstring for what is left out)."""
    out: list[str] = []
    start, prev, ri_run = 0, None, 0
    for i, ch in enumerate(text):
        cls = _break_class(ch)
        if prev is not None and not _joins(prev, cls, ri_run):
            out.append(text[start:i])
            start = i
        ri_run = ri_run + 1 if cls == "RI" else 0
        prev = cls
    if start < len(text):
        out.append(text[start:])
    return out


def _joins(a: str, b: str, ri_run: int) -> bool:
    """No boundary between classes a and b (``ri_run``: regional indicators in a row ending at a)."""
    if a == "CR" and b == "LF":
        return True
    if a in ("Control", "CR", "LF") or b in ("Control", "CR", "LF"):
        return False
    if (a, b) in _HANGUL_JOINS or b in ("Extend", "ZWJ", "SpacingMark") or a == "Prepend":
        return True
    return a == "RI" and b == "RI" and ri_run % 2 == 1


# --------------------------------------------------------------------------------------------
# SentencePiece's precompiled charsmap


class Charsmap:
    """A ``precompiled_charsmap``: u32 trie size, the double-array trie (u32 units), then the
    NUL-terminated replacement strings the trie's values point into (spm_precompiled's layout)."""

    def __init__(self, blob: bytes, *, source: str = "precompiled_charsmap"):
        if len(blob) < 4:
            raise RefsdError(f"{source}: precompiled charsmap of {len(blob)} bytes is truncated")
        (size,) = struct.unpack_from("<I", blob, 0)
        if size % 4 or 4 + size > len(blob):
            raise RefsdError(f"{source}: precompiled charsmap trie size {size} does not fit its {len(blob)} bytes")
        self.units = struct.unpack_from(f"<{size // 4}I", blob, 4)
        self.normalized = blob[4 + size:]
        try:
            self.normalized.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RefsdError(f"{source}: precompiled charsmap replacements are not UTF-8 ({e})") from None
        self.source = source

    def prefix_values(self, key: bytes) -> list[int]:
        """DoubleArray::common_prefix_search: the values of every trie key that is a prefix of ``key``,
        shortest first; the search stops at a NUL byte."""
        units, results = self.units, []
        if not units:
            return results
        pos = _offset(units[0])
        for c in key:
            if c == 0:
                break
            pos ^= c
            if pos >= len(units):
                return results
            unit = units[pos]
            if unit & ((1 << 31) | 0xFF) != c:
                return results
            pos ^= _offset(unit)
            if (unit >> 8) & 1:
                if pos >= len(units):
                    raise RefsdError(f"{self.source}: precompiled charsmap trie is corrupt (leaf past its end)")
                results.append(units[pos] & ((1 << 31) - 1))
        return results

    def transform(self, chunk: str) -> str | None:
        """The replacement of the shortest key that prefixes ``chunk``, or None (Precompiled::transform)."""
        found = self.prefix_values(chunk.encode("utf-8"))
        if not found:
            return None
        start = found[0]
        end = self.normalized.find(b"\0", start)
        return self.normalized[start:len(self.normalized) if end < 0 else end].decode("utf-8", errors="replace")

    def normalize(self, text: str) -> str:
        """Precompiled::normalize_string: per grapheme cluster, the cluster's replacement when it is
        under 6 bytes and has one, else each character's replacement or the character."""
        out = []
        for g in graphemes(text):
            if len(g.encode("utf-8")) < 6:
                rep = self.transform(g)
                if rep is not None:
                    out.append(rep)
                    continue
            for ch in g:
                rep = self.transform(ch)
                out.append(ch if rep is None else rep)
        return "".join(out)


def _offset(unit: int) -> int:
    return (unit >> 10) << ((unit & (1 << 9)) >> 6)


# --------------------------------------------------------------------------------------------
# spiece.model (SentencePiece ModelProto), parsed by hand


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(data: bytes):
    """Yield (field number, wire type, value) of one protobuf message: ints for varints and fixed32,
    bytes for length-delimited fields (fixed64 as 8 bytes)."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(data, i)
            value, i = data[i:i + n], i + n
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > len(data):
            raise ValueError("field runs past the end")
        yield field, wire, value


def _int32(v: int) -> int:
    """A protobuf int32 varint (negative values are sign-extended to 64 bits)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


_PIECE_TYPES = {1: "normal", 2: "unknown", 3: "control", 4: "user_defined", 5: "unused", 6: "byte"}


def read_spiece_model(data: bytes, *, source: str = "spiece.model") -> dict:
    """The fields of a SentencePiece ModelProto the T5 tokenizer needs: ``pieces`` [(piece, score,
    type)], ``model_type`` (1 unigram), ``unk_id`` / ``eos_id`` / ``pad_id``, ``byte_fallback``,
    ``charsmap`` (bytes or None). Field numbers: sentencepiece_model.proto (ModelProto 1 pieces,
    2 trainer_spec, 3 normalizer_spec; SentencePiece 1 piece, 2 score, 3 type; TrainerSpec 3
    model_type, 35 byte_fallback, 40-43 unk/bos/eos/pad ids; NormalizerSpec 2 precompiled_charsmap)."""
    out = {"pieces": [], "model_type": 1, "unk_id": 0, "eos_id": 2, "pad_id": -1, "byte_fallback": False,
           "charsmap": None}
    try:
        for field, wire, value in _fields(data):
            if field == 1 and wire == 2:
                piece, score, kind = None, 0.0, 1
                for f, w, v in _fields(value):
                    if f == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif f == 2 and w == 5:
                        (score,) = struct.unpack("<f", v)
                    elif f == 3 and w == 0:
                        kind = v
                if piece is None:
                    raise ValueError(f"piece {len(out['pieces'])} has no text")
                out["pieces"].append((piece, float(score), _PIECE_TYPES.get(kind, str(kind))))
            elif field == 2 and wire == 2:
                names = {3: "model_type", 35: "byte_fallback", 40: "unk_id", 42: "eos_id", 43: "pad_id"}
                for f, w, v in _fields(value):
                    if f in names and w == 0:
                        out[names[f]] = bool(v) if f == 35 else _int32(v)
            elif field == 3 and wire == 2:
                for f, w, v in _fields(value):
                    if f == 2 and w == 2:
                        out["charsmap"] = bytes(v) or None
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise RefsdError(f"{source}: not a SentencePiece model ({e})") from None
    return out


# --------------------------------------------------------------------------------------------
# the tokenizer


class T5Tokenizer:
    """T5's Unigram tokenizer. ``T5Tokenizer.from_folder(path)``; ``tok(text, max_length=256)`` -> ids."""

    def __init__(self, vocab: list[tuple[str, float]], *, charsmap: bytes | None, specials: dict[str, int],
                 unk_id: int = UNK, eos_id: int = EOS, pad_id: int = PAD, source: str = "T5 tokenizer"):
        if not vocab:
            raise RefsdError(f"{source}: empty vocabulary")
        for name, i in (("unk", unk_id), ("eos", eos_id), ("pad", pad_id)):
            if not 0 <= i < len(vocab):
                raise RefsdError(f"{source}: {name} id {i} is outside the vocabulary of {len(vocab)} pieces")
        self.vocab = [(str(t), float(s)) for t, s in vocab]
        self.ids = {t: i for i, (t, _) in enumerate(self.vocab)}
        self.unk_id, self.eos_id, self.pad_id = unk_id, eos_id, pad_id
        self.specials = dict(specials)
        self.charsmap = None if charsmap is None else Charsmap(charsmap, source=source)
        self.unk_score = min(s for _, s in self.vocab) - UNK_PENALTY
        self._trie: dict = {}
        for i, (t, _) in enumerate(self.vocab):  # every piece, specials too, as tokenizers' Unigram trie
            node = self._trie
            for ch in t:
                node = node.setdefault(ch, {})
            node[None] = i
        self._memo: dict[str, list[int]] = {}

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_folder(cls, folder) -> T5Tokenizer:
        """A diffusers ``tokenizer_3`` / ``tokenizer_2`` folder: ``tokenizer.json`` if present (what
        transformers reads first), else ``spiece.model``."""
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(folder / "tokenizer.json")
        if (folder / "spiece.model").is_file():
            return cls.from_spiece_model(folder / "spiece.model")
        raise RefsdError(f"T5 tokenizer folder {folder}: neither tokenizer.json nor spiece.model found "
                         "(a diffusers tokenizer_3 / tokenizer_2 folder holds one of them)")

    @classmethod
    def from_tokenizer_json(cls, path) -> T5Tokenizer:
        """A tokenizers ``tokenizer.json`` with a Unigram model (its vocabulary, unk_id, the Precompiled
        charsmap of its normalizer, and its special added tokens)."""
        path = Path(path)
        doc = _read_json(path)
        model = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(model, dict) or model.get("type") != "Unigram":
            raise RefsdError(f"{path}: not a Unigram tokenizer.json (model type "
                             f"{model.get('type') if isinstance(model, dict) else None!r}); T5 uses Unigram")
        if model.get("byte_fallback"):
            raise RefsdError(f"{path}: byte_fallback Unigram models are not supported (T5 has none)")
        vocab = model.get("vocab")
        if not isinstance(vocab, list) or not all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                                                  and isinstance(v[1], (int, float)) for v in vocab):
            raise RefsdError(f"{path}: model.vocab must be a list of [piece, score] pairs")
        specials = {}
        for t in doc.get("added_tokens") or []:
            if isinstance(t, dict) and t.get("special") and isinstance(t.get("content"), str):
                specials[t["content"]] = int(t["id"])
        ids = {p: i for i, (p, _) in enumerate(vocab)}
        unk = model.get("unk_id")
        unk = UNK if unk is None else int(unk)
        return cls([tuple(v) for v in vocab], charsmap=_json_charsmap(doc.get("normalizer"), path),
                   specials=specials or _default_specials(ids), unk_id=unk, eos_id=ids.get("</s>", EOS),
                   pad_id=ids.get("<pad>", PAD), source=str(path))

    @classmethod
    def from_spiece_model(cls, path) -> T5Tokenizer:
        """A SentencePiece ``spiece.model``: its pieces and scores, then ``<extra_id_99>`` ..
        ``<extra_id_0>`` (score 0), as transformers' T5 conversion lays them out."""
        path = Path(path)
        data = _read_bytes(path)
        m = read_spiece_model(data, source=str(path))
        if m["model_type"] != 1:
            raise RefsdError(f"{path}: SentencePiece model_type {m['model_type']} is not unigram (1); T5 uses unigram")
        bad = sorted({t for _, _, t in m["pieces"]} - {"normal", "unknown", "control", "unused"})
        if bad or m["byte_fallback"]:
            raise RefsdError(f"{path}: piece types {bad or ['byte']} are not supported (T5 has none)")
        vocab = [(p, s) for p, s, _ in m["pieces"]]
        vocab += [(f"<extra_id_{i}>", 0.0) for i in range(EXTRA_IDS - 1, -1, -1)]
        ids = {p: i for i, (p, _) in enumerate(vocab)}
        return cls(vocab, charsmap=m["charsmap"], specials=_default_specials(ids), unk_id=m["unk_id"],
                   eos_id=m["eos_id"], pad_id=max(m["pad_id"], 0), source=str(path))

    # ---------------------------------------------------------------- encoding

    def normalize(self, text: str) -> str:
        return text if self.charsmap is None else self.charsmap.normalize(text)

    def pieces(self, text: str) -> list[str]:
        """Normalized text -> pre-tokens: WhitespaceSplit, then Metaspace (prepend ▁, split before ▁)."""
        out = []
        for word in _WS_SPLIT.split(text):
            if not word:
                continue
            word = word.replace(" ", SPACE)
            if not word.startswith(SPACE):
                word = SPACE + word
            cuts = [i for i, ch in enumerate(word) if ch == SPACE] + [len(word)]
            out += [word[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
        return out

    def unigram(self, piece: str) -> list[int]:
        """Viterbi segmentation of one pre-token (tokenizers' Unigram::encode_optimized), unknowns fused."""
        ids = self._memo.get(piece)
        if ids is not None:
            return ids
        n = len(piece)
        best = [(0.0, -1, -1)] * (n + 1)  # per end position: (score, start, id); start -1 = unreached
        best[0] = (0.0, 0, -1)
        for start in range(n):
            base = best[start][0]
            node, single = self._trie, False
            for end in range(start, n):
                node = node.get(piece[end])
                if node is None:
                    break
                tid = node.get(None)
                if tid is None:
                    continue
                score = base + self.vocab[tid][1]
                if best[end + 1][1] < 0 or score > best[end + 1][0]:
                    best[end + 1] = (score, start, tid)
                single = single or end == start
            if not single:
                score = base + self.unk_score
                if best[start + 1][1] < 0 or score > best[start + 1][0]:
                    best[start + 1] = (score, start, self.unk_id)
        ids, end, in_unk = [], n, False
        while end > 0:
            _, start, tid = best[end]
            if tid == self.unk_id:
                if not in_unk:  # consecutive unknowns (and <unk> pieces) fuse into one
                    ids.append(tid)
                in_unk = True
            else:
                ids.append(tid)
                in_unk = False
            end = start
        ids.reverse()
        self._memo[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without ``</s>``: ``T5TokenizerFast(text, add_special_tokens=False).input_ids``."""
        if not isinstance(text, str):
            raise RefsdError(f"tokenizer input must be str, got {type(text).__name__}")
        ids: list[int] = []
        for part, special in (_split_special(text, self.specials) if self.specials else [(text, False)]):
            if special:
                ids.append(self.specials[part])
                continue
            for piece in self.pieces(self.normalize(part)):
                ids += self.unigram(piece)
        return ids

    def __call__(self, text: str, *, max_length: int | None = None, truncation: bool = True) -> list[int]:
        """ids + ``</s>``; with ``max_length``, truncated (keeping max_length - 1 tokens and the
        ``</s>``) and padded with ``<pad>`` to max_length: ``T5TokenizerFast(text, padding="max_length",
        max_length=max_length, truncation=True).input_ids``, as SD3 (256) and Flux (512) call it."""
        ids = self.encode(text)
        if max_length is None:
            return ids + [self.eos_id]
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise RefsdError(f"max_length must be a positive integer, got {max_length!r}")
        if truncation:
            ids = ids[:max_length - 1]
        ids = ids + [self.eos_id]
        return ids + [self.pad_id] * (max_length - len(ids))

    def attention_mask(self, text: str, *, max_length: int) -> list[int]:
        """The tokenizer's ``attention_mask`` for ``self(text, max_length=...)``: 1 per token (``</s>``
        included), 0 per pad."""
        n = min(len(self.encode(text)), max_length - 1) + 1
        return [1] * n + [0] * (max_length - n)

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """Pieces joined, ``▁`` -> space, the leading space dropped (the Metaspace decoder)."""
        rev = {i: t for t, i in self.ids.items()}
        rev.update({i: t for t, i in self.specials.items()})
        bad = [i for i in ids if int(i) not in rev]
        if bad:
            raise RefsdError(f"token ids not in the vocabulary: {bad[:5]}")
        toks = [rev[int(i)] for i in ids if not (skip_special_tokens and rev[int(i)] in self.specials)]
        text = "".join(toks).replace(SPACE, " ")
        return text[1:] if text.startswith(" ") else text


def _default_specials(ids: dict[str, int]) -> dict[str, int]:
    """<pad>, </s>, <unk> and <extra_id_0..99>, where the vocabulary has them (T5Tokenizer's specials)."""
    names = ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    return {t: ids[t] for t in names if t in ids}


def _json_charsmap(normalizer, path: Path) -> bytes | None:
    """The Precompiled normalizer's charsmap in a tokenizer.json (alone or inside a Sequence)."""
    if not isinstance(normalizer, dict):
        return None
    parts = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    for n in parts:
        if isinstance(n, dict) and n.get("type") == "Precompiled" and n.get("precompiled_charsmap"):
            try:
                return base64.b64decode(n["precompiled_charsmap"], validate=True)
            except (binascii.Error, TypeError, ValueError) as e:
                raise RefsdError(f"{path}: precompiled_charsmap is not base64 ({e})") from None
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise RefsdError(f"{path}: {size} bytes is larger than a T5 tokenizer file can be ({MAX_FILE_BYTES})")
        return path.read_bytes()
    except OSError as e:
        raise RefsdError(f"cannot read T5 tokenizer file {path}: {e.strerror or e}") from None


def _read_json(path: Path):
    try:
        return json.loads(_read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RefsdError(f"{path}: not a tokenizer.json ({e})") from None
