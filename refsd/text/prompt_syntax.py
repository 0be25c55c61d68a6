"""Prompt emphasis syntax: a prompt -> [(text, weight)], as A1111 and ComfyUI parse it.

Syntaxes (``parse_prompt``; the chunking rules are applied by ``refsd.text.tokenizer.CLIPTokenizer.chunks``):
- ``"a1111"``: ``modules/prompt_parser.py::parse_prompt_attention`` of AUTOMATIC1111/stable-diffusion-webui
  (``(x)`` x1.1, ``(x:w)`` xw, ``[x]`` /1.1, ``\\( \\) \\[ \\] \\\\`` literals, nesting multiplies, unbalanced
  brackets close at the end, ``BREAK`` starts a new chunk, equal-weight neighbours merge), chunked as
  ``modules/sd_hijack_clip.py::tokenize_line``: 75 tokens per chunk; when a chunk is full and the last
  comma (``,</w>``, 267) in it is at most 20 tokens back (``comma_padding_backtrack``, default 20), the
  tokens after that comma move to the next chunk.
- ``"comfyui"``: ``comfy/sd1_clip.py`` (``token_weights``, ``escape_important``): ``(x)`` multiplies
  by 1.1 (nesting multiplies), ``(x:w)`` SETS the weight to w (the outer weight is not applied), ``[x]`` is
  plain text, ``\\( \\)`` literals, no BREAK; chunking puts a word that would straddle a chunk boundary
  whole into the next chunk when it has fewer than 8 tokens (``max_word_length``), else splits it.
- ``"none"``: the prompt is literal text with weight 1 (diffusers).
"""

from __future__ import annotations

import re

from refsd.errors import RefsdError

_A1111_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:([+-]?[.\d]+)\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)
_A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _parse_a1111(text: str) -> list[tuple[str, float]]:
    """AUTOMATIC1111 modules/prompt_parser.py::parse_prompt_attention (ported, same results)."""
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start, multiplier):
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _A1111_ATTENTION.finditer(text):
        s, weight = m.group(0), m.group(1)
        if s.startswith("\\"):
            res.append([s[1:], 1.0])
        elif s == "(":
            round_brackets.append(len(res))
        elif s == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif s == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif s == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_A1111_BREAK.split(s)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):  # merge runs of identical weights
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(t, w) for t, w in res]


def _comfy_escape(text: str) -> str:
    return text.replace("\\)", "\0\1").replace("\\(", "\0\2")


def _comfy_unescape(text: str) -> str:
    return text.replace("\0\1", ")").replace("\0\2", "(")


def _comfy_parentheses(text: str) -> list[str]:
    result, current, depth = [], "", 0
    for ch in text:
        if ch == "(":
            if depth == 0:
                if current:
                    result.append(current)
                current = "("
            else:
                current += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                result.append(current + ")")
                current = ""
            else:
                current += ch
        else:
            current += ch
    if current:
        result.append(current)
    return result


def _comfy_token_weights(text: str, weight: float) -> list[tuple[str, float]]:
    """comfy/sd1_clip.py::token_weights: '(x)' x1.1, '(x:w)' sets w, nesting multiplies."""
    out = []
    for x in _comfy_parentheses(text):
        w = weight
        if len(x) >= 2 and x[-1] == ")" and x[0] == "(":
            x = x[1:-1]
            xx = x.rfind(":")
            w *= 1.1
            if xx > 0:
                try:
                    w = float(x[xx + 1:])
                    x = x[:xx]
                except ValueError:
                    pass
            out += _comfy_token_weights(x, w)
        else:
            out.append((x, weight))
    return out


def parse_prompt(text: str, *, syntax: str = "a1111") -> list[tuple[str, float]]:
    """Prompt -> [(text, weight)]. "a1111": A1111's parse_prompt_attention (a ``("BREAK", -1)`` entry
    marks a forced chunk break); "comfyui": ComfyUI's token_weights with its escapes; "none": literal."""
    if not isinstance(text, str):
        raise RefsdError(f"prompt must be str, got {type(text).__name__}")
    if syntax == "a1111":
        return _parse_a1111(text)
    if syntax == "comfyui":
        return [(_comfy_unescape(t), w) for t, w in _comfy_token_weights(_comfy_escape(text), 1.0)]
    if syntax == "none":
        return [(text, 1.0)]
    raise RefsdError(f"unknown prompt syntax {syntax!r}; valid: 'a1111', 'comfyui', 'none'")
