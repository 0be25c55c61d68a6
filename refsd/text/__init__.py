"""Text side of Stable Diffusion: the CLIP BPE tokenizer and chunking (tokenizer.py), prompt-emphasis
parsing (prompt_syntax.py), the CLIP text transformer (clip.py), prompt -> conditioning with emphasis (conditioning.py),
and textual-inversion embeddings (embeddings.py; the opt-in pickle converter: embedding_pickle.py)."""

from refsd.text.clip import CLIPTextConfig, clip_text, penultimate
from refsd.text.conditioning import clip_encode_fn, encode_prompt
from refsd.text.prompt_syntax import parse_prompt
from refsd.text.tokenizer import BOS, EOS, CLIPTokenizer, TokenChunks

__all__ = ["BOS", "EOS", "CLIPTextConfig", "CLIPTokenizer", "TokenChunks", "clip_encode_fn", "clip_text",
           "encode_prompt", "parse_prompt", "penultimate"]
