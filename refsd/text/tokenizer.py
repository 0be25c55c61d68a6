"""CLIP byte-level BPE tokenizer, exact with transformers' ``CLIPTokenizer``; prompt emphasis and chunking.

Pipeline (what transformers 5.x ``CLIPTokenizer`` does; in 5.x that class is the *tokenizers*-backed
one, there is no slow/Python CLIPTokenizer any more and ftfy is never consulted):

1. special tokens ``<|startoftext|>`` / ``<|endoftext|>`` are cut out of the RAW text (case-sensitive,
   anywhere, even inside a word) and map straight to 49406 / 49407; the pieces between are processed
   separately;
2. normalizer: NFC, every run of whitespace -> one space (Oniguruma's ``\\s``: Python's ``\\s`` minus
   U+001C..U+001F), lower-case character by character (so a final capital sigma becomes ``σ``, not
   ``ς``). No ftfy, no HTML unescaping (``&amp;`` stays four tokens' worth of text), no strip;
3. pre-split with CLIP's pattern ``'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``
   (whitespace between matches is dropped; the pattern's leading special-token literals never
   match in tokenizers, see ``_PRETOKENIZE``);
4. each piece -> UTF-8 bytes -> GPT-2's byte-to-unicode map -> BPE with ``</w>`` on the last symbol.

``\\p{L}`` / ``\\p{N}`` (``letter_or_digit``) come from ``unicodedata`` plus the letters and digits
added in Unicode 15-16 (tokenizers' Oniguruma is at Unicode 16, CPython 3.11's unicodedata at 14);
lower-casing likewise adds the case pairs newer than CPython's tables. Remaining known difference:
canonical compositions introduced after the running Python's Unicode version (NFC) -- a handful of
Unicode-16 scripts.

open_clip's ``SimpleTokenizer`` (used to train OpenCLIP and by A1111 for SD2) differs from HF: it runs
ftfy.fix_text + html.unescape twice, strips, uses ``str.split`` whitespace, ``str.lower`` (final
sigma), calls its specials ``<start_of_text>``/``<end_of_text>`` (so a literal ``<|startoftext|>`` is
ordinary text there), and pads with 0. transformers is our reference (diffusers uses it).

The vocabulary file ``bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's, copied from open_clip 3.3.0
(MIT licence, https://github.com/mlfoundations/open_clip, src/open_clip/bpe_simple_vocab_16e6.txt.gz).

Prompt syntax (emphasis weights, BREAK) is parsed by ``refsd.text.prompt_syntax.parse_prompt``; ``CLIPTokenizer.chunks``
chunks its output by each syntax's rules (A1111: 75 tokens per chunk with comma backtrack 20;
ComfyUI: a word under 8 tokens never straddles a chunk boundary).

Applying the weights is the text encoder's job; the two rules it must implement:
- A1111 ("scale + restore mean"): z = encoder(ids); mean0 = mean(z); z *= weights[..., None];
  z *= mean0 / mean(z)  (means over the whole chunk's (77, D) hidden states).
- ComfyUI ("interpolate toward empty"): z_empty = encoder(ids of the empty prompt, padded);
  z = (z - z_empty) * weights[..., None] + z_empty  (only when some weight != 1).
"""

from __future__ import annotations

import gzip
import json
import re
import unicodedata
from pathlib import Path
from typing import Iterable

from refsd.errors import RefsdError
from refsd.text.prompt_syntax import parse_prompt

BOS = 49406  # <|startoftext|>
EOS = 49407  # <|endoftext|>
CONTEXT_LENGTH = 77
CHUNK_TOKENS = CONTEXT_LENGTH - 2  # 75 content tokens between BOS and EOS

TokenChunks = list[tuple[list[int], list[float]]]  # per chunk: (ids[77], weights[77])
EMBEDDING_PREFIX = "embedding:"  # ComfyUI's embedding_identifier

VOCAB_FILE = Path(__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"

# Letters / digits added in Unicode 15.0-16.0 (tokenizers' Oniguruma tables) that CPython 3.11's
# unicodedata (Unicode 14.0) lists as unassigned. Inclusive ranges; verified exhaustively in tests.
_NEW_LETTERS = (
    (0x1C89, 0x1C8A), (0xA7CB, 0xA7CD), (0xA7DA, 0xA7DC), (0x105C0, 0x105F3), (0x10D4A, 0x10D65),
    (0x10D6F, 0x10D85), (0x10EC2, 0x10EC4), (0x1123F, 0x11240), (0x11380, 0x11389), (0x1138B, 0x1138B),
    (0x1138E, 0x1138E), (0x11390, 0x113B5), (0x113B7, 0x113B7), (0x113D1, 0x113D1), (0x113D3, 0x113D3),
    (0x11BC0, 0x11BE0), (0x11F02, 0x11F02), (0x11F04, 0x11F10), (0x11F12, 0x11F33), (0x1342F, 0x1342F),
    (0x13441, 0x13446), (0x13460, 0x143FA), (0x16100, 0x1611D), (0x16D40, 0x16D6C), (0x18CFF, 0x18CFF),
    (0x1B132, 0x1B132), (0x1B155, 0x1B155), (0x1DF25, 0x1DF2A), (0x1E030, 0x1E06D), (0x1E4D0, 0x1E4EB),
    (0x1E5D0, 0x1E5ED), (0x1E5F0, 0x1E5F0), (0x2B739, 0x2B739), (0x2EBF0, 0x2EE5D), (0x31350, 0x323AF),
)
_NEW_DIGITS = (
    (0x10D40, 0x10D49), (0x116D0, 0x116E3), (0x11BF0, 0x11BF9), (0x11F50, 0x11F59), (0x16130, 0x16139),
    (0x16D70, 0x16D79), (0x1CCF0, 0x1CCF9), (0x1D2C0, 0x1D2D3), (0x1E4F0, 0x1E4F9), (0x1E5F1, 0x1E5FA),
)
# Upper -> lower pairs newer than CPython 3.11's tables (Rust's char::to_lowercase in tokenizers).
_NEW_LOWER = {0x1C89: 0x1C8A, 0xA7CB: 0x0264, 0xA7CC: 0xA7CD, 0xA7CE: 0xA7CF, 0xA7D2: 0xA7D3,
              0xA7D4: 0xA7D5, 0xA7DA: 0xA7DB, 0xA7DC: 0x019B,
              **{c: c + 0x20 for c in range(0x10D50, 0x10D66)},
              **{c: c + 0x1B for c in range(0x16EA0, 0x16EB9)}}
_LOWER_TABLE = {k: chr(v) for k, v in _NEW_LOWER.items()}

# Oniguruma's \s (Unicode White_Space) is Python's \s without the ASCII separators U+001C..U+001F.
_WS = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WS_RUN = re.compile(f"[{_WS}]+")
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _in_ranges(cp: int, ranges) -> bool:
    return any(a <= cp <= b for a, b in ranges)


def letter_or_digit(ch: str) -> str | None:
    """'L' if ``ch`` is in \\p{L}, 'N' if in \\p{N}, else None (Unicode 16, as tokenizers' Oniguruma)."""
    cat = unicodedata.category(ch)[0]
    if cat in "LN":
        return cat
    cp = ord(ch)
    if cat == "C":  # unassigned in this Python's tables: maybe assigned by Unicode 16
        if _in_ranges(cp, _NEW_LETTERS):
            return "L"
        if _in_ranges(cp, _NEW_DIGITS):
            return "N"
    return None


# CLIP's split pattern, run on a same-length "class string": ASCII stays itself, any other character
# becomes 'a' (\p{L}), '0' (\p{N}), ' ' (\s) or '!' (other). transformers' pattern also lists
# <\|startoftext\|> and <\|endoftext\|> first, but in tokenizers those alternatives never match
# (measured: "<|endoftext|>" written in another case is split "<|", "endoftext", "|>"); special
# tokens only come from the raw-text cut (step 1), so they are left out here.
_PRETOKENIZE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[A-Za-z]+|[0-9]|[^\t\n\x0b\x0c\r A-Za-z0-9]+")
_WS_CHARS = re.compile(f"[{_WS}]")


def _class_char(ch: str) -> str:
    if ch < "\x80":
        return ch
    kind = letter_or_digit(ch)
    return "a" if kind == "L" else "0" if kind == "N" else " " if _WS_CHARS.match(ch) else "!"


def pretokenize(text: str) -> list[str]:
    """CLIP's pre-split of normalized text: contractions, letter runs, single digits, other runs."""
    classes = text if text.isascii() else "".join(map(_class_char, text))
    return [text[m.start():m.end()] for m in _PRETOKENIZE.finditer(classes)]


def normalize(text: str) -> str:
    """transformers' CLIP normalizer: NFC, whitespace runs -> ' ', per-character lower-casing."""
    text = _WS_RUN.sub(" ", unicodedata.normalize("NFC", text))
    if text.isascii():
        return text.lower()
    return "".join(_LOWER_TABLE.get(ord(c)) or c.lower() for c in text)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character map (printable Latin-1 maps to itself)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _split_special(text: str, specials: Iterable[str]) -> list[tuple[str, bool]]:
    """Cut special-token strings out of raw text (leftmost, longest first): [(piece, is_special)]."""
    specials = sorted(set(specials), key=len, reverse=True)
    pat = re.compile("|".join(map(re.escape, specials)))
    out, pos = [], 0
    for m in pat.finditer(text):
        if m.start() > pos:
            out.append((text[pos:m.start()], False))
        out.append((m.group(0), True))
        pos = m.end()
    if pos < len(text):
        out.append((text[pos:], False))
    return out


class CLIPTokenizer:
    """CLIP BPE tokenizer. ``tok = CLIPTokenizer.from_package()``; ``tok(text)`` -> 77 ids."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        for s in _SPECIALS:
            if s not in self.encoder:
                raise RefsdError(f"vocabulary lacks the special token {s!r}")
        self.bos, self.eos = self.encoder[_SPECIALS[0]], self.encoder[_SPECIALS[1]]
        self.comma = self.encoder.get(",</w>")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._bpe_memo: dict[str, list[int]] = {}

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_package(cls) -> "CLIPTokenizer":
        """The shipped OpenAI CLIP vocabulary, laid out as open_clip's SimpleTokenizer builds it
        (256 byte symbols, their ``</w>`` forms, 48894 merges, then the two specials at 49406/49407)."""
        lines = gzip.open(VOCAB_FILE).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(_SPECIALS)
        return cls({t: i for i, t in enumerate(vocab)}, merges)

    @classmethod
    def from_files(cls, vocab_json, merges_txt) -> "CLIPTokenizer":
        """A diffusers ``tokenizer/`` folder's ``vocab.json`` and ``merges.txt``."""
        try:
            vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
            lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        except (OSError, ValueError) as e:
            raise RefsdError(f"cannot read tokenizer files {vocab_json}, {merges_txt}: {e}") from e
        merges = []
        for n, line in enumerate(lines, 1):
            if not line.strip() or (n == 1 and line.startswith("#version")):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise RefsdError(f"{merges_txt}:{n}: a merge must be two symbols, got {line!r}")
            merges.append(tuple(parts))
        return cls(vocab, merges)

    @classmethod
    def from_folder(cls, folder) -> "CLIPTokenizer":
        """A diffusers ``tokenizer/`` folder (vocab.json + merges.txt)."""
        return cls.from_files(Path(folder) / "vocab.json", Path(folder) / "merges.txt")

    # ---------------------------------------------------------------- encoding

    def bpe(self, piece: str) -> list[int]:
        """Ids of one pre-tokenized piece (already byte-to-unicode mapped)."""
        ids = self._bpe_memo.get(piece)
        if ids is not None:
            return ids
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(self.ranks.get(p, -1), i) for i, p in enumerate(zip(word, word[1:]))]
            best = min((r for r, _ in pairs if r >= 0), default=-1)
            if best < 0:
                break
            first, second = next(p for p in zip(word, word[1:]) if self.ranks.get(p) == best)
            merged, i = [], 0
            while i < len(word):  # merge every non-overlapping occurrence, left to right
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.encoder[t] for t in word]
        self._bpe_memo[piece] = ids
        return ids

    def _encode_plain(self, text: str, added: dict[str, int] | None = None) -> list[int]:
        ids = []
        text = normalize(text)
        pieces = _split_special(text, added) if added else [(text, False)]
        for part, is_added in pieces:  # tokenizers matches normalized added tokens on the normalized text
            if is_added:
                ids.append(added[part])
                continue
            for piece in pretokenize(part):
                ids += self.bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8")))
        return ids

    def encode(self, text: str, *, extra_specials: Iterable[str] = (),
               added: dict[str, int] | None = None) -> list[int]:
        """Token ids of ``text`` without BOS/EOS, as ``transformers.CLIPTokenizer(text,
        add_special_tokens=False).input_ids``. ``extra_specials``: further strings transformers has
        registered as special tokens (e.g. a pad token ``"!"``), which it also cuts out of the text.
        ``added``: tokens added with ``tokenizer.add_tokens`` (diffusers' textual-inversion tokens), by
        their normalized text -> id: cut out of the normalized text, as tokenizers matches them."""
        if not isinstance(text, str):
            raise RefsdError(f"tokenizer input must be str, got {type(text).__name__}")
        ids = []
        for piece, special in _split_special(text, (*_SPECIALS, *extra_specials)):
            ids += [self.encoder[piece]] if special else self._encode_plain(piece, added)
        return ids

    def __call__(self, text: str, *, max_length: int = CONTEXT_LENGTH, pad_token: int = EOS,
                 truncation: bool = True, pad_is_special: bool = True,
                 added: dict[str, int] | None = None) -> list[int]:
        """BOS + ids + EOS, truncated and padded with ``pad_token`` to ``max_length``: exactly
        ``transformers.CLIPTokenizer(..., pad_token=<its string>)(text, padding="max_length",
        max_length=max_length, truncation=truncation).input_ids``. SD1 pads with EOS (49407); OpenCLIP
        (SD2, SDXL's second encoder) with 0 (``"!"``). transformers registers the pad string as a
        special token, so with ``pad_token=0`` a ``!`` in the text becomes 0 and is never merged
        (``"!!"`` -> [0, 0]), as in diffusers' SD2 pipelines; ``pad_is_special=False`` tokenizes the
        text as open_clip / ComfyUI / A1111 do and only pads."""
        if not isinstance(pad_token, int) or pad_token not in self.decoder:
            raise RefsdError(f"pad_token must be a token id in the vocabulary, got {pad_token!r}")
        extra = (self.decoder[pad_token],) if pad_is_special and pad_token != self.eos else ()
        ids = self.encode(text, extra_specials=extra, added=added)
        if truncation:
            ids = ids[:max(max_length - 2, 0)]
        ids = [self.bos, *ids, self.eos]
        return ids + [pad_token] * (max_length - len(ids))

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` as transformers decodes it: byte-level decoding, ``</w>`` -> space, stripped."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if i not in self.decoder]
        if bad:
            raise RefsdError(f"token ids not in the vocabulary: {bad[:5]}")
        if skip_special_tokens:
            ids = [i for i in ids if i not in (self.bos, self.eos)]
        data = bytearray()
        for i in ids:  # tokenizers' ByteLevel decoder: byte symbols -> bytes, else the token's UTF-8
            tok = self.decoder[i]
            if all(c in self.byte_decoder for c in tok):
                data += bytes(self.byte_decoder[c] for c in tok)
            else:
                data += tok.encode("utf-8")
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    # ---------------------------------------------------------------- prompts

    def chunks(self, prompt: str, *, syntax: str = "a1111", pad_token: int = EOS,
               comma_backtrack: int = 20, embeddings=None) -> TokenChunks:
        """Prompt -> chunks of (ids[77], weights[77]), each BOS + 75 tokens + EOS, padded with
        ``pad_token`` (weight 1.0). ``syntax``: "a1111" (emphasis, BREAK, comma rule with
        ``comma_backtrack``), "comfyui" (its emphasis and word-keeping rule) or "none" (literal).
        ``embeddings``: a refsd.text.embeddings.PromptEmbeddings; A1111 / "none": an embedding's stem
        matched on token ids, its vectors kept in one chunk (sd_hijack_clip.tokenize_line); ComfyUI:
        ``embedding:name`` words, kept whole like a word (fewer than 8 vectors)."""
        if not isinstance(prompt, str):
            raise RefsdError(f"prompt must be str, got {type(prompt).__name__}")
        if syntax == "comfyui":
            return self._chunks_comfyui(prompt, pad_token, embeddings)
        parsed = parse_prompt(prompt, syntax=syntax)
        chunks: TokenChunks = []
        toks: list[int] = []
        mults: list[float] = []
        last_comma = -1

        def close():
            nonlocal toks, mults, last_comma
            n = CHUNK_TOKENS - len(toks)
            chunks.append(([self.bos, *toks, self.eos] + [pad_token] * n, [1.0, *mults, 1.0] + [1.0] * n))
            toks, mults, last_comma = [], [], -1

        for text, weight in parsed:
            if text == "BREAK" and weight == -1:
                close()
                continue
            tokens = self.encode(text)
            position = 0
            while position < len(tokens):
                token = tokens[position]
                if token == self.comma:
                    last_comma = len(toks)
                elif (comma_backtrack and len(toks) == CHUNK_TOKENS and last_comma != -1
                      and len(toks) - last_comma <= comma_backtrack):
                    cut = last_comma + 1
                    moved = toks[cut:], mults[cut:]
                    toks, mults = toks[:cut], mults[:cut]
                    close()
                    toks, mults = list(moved[0]), list(moved[1])
                if len(toks) == CHUNK_TOKENS:
                    close()
                found = embeddings.a1111_match(tokens, position) if embeddings is not None else None
                if found is None:
                    toks.append(token)
                    mults.append(weight)
                    position += 1
                    continue
                vector_ids, consumed = found  # A1111: an embedding never straddles two chunks
                if len(toks) + len(vector_ids) > CHUNK_TOKENS:
                    close()
                toks += vector_ids
                mults += [weight] * len(vector_ids)
                position += consumed
        if toks or not chunks:
            close()
        return chunks

    def _chunks_comfyui(self, prompt: str, pad_token: int, embeddings=None) -> TokenChunks:
        """comfy/sd1_clip.py SDTokenizer.tokenize_with_weights (no embeddings, max_word_length 8).

        ref: comfyanonymous/ComfyUI@00728eb20fce05955f89ef1ccf5f6167416e94cf comfy/sd1_clip.py (checked
        line by line: word split on ' ' after '\n' -> ' '; words of >= 8 tokens split across chunks,
        shorter ones move whole; BOS/EOS/pad weights 1.0). ComfyUI looks a word up as ``word</w>``
        before running BPE; BPE yields that same single token whenever it is in the vocabulary.
        """
        words = []  # (ids, weight) per space-separated word; an embedding's vectors are one word
        for text, weight in parse_prompt(prompt, syntax="comfyui"):
            for word in text.replace("\n", " ").split(" "):
                if word.startswith(EMBEDDING_PREFIX) and embeddings is not None:
                    vector_ids, word = embeddings.comfy_ids(word[len(EMBEDDING_PREFIX):])
                    words.append((vector_ids, weight))
                if word:
                    words.append((self.encode(word), weight))
        chunks: TokenChunks = []
        batch: list[tuple[int, float]] = []

        def close():
            nonlocal batch
            n = CHUNK_TOKENS - len(batch)
            chunks.append(([self.bos, *(t for t, _ in batch), self.eos] + [pad_token] * n,
                           [1.0, *(w for _, w in batch), 1.0] + [1.0] * n))
            batch = []

        for ids, weight in words:
            pairs = [(t, weight) for t in ids]
            is_large = len(pairs) >= 8  # ComfyUI's max_word_length
            while pairs:
                room = CHUNK_TOKENS - len(batch)
                if len(pairs) <= room:
                    batch += pairs
                    break
                if is_large:  # long word: split it across chunks
                    batch += pairs[:room]
                    pairs = pairs[room:]
                close()  # short word: move it whole into the next chunk
        if batch or not chunks:
            close()
        return chunks
