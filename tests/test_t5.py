"""T5 encoder: traces vs transformers' module paths, relative position buckets, padding mask, config checks."""

import numpy as np
import pytest

from refsd import golden
from refsd import xp as rxp
from refsd.errors import BackendError
from refsd.models.configs import ConfigError
from refsd.text.t5 import T5Config, relative_position_bucket, t5_encoder
from refsd.trace import record
from refsd.weights import Params

CASES = [c for c in sorted(golden.manifest()) if c.startswith("text_encoder/t5_")]


def _setup(case_id, xp, device):
    case = golden.load_case(case_id)
    params = Params(case.group("param"), xp=xp, device=device)
    inputs = {k: rxp.asarray(v, xp=xp, device=device) for k, v in case.group("in").items()}
    return case, params, inputs, T5Config.from_dict(case.meta["op"]["kwargs"]["config"])


def test_cases_exist():
    assert {"text_encoder/t5_v1_1_porting_tiny_f32", "text_encoder/t5_v1_1_padded_tiny_f32",
            "text_encoder/t5_relu_tiny_f32"} <= set(CASES)


@pytest.mark.parametrize("case_id", CASES)
def test_trace_names_match_transformers_modules(case_id, xp, device):
    """refsd emits under the module paths the oracle hooked, in the same order, with the same values
    (the porting case: every q / k / v / o, relative_attention_bias, wi_0 / act / wi_1 / wo, norm)."""
    case, params, inputs, cfg = _setup(case_id, xp, device)
    with record(depth=case.meta.get("trace_depth", 1)) as rec:
        t5_encoder(params, inputs["input_ids"], attention_mask=inputs.get("attention_mask"), cfg=cfg)
    assert rec.order == case.meta["trace_order"]
    ref = case.group("trace")
    for name in rec.order:
        np.testing.assert_allclose(rec[name], ref[name], atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("buckets,distance", [(32, 128), (32, 64), (64, 256), (16, 32), (8, 20), (128, 128)])
def test_relative_position_bucket_matches_transformers(buckets, distance):
    """Every key-minus-query offset in [-4096, 4096]: the host float64 formula equals transformers'
    float32 torch one (including the exact-power-of-two boundaries)."""
    torch = pytest.importorskip("torch")
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    offsets = torch.arange(-4096, 4097)
    ref = t5.T5Attention._relative_position_bucket(offsets, True, buckets, distance).tolist()
    got = [relative_position_bucket(d, num_buckets=buckets, max_distance=distance) for d in offsets.tolist()]
    assert got == ref


def _tiny(seed=0):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from golden.registry import randomise_weights

    cfg = {"vocab_size": 50, "d_model": 16, "d_kv": 4, "d_ff": 24, "num_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16, "feed_forward_proj": "gated-gelu"}
    model = transformers.T5EncoderModel(transformers.T5Config(**cfg, dropout_rate=0.0)).eval()
    randomise_weights(model, torch.Generator().manual_seed(seed))
    return torch, model, cfg


def test_fully_masked_row_attends_uniformly_as_transformers(xp, device):
    """A row whose attention_mask is all 0: transformers adds finfo.min (no NaN); so does refsd."""
    torch, model, cfg = _tiny()
    ids = torch.tensor([[5, 7, 9, 1, 0, 0], [4, 1, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    params = Params({k: v.detach().numpy() for k, v in model.state_dict().items()}, xp=xp, device=device)
    got = t5_encoder(params, rxp.asarray(ids.numpy(), xp=xp, device=device), cfg=T5Config.from_dict(cfg),
                     attention_mask=rxp.asarray(mask.numpy(), xp=xp, device=device))["last_hidden_state"]
    got = rxp.to_numpy(got)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_param_shapes_are_transformers_state_dict():
    _, model, cfg = _tiny()
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert T5Config.from_dict(cfg).param_shapes() == want
    relu = T5Config.from_dict({**cfg, "feed_forward_proj": "relu"}).param_shapes()
    assert "encoder.block.1.layer.1.DenseReluDense.wi.weight" in relu and not any("wi_0" in k for k in relu)


def test_embed_tokens_key_is_read_when_shared_is_absent(xp, device):
    """Files saved from T5EncoderModel may carry the tied table as encoder.embed_tokens.weight only."""
    torch, model, cfg = _tiny()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ids = rxp.asarray(np.array([[3, 1, 0]]), xp=xp, device=device)
    c = T5Config.from_dict(cfg)
    a = t5_encoder(Params(sd, xp=xp, device=device), ids, cfg=c)["last_hidden_state"]
    sd.pop("shared.weight")
    b = t5_encoder(Params(sd, xp=xp, device=device), ids, cfg=c)["last_hidden_state"]
    assert np.array_equal(rxp.to_numpy(a), rxp.to_numpy(b))


def test_config_refuses_what_refsd_does_not_run():
    with pytest.raises(ConfigError, match="feed_forward_proj='gated-silu'"):
        T5Config(feed_forward_proj="gated-silu")
    with pytest.raises(ConfigError, match="num_heads=0"):
        T5Config(num_heads=0)
    c = T5Config.from_dict({"d_model": 4096, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
                            "is_gated_act": True, "_name_or_path": "google/t5-v1_1-xxl"})
    assert c.d_model == 4096 and c.is_gated_act and c.inner_dim == 512


def test_mask_shape_mismatch_is_one_line(xp, device):
    torch, model, cfg = _tiny()
    params = Params({k: v.detach().numpy() for k, v in model.state_dict().items()}, xp=xp, device=device)
    ids = rxp.asarray(np.array([[3, 1, 0]]), xp=xp, device=device)
    with pytest.raises(BackendError, match=r"attention_mask of shape \(1, 2\)"):
        t5_encoder(params, ids, cfg=T5Config.from_dict(cfg), attention_mask=rxp.asarray(np.ones((1, 2)), xp=xp,
                                                                                        device=device))
