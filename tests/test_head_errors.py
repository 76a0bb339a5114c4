"""Bad input to the head gets a clear ValueError naming the value."""

import pytest
import torch

import pfc_ds

D, C = 8, 20


def head(**kw):
    return pfc_ds.PartialFC(pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4), D, C, **kw)


@pytest.mark.parametrize("bad", [C, C + 7, -1])
def test_label_out_of_range(bad):
    with pytest.raises(ValueError, match=rf"label {bad} is outside \[0, num_classes={C}\)"):
        head()(torch.randn(3, D), torch.tensor([0, bad, 1]))


def test_float_labels_refused():
    with pytest.raises(ValueError, match=r"integer tensor, got torch\.float32"):
        head()(torch.randn(2, D), torch.tensor([0.0, 1.0]))


def test_wrong_embedding_size():
    with pytest.raises(ValueError, match=r"embeddings must have shape \(B, 8\), got \(4, 9\)"):
        head()(torch.randn(4, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        head()(torch.randn(4, D), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_sample_rate_outside_unit_interval(rate):
    with pytest.raises(ValueError, match=rf"sample_rate must be in \[0, 1\], got {rate}"):
        head(sample_rate=rate)


def test_bad_dtypes():
    with pytest.raises(ValueError, match="dtype must be one of"):
        head(dtype=torch.float64)
    with pytest.raises(ValueError, match="momentum dtype must be the storage dtype"):
        head(dtype=torch.float16, momentum_dtype=torch.bfloat16)


def test_num_classes_below_world_size():
    with pytest.raises(ValueError, match="num_classes=1 < world_size=2"):
        pfc_ds.shard_range(1, 2, 0)


def test_mismatched_state_dict_names_the_keys():
    state = head().state_dict()
    other = pfc_ds.PartialFC(pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4), D, C + 1)
    with pytest.raises(ValueError, match=r"num_classes: checkpoint 20 != head 21.*num_local"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['rng'\]"):
        head().load_state_dict({k: v for k, v in state.items() if k != "rng"})
    wide = pfc_ds.PartialFC(pfc_ds.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4), D + 1, C)
    with pytest.raises(ValueError, match="embedding_size: checkpoint 8 != head 9"):
        wide.load_state_dict(state)


def test_state_round_trip_is_exact():
    a = head(sample_rate=0.5)
    opt = pfc_ds.SparseSGD(a, lr=0.1, momentum=0.9)
    a(torch.randn(4, D), torch.tensor([1, 2, 3, 4])).backward()
    opt.step()
    b = head(sample_rate=0.5, seed=9)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weight, b.weight) and torch.equal(a.momentum, b.momentum)


def test_negative_hyperparameters_refused():
    with pytest.raises(ValueError, match="lr, momentum and weight_decay must be >= 0"):
        pfc_ds.SparseSGD(head(), lr=-1.0)
