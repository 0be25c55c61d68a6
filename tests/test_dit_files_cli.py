"""SD3 / Flux from the files people have (refsd.pipelines.dit_files): a diffusers folder, single files with
their text encoders and VAE bundled, and BFL / ComfyUI-style separate files, all tiny seeded models
written in tmp_path with refsd's safetensors writer. Every layout must load to exactly the folder's
Params (array_equal on every key); every bad input is one line naming the culprit, from headers."""

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from refsd import golden  # noqa: E402
from refsd.errors import WeightsError  # noqa: E402
from refsd.pipelines.dit_files import dit_family, load_dit_files  # noqa: E402
from refsd.weights import flux, ldm, save_safetensors, sd3  # noqa: E402

from tests.test_checkpoint import CLIP_TINY, OPENCLIP_TINY, assert_one_line_error  # noqa: E402
from tests.test_dit_files import VAE16_TINY, _randomise, _to_file  # noqa: E402

# widths that fit together: SD3 pooled = CLIP-L proj 16 + bigG proj 20; joint = T5 d_model 48 >= 16 + 24
SD3_CFG = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
               joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=36, out_channels=16,
               pos_embed_max_size=12, qk_norm="rms_norm")
# Flux: one 128-wide head, so the rotary axes (16, 56, 56) are what a single file implies (not in the weights)
FLUX_CFG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                num_attention_heads=1, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
T5_CFG = dict(vocab_size=1002, d_kv=4, d_ff=24, num_layers=2, num_heads=3, feed_forward_proj="gated-gelu",
              is_encoder_decoder=False)  # the vocabulary of SPIECE below
# CLIP's real vocabulary (refsd ships its BPE) and one head: 64-wide heads are what refsd reads from a
# single file (refsd.models.infer.text_config), 1 for these 16- / 24-wide encoders
CLIP_L = {**CLIP_TINY, "vocab_size": 49408, "num_attention_heads": 1}
CLIP_G = {**OPENCLIP_TINY, "vocab_size": 49408, "num_attention_heads": 1}
SPIECE = bytes(golden.load_case("text/t5_tokenize_f64").group("in")["spiece_model"])


def _state(model):
    return {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}


def _build(family, seed):
    """{component: (state dict, config dict)} of a tiny model of ``family`` with seeded random weights."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    sd3_family = family == "sd3"
    tcls, tcfg = (SD3Transformer2DModel, SD3_CFG) if sd3_family else (FluxTransformer2DModel, FLUX_CFG)
    t5cfg = T5Config(d_model=tcfg["joint_attention_dim"], **T5_CFG)
    # Flux: the released VAE's factors, and 4 levels (8x: refsd.pipelines.diffusers_schedulers.flow_latent_shape
    # assumes it, as the released VAEs are)
    factors = {} if sd3_family else {"scaling_factor": 0.3611, "shift_factor": 0.1159, "block_out_channels": [32] * 4,
                                     "down_block_types": ["DownEncoderBlock2D"] * 4,
                                     "up_block_types": ["UpDecoderBlock2D"] * 4}
    models = {"transformer": tcls(**tcfg), "vae": AutoencoderKL(**{**VAE16_TINY, **factors}),
              "text_encoder": (CLIPTextModelWithProjection if sd3_family else CLIPTextModel)(CLIPTextConfig(**CLIP_L))}
    if sd3_family:
        models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    models["text_encoder_3" if sd3_family else "text_encoder_2"] = T5EncoderModel(t5cfg)
    out = {}
    for i, (comp, m) in enumerate(models.items()):
        _randomise(m, seed + i)
        cfg = dict(m.config) if comp in ("transformer", "vae") else m.config.to_dict()
        out[comp] = (_state(m), json.loads(json.dumps(cfg, default=list)))
    return out


def _write_folder(root, family, built):
    root.mkdir()
    cls = "StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline"
    index = {"_class_name": cls}
    for comp, (state, cfg) in built.items():
        (root / comp).mkdir()
        (root / comp / "config.json").write_text(json.dumps(cfg))
        name = "diffusion_pytorch_model" if comp in ("transformer", "vae") else "model"
        save_safetensors(root / comp / f"{name}.safetensors", state)
        index[comp] = ["diffusers" if comp in ("transformer", "vae") else "transformers", "X"]
    t5_tok = "tokenizer_3" if family == "sd3" else "tokenizer_2"
    (root / t5_tok).mkdir()
    (root / t5_tok / "spiece.model").write_bytes(SPIECE)
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def _transformer_file(family, built, slot_index=-1):
    state = {k: torch.from_numpy(v) for k, v in built["transformer"][0].items()}
    slot = (sd3.SLOTS if family == "sd3" else flux.SLOTS)[slot_index]
    return {k: np.asarray(v) for k, v in _to_file(family, state, slot).items()}


def _separate(tmp, family, built):
    """ComfyUI-style separate files: transformer (bare original names), ae, clip_l, clip_g, t5xxl."""
    files = {"model": tmp / "model.safetensors", "vae": tmp / "ae.safetensors", "clip_l": tmp / "clip_l.safetensors",
             "t5": tmp / "t5xxl.safetensors"}
    save_safetensors(files["model"], _transformer_file(family, built))
    vae = {k: torch.from_numpy(v) for k, v in built["vae"][0].items()}
    save_safetensors(files["vae"], {k: np.asarray(v) for k, v in ldm.to_ldm(vae, ldm.SLOTS[1]).items()})
    clip_l = built["text_encoder"][0]
    if family == "flux":  # ComfyUI's clip_l.safetensors: text_model. names plus a projection Flux does not use
        clip_l = {"text_model." + k: v for k, v in clip_l.items()}
        clip_l["text_projection.weight"] = np.ones((16, 16), np.float32)
    save_safetensors(files["clip_l"], clip_l)
    if family == "sd3":
        files["clip_g"] = tmp / "clip_g.safetensors"
        save_safetensors(files["clip_g"], built["text_encoder_2"][0])
    save_safetensors(files["t5"], built["text_encoder_3" if family == "sd3" else "text_encoder_2"][0])
    (tmp / "tok").mkdir()
    (tmp / "tok" / "spiece.model").write_bytes(SPIECE)
    files["t5_tokenizer"] = tmp / "tok" / "spiece.model"
    return files


@pytest.fixture(scope="module", params=["sd3", "flux"])
def layouts(request, tmp_path_factory):
    family = request.param
    built = _build(family, 700 if family == "sd3" else 800)
    tmp = tmp_path_factory.mktemp(family)
    return family, built, _write_folder(tmp / "folder", family, built), _separate(tmp, family, built)


def _assert_same(a, b):
    assert list(a.params) == list(b.params)
    for comp in a.params:
        pa, pb = a.params[comp], b.params[comp]
        assert set(pa) == set(pb), (comp, sorted(set(pa) ^ set(pb))[:5])
        for k in pa:
            x, y = np.asarray(pa[k]), np.asarray(pb[k])
            assert x.dtype == y.dtype and np.array_equal(x, y), (comp, k)


def test_every_layout_loads_the_folders_params(layouts, tmp_path):
    family, built, folder, files = layouts
    ref = load_dit_files(folder)
    assert ref.format == "diffusers" and ref.family == family
    assert ref.architecture == ("sd3.5-large" if family == "sd3" else "flux-dev")
    for comp, (state, _) in built.items():  # the folder itself holds what was written
        assert set(ref.params[comp]) == set(state) - {"text_model.embeddings.position_ids", "encoder.embed_tokens.weight"}, comp
        for k in ref.params[comp]:
            assert np.array_equal(np.asarray(ref.params[comp][k]), state[k]), (comp, k)
    flags = {r: files[r] for r in ("vae", "clip_l", "clip_g", "t5", "t5_tokenizer") if r in files}
    separate = load_dit_files(files["model"], **flags)
    assert separate.format == "single-file" and separate.architecture == ref.architecture
    _assert_same(separate, ref)
    assert {c: o.name for c, o in separate.origins.items()} == {
        "transformer": "model.safetensors", "vae": "ae.safetensors", "text_encoder": "clip_l.safetensors",
        **({"text_encoder_2": "clip_g.safetensors", "text_encoder_3": "t5xxl.safetensors"} if family == "sd3"
           else {"text_encoder_2": "t5xxl.safetensors"})}
    # everything bundled in one file (SD3 "incl. clips", ComfyUI-saved Flux): tokenizer still given
    slots = sd3.SLOTS if family == "sd3" else flux.SLOTS
    bundled = _transformer_file(family, built, 0)
    vae = {k: torch.from_numpy(v) for k, v in built["vae"][0].items()}
    bundled.update({k: np.asarray(v) for k, v in ldm.to_ldm(vae, ldm.SLOTS[1]).items()})
    for s in slots:
        if s.component.startswith("text_encoder"):
            clip_l = family == "flux" and s.component == "text_encoder"  # ComfyUI keeps text_model.
            bundled.update({s.prefix + ("text_model." if clip_l else "") + k: v for k, v in built[s.component][0].items()
                            if not k.endswith("position_ids")})
    path = tmp_path / "bundled.safetensors"
    save_safetensors(path, bundled)
    one = load_dit_files(path, t5_tokenizer=files["t5_tokenizer"])
    _assert_same(one, ref)
    assert set(one.origins.values()) == {path}
    # a separately given component replaces the bundled one
    assert load_dit_files(path, vae=files["vae"], t5_tokenizer=files["t5_tokenizer"]).origins["vae"] == files["vae"]
    assert dit_family(folder) == dit_family(path) == dit_family(files["model"]) == family
    assert dit_family(files["vae"]) is None
    from refsd.pipelines.dit_files import describe_part
    from refsd.weights import read_header

    shapes = {k: t.shape for k, t in read_header(files["vae"]).tensors.items()}
    assert describe_part(shapes) == ["kind: VAE (16-channel latents): SD3's / Flux's --vae"]


def test_tokenizers(layouts):
    family, _, folder, files = layouts
    from refsd.text.t5_tokenizer import T5Tokenizer
    from refsd.text.tokenizer import CLIPTokenizer

    for f in (load_dit_files(folder), load_dit_files(files["model"], **{r: files[r] for r in files if r != "model"})):
        t5 = "tokenizer_3" if family == "sd3" else "tokenizer_2"
        assert isinstance(f.tokenizers[t5], T5Tokenizer)
        assert f.tokenizers[t5]("a cat") == T5Tokenizer.from_spiece_model(files["t5_tokenizer"])("a cat")
        clips = [t for t in f.tokenizers if t != t5]
        assert clips == (["tokenizer", "tokenizer_2"] if family == "sd3" else ["tokenizer"])
        assert all(isinstance(f.tokenizers[t], CLIPTokenizer) for t in clips)
        assert f.tokenizers["tokenizer"]("a cat", pad_token=49407)[:4] == [49406, 320, 2368, 49407]


# --------------------------------------------------------------------------------------------
# bad input: one line naming the culprit, from headers


def _error(path, **flags):
    with pytest.raises(WeightsError) as e:
        load_dit_files(path, **flags)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_input_names_the_culprit(layouts, tmp_path):
    family, built, folder, files = layouts
    tok = {"t5_tokenizer": files["t5_tokenizer"]}
    encoders = {r: files[r] for r in ("clip_l", "clip_g", "t5") if r in files}
    # a file without its text encoders
    msg = _error(files["model"], vae=files["vae"], **tok)
    arch = "sd3.5-large" if family == "sd3" else "flux-dev"
    assert f"model.safetensors: a {arch} file without its text_encoder" in msg and "give --clip-l" in msg and "--t5" in msg
    # a 4-channel VAE for a 16-channel model
    from diffusers import AutoencoderKL

    sd_vae = _randomise(AutoencoderKL(**{**VAE16_TINY, "latent_channels": 4, "use_quant_conv": True,
                                         "use_post_quant_conv": True}), 3)
    vae4 = tmp_path / "vae4.safetensors"
    save_safetensors(vae4, {k: np.asarray(v) for k, v in ldm.to_ldm(
        {k: v.detach() for k, v in sd_vae.state_dict().items()}, ldm.SLOTS[1]).items()})
    msg = _error(files["model"], vae=vae4, **encoders, **tok)
    assert msg.startswith(f"--vae {vae4}: a 4-channel VAE") and "16-channel latents" in msg
    # T5 tokenizer: none given for a single T5 file; a T5 folder without one
    msg = _error(files["model"], vae=files["vae"], **encoders)
    assert "T5's tokenizer is not in the weights file" in msg and "--t5-tokenizer" in msg
    t5_dir = tmp_path / "t5"
    t5_dir.mkdir()
    save_safetensors(t5_dir / "model.safetensors", built["text_encoder_3" if family == "sd3" else "text_encoder_2"][0])
    msg = _error(files["model"], vae=files["vae"], **{**encoders, "t5": t5_dir})
    assert msg.startswith(f"--t5 {t5_dir}: a T5 folder without its tokenizer (no spiece.model or tokenizer.json)")
    (t5_dir / "spiece.model").write_bytes(SPIECE)  # with it: loads
    assert load_dit_files(files["model"], vae=files["vae"], **{**encoders, "t5": t5_dir}).origins
    # the folder's T5 tokenizer folder emptied
    broken = tmp_path / "folder"
    import shutil

    shutil.copytree(folder, broken)
    t5_tok = broken / ("tokenizer_3" if family == "sd3" else "tokenizer_2")
    (t5_tok / "spiece.model").unlink()
    assert "a T5 tokenizer folder without spiece.model or tokenizer.json" in _error(broken)
    # swapped roles: a T5 file as --clip-l, a CLIP as --t5
    assert _error(files["model"], **{**encoders, "clip_l": files["t5"]}, vae=files["vae"], **tok).startswith(
        f"--clip-l {files['t5']}: not a CLIP text encoder (a T5 encoder)")
    assert _error(files["model"], **{**encoders, "t5": files["clip_l"]}, vae=files["vae"], **tok).startswith(
        f"--t5 {files['clip_l']}: not a T5 encoder")


def _released_clip(tmp_path, width, name):
    """A 1-layer CLIP of a released width (768: CLIP-L, 1280: bigG), header only matters."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=8, hidden_size=width, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=width // 64, max_position_embeddings=77, projection_dim=width)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CLIPTextModelWithProjection(cfg).state_dict().items()}
    path = tmp_path / name
    save_safetensors(path, {k: np.zeros(s, np.float16) for k, s in shapes.items() if not k.endswith("position_ids")})
    return path


def test_clip_g_given_to_flux(tmp_path):
    built = _build("flux", 900)
    files = _separate(tmp_path, "flux", built)
    flags = {r: files[r] for r in ("vae", "clip_l", "t5", "t5_tokenizer")}
    clip_g = _released_clip(tmp_path, 1280, "clip_g.safetensors")
    msg = _error(files["model"], clip_g=clip_g, **flags)
    assert msg == f"--clip-g {clip_g}: flux-dev has no OpenCLIP bigG text encoder (it takes --clip-l, --t5, --vae)"
    msg = _error(files["model"], **{**flags, "clip_l": clip_g})
    assert msg.startswith(f"--clip-l {clip_g}: a 1280-wide text encoder (OpenCLIP bigG), not CLIP-L") \
        and "flux-dev has no OpenCLIP bigG" in msg
    # a CLIP of the wrong width for this transformer
    wide = _released_clip(tmp_path, 768, "clip_l_768.safetensors")
    msg = _error(files["model"], **{**flags, "clip_l": wide})
    assert msg == f"--clip-l {wide}: a CLIP text encoder of width 768, but the flux-dev transformer takes 16"


def test_checks_read_no_weights(layouts, monkeypatch):
    """Every check above runs on headers: loading (with all checks) reads no tensor."""
    from refsd.weights import safetensors

    family, _, folder, files = layouts
    read = []
    real = safetensors.SafeTensorsFile.numpy
    monkeypatch.setattr(safetensors.SafeTensorsFile, "numpy", lambda self, k: read.append(k) or real(self, k))
    load_dit_files(files["model"], **{r: files[r] for r in files if r != "model"})
    load_dit_files(folder)
    with pytest.raises(WeightsError):
        load_dit_files(files["model"], vae=files["vae"])
    assert read == []


# --------------------------------------------------------------------------------------------
# refsd generate end to end: the oracle's image (diffusers StableDiffusion3Pipeline on the golden case's
# tiny model), from a diffusers folder and from the separate files ComfyUI users have


def _run(*args):
    """``refsd ARGS`` in this process (refsd.cli.main: the exit status and the stdout / stderr text)."""
    import contextlib
    import io
    import types

    from refsd import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


SD3_CASE = "pipeline/dit_sd3_txt2img_f32"


@pytest.fixture(scope="module")
def sd3_case_files(tmp_path_factory):
    """The golden case's weights as (a) a whole diffusers folder, (b) a folder of transformer only plus
    clip_l / clip_g / t5xxl / ae single files (ae in LDM names) and the T5 spiece.model."""
    case = golden.load_case(SD3_CASE)
    model = case.meta["op"]["kwargs"]["model"]
    params = {k: np.asarray(v) for k, v in case.group("param").items()}
    comps = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    state = {c: {k[len(c) + 1:]: v for k, v in params.items() if k.startswith(c + ".")} for c in comps}
    root = tmp_path_factory.mktemp("sd3case")
    full = _write_folder(root / "full", "sd3", {c: (state[c], model[c]) for c in comps})
    (full / "scheduler").mkdir()
    (full / "scheduler" / "scheduler_config.json").write_text(json.dumps(model["scheduler"]))
    # the separate files: T5 (its config is all in the weights: heads from the relative-attention bias);
    # the tiny CLIPs' 8-wide heads are not (refsd.models.infer.text_config reads 64-wide heads, as released),
    # nor the tiny VAE's 4 norm groups (32 released), so they stay in the folder here; their files' loading
    # is proven tensor for tensor by test_every_layout_loads_the_folders_params
    alone = _write_folder(root / "alone", "sd3", {c: (state[c], model[c]) for c in comps[:4]})
    _write_folder(root / "bare", "sd3", {c: (state[c], model[c]) for c in comps[:2]})  # transformer + VAE
    files = {"--t5": root / "t5xxl_fp32.safetensors", "--t5-tokenizer": root / "spiece.model"}
    save_safetensors(files["--t5"], state["text_encoder_3"])
    files["--t5-tokenizer"].write_bytes(SPIECE)
    return case, full, alone, files


def _case_flags(case):
    kw = case.meta["op"]["kwargs"]
    return ["--prompt", kw["prompt"], "--negative", kw["negative_prompt"], "--steps", kw["steps"], "--cfg", kw["cfg"],
            "--seed", kw["seed"], "--width", kw["width"], "--height", kw["height"]]


def _image(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), im.info.get("parameters", "")


def test_generate_from_folder_and_separate_files_matches_diffusers(sd3_case_files, tmp_path):
    case, full, alone, files = sd3_case_files
    ref = np.round(np.asarray(case.group("out")["image"])[0].astype(np.float64) * 255)  # diffusers' uint8 rounding
    out_a = tmp_path / "folder.png"
    proc = _run("generate", "--model", full, *_case_flags(case), "--out", out_a, "--quiet")
    assert proc.returncode == 0, proc.stderr
    a, text_a = _image(out_a)
    assert np.abs(a - ref).max() <= 1, np.abs(a - ref).max()
    assert "Model: full" in text_a and "T5 hash" not in text_a
    out_b = tmp_path / "files.png"
    flags = [x for f, p in files.items() for x in (f, p)]
    proc = _run("generate", "--model", alone, *flags, *_case_flags(case), "--out", out_b, "--quiet")
    assert proc.returncode == 0, proc.stderr
    b, text_b = _image(out_b)
    assert np.array_equal(a, b)  # the same weights read from other files: the same numbers
    from refsd.pipelines import png

    got = png.parse_parameters(text_b)
    assert got["T5"] == "t5xxl_fp32" and got["T5 hash"] == png.model_hash(files["--t5"])
    assert not {"VAE", "CLIP-L", "CLIP-G"} & set(got)
    # --from-png: the PNG names the component files but not where they are
    out_c = tmp_path / "again.png"
    proc = _run("generate", "--from-png", out_b, "--model", alone, "--out", out_c)
    assert_one_line_error(proc, f"{out_b} was made with --t5 t5xxl_fp32, hash {png.model_hash(files['--t5'])}: pass "
                          "--t5 PATH")
    assert not out_c.exists()
    proc = _run("generate", "--from-png", out_b, "--model", alone, *flags, "--out", out_c, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(_image(out_c)[0], b)


def test_generate_bad_input_exit_2_nothing_written(sd3_case_files, tmp_path):
    case, full, alone, files = sd3_case_files
    out = tmp_path / "x.png"
    flags = dict(files)
    common = [*_case_flags(case), "--out", out]

    def run(**change):
        f = {**flags, **change}
        return _run("generate", "--model", alone, *[x for k, v in f.items() if v is not None for x in (k, v)], *common)

    bare = alone.parent / "bare"
    assert_one_line_error(_run("generate", "--model", bare, *[x for k, v in flags.items() for x in (k, v)], *common),
                          "bare: a sd3-medium file without its text_encoder, text_encoder_2: give --clip-l (CLIP-L",
                          "--clip-g (OpenCLIP bigG")
    assert_one_line_error(run(**{"--t5-tokenizer": None}), "T5's tokenizer is not in the weights file",
                          "give --t5-tokenizer PATH")
    t5_dir = tmp_path / "t5"
    t5_dir.mkdir()
    (t5_dir / "model.safetensors").symlink_to(files["--t5"])
    assert_one_line_error(run(**{"--t5-tokenizer": None, "--t5": t5_dir}),
                          f"--t5 {t5_dir}: a T5 folder without its tokenizer")
    from diffusers import AutoencoderKL

    vae4 = tmp_path / "sd-vae.safetensors"
    m = _randomise(AutoencoderKL(**{**VAE16_TINY, "latent_channels": 4}), 5)
    save_safetensors(vae4, {k: v.detach().numpy() for k, v in m.state_dict().items()})
    assert_one_line_error(run(**{"--vae": vae4}), f"--vae {vae4}: a 4-channel VAE (latent_channels 4), but the sd3 "
                          "transformer works on 16-channel latents")
    assert_one_line_error(run(**{"--clip-g": files["--t5"]}), f"--clip-g {files['--t5']}: not a CLIP text encoder (a T5 "
                          "encoder)")
    assert_one_line_error(_run("generate", "--demo", "--t5", files["--t5"], "--prompt", "x", "--out", out),
                          "--t5 is for SD3 / Flux models; the demo model is sd1")
    assert_one_line_error(run(**{"--mask": files["--t5-tokenizer"]}), "--mask is not supported for SD3 / Flux models")
    assert not out.exists() and not list(tmp_path.glob("*.png"))


def test_flux_generate_from_separate_files_equals_the_folder(layouts, tmp_path):
    """BFL's transformer file + ae / clip_l / t5xxl files + spiece.model give the folder's image exactly
    (txt2img), and img2img from it runs from the same files."""
    family, _, folder, files = layouts
    if family != "flux":
        pytest.skip("the SD3 run is test_generate_from_folder_and_separate_files_matches_diffusers")
    common = ["--prompt", "a red cube", "--steps", "2", "--seed", "5", "--width", "32", "--height", "32", "--quiet"]
    proc = _run("generate", "--model", folder, *common, "--out", tmp_path / "folder.png")
    assert proc.returncode == 0, proc.stderr
    flags = [x for r, f in (("vae", "--vae"), ("clip_l", "--clip-l"), ("t5", "--t5"), ("t5_tokenizer", "--t5-tokenizer"))
             for x in (f, files[r])]
    proc = _run("generate", "--model", files["model"], *flags, *common, "--out", tmp_path / "files.png")
    assert proc.returncode == 0, proc.stderr
    a, b = _image(tmp_path / "folder.png"), _image(tmp_path / "files.png")
    assert np.array_equal(a[0], b[0]) and a[0].std() > 0
    assert "CFG scale: 3.5" in b[1] and "Model: model" in b[1] and "T5: t5xxl" in b[1]
    proc = _run("generate", "--model", files["model"], *flags, *common, "--init-image", tmp_path / "files.png",
                "--strength", "0.5", "--out", tmp_path / "img2img.png")
    assert proc.returncode == 0, proc.stderr
    c = _image(tmp_path / "img2img.png")
    assert c[0].shape == (32, 32, 3) and "Denoising strength: 0.5" in c[1]


def test_info_names_the_model_and_the_parts(sd3_case_files):
    _, full, alone, files = sd3_case_files
    proc = _run("info", full)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert "architecture: sd3-medium (Stable Diffusion 3 Medium (MMDiT, CLIP-L + OpenCLIP-bigG + T5-XXL, 16-channel VAE))" \
        in out
    comps = [line.split() for line in out if re.match(r"^  \S+ +[\d,]+ parameters", line)]
    assert [c[0] for c in comps] == ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
    assert "tokenizers: tokenizer (CLIPTokenizer), tokenizer_2 (CLIPTokenizer), tokenizer_3 (T5Tokenizer)" in out
    # a folder lacking its text encoders: one line naming them and the flags
    assert_one_line_error(_run("info", alone.parent / "bare"), "bare: a sd3-medium file without its text_encoder, "
                          "text_encoder_2, text_encoder_3: give --clip-l")
    kinds = [x for x in _run("info", files["--t5"]).stdout.splitlines() if x.startswith("kind:")]
    assert kinds == ["kind: T5 encoder (T5EncoderModel: d_model 64, 2 layers, 4 heads, gated-gelu): SD3's / Flux's --t5"]


def test_trace_records_the_dit_run_as_the_oracle_did(sd3_case_files, tmp_path):
    """``refsd trace`` on SD3 (the same command as SD): layer outputs of every component and the pipeline's
    tensors, which equal diffusers' (the golden case's ``out`` group) within the pipeline tolerance."""
    from refsd.weights.safetensors import load_numpy

    case, full, _, _ = sd3_case_files
    out = tmp_path / "trace.safetensors"
    proc = _run("trace", "--model", full, *_case_flags(case), "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    trace, _ = load_numpy(out)
    for layer in ("transformer_blocks.0", "encoder.block.0", "text_model.encoder.layers.0", "decoder.up_blocks.0"):
        assert f"trace/{layer}" in trace, layer  # transformer, T5, CLIP, VAE
    ref = case.group("out")
    assert np.array_equal(trace["out/noise"], np.asarray(ref["noise"]))
    for key in ("step.0", "latents", "image"):
        assert np.allclose(trace[f"out/{key}"], np.asarray(ref[key]), atol=5e-4, rtol=2e-5), key  # ("pipeline", "float32")
