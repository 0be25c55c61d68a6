"""train.tiny_shapes.UsedRows: training only the token-embedding rows the captions use is the same
training as the whole table's (AdamW without weight decay, gradient clipping, EMA), measured on a small
CLIP text encoder over a few steps."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from train.tiny_shapes import EMA, UsedRows  # noqa: E402


def _encoder():
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=1, max_position_embeddings=8, eos_token_id=499,
                                      bos_token_id=498, pad_token_id=499)
    return transformers.CLIPTextModel(cfg)


def _train(text, ids, steps=4):
    params = list(text.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    ema = EMA(params, 0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        pick = torch.randint(len(ids), (3,), generator=g)
        loss = text(ids[pick]).last_hidden_state.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.05)  # small enough to clip every step
        opt.step()
        ema.update()
    ema.copy_to()


def test_used_rows_train_as_the_whole_table_does():
    ids = torch.tensor([[498, 7, 42, 9, 499, 499, 499, 499], [498, 7, 300, 42, 11, 499, 499, 499],
                        [498, 499, 499, 499, 499, 499, 499, 499]])
    whole, part = _encoder(), _encoder()
    before = whole.get_input_embeddings().weight.detach().clone()
    _train(whole, ids)
    used = UsedRows(part, ids)
    assert len(used.rows) == 7 and part.get_input_embeddings().num_embeddings == 7
    _train(part, used.ids)
    used.restore()
    table = part.get_input_embeddings()
    assert table.num_embeddings == 500
    a, b = whole.state_dict(), part.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())  # measured: bit-identical (max |diff| 0.0)
    moved = (table.weight != before).any(dim=1)
    assert moved.nonzero().flatten().tolist() == used.rows.tolist()  # exactly the used rows trained
