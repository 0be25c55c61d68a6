"""T5 cases: transformers' T5EncoderModel and T5TokenizerFast are the oracle (SD3 text_encoder_3, Flux text_encoder_2).

Encoder: tiny models built offline from T5Config dicts, every parameter redrawn from the case generator
(``randomise_t5``: ``randomise_weights`` with T5's attention scale folded into q, as its initialisation
does); traces are forward hooks on the model's own module paths.

Tokenizer: no T5 vocabulary is downloadable here, so the oracle trains one. SentencePiece (single
thread: deterministic) learns a unigram model with T5's settings (pad 0, eos 1, unk 2, no bos,
nmt_nfkc normalisation) on a fixed corpus built from the CLIP tokenizer corpus; transformers'
T5TokenizerFast is built from that ``spiece.model`` and saved (``tokenizer.json``), and the same
tokenizer is also loaded from the saved folder; the two must agree on every prompt. Both files are
stored in the case as uint8 inputs (``in/spiece_model``, ``in/tokenizer_json``): they are fixtures
written by the oracle, checked bit for bit by ``--check`` like every input. This module imports
nothing from refsd.
"""

from __future__ import annotations

import io
import re
import tempfile
from pathlib import Path

import torch

from golden.oracle_text import _pack, corpus
from golden.registry import Capture, case, hooked, randomise_weights

T5_V1_1_TINY = {  # google/t5-v1_1 layout (gated-gelu), real bucket settings, tiny widths
    "vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
}
T5_RELU_TINY = {**T5_V1_1_TINY, "feed_forward_proj": "relu", "relative_attention_num_buckets": 8,
                "relative_attention_max_distance": 20}
# google/t5-v1_1-xxl config.json (SD3 text_encoder_3, Flux text_encoder_2) with 2 of its 24 layers:
# the slow tier's full-width case (golden/fullsize.py).
T5_V1_1_XXL_2L = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 2, "num_heads": 64,
                  "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
                  "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu"}
ATTENTION_VARIANTS = [{"attention": "sliced"}, {"attention": "naive"}, {"attention": "tiled"}]

# Block outputs (depth 1) and every submodule a porter writes (depth 2).
_BLOCK = re.compile(r"encoder\.(embed_tokens|block\.\d+|final_layer_norm)$")
_FINE = re.compile(r"encoder\.block\.\d+\.layer\.(0(\.layer_norm|\.SelfAttention(\.(q|k|v|o|relative_attention_bias))?)?"
                   r"|1(\.layer_norm|\.DenseReluDense(\.(wi|wi_0|wi_1|wo|act))?)?)$")


def randomise_t5(model, g: torch.Generator) -> None:
    """``randomise_weights``, then every ``SelfAttention.q`` scaled by d_kv^-1/2: T5 has no attention
    scaling because its initialisation folds it into q (transformers T5PreTrainedModel._init_weights:
    q ~ N(0, 1/(d_model d_kv))); without it the logits are sqrt(d_kv) times those of a trained model."""
    randomise_weights(model, g)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("SelfAttention.q.weight"):
                t.mul_(model.config.d_kv ** -0.5)


def _t5_case(g, dt, cfg, ids, desc, *, mask=None, porting=False):
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(**cfg, dropout_rate=0.0)).eval().to(dt)
    randomise_t5(model, g)
    traced = (lambda n: bool(_BLOCK.match(n) or _FINE.match(n))) if porting else (lambda n: bool(_BLOCK.match(n)))
    o, trace = hooked(model, lambda: model(input_ids=ids, attention_mask=mask), traced)
    inputs = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
    call = "input_ids" if mask is None else "input_ids, attention_mask=attention_mask"
    return Capture("t5_text", inputs, {"last_hidden_state": o.last_hidden_state},
                   f"transformers.T5EncoderModel(T5Config(**config, dropout_rate=0.0))({call}).last_hidden_state",
                   desc, kwargs={"config": cfg}, variants=ATTENTION_VARIANTS, tol_component="text_encoder.t5",
                   params={k: v.clone() for k, v in model.state_dict().items()}, trace=trace,
                   trace_depth=2 if porting else 1)


@case("text_encoder", "t5_v1_1_porting_tiny", dtypes=("float32",))
def _t5_v1_1_tiny(g, dt):
    # 140 tokens: offsets beyond max_distance 128 reach the last logarithmic bucket
    ids = torch.randint(0, T5_V1_1_TINY["vocab_size"], (1, 140), generator=g)
    return _t5_case(g, dt, T5_V1_1_TINY, ids, "porting case: tiny T5 v1.1 encoder (gated-gelu, 32 buckets, max "
                    "distance 128) on 1 x 140 tokens, no attention mask (as SD3 / Flux call it), every submodule "
                    "traced (depth 2)", porting=True)


@case("text_encoder", "t5_v1_1_padded_tiny", dtypes=("float32",))
def _t5_v1_1_padded(g, dt):
    ids = torch.randint(3, T5_V1_1_TINY["vocab_size"], (3, 40), generator=g)
    mask = torch.ones((3, 40), dtype=torch.int64)
    for row, n in ((1, 20), (2, 0)):  # n tokens, then </s> (1), then <pad> (0)
        ids[row, n], ids[row, n + 1:] = 1, 0
        mask[row, n + 1:] = 0
    ids[0, -1] = 1
    return _t5_case(g, dt, T5_V1_1_TINY, ids, "tiny T5 v1.1 encoder on a padded batch (40, 21 and 1 tokens incl. "
                    "</s>, <pad> 0 after) with the tokenizer's attention_mask", mask=mask)


@case("text_encoder", "t5_relu_tiny", dtypes=("float32",))
def _t5_relu(g, dt):
    ids = torch.randint(0, T5_RELU_TINY["vocab_size"], (2, 30), generator=g)
    return _t5_case(g, dt, T5_RELU_TINY, ids, "tiny original-T5 encoder (ReLU feed-forward, 8 buckets, max "
                    "distance 20) on 2 x 30 tokens")


# --------------------------------------------------------------------------------------------
# tokenizer


def t5_corpus() -> list[str]:
    """The CLIP tokenizer corpus plus what is particular to T5: sentinels and specials (also written
    so that NFKC makes them), SentencePiece's ▁, whitespace runs, clusters the charsmap rewrites."""
    extra = [
        "<extra_id_0>", "a <extra_id_0> b <extra_id_99>", "<extra_id_100>", "<extra_id_5><extra_id_6>",
        "</s>", "a</s>b", "<pad><unk>", "x<unk>y", "＜pad＞", "＜/s＞", "＜unk＞", "＜extra_id_0＞",
        "\u2581", "a\u2581b", "\u2581\u2581x", "a\u2581", " \u2581 ", "a  b", "  a", "a   ", "a\u3000\u3000b",
        "\r\n", "a\r\nb", "\r\u0301", "\n\u0301x", "\u2460\u0301", "\ufb01\u0301", "e\u0301\u0301", "e\u0301",
        "\u0600a", "\u216b\u20dd", "x\u200d", "\u00adsoft", "a\u200bb", "\uff76\uff9e", "\u337f\u0301",
        "\u1100\u1161\u11a8", "\uac00\u11a8\u0301", "\U0001f1ef\U0001f1f5\U0001f1ef", "\u0e01\u0e33",
        "unknown: \u2603\u2604 \U0001f9ea\U0001f9eb", "MiXeD CaSe and UPPER", "tab\tsep\tvalues",
    ]
    return corpus() + extra


def _max_length_prompts() -> list[str]:
    """Prompts around the 256 / 512 boundaries (each 'word ' is one token in the trained vocabulary)."""
    out = ["", "a", "<extra_id_0>", "a photo of a cat"]
    out += [("word " * k).strip() for k in (254, 255, 256, 257, 510, 511, 512, 600)]
    long = corpus()[-1]
    out += [long, long * 3, "<extra_id_1> " * 300]
    return out


def _train_corpus(g) -> list[str]:
    """A fixed training text: the prompts, then 3000 sentences of their words drawn from ``g``."""
    prompts = t5_corpus()
    words = " ".join(prompts).split()
    lines = list(prompts)
    for _ in range(3000):
        n = int(torch.randint(3, 31, (1,), generator=g))
        idx = torch.randint(0, len(words), (n,), generator=g).tolist()
        lines.append(" ".join(words[i] for i in idx))
    return lines


def train_spiece(g) -> bytes:
    """A SentencePiece unigram model with T5's settings, trained on ``_train_corpus(g)`` (~860 pieces)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_train_corpus(g)), model_writer=model, model_type="unigram", vocab_size=1000,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="nmt_nfkc",
        character_coverage=1.0, num_threads=1, minloglevel=2)
    return model.getvalue()


def hf_t5_tokenizers(spiece: bytes):
    """(T5TokenizerFast from spiece.model alone, the tokenizer.json bytes it saves, T5TokenizerFast from
    the saved folder)."""
    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory() as d:
        src, saved = Path(d) / "spm", Path(d) / "saved"
        src.mkdir()
        (src / "spiece.model").write_bytes(spiece)
        from_spm = T5TokenizerFast.from_pretrained(str(src))
        from_spm.save_pretrained(str(saved))
        from_json = T5TokenizerFast.from_pretrained(str(saved))
        return from_spm, (saved / "tokenizer.json").read_bytes(), from_json


def _flat(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + len(r))
    return torch.tensor([i for r in rows for i in r], dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)


@case("text", "t5_tokenize", dtypes=("float64",))
def _t5_tokenize(g, dt):
    spiece = train_spiece(g)
    from_spm, tokenizer_json, from_json = hf_t5_tokenizers(spiece)
    texts, long = t5_corpus(), _max_length_prompts()
    ids = [from_json(t).input_ids for t in texts]
    outputs = {}
    outputs["ids"], outputs["ids_offsets"] = _flat(ids)
    for n in (256, 512):
        enc = from_json(long, padding="max_length", max_length=n, truncation=True)
        outputs[f"ids_{n}"] = torch.tensor(enc.input_ids, dtype=torch.int64)
        outputs[f"mask_{n}"] = torch.tensor(enc.attention_mask, dtype=torch.int64)
        assert from_spm(long, padding="max_length", max_length=n, truncation=True).input_ids == enc.input_ids
    assert [from_spm(t).input_ids for t in texts] == ids, "T5TokenizerFast from spiece.model and tokenizer.json differ"
    text_bytes, text_offsets = _pack(texts)
    long_bytes, long_offsets = _pack(long)
    inputs = {"spiece_model": torch.tensor(list(spiece), dtype=torch.uint8),
              "tokenizer_json": torch.tensor(list(tokenizer_json), dtype=torch.uint8),
              "text_bytes": text_bytes, "text_offsets": text_offsets,
              "long_bytes": long_bytes, "long_offsets": long_offsets}
    call = ("transformers.T5TokenizerFast.from_pretrained(<folder with in/spiece_model as spiece.model, or "
            "in/tokenizer_json as tokenizer.json>)(text).input_ids; for the long prompts (text, padding="
            "'max_length', max_length=256 | 512, truncation=True) .input_ids / .attention_mask")
    desc = (f"{len(texts)} prompts tokenized by transformers' T5TokenizerFast on a SentencePiece unigram model "
            "trained by the oracle with T5's settings (pad 0, eos 1, unk 2, 100 extra ids, nmt_nfkc): out/ids "
            "flat with </s>, prompt i = ids[ids_offsets[i]:ids_offsets[i+1]]; out/ids_256 / ids_512 (+ masks) "
            f"for {len(long)} prompts around the SD3 / Flux max_sequence_length. Strings as in the CLIP "
            "tokenizer cases (UTF-8 bytes + offsets). dtype 'float64' is a naming convention only.")
    return Capture("t5_tokenize", inputs, outputs, call, desc,
                   variants=[{"source": "tokenizer.json"}, {"source": "spiece.model"}])


# --------------------------------------------------------------------------------------------
# SD3 / Flux prompt encoding (diffusers' encode_prompt on tiny encoders)
#
# The CLIPs are the tiny SDXL pipeline's (golden/oracle_sdxl.py: CLIP-L-like 16 wide, bigG-like 32 wide
# with projection), borrowed through params_from; SD3's CLIP-L is a CLIPTextModelWithProjection whose
# text model is that CLIP-L and whose text_projection is this case's own draw. The T5 is this case's
# own tiny T5 v1.1 on the vocabulary of the tokenizer case's oracle-trained model. Token ids come from
# the same tokenizer objects the pipeline uses, called as the pipeline calls them, and are stored as
# inputs: the goldens check ids -> embeddings; the tokenizer goldens check text -> ids.

T5_DIT_TINY = {**T5_V1_1_TINY, "d_model": 64, "d_ff": 80}  # wider than the 16 + 32 CLIP channels
SD3_TRANSFORMER_TINY = {  # only its config is read (joint_attention_dim, sample_size, patch_size)
    "sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 1, "attention_head_dim": 8,
    "num_attention_heads": 2, "joint_attention_dim": 64, "caption_projection_dim": 16,
    "pooled_projection_dim": 40, "out_channels": 4, "pos_embed_max_size": 16,
}


def oracle_t5_tokenizer():
    """The tokenizer case's T5TokenizerFast (its model is the first draw of that case's generator)."""
    import zlib

    global _T5_TOKENIZER
    if _T5_TOKENIZER is None:
        g = torch.Generator().manual_seed(zlib.crc32(b"text/t5_tokenize_f64"))
        _T5_TOKENIZER = hf_t5_tokenizers(train_spiece(g))[2]
    return _T5_TOKENIZER


_T5_TOKENIZER = None


def _sdxl_clips():
    from golden import oracle_sdxl

    return oracle_sdxl._components("sdxl"), oracle_sdxl.OWNER["sdxl"], oracle_sdxl.TEXT_L, oracle_sdxl.TEXT_G


def _tiny_t5(g, vocab: int):
    from transformers import T5Config, T5EncoderModel

    cfg = {**T5_DIT_TINY, "vocab_size": vocab}
    model = T5EncoderModel(T5Config(**cfg, dropout_rate=0.0)).eval()
    randomise_t5(model, g)
    return model, cfg


def _clip_ids(tok, texts):
    return torch.tensor(tok(texts, padding="max_length", max_length=77, truncation=True).input_ids)


def _t5_ids(tok, texts, n):
    return torch.tensor(tok(texts, padding="max_length", max_length=n, truncation=True,
                            add_special_tokens=True).input_ids)


def _state(prefix, model):
    return {f"{prefix}.{k}": v.detach().clone() for k, v in model.state_dict().items()}


def _sd3_case(g, dt, *, with_t5: bool, prompts: dict, clip_skip, msl: int, desc: str):
    import math

    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    base, owner, text_l, text_g = _sdxl_clips()
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**text_l, attention_dropout=0.0)).eval()
    clip_l.text_model.load_state_dict(base["text_encoder"].state_dict())
    w = clip_l.text_projection.weight
    with torch.no_grad():
        w.copy_((torch.randn(w.shape, generator=g, dtype=torch.float64) / math.sqrt(w.shape[1])).to(w.dtype))
    t5tok = oracle_t5_tokenizer()
    t5, t5_cfg = _tiny_t5(g, len(t5tok)) if with_t5 else (None, None)
    pipe = StableDiffusion3Pipeline(transformer=SD3Transformer2DModel(**SD3_TRANSFORMER_TINY), scheduler=None, vae=None,
                                    text_encoder=clip_l, tokenizer=base["tokenizer"],
                                    text_encoder_2=base["text_encoder_2"], tokenizer_2=base["tokenizer_2"],
                                    text_encoder_3=t5, tokenizer_3=t5tok if with_t5 else None)
    with torch.no_grad():
        full = {"prompt_2": None, "prompt_3": None, **prompts}
        pe, npe, pp, npp = pipe.encode_prompt(**full, device="cpu", do_classifier_free_guidance=True,
                                              clip_skip=clip_skip, max_sequence_length=msl)
    p, n = prompts["prompt"], prompts["negative_prompt"]
    inputs = {"ids_l": _clip_ids(base["tokenizer"], [p, n]),
              "ids_g": _clip_ids(base["tokenizer_2"], [prompts.get("prompt_2") or p, n])}
    if with_t5:
        inputs["ids_t5"] = _t5_ids(t5tok, [prompts.get("prompt_3") or p, n], msl)
    borrowed = {**_state("text_encoder", base["text_encoder"]), **_state("text_encoder_2", base["text_encoder_2"])}
    params = {**borrowed, "text_encoder.text_projection.weight": w.detach().clone()}
    if with_t5:
        params.update(_state("text_encoder_3", t5))
    kwargs = {"family": "sd3", "prompts": prompts, "clip_l": text_l, "clip_g": text_g, "t5": t5_cfg, "clip_skip": clip_skip,
              "max_sequence_length": msl, "joint_attention_dim": SD3_TRANSFORMER_TINY["joint_attention_dim"]}
    call = (f"diffusers.StableDiffusion3Pipeline(<tiny encoders>).encode_prompt(**{prompts!r}, "
            f"do_classifier_free_guidance=True, clip_skip={clip_skip}, max_sequence_length={msl})")
    return Capture("dit_prompt_embeds", inputs,
                   {"prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": pp,
                    "negative_pooled_prompt_embeds": npp},
                   call, desc, kwargs=kwargs, params=params, params_from=owner, borrowed=tuple(borrowed))


@case("text_encoder", "sd3_encode_prompt", dtypes=("float32",))
def _sd3_encode(g, dt):
    prompts = {"prompt": "a photo of a cat", "prompt_3": "a photo of a cat on a red sofa, <extra_id_0>",
               "negative_prompt": "blurry"}
    return _sd3_case(g, dt, with_t5=True, prompts=prompts, clip_skip=None, msl=256,
                     desc="SD3 encode_prompt on tiny CLIP-L + bigG (projection) + T5 v1.1: penultimate CLIP states "
                          "concatenated, zero-padded to T5's 64 channels, before 256 T5 tokens; pooled = both "
                          "text_embeds; prompt_3 differs from prompt; negative prompt 'blurry'")


@case("text_encoder", "sd3_encode_prompt_no_t5", dtypes=("float32",))
def _sd3_encode_no_t5(g, dt):
    prompts = {"prompt": "an astronaut riding a horse", "prompt_2": "a horse", "negative_prompt": ""}
    return _sd3_case(g, dt, with_t5=False, prompts=prompts, clip_skip=1, msl=77,
                     desc="SD3 encode_prompt without text_encoder_3 (T5 part zeros, joint_attention_dim 64, "
                          "max_sequence_length 77), clip_skip=1 (prompt only; the negative uses hidden_states[-2]), "
                          "prompt_2 for bigG, empty negative prompt")


@case("text_encoder", "flux_encode_prompt", dtypes=("float32",))
def _flux_encode(g, dt):
    from diffusers import FluxPipeline

    base, owner, text_l, _ = _sdxl_clips()
    t5tok = oracle_t5_tokenizer()
    t5, t5_cfg = _tiny_t5(g, len(t5tok))
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=base["text_encoder"], tokenizer=base["tokenizer"],
                        text_encoder_2=t5, tokenizer_2=t5tok, transformer=None)
    p, p2 = "a photo of a cat", "a photo of a cat, highly detailed, <extra_id_3> studio light"
    with torch.no_grad():
        pe, pp, text_ids = pipe.encode_prompt(prompt=p, prompt_2=p2, device="cpu", max_sequence_length=512)
    inputs = {"ids_clip": _clip_ids(base["tokenizer"], [p]), "ids_t5": _t5_ids(t5tok, [p2], 512)}
    borrowed = _state("text_encoder", base["text_encoder"])
    params = {**borrowed, **_state("text_encoder_2", t5)}
    return Capture("dit_prompt_embeds", inputs,
                   {"prompt_embeds": pe, "pooled_prompt_embeds": pp, "text_ids": text_ids},
                   f"diffusers.FluxPipeline(<tiny encoders>).encode_prompt(prompt={p!r}, prompt_2={p2!r}, "
                   "max_sequence_length=512)",
                   "Flux encode_prompt on tiny CLIP-L (pooler_output only) + T5 v1.1 (512 tokens from prompt_2); "
                   "text_ids zeros (512, 3)",
                   kwargs={"family": "flux", "prompts": {"prompt": p, "prompt_2": p2}, "clip": text_l, "t5": t5_cfg},
                   tol_component="text_encoder.t5_512",
                   params=params, params_from=owner,
                   borrowed=tuple(borrowed))
