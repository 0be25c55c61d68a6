"""T5 cases: transformers' T5EncoderModel and T5TokenizerFast are the oracle (SD3 text_encoder_3, Flux text_encoder_2).

Encoder: tiny models built offline from T5Config dicts, every parameter redrawn from the case generator
(``randomise_weights``); traces are forward hooks on the model's own module paths.

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
ATTENTION_VARIANTS = [{"attention": "sliced"}, {"attention": "naive"}, {"attention": "tiled"}]

# Block outputs (depth 1) and every submodule a porter writes (depth 2).
_BLOCK = re.compile(r"encoder\.(embed_tokens|block\.\d+|final_layer_norm)$")
_FINE = re.compile(r"encoder\.block\.\d+\.layer\.(0(\.layer_norm|\.SelfAttention(\.(q|k|v|o|relative_attention_bias))?)?"
                   r"|1(\.layer_norm|\.DenseReluDense(\.(wi|wi_0|wi_1|wo|act))?)?)$")


def _t5_case(g, dt, cfg, ids, desc, *, mask=None, porting=False):
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(**cfg, dropout_rate=0.0)).eval().to(dt)
    randomise_weights(model, g)
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
