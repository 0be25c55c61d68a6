"""Text side of Stable Diffusion: the CLIP BPE tokenizer and chunking (tokenizer.py), prompt-emphasis
parsing (prompt_syntax.py), the CLIP text transformer (clip.py), prompt -> conditioning with emphasis (conditioning.py),
and textual-inversion embeddings (embeddings.py; the opt-in pickle converter: embedding_pickle.py). The SD3 / Flux
text side: the T5 encoder (t5.py), its SentencePiece tokenizer (t5_tokenizer.py), SD3's and Flux's prompt
layouts (dit_conditioning.py)."""

from refsd.text.clip import CLIPTextConfig, clip_text, penultimate
from refsd.text.conditioning import clip_encode_fn, encode_prompt
from refsd.text.prompt_syntax import parse_prompt
from refsd.text.t5 import T5Config, t5_encoder
from refsd.text.t5_tokenizer import T5Tokenizer
from refsd.text.tokenizer import BOS, EOS, CLIPTokenizer, TokenChunks

__all__ = ["BOS", "EOS", "CLIPTextConfig", "CLIPTokenizer", "T5Config", "T5Tokenizer", "TokenChunks", "clip_encode_fn",
           "clip_text", "encode_prompt", "parse_prompt", "penultimate", "t5_encoder"]
