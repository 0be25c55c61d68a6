"""Text side of Stable Diffusion: the CLIP BPE tokenizer and prompt-emphasis parsing (tokenizer.py),
and the CLIP text transformer (clip.py)."""

from refsd.text.clip import CLIPTextConfig, clip_text, penultimate
from refsd.text.tokenizer import BOS, EOS, CLIPTokenizer, TokenChunks, parse_prompt

__all__ = ["BOS", "EOS", "CLIPTextConfig", "CLIPTokenizer", "TokenChunks", "clip_text", "parse_prompt", "penultimate"]
