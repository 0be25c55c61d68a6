"""Text side of Stable Diffusion: the CLIP BPE tokenizer and prompt-emphasis parsing (tokenizer.py)."""

from refsd.text.tokenizer import BOS, EOS, CLIPTokenizer, TokenChunks, parse_prompt

__all__ = ["BOS", "EOS", "CLIPTokenizer", "TokenChunks", "parse_prompt"]
