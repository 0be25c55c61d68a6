"""SD3 / SD3.5 and Flux single files, proven by diffusers' own single-file loader.

For each layout a diffusers transformer with seeded random weights is written as a single file in
the original layout by refsd's reverse tables (``ldm.to_ldm`` with ``sd3.mmdit_table`` /
``flux.flux_table``). Then:

- diffusers' converter (``convert_sd3_transformer_checkpoint_to_diffusers`` /
  ``convert_flux_transformer_checkpoint_to_diffusers``, which pop every key they use) consumes every
  key of the file, and ``SD3Transformer2DModel.from_single_file`` / ``FluxTransformer2DModel.
  from_single_file`` (offline, ``config=`` a local folder) read back every tensor torch.equal;
- refsd's ``load_checkpoint`` yields exactly the original state dict from the same file;

so refsd's forward tables equal diffusers' conversion on every key. A negative control (q and k
swapped, the (shift, scale) swap dropped) shows the proof catches a wrong table. diffusers'
Flux converter hardcodes Flux's width (3072), so the Flux value proof runs at the released width
with reduced depth (slow tier); the default tier proves Flux's tiny tables against ComfyUI's
``flux_to_diffusers`` key map restated here. Key sets and shapes of the released configs (full
depth, on the meta device: no memory) check detection, config inference and naming.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from refsd.errors import WeightsError  # noqa: E402
from refsd.weights import dit, flux, ldm, load_checkpoint, save_safetensors, sd3  # noqa: E402

from tests.test_checkpoint import assert_one_line_error, assert_same_state, run_info  # noqa: E402

SD3_TINY = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10,
                out_channels=16, pos_embed_max_size=12)
TINY = {  # name -> (diffusers config, refsd architecture name)
    # without QK norm the head width is not in the weights: 64, as released
    "sd3-medium": ({**SD3_TINY, "attention_head_dim": 64, "num_attention_heads": 1, "caption_projection_dim": 64},
                   "sd3-medium"),
    "sd3.5-large": ({**SD3_TINY, "qk_norm": "rms_norm"}, "sd3.5-large"),
    "sd3.5-medium": ({**SD3_TINY, "qk_norm": "rms_norm", "dual_attention_layers": (0, 1)}, "sd3.5-medium"),
}
FLUX_TINY = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
                 axes_dims_rope=(2, 2, 4))
VAE16_TINY = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=16,
                  use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)

# the released configs (their config.json files on the Hub), for detection and naming
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
RELEASED = {
    "sd3-medium": ("SD3Transformer2DModel", SD3_MEDIUM, "sd3"),
    "sd3.5-large": ("SD3Transformer2DModel", {**SD3_MEDIUM, "num_layers": 38, "num_attention_heads": 38,
                                              "caption_projection_dim": 2432, "qk_norm": "rms_norm"}, "sd35_large"),
    "sd3.5-medium": ("SD3Transformer2DModel", {**SD3_MEDIUM, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                                               "dual_attention_layers": tuple(range(13))}, "sd35_medium"),
    "flux-dev": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                                attention_head_dim=128, num_attention_heads=24,
                                                joint_attention_dim=4096, pooled_projection_dim=768,
                                                guidance_embeds=True, axes_dims_rope=(16, 56, 56)), "flux-dev"),
}
RELEASED["flux-schnell"] = ("FluxTransformer2DModel", {**RELEASED["flux-dev"][1], "guidance_embeds": False},
                            "flux-schnell")

SD3_SLOT = sd3.SLOTS[0]
FLUX_BARE = flux.SLOTS[-1]
VAE_SLOT = ldm.SLOTS[1]


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    return model.eval()


def _table(family, state):
    if family == "sd3":
        return sd3.mmdit_table(sd3.depth_diffusers(state))
    return flux.flux_table(*flux.depths_diffusers(state))


def _to_file(family, state, slot):
    return ldm.to_ldm(state, slot, _table(family, state))


def _config_folder(model, root):
    root.mkdir(parents=True, exist_ok=True)
    model.save_config(root)
    return str(root)


def _meta_shapes(cls_name, cfg):
    with torch.device("meta"):
        m = getattr(diffusers, cls_name)(**cfg)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


# --------------------------------------------------------------------------------------------
# SD3 / SD3.5: diffusers reads what refsd writes; refsd reads it exactly


@pytest.fixture(scope="module")
def sd3_built(tmp_path_factory):
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    out = {}
    for i, (name, (cfg, _)) in enumerate(TINY.items()):
        root = tmp_path_factory.mktemp(name)
        model = _randomise(SD3Transformer2DModel(**cfg), 100 + i)
        vae = _randomise(AutoencoderKL(**VAE16_TINY), 200 + i)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        vae_state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
        sd = {**_to_file("sd3", state, SD3_SLOT), **ldm.to_ldm(vae_state, VAE_SLOT)}
        path = root / f"{name}.safetensors"
        save_safetensors(path, sd)
        out[name] = dict(model=model, state=state, vae_state=vae_state, file=path, sd=sd,
                         config=_config_folder(model, root / "transformer"), vae_config=_config_folder(vae, root / "vae"))
    return out


@pytest.mark.parametrize("name", list(TINY))
def test_diffusers_converter_consumes_every_key(sd3_built, name):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    b = sd3_built[name]
    ck = {k: torch.from_numpy(np.array(v)) for k, v in b["sd"].items() if k.startswith("model.diffusion_model.")}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(ck)
    assert ck == {}, f"keys diffusers did not consume: {sorted(ck)[:5]}"
    assert set(converted) == set(b["state"])
    for k, w in b["state"].items():
        assert torch.equal(converted[k], w), k


@pytest.mark.parametrize("name", list(TINY))
def test_diffusers_single_file_loader_reads_refsd_sd3_files_exactly(sd3_built, name):
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    b = sd3_built[name]
    m = SD3Transformer2DModel.from_single_file(str(b["file"]), config=b["config"], local_files_only=True)
    assert_same_state(m.state_dict(), b["state"], f"diffusers transformer {name}")
    v = AutoencoderKL.from_single_file(str(b["file"]), config=b["vae_config"], local_files_only=True)
    assert_same_state(v.state_dict(), b["vae_state"], f"diffusers VAE {name}")


@pytest.mark.parametrize("name", list(TINY))
def test_refsd_loads_sd3_file_exactly(sd3_built, name):
    b = sd3_built[name]
    ck = load_checkpoint(b["file"])
    cfg, arch = TINY[name]
    assert ck.architecture == arch and list(ck.params) == ["transformer", "vae"]
    assert_same_state(ck.params["transformer"], b["state"], f"refsd transformer {name}")
    assert_same_state(ck.params["vae"], b["vae_state"], f"refsd VAE {name}")
    got = ck.configs["transformer"]
    for k, v in cfg.items():
        if k != "sample_size":
            assert got[k] == (list(v) if isinstance(v, tuple) else v), (k, got[k], v)
    assert got["dual_attention_layers"] == list(cfg.get("dual_attention_layers", ()))
    assert sd3.param_shapes(got) == {k: tuple(v.shape) for k, v in b["state"].items()}
    vae = ck.configs["vae"]
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 1.5305, 0.0609)
    assert not vae["use_quant_conv"] and not vae["use_post_quant_conv"]
    assert [c for c, _, _ in ck.needs] == ["text_encoder", "text_encoder_2", "text_encoder_3"]


def test_splits_are_views_of_the_file(sd3_built):
    """Loading renames without reading: the split q/k/v are views of the memory-mapped file."""
    ck = load_checkpoint(sd3_built["sd3.5-medium"]["file"])
    q = ck.params["transformer"]["transformer_blocks.0.attn2.to_q.weight"]
    assert not q.flags.owndata and q.base is not None


def test_the_proof_catches_a_wrong_sd3_table(sd3_built, tmp_path, monkeypatch):
    """Negative control: q and k swapped in the joint-block table, or the (shift, scale) swap
    dropped: refsd reads its own file back, diffusers does not."""
    from diffusers import SD3Transformer2DModel

    b = sd3_built["sd3.5-large"]
    rows = [(ldm_k, (d[1], d[0], d[2]) if ldm_k == "x_block.attn.qkv.weight" else d) for ldm_k, d in sd3.JOINT_BLOCK]
    monkeypatch.setattr(sd3, "JOINT_BLOCK", tuple(rows))
    path = tmp_path / "wrong.safetensors"
    save_safetensors(path, _to_file("sd3", b["state"], SD3_SLOT))
    assert_same_state(load_checkpoint(path).params["transformer"], b["state"], "refsd, self-consistent")
    m = SD3Transformer2DModel.from_single_file(str(path), config=b["config"], local_files_only=True)
    with pytest.raises(AssertionError, match=r"attn\.to_[qk]\.weight differs"):
        assert_same_state(m.state_dict(), b["state"], "diffusers")
    monkeypatch.undo()
    monkeypatch.setattr(sd3, "mmdit_table", lambda depth: ldm.Table(tuple(sd3.mmdit_rows(depth))))
    save_safetensors(path, _to_file("sd3", b["state"], SD3_SLOT))
    assert_same_state(load_checkpoint(path).params["transformer"], b["state"], "refsd, self-consistent")
    m = SD3Transformer2DModel.from_single_file(str(path), config=b["config"], local_files_only=True)
    with pytest.raises(AssertionError, match=r"norm1_context\.linear\.(weight|bias) differs|norm_out"):
        assert_same_state(m.state_dict(), b["state"], "diffusers")


# --------------------------------------------------------------------------------------------
# Flux


def _flux_state(cfg, seed, dtype=torch.float32):
    from diffusers import FluxTransformer2DModel

    model = _randomise(FluxTransformer2DModel(**cfg).to(dtype), seed)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def comfyui_flux_to_diffusers(cfg):
    """ComfyUI's ``flux_to_diffusers(mmdit_config, output_prefix)`` (comfy/utils.py, Comfy-Org/ComfyUI
    master): diffusers key -> BFL key, or (BFL key, (start, stop)) for a row slice of a fused tensor,
    or (BFL key, None, swap) for the (shift, scale) swap. Restated in torch-free Python from its
    tables (FLUX_DOUBLE / FLUX_SINGLE block maps; hidden_size * {1,2,3} offsets for qkv; offset
    3 * hidden_size onward for proj_mlp)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    out = {}
    for i in range(cfg["num_layers"]):
        b, f = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for wb in ("weight", "bias"):
            for j, q in enumerate(("to_q", "to_k", "to_v")):
                out[f"{b}.attn.{q}.{wb}"] = (f"{f}.img_attn.qkv.{wb}", (j * d, (j + 1) * d))
            for j, q in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
                out[f"{b}.attn.{q}.{wb}"] = (f"{f}.txt_attn.qkv.{wb}", (j * d, (j + 1) * d))
        block_map = {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin",
                     "norm1_context.linear": "txt_mod.lin", "attn.to_add_out": "txt_attn.proj",
                     "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
                     "ff_context.net.2": "txt_mlp.2"}
        for k, v in block_map.items():
            for wb in ("weight", "bias"):
                out[f"{b}.{k}.{wb}"] = f"{f}.{v}.{wb}"
        for k, v in {"attn.norm_q.weight": "img_attn.norm.query_norm.scale",
                     "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
                     "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
                     "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale"}.items():
            out[f"{b}.{k}"] = f"{f}.{v}"
    for i in range(cfg["num_single_layers"]):
        b, f = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for wb in ("weight", "bias"):
            for j, q in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
                out[f"{b}.{q}.{wb}"] = (f"{f}.linear1.{wb}", (j * d, (j + 1) * d))
            out[f"{b}.proj_mlp.{wb}"] = (f"{f}.linear1.{wb}", (3 * d, None))
            out[f"{b}.norm.linear.{wb}"] = f"{f}.modulation.lin.{wb}"
            out[f"{b}.proj_out.{wb}"] = f"{f}.linear2.{wb}"
        out[f"{b}.attn.norm_q.weight"] = f"{f}.norm.query_norm.scale"
        out[f"{b}.attn.norm_k.weight"] = f"{f}.norm.key_norm.scale"
    top = {"x_embedder": "img_in", "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
           "context_embedder": "txt_in", "proj_out": "final_layer.linear"}
    for k, v in top.items():
        for wb in ("weight", "bias"):
            out[f"{k}.{wb}"] = f"{v}.{wb}"
    for wb in ("weight", "bias"):
        out[f"norm_out.linear.{wb}"] = (f"final_layer.adaLN_modulation.1.{wb}", None, "swap")
    return out


def _comfy_take(sd, how):
    if isinstance(how, str):
        return sd[how]
    if len(how) == 3:  # ComfyUI's swap_scale_shift
        shift, scale = sd[how[0]].chunk(2, dim=0)
        return torch.cat([scale, shift], dim=0)
    a, (start, stop) = sd[how[0]], how[1]
    return a[start:stop]


@pytest.mark.parametrize("guidance", [True, False])
def test_flux_tiny_tables_equal_comfyui_map(tmp_path, guidance):
    """refsd's tables on a tiny Flux file (BFL bare names and ComfyUI's model.diffusion_model. ones)
    give, on every key, what ComfyUI's flux_to_diffusers map takes from the file."""
    cfg = {**FLUX_TINY, "guidance_embeds": guidance}
    _, state = _flux_state(cfg, 7 + guidance)
    sd = _to_file("flux", state, FLUX_BARE)
    comfy = comfyui_flux_to_diffusers(cfg)
    file_t = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    used = {h if isinstance(h, str) else h[0] for k, h in comfy.items() if k in state}
    assert used == set(sd), (sorted(set(sd) - used)[:5], sorted(used - set(sd))[:5])
    for k, w in state.items():
        assert torch.equal(_comfy_take(file_t, comfy[k]), w), k
    for prefix in ("", "model.diffusion_model."):
        path = tmp_path / f"flux{prefix[:5]}.safetensors"
        save_safetensors(path, {prefix + k: v for k, v in sd.items()})
        ck = load_checkpoint(path)
        assert ck.architecture == ("flux-dev" if guidance else "flux-schnell")
        assert_same_state(ck.params["transformer"], state, "refsd flux")
        got = ck.configs["transformer"]
        assert {k: got[k] for k in cfg if k != "axes_dims_rope"} == {k: v for k, v in cfg.items() if k != "axes_dims_rope"}
        assert flux.param_shapes(got) == {k: tuple(v.shape) for k, v in state.items()}
        assert [c for c, _, _ in ck.needs] == ["vae", "text_encoder", "text_encoder_2"]


def test_flux_single_block_split_is_a_view(tmp_path):
    cfg = {**FLUX_TINY, "guidance_embeds": False}
    _, state = _flux_state(cfg, 3)
    path = tmp_path / "f.safetensors"
    save_safetensors(path, _to_file("flux", state, FLUX_BARE))
    p = load_checkpoint(path).params["transformer"]
    mlp = p["single_transformer_blocks.1.proj_mlp.weight"]
    assert mlp.shape == (64, 16) and not mlp.flags.owndata


def _bf16_to_torch(a):
    """An ml_dtypes bfloat16 NumPy array as a torch bfloat16 tensor (same bits)."""
    return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).view(torch.bfloat16)


@pytest.mark.slow
def test_diffusers_reads_refsd_flux_file_at_released_width(tmp_path):
    """Flux at the released width (3072, 24 heads of 128; diffusers' converter hardcodes it) with
    one double and one single block, bfloat16 as released, ComfyUI's model.diffusion_model. prefix:
    diffusers' converter consumes every key, from_single_file reads every tensor torch.equal, and
    so does refsd. (~1.1 GB of weights; run under the big-memory lock.)"""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    cfg = {**RELEASED["flux-dev"][1], "num_layers": 1, "num_single_layers": 1}
    _, state = _flux_state(cfg, 11, torch.bfloat16)
    path = tmp_path / "flux-dev-1-1.safetensors"
    save_safetensors(path, _to_file("flux", state, flux.SLOTS[0]))
    ck = load_file(str(path))
    assert all(k.startswith("model.diffusion_model.") for k in ck)
    converted = convert_flux_transformer_checkpoint_to_diffusers(ck)
    assert ck == {} and set(converted) == set(state)
    del ck, converted
    folder = tmp_path / "transformer"
    with torch.device("meta"):
        FluxTransformer2DModel(**cfg).save_config(folder)
    m = FluxTransformer2DModel.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                torch_dtype=torch.bfloat16)
    assert_same_state(m.state_dict(), state, "diffusers flux, released width")
    del m
    got = load_checkpoint(path)
    assert got.architecture == "flux-dev" and set(got.params["transformer"]) == set(state)
    for k, w in state.items():
        assert torch.equal(_bf16_to_torch(got.params["transformer"][k]), w), k


# --------------------------------------------------------------------------------------------
# detection matrix: the released configs' key sets (meta device), named as diffusers names them


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_key_sets_are_detected_and_named(name):
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
        convert_sd3_transformer_checkpoint_to_diffusers,
        infer_diffusers_model_type,
    )

    cls, cfg, diffusers_name = RELEASED[name]
    family = "sd3" if cls.startswith("SD3") else "flux"
    shapes = _meta_shapes(cls, cfg)
    slot = SD3_SLOT if family == "sd3" else FLUX_BARE
    file_shapes = ldm.to_ldm_shapes(shapes, slot, _table(family, shapes))
    with torch.device("meta"):
        ck = {k: torch.empty(s) for k, s in file_shapes.items()}
        assert infer_diffusers_model_type(ck) == diffusers_name
        convert = (convert_sd3_transformer_checkpoint_to_diffusers if family == "sd3"
                   else convert_flux_transformer_checkpoint_to_diffusers)
        converted = convert(ck)  # on meta tensors: the full released key set, every key consumed
    assert ck == {} and {k: tuple(v.shape) for k, v in converted.items()} == shapes
    found = dit.detect_dit(file_shapes, what=name)
    assert found.architecture == name and found.family == family
    got = found.configs["transformer"]
    for k, v in cfg.items():
        assert got[k] == (list(v) if isinstance(v, tuple) else v), (name, k, got[k], v)
    assert found.plan.shapes["transformer"] == shapes
    assert (sd3 if family == "sd3" else flux).param_shapes(got) == shapes
    flags = [f for _, _, f in found.needs]
    assert flags == (["--vae", "--clip-l", "--clip-g", "--t5"] if family == "sd3" else ["--vae", "--clip-l", "--t5"])


# --------------------------------------------------------------------------------------------
# bad input and refsd info


def test_info_names_the_model_and_what_it_needs(sd3_built, tmp_path):
    b = sd3_built["sd3.5-large"]
    path = tmp_path / "alone.safetensors"
    save_safetensors(path, {k: v for k, v in b["sd"].items() if k.startswith("model.diffusion_model.")})
    proc = run_info(path)
    assert proc.returncode == 0, proc.stderr
    assert "architecture: sd3.5-large (Stable Diffusion 3.5 Large" in proc.stdout
    assert "needs: --vae (16-channel AutoencoderKL), --clip-l" in proc.stdout and "--clip-g" in proc.stdout \
        and "--t5 (T5-XXL" in proc.stdout
    n = sum(v.numel() for v in b["state"].values())
    assert any(line.split()[:2] == ["transformer", f"{n:,}"] for line in proc.stdout.splitlines())
    bad = dict(b["sd"])
    bad["model.diffusion_model.joint_blocks.0.x_block.frob.weight"] = np.ones(2, np.float32)
    save_safetensors(path, bad)
    assert_one_line_error(run_info(path), "alone.safetensors", "match no rename rule",
                          "model.diffusion_model.joint_blocks.0.x_block.frob.weight")


def test_a_flux_file_without_its_text_encoders(tmp_path):
    _, state = _flux_state({**FLUX_TINY, "guidance_embeds": True}, 5)
    path = tmp_path / "flux1-dev.safetensors"
    save_safetensors(path, _to_file("flux", state, FLUX_BARE))
    found = dit.detect_dit({k: tuple(v.shape) for k, v in _to_file("flux", state, FLUX_BARE).items()})
    with pytest.raises(WeightsError) as e:
        dit.check_supplied(found, {"vae"}, what=str(path))
    msg = str(e.value)
    assert "\n" not in msg and "flux1-dev.safetensors" in msg and "flux-dev file without its text_encoder, " \
        "text_encoder_2" in msg and "--clip-l (CLIP-L" in msg and "--t5 (T5-XXL" in msg
    dit.check_supplied(found, {"vae", "text_encoder", "text_encoder_2"}, what=str(path))  # all given: fine
    proc = run_info(path)
    assert proc.returncode == 0, proc.stderr
    assert "architecture: flux-dev (FLUX.1 dev" in proc.stdout
    assert "needs: --vae (16-channel AutoencoderKL), --clip-l (CLIP-L (CLIPTextModel)), --t5 (T5-XXL" in proc.stdout


def test_a_4_channel_vae_for_a_16_channel_model(sd3_built, tmp_path):
    from diffusers import AutoencoderKL

    b = sd3_built["sd3-medium"]
    ck = load_checkpoint(b["file"])
    sd_vae = _randomise(AutoencoderKL(**{**VAE16_TINY, "latent_channels": 4, "use_quant_conv": True,
                                         "use_post_quant_conv": True}), 1)
    state4 = {k: v.detach() for k, v in sd_vae.state_dict().items()}
    for name, sd in (("sd-vae-ldm.safetensors", ldm.to_ldm(state4, VAE_SLOT)),
                     ("sd-vae-diffusers.safetensors", {k: v.numpy() for k, v in state4.items()})):
        path = tmp_path / name
        save_safetensors(path, sd)
        with pytest.raises(WeightsError, match=rf"{name}: a 4-channel VAE \(latent_channels 4\), but the sd3 "
                                               r"transformer works on 16-channel latents"):
            dit.load_vae_file(path, architecture=ck.architecture, transformer_config=ck.configs["transformer"])
    # the model's own 16-channel VAE, shipped separately under vae. (and bare): loads exactly
    for prefix in ("vae.", ""):
        path = tmp_path / f"ae{prefix}.safetensors"
        save_safetensors(path, {prefix + k.removeprefix("first_stage_model."): v for k, v in b["sd"].items()
                                if k.startswith("first_stage_model.")})
        params, cfg = dit.load_vae_file(path, architecture=ck.architecture, transformer_config=ck.configs["transformer"])
        assert_same_state(params, b["vae_state"], "separate VAE")
        assert (cfg["latent_channels"], cfg["shift_factor"]) == (16, 0.0609)
    # a 4-channel VAE bundled in an SD3 file
    bundled = {**{k: v for k, v in b["sd"].items() if not k.startswith("first_stage_model.")},
               **ldm.to_ldm(state4, VAE_SLOT)}
    path = tmp_path / "bundled.safetensors"
    save_safetensors(path, bundled)
    with pytest.raises(WeightsError, match=r"the VAE of .*bundled\.safetensors: a 4-channel VAE"):
        load_checkpoint(path)


def _text_encoders(seed):
    """Tiny CLIP-L (quick_gelu) and bigG (gelu) with projections, CLIP-L without, and a T5 v1.1 encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from tests.test_checkpoint import CLIP_TINY, OPENCLIP_TINY

    t5 = T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=3,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    models = {"clip_l_proj": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TINY)),
              "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_TINY)),
              "clip_l": CLIPTextModel(CLIPTextConfig(**CLIP_TINY)), "t5": T5EncoderModel(t5)}
    return {k: {n: v.detach().clone() for n, v in _randomise(m, seed + i).state_dict().items()}
            for i, (k, m) in enumerate(models.items())}


def test_bundled_text_encoders_and_vae(sd3_built, tmp_path):
    """SD3 "incl. clips" and ComfyUI-saved Flux files: the text encoders keep transformers' names
    (diffusers' convert_ldm_clip_checkpoint / convert_sd3_t5_checkpoint_to_diffusers strip the prefix
    and nothing else), the VAE sits under first_stage_model. (SD3) or vae. (Flux)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_sd3_t5_checkpoint_to_diffusers

    te = _text_encoders(300)
    b = sd3_built["sd3.5-medium"]
    sd = dict(b["sd"])
    for slot, key in zip(sd3.SLOTS[2:5], ("clip_l_proj", "clip_g", "t5")):
        sd.update({slot.prefix + k: v.numpy() for k, v in te[key].items()})
    path = tmp_path / "sd3.5-medium-incl-clips.safetensors"
    save_safetensors(path, sd)
    ck = load_checkpoint(path)
    assert ck.architecture == "sd3.5-medium" and ck.needs == ()
    file_t = {k: torch.from_numpy(v) for k, v in sd.items()}
    for comp, slot, key in zip(("text_encoder", "text_encoder_2", "text_encoder_3"), sd3.SLOTS[2:5],
                               ("clip_l_proj", "clip_g", "t5")):
        assert_same_state(ck.params[comp], te[key], f"refsd {comp}")
        ref = (convert_sd3_t5_checkpoint_to_diffusers(file_t) if key == "t5"
               else convert_ldm_clip_checkpoint(file_t, slot.prefix))
        assert_same_state(ref, te[key], f"diffusers {comp}")
    assert ck.configs["text_encoder"]["hidden_act"] == "quick_gelu" and ck.configs["text_encoder_2"]["hidden_act"] == "gelu"
    assert ck.configs["text_encoder_2"]["projection_dim"] == 20
    assert {k: ck.configs["text_encoder_3"][k] for k in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                                                        "feed_forward_proj")} == \
        {"d_model": 16, "d_kv": 4, "d_ff": 24, "num_layers": 2, "num_heads": 3, "feed_forward_proj": "gated-gelu"}
    # ComfyUI-saved Flux: transformer, VAE under vae., CLIP-L (CLIPTextModel) and T5
    _, state = _flux_state({**FLUX_TINY, "in_channels": 64}, 9)
    sd = {**_to_file("flux", state, flux.SLOTS[0]),
          **{"vae." + k.removeprefix("first_stage_model."): v for k, v in b["sd"].items()
             if k.startswith("first_stage_model.")},
          **{"text_encoders.clip_l.transformer.text_model." + k: v.numpy() for k, v in te["clip_l"].items()},
          **{"text_encoders.t5xxl.transformer." + k: v.numpy() for k, v in te["t5"].items()}}
    path = tmp_path / "flux1-dev-comfy.safetensors"
    save_safetensors(path, sd)
    ck = load_checkpoint(path)
    assert ck.architecture == "flux-dev" and ck.needs == ()
    assert_same_state(ck.params["text_encoder"], te["clip_l"], "refsd flux clip_l")
    assert_same_state(ck.params["text_encoder_2"], te["t5"], "refsd flux t5")
    assert_same_state(ck.params["vae"], b["vae_state"], "refsd flux vae")
    assert (ck.configs["vae"]["scaling_factor"], ck.configs["vae"]["shift_factor"]) == (0.3611, 0.1159)


def test_malformed_dit_files_name_the_culprit(sd3_built, tmp_path):
    """Hostile input: one error naming the file and the key, before any tensor is read."""
    _, state = _flux_state({**FLUX_TINY, "guidance_embeds": False}, 13)
    sd = _to_file("flux", state, FLUX_BARE)
    cases = {
        "split.safetensors": ({**sd, "single_blocks.0.linear1.weight": np.zeros((50, 16), np.float32)},
                              r"single_blocks\.0\.linear1\.weight: shape \(50, 16\) does not split in the ratio 1:1:1:4"),
        "gap.safetensors": ({**{k: v for k, v in sd.items() if not k.startswith("double_blocks.0.")}},
                            r"double_blocks \[1\] are not 0\.\.N-1"),
        "extra.safetensors": ({**sd, "double_blocks.0.img_attn.frob": np.zeros(2, np.float32)},
                              r"match no rename rule: double_blocks\.0\.img_attn\.frob"),
        "shape.safetensors": ({**sd, "double_blocks.1.img_mlp.0.bias": np.zeros(63, np.float32)},
                              r"transformer_blocks\.1\.ff\.net\.0\.proj\.bias: expected \(64,\), got \(63,\)"),
    }
    b = sd3_built["sd3-medium"]
    pos = {**b["sd"], "model.diffusion_model.pos_embed": np.zeros((1, 143, 64), np.float32)}
    cases["pos.safetensors"] = (pos, "pos_embed has 143 positions, not a square grid")
    for name, (state_dict, pattern) in cases.items():
        path = tmp_path / name
        save_safetensors(path, state_dict)
        with pytest.raises(WeightsError, match=pattern) as e:
            load_checkpoint(path)
        assert name in str(e.value)
