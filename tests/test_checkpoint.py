"""Checkpoint loading, proven by diffusers rather than by refsd itself.

For every architecture a tiny diffusers pipeline with seeded random weights is built offline. refsd's
reverse tables (``ldm.to_single_file``) write its state dicts as one single-file LDM checkpoint;
diffusers' own single-file loader (``Pipeline.from_single_file(config=<saved folder>)``) must read
back every tensor exactly, and refsd's ``load_checkpoint`` must yield exactly the original state
dicts, from that file and from the ``save_pretrained`` folder, with nothing missing or extra.
Then the failure modes: every bad input names its culprit.
"""

import json
import mmap
import os
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from refsd.errors import WeightsError  # noqa: E402
from refsd.weights import SafeTensorsFile, load_checkpoint, save_safetensors  # noqa: E402
from refsd.weights import ldm  # noqa: E402
from refsd.weights.detect import BY_NAME  # noqa: E402

CLIP_TINY = dict(vocab_size=1000, hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=16,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
OPENCLIP_TINY = {**CLIP_TINY, "hidden_size": 24, "intermediate_size": 40, "hidden_act": "gelu", "projection_dim": 20}
VAE_TINY = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=4, sample_size=32)
UNET_SD1 = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=2,
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                cross_attention_dim=16, attention_head_dim=8)
UNET_SD2 = {**UNET_SD1, "layers_per_block": 1, "cross_attention_dim": 24, "use_linear_projection": True,
            "attention_head_dim": [1, 1]}
UNET_SDXL = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                 transformer_layers_per_block=[1, 2], cross_attention_dim=16 + 24, attention_head_dim=[1, 1],
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=20 + 6 * 8)  # pooled bigG + 6 time ids
UNET_REFINER = {**UNET_SDXL, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "transformer_layers_per_block": 2,
                "cross_attention_dim": 24, "projection_class_embeddings_input_dim": 20 + 5 * 8}

# architecture -> (pipeline class, UNet config, text encoders {component: (config, with projection)})
ARCHS = {
    "sd1": ("StableDiffusionPipeline", UNET_SD1, {"text_encoder": (CLIP_TINY, False)}),
    "sd1-inpaint": ("StableDiffusionPipeline", {**UNET_SD1, "in_channels": 9}, {"text_encoder": (CLIP_TINY, False)}),
    "sd2": ("StableDiffusionPipeline", UNET_SD2, {"text_encoder": (OPENCLIP_TINY, False)}),
    "sd2-inpaint": ("StableDiffusionPipeline", {**UNET_SD2, "in_channels": 9}, {"text_encoder": (OPENCLIP_TINY, False)}),
    "sdxl": ("StableDiffusionXLPipeline", UNET_SDXL,
             {"text_encoder": (CLIP_TINY, False), "text_encoder_2": (OPENCLIP_TINY, True)}),
    "sdxl-inpaint": ("StableDiffusionXLPipeline", {**UNET_SDXL, "in_channels": 9},
                     {"text_encoder": (CLIP_TINY, False), "text_encoder_2": (OPENCLIP_TINY, True)}),
    "sdxl-refiner": ("StableDiffusionXLImg2ImgPipeline", UNET_REFINER, {"text_encoder_2": (OPENCLIP_TINY, True)}),
}
# Keys real single files carry besides the components (all must be ignored, not loaded).
EXTRAS = {"alphas_cumprod": (1000,), "betas": (1000,), "model_ema.decay": (), "model_ema.num_updates": (),
          "model_ema.diffusion_modelinput_blocks00weight": (32, 4, 3, 3)}
FAMILY_EXTRAS = {  # per family: what the real files of that family carry in their text slots
    "sd1": {"cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77)},
    "sd2": {"cond_stage_model.model.text_projection": (24, 24), "cond_stage_model.model.logit_scale": ()},
    "sdxl": {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
             "conditioner.embedders.1.model.logit_scale": ()},
    "sdxl-refiner": {"conditioner.embedders.0.model.logit_scale": ()},
}


def _family(arch):
    return BY_NAME[arch].family


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def _tokenizer(folder, pad):
    """A tiny CLIP BPE vocabulary (byte symbols, no merges): what from_single_file's config folder needs."""
    from transformers import CLIPTokenizer

    from refsd.text.tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), pad_token=pad)


class Built:
    """One architecture: the original models, the saved diffusers folder, the refsd-written single file."""

    def __init__(self, arch, root):
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        pipe_name, unet_cfg, texts = ARCHS[arch]
        seed = sum(map(ord, arch))
        self.arch, self.unet_cfg, self.texts = arch, unet_cfg, texts
        self.models = {"unet": _randomise(UNet2DConditionModel(**unet_cfg), seed),
                       "vae": _randomise(AutoencoderKL(**VAE_TINY), seed + 1)}
        kwargs = {}
        for i, (comp, (cfg, proj)) in enumerate(texts.items()):
            cls = CLIPTextModelWithProjection if proj else CLIPTextModel
            self.models[comp] = _randomise(cls(CLIPTextConfig(**cfg)), seed + 2 + i)
            tok = "tokenizer" if comp == "text_encoder" else "tokenizer_2"
            kwargs[tok] = _tokenizer(root / "vocab" / tok, "<|endoftext|>" if cfg["hidden_act"] == "quick_gelu" else "!")
        pipe_cls = getattr(diffusers, pipe_name)
        if pipe_name == "StableDiffusionPipeline":
            kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if pipe_name == "StableDiffusionXLImg2ImgPipeline":
            kwargs.update(text_encoder=None, tokenizer=None, requires_aesthetics_score=True)
        self.pipe_cls = pipe_cls
        pipe = pipe_cls(scheduler=EulerDiscreteScheduler(steps_offset=1), **self.models, **kwargs)
        self.folder = root / "diffusers"
        pipe.save_pretrained(self.folder)
        # diffusers' from_single_file gets the configs and tokenizers only: with no weights to fall
        # back on, every tensor it ends up with came from the single file
        self.configs_only = root / "configs"
        shutil.copytree(self.folder, self.configs_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        self.state = {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in self.models.items()}
        sd = ldm.to_single_file(self.state, _family(arch))
        rng = np.random.default_rng(0)
        for k, s in {**EXTRAS, **FAMILY_EXTRAS[_family(arch)]}.items():
            sd[k] = rng.standard_normal(s).astype(np.float32)
        self.file_state = sd
        self.file = root / f"{arch}.safetensors"
        save_safetensors(self.file, sd)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = Built(arch, tmp_path_factory.mktemp(arch))
        return cache[arch]

    return get


def unet_state_shapes(cfg):
    """The state-dict shapes of diffusers' UNet built from ``cfg`` (on the meta device: no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        m = UNet2DConditionModel(**cfg)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def assert_same_state(got, want, what):
    """Exactly the same keys, shapes, dtypes and values."""
    assert set(got) == set(want), f"{what}: missing {sorted(set(want) - set(got))[:5]}, extra {sorted(set(got) - set(want))[:5]}"
    for k, w in want.items():
        g = got[k]
        g = g.detach() if isinstance(g, torch.Tensor) else torch.from_numpy(np.array(g))
        assert g.dtype == w.dtype and g.shape == w.shape, (what, k, g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g, w), f"{what}: {k} differs"


# --------------------------------------------------------------------------------------------
# the proof: diffusers reads what refsd writes; refsd reads it (and the folder) exactly


@pytest.mark.parametrize("arch", list(ARCHS))
def test_diffusers_single_file_loader_reads_refsd_files_exactly(built, arch):
    b = built(arch)
    pipe = b.pipe_cls.from_single_file(str(b.file), config=str(b.configs_only), local_files_only=True)
    for comp, want in b.state.items():
        assert_same_state(getattr(pipe, comp).state_dict(), want, f"diffusers {comp}")


def test_the_proof_catches_a_wrong_table(built, tmp_path, monkeypatch):
    """Negative control: with q and k swapped in the open_clip table, refsd still reads its own file
    back, but diffusers does not -- the round trip through diffusers is what proves the tables."""
    b = built("sd2")
    rows = list(ldm.OPENCLIP_LAYER)
    i = next(i for i, (k, _) in enumerate(rows) if k == "attn.in_proj_weight")
    q, k, v = rows[i][1]
    rows[i] = ("attn.in_proj_weight", (k, q, v))
    monkeypatch.setattr(ldm, "OPENCLIP_LAYER", tuple(rows))
    path = _write(tmp_path, "wrong.safetensors", {**b.file_state, **ldm.to_single_file(b.state, "sd2")})
    assert_same_state(load_checkpoint(path).params["text_encoder"], b.state["text_encoder"], "refsd, self-consistent")
    pipe = b.pipe_cls.from_single_file(str(path), config=str(b.configs_only), local_files_only=True)
    with pytest.raises(AssertionError, match=r"self_attn\.[qk]_proj\.weight differs"):
        assert_same_state(pipe.text_encoder.state_dict(), b.state["text_encoder"], "diffusers")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_refsd_loads_single_file_exactly(built, arch):
    b = built(arch)
    ck = load_checkpoint(b.file)
    assert ck.format == "single-file" and ck.architecture == arch
    assert list(ck.params) == [c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if c in b.state]
    for comp, want in b.state.items():
        assert_same_state(ck.params[comp], want, f"refsd {comp}")
    assert sorted(ck.ignored) == sorted({**EXTRAS, **FAMILY_EXTRAS[_family(arch)]})
    # configs: every field that shapes the network is what the model was built with
    unet = ck.configs["unet"]
    for k, v in b.unet_cfg.items():
        if k not in ("sample_size", "transformer_layers_per_block"):
            assert unet[k] == v, (k, unet[k], v)
    assert unet_state_shapes(unet) == {k: tuple(v.shape) for k, v in b.state["unet"].items()}
    for k, v in VAE_TINY.items():
        if k != "sample_size":
            assert ck.configs["vae"][k] == v, k
    for comp, (cfg, _) in b.texts.items():
        got = ck.configs[comp]
        for k, v in cfg.items():
            if k not in ("num_attention_heads", "projection_dim") or (k == "projection_dim" and comp == "text_encoder_2"):
                assert got[k] == v, (comp, k, got[k], v)
    pads = {"tokenizer" if c == "text_encoder" else "tokenizer_2": 49407 if cfg["hidden_act"] == "quick_gelu" else 0
            for c, (cfg, _) in b.texts.items()}
    assert {t: i.pad_token for t, i in ck.tokenizers.items()} == pads
    assert all(i.folder is None for i in ck.tokenizers.values())


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl", "sdxl-refiner"])
def test_refsd_loads_diffusers_folder_exactly(built, arch):
    b = built(arch)
    ck = load_checkpoint(b.folder)
    assert ck.format == "diffusers" and ck.architecture == arch
    for comp, want in b.state.items():
        assert_same_state(ck.params[comp], want, f"refsd folder {comp}")
        saved = json.loads((b.folder / comp / "config.json").read_text())
        assert ck.configs[comp] == saved
    assert ck.configs["scheduler"]["_class_name"] == "EulerDiscreteScheduler"
    from transformers import CLIPTokenizer

    for tok_name, info in ck.tokenizers.items():
        assert info.folder == b.folder / tok_name
        tok = info.load()  # transformers 5 saved tokenizer.json only
        ref = CLIPTokenizer.from_pretrained(str(info.folder))
        text = "a photo of a cat, (masterpiece)"
        ids = ref(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert tok(text, pad_token=info.pad_token) == ids
        assert info.pad_token == ref.pad_token_id


def test_a_diffusers_unet_file_alone(built):
    b = built("sd2-inpaint")
    ck = load_checkpoint(b.folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert ck.architecture == "sd2-inpaint" and list(ck.params) == ["unet"]
    assert_same_state(ck.params["unet"], b.state["unet"], "unet file")
    # SDXL base and refiner UNets alone are told apart by their number of levels (3 and 4); these have 2
    with pytest.raises(WeightsError, match="without text encoders, SDXL base and refiner UNets are told apart"):
        load_checkpoint(built("sdxl-refiner").folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_params_are_lazy_views_of_the_file(built):
    b = built("sdxl")
    ck = load_checkpoint(b.file)

    def maps_file(a):
        while isinstance(a, np.ndarray):
            a = a.base
        return isinstance(a, mmap.mmap) or (isinstance(a, memoryview) and isinstance(a.obj, mmap.mmap))

    te2 = ck.params["text_encoder_2"]
    assert te2._store.cache == {}  # nothing read yet
    q = te2["text_model.encoder.layers.0.self_attn.k_proj.weight"]  # a row slice of the fused in_proj
    proj = te2["text_projection.weight"]  # a transpose
    conv = ck.params["vae"]["decoder.mid_block.attentions.0.to_q.weight"]  # a squeezed 1x1 conv
    for a in (q, proj, conv, ck.params["unet"]["conv_in.weight"]):
        assert maps_file(a) and not a.flags.writeable
    assert len(te2._store.cache) == 2


def test_placement_and_dtype(built):
    b = built("sd2")
    ck = load_checkpoint(b.file, backend="torch", dtype="float16")
    p = ck.params["text_encoder"]
    k = "encoder.layers.1.self_attn.v_proj.bias"
    assert isinstance(p[k], torch.Tensor) and p[k].dtype == torch.float16 and p.dtype_of(k) == "float16"
    assert torch.equal(p[k], b.state["text_encoder"][k].half())


# --------------------------------------------------------------------------------------------
# failures name the culprit


def _write(tmp_path, name, state):
    path = tmp_path / name
    save_safetensors(path, state)
    return path


def test_unknown_and_unconsumed_keys_are_named(built, tmp_path):
    sd = dict(built("sd1").file_state)
    bad = _write(tmp_path, "a.safetensors", {**sd, "model.diffusion_model.input_blocks.1.0.frobnicate.weight": np.ones(2, np.float32)})
    with pytest.raises(WeightsError, match=r"match no rename rule: model\.diffusion_model\.input_blocks\.1\.0\.frobnicate"):
        load_checkpoint(bad)
    bad = _write(tmp_path, "b.safetensors", {**sd, "some_extension.weight": np.ones(2, np.float32)})
    with pytest.raises(WeightsError, match="not known to be ignorable: some_extension.weight"):
        load_checkpoint(bad)
    # under an attention block every name is carried over; the full key list of the config catches junk
    bad = _write(tmp_path, "c.safetensors", {**sd, "model.diffusion_model.input_blocks.1.1.extra.weight": np.ones(2, np.float32)})
    with pytest.raises(WeightsError, match=r"unexpected: down_blocks\.0\.attentions\.0\.extra\.weight"):
        load_checkpoint(bad)


def test_missing_and_misshapen_keys_are_named(built, tmp_path):
    sd = dict(built("sd1").file_state)
    missing = {k: v for k, v in sd.items() if k != "model.diffusion_model.output_blocks.2.0.skip_connection.bias"}
    with pytest.raises(WeightsError, match=r"(?s)1 missing.*missing: up_blocks\.0\.resnets\.2\.conv_shortcut\.bias \(expected \(64,\)\)"):
        load_checkpoint(_write(tmp_path, "m.safetensors", missing))
    k = "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_v.weight"
    wrong = {**sd, k: np.zeros((32, 17), np.float32)}
    with pytest.raises(WeightsError, match=r"up_blocks\.1\.attentions\.2\.transformer_blocks\.0\.attn2\.to_v\.weight: "
                                           r"expected \(32, 16\), got \(32, 17\)"):
        load_checkpoint(_write(tmp_path, "w.safetensors", wrong))
    fused = {**built("sd2").file_state, "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias": np.zeros(70, np.float32)}
    with pytest.raises(WeightsError, match=r"in_proj_bias: shape \(70,\) does not split into 3"):
        load_checkpoint(_write(tmp_path, "f.safetensors", fused))


def test_unknown_architecture_lists_what_was_found(built, tmp_path):
    sd = dict(built("sd1").file_state)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((32, 8, 3, 3), np.float32)  # 8 channels
    with pytest.raises(WeightsError) as e:
        load_checkpoint(_write(tmp_path, "x.safetensors", sd))
    msg = str(e.value)
    assert "8 input channels is no known architecture" in msg
    assert "model.diffusion_model.* (304)" in msg and "cond_stage_model.transformer.* (37)" in msg
    assert "model.diffusion_model.input_blocks.0.0.weight (32, 8, 3, 3)" in msg
    # text encoders of one family, UNet of another
    mixed = {k: v for k, v in built("sd1").file_state.items() if not k.startswith("cond_stage_model.")}
    mixed.update({k: v for k, v in built("sd2").file_state.items() if k.startswith("cond_stage_model.")})
    with pytest.raises(WeightsError, match="unknown architecture.*text_encoder: openclip.*Found"):
        load_checkpoint(_write(tmp_path, "mixed.safetensors", mixed))


def test_foreign_truncated_and_pickled_files(built, tmp_path):
    foreign = _write(tmp_path, "lora.safetensors", {"lora_unet_down.alpha": np.ones((), np.float32),
                                                  "lora_unet_down.lora_up.weight": np.ones((4, 2), np.float32)})
    with pytest.raises(WeightsError, match=r"not a Stable Diffusion checkpoint.*Found 2 tensors: lora_unet_down\.\* \(2\)"):
        load_checkpoint(foreign)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(built("sd1").file.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="truncated"):
        load_checkpoint(truncated)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK\x03\x04whatever")
    with pytest.raises(WeightsError, match="pickle"):
        load_checkpoint(ckpt)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a tensor file at all")
    with pytest.raises(WeightsError, match="notes.safetensors"):
        load_checkpoint(text)
    with pytest.raises(WeightsError, match="no such file"):
        load_checkpoint(tmp_path / "absent.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors", "model.ckpt", "notes.safetensors",
                                                          "t.safetensors"]  # nothing written


def _copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_folder_sharded_variant_and_errors(built, tmp_path):
    b = built("sd1")
    folder = _copy_folder(b.folder, tmp_path / "f")
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    f = SafeTensorsFile(unet)
    keys = list(f)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:100],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[100:]}
    for name, ks in shards.items():
        save_safetensors(folder / "unet" / name, {k: f[k] for k in ks})
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    f.close()
    unet.unlink()
    ck = load_checkpoint(folder)
    assert_same_state(ck.params["unet"], b.state["unet"], "sharded unet")
    # the index must agree with the shards
    index["weight_map"][keys[0]] = "diffusion_pytorch_model-00002-of-00002.safetensors"
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=f"weight_map disagrees with the shards on 1 key.*{keys[0]}"):
        load_checkpoint(folder)
    del index["weight_map"][keys[0]]
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=f"weight_map disagrees .*{keys[0]} \\(in diffusion_pytorch_model-00001"):
        load_checkpoint(folder)
    index["weight_map"][keys[0]] = "diffusion_pytorch_model-00001-of-00002.safetensors"
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    # a variant
    folder2 = _copy_folder(b.folder, tmp_path / "g")
    te = folder2 / "text_encoder" / "model.safetensors"
    half = {k: v.half() for k, v in b.state["text_encoder"].items()}
    save_safetensors(folder2 / "text_encoder" / "model.fp16.safetensors", half)
    for comp in ("unet", "vae"):
        src = folder2 / comp / "diffusion_pytorch_model.safetensors"
        src.rename(src.with_name("diffusion_pytorch_model.fp16.safetensors"))
    ck = load_checkpoint(folder2, variant="fp16")
    assert_same_state(ck.params["text_encoder"], half, "fp16 variant")
    with pytest.raises(WeightsError, match="no weights"):
        load_checkpoint(folder2)  # no plain unet weights any more
    # weights are judged by content: safetensors under a .bin name load, pickles are refused; missing configs named
    te.unlink()
    (folder2 / "text_encoder" / "model.fp16.safetensors").rename(folder2 / "text_encoder" / "pytorch_model.bin")
    assert_same_state(load_checkpoint(folder2, variant="fp16").params["text_encoder"], half, "safetensors named .bin")
    (folder2 / "text_encoder" / "pytorch_model.bin").write_bytes(b"\x80\x04\x95" + bytes(64))
    with pytest.raises(WeightsError, match="pytorch_model.bin is a pickle-based checkpoint"):
        load_checkpoint(folder2, variant="fp16")
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(WeightsError, match=r"vae/config.json: missing"):
        load_checkpoint(folder)
    with pytest.raises(WeightsError, match="no model_index.json"):
        load_checkpoint(folder / "unet")


def test_folder_shape_check(built, tmp_path):
    b = built("sd2")
    folder = _copy_folder(b.folder, tmp_path / "f")
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg["cross_attention_dim"] = 1024
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"(?s)unet of .*attn2\.to_k\.weight: expected \(32, 1024\), got \(32, 24\)"):
        load_checkpoint(folder)


# --------------------------------------------------------------------------------------------
# refsd info


def run_info(*args):
    proc = subprocess.run([sys.executable, "-m", "refsd", "info", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return proc


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("refsd: error: ") and "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_info_single_file_and_folder(built):
    b = built("sdxl")
    proc = run_info(b.file)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "tensors: " in out and "key prefixes" in out  # the header summary stays
    assert "architecture: sdxl (Stable Diffusion XL base" in out
    n = sum(v.numel() for v in b.state["unet"].values())
    assert any(line.split()[:2] == ["unet", f"{n:,}"] and line.rstrip().endswith("float32") for line in out.splitlines())
    assert "text_encoder_2" in out and "ignored: 7 tensors" in out
    proc = run_info(built("sd1").folder)
    assert proc.returncode == 0, proc.stderr
    assert "architecture: sd1 " in proc.stdout and "pipeline: StableDiffusionPipeline" in proc.stdout
    assert "== unet/diffusion_pytorch_model.safetensors" in proc.stdout


def test_info_errors(built, tmp_path):
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(built("sd1").file.read_bytes()[:-100])
    assert_one_line_error(run_info(truncated), "t.safetensors", "truncated")
    text = tmp_path / "x.safetensors"
    text.write_text("not a safetensors file")
    assert_one_line_error(run_info(text), "x.safetensors")
    junk = _write(tmp_path, "junk.safetensors", {"model.diffusion_model.foo.weight": np.ones(2, np.float32),
                                                 "cond_stage_model.bar": np.ones(2, np.float32)})
    assert_one_line_error(run_info(junk), "junk.safetensors", "not known to be ignorable: cond_stage_model.bar")
    junk = _write(tmp_path, "junk2.safetensors", {"model.diffusion_model.foo.weight": np.ones(2, np.float32)})
    assert_one_line_error(run_info(junk), "junk2.safetensors", "UNet: no input_blocks")
    sd = dict(built("sd1").file_state)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((32, 8, 3, 3), np.float32)
    assert_one_line_error(run_info(_write(tmp_path, "c8.safetensors", sd)), "no known architecture", "Found")
