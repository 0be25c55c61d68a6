"""Tokenizer cases: transformers' CLIPTokenizer is the oracle.

transformers 5.x ``CLIPTokenizer`` is the tokenizers-backed class (no slow tokenizer, no ftfy). It is
built offline from OpenAI CLIP's BPE file as shipped by open_clip: vocab.json = 256 byte symbols,
their '</w>' forms, the 48894 merges joined, then <|startoftext|> 49406 / <|endoftext|> 49407 (the
layout of open_clip's SimpleTokenizer, whose ids agree on plain text); merges.txt = the merges.
Strings are stored as ``in/text_bytes`` (uint8, all prompts' UTF-8 concatenated) and
``in/text_offsets`` (int64, N+1 byte offsets: prompt i is bytes[offsets[i]:offsets[i+1]]).
This module imports nothing from refsd.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from golden.registry import Capture, case


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def bpe_file() -> Path:
    return Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def write_vocab(folder: Path) -> Path:
    """vocab.json + merges.txt (a diffusers tokenizer/ folder) from open_clip's BPE file."""
    merges = gzip.open(bpe_file()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@lru_cache(maxsize=None)
def hf_tokenizer(pad_token: str = "<|endoftext|>"):
    """transformers.CLIPTokenizer on the files above; pad_token "!" (id 0) is SD2/OpenCLIP's."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        return CLIPTokenizer.from_pretrained(str(write_vocab(Path(d))), pad_token=pad_token)


def corpus() -> list[str]:
    """>= 200 prompts that exercise cleaning, pre-splitting, BPE, specials and truncation."""
    base = [
        "", " ", "a", "A", "a photo of a cat", "A Photo Of A CAT", "  leading and trailing  ",
        "tabs\tand\nnewlines\r\nand\x0bvt\x0cff", "multiple     spaces", "\u00a0nbsp\u3000ideographic\u2003em",
        "file\x1cseparators\x1dare\x1enot\x1fspace", "zero\u200bwidth", "soft\u00adhyphen",
        "masterpiece, best quality, 1girl, solo, long hair, looking at viewer",
        "a (red:1.2) car, [blue] sky, ((detailed))", "\\(escaped\\) \\[brackets\\]", "BREAK a BREAK b",
        "can't won't I'm you're they've we'll she'd it's", "CAN'T I'M YOU'RE", "rock 'n' roll", "'s 't",
        "&amp; &lt; &gt; &quot; &#39; &nbsp;", "Tom &amp; Jerry", "<b>html</b> <br/>",
        "café", "cafe\u0301", "naïve résumé façade", "Ångström", "Straße", "İstanbul", "ΣΑΣ ΟΔΥΣΣΕΥΣ",
        "ǅungla", "ﬁne ligature", "ｆｕｌｌｗｉｄｔｈ", "①②③", "½ ¾", "x² y³", "Ⅻ roman", "٣٤٥ arabic digits",
        "日本語のテキスト", "中文提示词，高质量", "한국어 프롬프트", "ไทย", "हिन्दी", "русский текст",
        "עברית מימין לשמאל", "العربية من اليمين", "Ελληνικά", "ქართული", "Հայերեն", "ᚠᛇᚻ runes",
        "😀 emoji", "👩‍👩‍👧‍👦 family", "🇯🇵 flag", "❤️ heart", "a🐱b", "🔥🔥🔥", "✨sparkles✨",
        "12345", "3.14159", "1,000,000", "v1.5", "2girls", "1980s", "0x1F600", "-42", "+7", "1e-5",
        "!!!", "???", "...", "a...b", "!?!?", "--", "—em dash—", "–en–", "“smart quotes”", "‘single’",
        "«guillemets»", "@user #tag $100 50% ^caret &and *star", "a_b-c.d/e\\f", "path/to/file.png",
        "http://example.com/a?b=c", "user@example.com", "<|startoftext|>", "<|endoftext|>",
        "a<|endoftext|>b", "<|startoftext|>hello<|endoftext|>", "<|STARTOFTEXT|>", "< |startoftext| >",
        "<|endoftext", "<<|endoftext|>>", "\u0000null", "\u007fdel", "\ufeffbom", "\ufffdreplacement",
        "\U0001d400 math bold", "𝔣𝔯𝔞𝔨𝔱𝔲𝔯", "ℌ", "™ ©", "°C", "µm", "Ω ohm", "K kelvin", "ﬀ", "ŉ",
        "ΐ", "ẞ capital sharp s", "Ǉ", "ᾈ", "ﬆ", "İi̇", "\u0130", "ǰ", "Σ", "ς", "σς", "ΌΣΟΣ.",
        "ab\u0300c", "e\u0301\u0302", "\u1100\u1161\u11a8", "가", "Å", "Å", "ｶﾞ", "㍿", "㈱",
        "a\u2028b\u2029c", "a\u0085b", "mixed Case WoRdS", "UPPER", "lower", "ÉCOLE", "ÇA", "Ü",
        "photo of a dog, 8k, uhd, dslr, soft lighting, high quality, film grain, Fujifilm XT3",
        "portrait of a woman, (freckles:0.8), [[[blurry]]], (bokeh)", "emb:1.5", "lora:name:0.8",
        "<lora:add_detail:1>", "a,b,c", "a , b , c", "a;b:c", "'quoted'", '"double"', "`tick`",
        "x" * 300, "word " * 100, "a, " * 60, "🎨" * 40, "日本" * 60, "1234567890" * 10,
        " ".join(str(i) for i in range(120)), "supercalifragilisticexpialidocious",
        "pneumonoultramicroscopicsilicovolcanoconiosis", "antidisestablishmentarianism",
        "ohmygodthisisaverylongwordwithoutanyspacesatallitjustgoesonandon",
        "\t", "\n", "\r\n", " \t \n ", "a\tb", "a\n\nb", "  a  ", "\u200d", "\u2060", "\u180e",
        "ß", "ﬃ", "ǈ", "Ǳ", "ǲ", "ǳ", "ꞵ", "Ɐ", "Ɑ", "ʒ", "ȿ", "ɀ", "ⱥ", "ⱦ",
        "\U00010400 deseret", "\U0001e900 adlam", "𐐀𐐨", "Ꭰꭰ cherokee", "ᲐᲑ georgian mtavruli",
        "\u1c89\u1c8a", "\ua7cb", "\U00010d50", "\U00016ea0", "\U000105c0", "\U00011f50",
        "0️⃣ keycap", "#️⃣", "©️", "🏳️‍🌈", "👍🏽", "👨‍💻", "ℵ₀", "∑∫∂", "→←↑↓", "★☆", "♥♦♣♠",
        "…", "‰", "•", "·", "¿Qué?", "¡Hola!", "Ça va?", "Ǆ", "Ĳ", "ĳ", "ŀ", "Ŀ",
    ]
    long = ("a highly detailed digital painting of an ancient castle on a cliff above a stormy sea, "
            "dramatic lighting, volumetric fog, by greg rutkowski and alphonse mucha, trending on "
            "artstation, octane render, unreal engine 5, 8k resolution, intricate details, "
            "sharp focus, golden hour, cinematic composition, wide angle lens, HDR, masterpiece")
    extra = [long, long.upper(), long.replace(", ", "\n"), long * 2]
    return base + extra


def _pack(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    blobs = [t.encode("utf-8") for t in texts]
    offsets = [0]
    for b in blobs:
        offsets.append(offsets[-1] + len(b))
    data = torch.tensor(list(b"".join(blobs)), dtype=torch.uint8)
    return data, torch.tensor(offsets, dtype=torch.int64)


def _tokenize_case(pad_token: str, pad_id: int):
    texts = corpus()
    tok = hf_tokenizer(pad_token)
    ids = [tok(t, padding="max_length", max_length=77, truncation=True).input_ids for t in texts]
    data, offsets = _pack(texts)
    call = (f'transformers.CLIPTokenizer.from_pretrained(<vocab.json + merges.txt from open_clip\'s '
            f'bpe_simple_vocab_16e6.txt.gz>, pad_token={pad_token!r})(text, padding="max_length", '
            f'max_length=77, truncation=True).input_ids')
    desc = (f"{len(texts)} prompts tokenized by transformers' CLIPTokenizer, padded with {pad_id}. "
            "in/text_bytes: uint8, the prompts' UTF-8 concatenated; in/text_offsets: int64 (N+1), "
            "prompt i = text_bytes[offsets[i]:offsets[i+1]]; out/ids: int64 (N, 77), exact. "
            "dtype 'float64' is a naming convention only.")
    return Capture("tokenize", {"text_bytes": data, "text_offsets": offsets},
                   {"ids": torch.tensor(ids, dtype=torch.int64)}, call, desc,
                   kwargs={"max_length": 77, "pad_token": pad_id})


@case("text", "clip_tokenize_corpus", dtypes=("float64",))
def _clip_tokenize(g, dt):
    return _tokenize_case("<|endoftext|>", 49407)


@case("text", "clip_tokenize_corpus_pad0", dtypes=("float64",))
def _clip_tokenize_pad0(g, dt):
    return _tokenize_case("!", 0)
