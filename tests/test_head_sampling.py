"""Partial sampling (r < 1): positives kept, uniform negatives, no passive update, accumulation."""

import pytest
import torch

import pfc_ds
from pfc_ds.head.sampler import ClassSampler
from tests import reference as ref

D = 16
S, M2, M3 = 64.0, 0.0, 0.4
LR, MOM, WD = 0.1, 0.9, 5e-4


def _sample(sampler: ClassSampler, local: torch.Tensor):
    """``(index, target, active)``: the sample and each label's column in it."""
    index, active = sampler.sample(local)
    return index, sampler.targets(index, local), active


def make_head(num_classes=1000, sample_rate=0.1, **kw):
    margin = pfc_ds.CombinedMarginLoss(S, 1.0, M2, M3)
    return pfc_ds.PartialFC(margin, D, num_classes, sample_rate=sample_rate, **kw)


def batch(seed, n=32, num_classes=1000):
    g = torch.Generator().manual_seed(20_000 + seed)
    return torch.randn(n, D, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def _taken(index, active):
    return index if active is None else index[active]


def test_positives_count_and_sorted_remap():
    sampler = ClassSampler(num_local=1000, sample_rate=0.1, seed=0, rank=0)
    positives = torch.tensor([5, 999, 5, 0, 417])
    index, target, active = _sample(sampler, positives)
    assert active is None  # 100 slots always cover a batch of 5
    assert len(index) == 100 and len(set(index.tolist())) == 100
    assert torch.equal(index, index.sort().values)
    assert torch.equal(index[target], positives)


def test_labels_of_other_shards_get_no_column():
    sampler = ClassSampler(num_local=1000, sample_rate=0.1, seed=0, rank=0)
    local = torch.tensor([5, -3, 1000, 7, -1])  # what labels - class_start gives off the shard
    index, target, _ = _sample(sampler, local)
    assert target.tolist()[1:3] == [-1, -1] and target[4] == -1
    assert index[target[0]] == 5 and index[target[3]] == 7


def test_positives_beyond_budget_are_all_taken_and_rate_zero_means_positives_only():
    many = torch.arange(0, 1000, 7)  # 143 positives > 100 slots
    index, target, active = _sample(ClassSampler(1000, 0.1, 0, 0), many)
    assert torch.equal(_taken(index, active), many)
    # Rate 0: the static size is the batch (3), of which the 2 distinct positives are active.
    index, target, active = _sample(ClassSampler(1000, 0.0, 0, 0), torch.tensor([9, 3, 9]))
    assert len(index) == 3 and _taken(index, active).tolist() == [3, 9]
    assert index[target].tolist() == [9, 3, 9] and bool(active[target].all())


@pytest.mark.parametrize(
    ("num_local", "rate", "npos"),
    [
        (100_000, 0.1, 128),
        (1_000_000, 0.1, 128),
        (1000, 0.5, 10),
        (1000, 0.9, 40),
        (50, 0.99, 3),
        (1000, 0.01, 64),  # positives may exceed the 10 slots: padded, masked columns
        (40, 0.5, 64),  # a shard smaller than the batch
    ],
)
def test_sample_sizes_across_densities(num_local, rate, npos):
    sampler = ClassSampler(num_local, rate, seed=3, rank=0)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        positives = torch.randint(0, num_local, (npos,), generator=g)
        index, target, active = _sample(sampler, positives)
        want = max(int(rate * num_local), len(positives.unique()))
        assert len(index) == sampler.size(npos) == len(index.unique())
        assert len(_taken(index, active)) == want
        assert torch.equal(index, index.sort().values) and torch.equal(index[target], positives)
        assert active is None or bool(active[target].all())
        assert int(index.min()) >= 0 and int(index.max()) < num_local


@pytest.mark.parametrize("rate", [0.1, 0.7])
def test_negatives_are_uniform_chi_square(rate):
    num_local, draws = 200, 3000
    sampler = ClassSampler(num_local, rate, seed=1, rank=0)
    positives = torch.tensor([3, 50, 51, 120, 199])
    counts = torch.zeros(num_local)
    for _ in range(draws):
        index, _, active = _sample(sampler, positives)
        counts[_taken(index, active)] += 1
    assert torch.all(counts[positives] == draws)
    negatives = torch.ones(num_local, dtype=torch.bool)
    negatives[positives] = False
    observed = counts[negatives]
    p = (int(rate * num_local) - 5) / (num_local - 5)  # each negative's inclusion probability
    # Inclusion counts are Binomial(draws, p): normalise by its variance, not Pearson's mean.
    chi2 = float(((observed - draws * p) ** 2 / (draws * p * (1 - p))).sum())
    dof = int(negatives.sum()) - 1
    # mean dof, sd sqrt(2 dof) ~ 19.7: 5 sd above the mean is p < 1e-6 for a uniform sampler
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, chi2
    assert chi2 > dof - 5 * (2 * dof) ** 0.5, chi2  # not suspiciously regular either


def test_loss_equals_reference_on_sampled_submatrix():
    head = make_head()
    w0 = head.weight.clone()
    emb, labels = batch(0)
    loss = head(emb, labels)
    index = head.window.index
    assert set(labels.tolist()) <= set(index.tolist()) and len(index) == 100
    sub_labels = torch.searchsorted(index, labels)
    ref_loss, _, _ = ref.loss_and_grads(emb, w0[index], sub_labels, S, M2, M3)
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-5


def test_rows_not_sampled_stay_bit_identical():
    head = make_head()
    opt = pfc_ds.SparseSGD(head, lr=LR, momentum=MOM, weight_decay=WD)
    w_init = head.weight.clone()
    touched = torch.zeros(1000, dtype=torch.bool)
    for step in range(2):
        w_before = head.weight.clone()
        m_before = None if head.momentum is None else head.momentum.clone()
        emb, labels = batch(step)
        head(emb, labels).backward()
        index = head.window.index
        assert opt.step()
        opt.zero_grad()
        untouched = torch.ones(1000, dtype=torch.bool)
        untouched[index] = False
        touched[index] = True
        assert torch.equal(head.weight[untouched], w_before[untouched])
        assert not torch.equal(head.weight[index], w_before[index])
        if m_before is not None:
            assert torch.equal(head.momentum[untouched], m_before[untouched])
    never = ~touched
    assert never.any()
    assert torch.equal(head.weight[never], w_init[never])
    assert torch.count_nonzero(head.momentum[never]) == 0


@pytest.mark.parametrize("momentum_dtype", [None, torch.float32])
def test_accumulation_window_updates_its_rows_like_sgd(momentum_dtype):
    """Two micro-batches in one window: one sample for both, their gradients summed, and
    torch.optim.SGD on the sampled submatrix with the float64 reference loss gives the same."""
    head = make_head(momentum_dtype=momentum_dtype)
    opt = pfc_ds.SparseSGD(head, lr=LR, momentum=MOM, weight_decay=WD)
    # One ordinary step first, so the accumulated step also exercises existing momentum.
    emb, labels = batch(10)
    head(emb, labels).backward()
    opt.step()
    opt.zero_grad()
    w0, m0 = head.weight.clone().double(), head.momentum.clone().double()

    micro = [batch(11), batch(12)]
    head.prefetch([labels for _, labels in micro])
    index = head.window.index
    for emb, labels in micro:
        (head(emb, labels) / 2).backward()
        assert head.window.index is index  # one sample for the whole window
    both = torch.cat([labels for _, labels in micro])
    assert set(both.tolist()) <= set(index.tolist()) and len(index) == 100
    assert opt.step()

    p = torch.nn.Parameter(w0[index].clone())
    sgd = torch.optim.SGD([p], lr=LR, momentum=MOM, weight_decay=WD)
    sgd.state[p]["momentum_buffer"] = m0[index].clone()
    for emb, labels in micro:
        target = torch.searchsorted(index, labels)
        (ref.margin_ce(emb.double(), p, target, S, M2, M3) / 2).backward()
    sgd.step()
    assert ref.rel_err(head.weight[index], p.detach()) < 1e-5
    assert ref.rel_err(head.momentum[index], sgd.state[p]["momentum_buffer"]) < 1e-5
    rest = torch.ones(1000, dtype=torch.bool)
    rest[index] = False
    assert torch.equal(head.weight[rest].double(), w0[rest])
    assert torch.equal(head.momentum[rest].double(), m0[rest])


def test_k_micro_batches_act_as_one_batch_of_k_times_b():
    """prefetch([l1, l2]) + two half-weighted micro-batches == one forward of the concatenated
    batch: the same rows sampled, the same update (fp32 sums in another order)."""
    (e1, l1), (e2, l2) = batch(20), batch(21)
    window, whole = make_head(), make_head()
    opt_w = pfc_ds.SparseSGD(window, lr=LR, momentum=MOM, weight_decay=WD)
    opt_b = pfc_ds.SparseSGD(whole, lr=LR, momentum=MOM, weight_decay=WD)
    window.prefetch([l1, l2])
    losses = [window(e, lab) for e, lab in ((e1, l1), (e2, l2))]
    for loss in losses:
        (loss / 2).backward()
    loss_b = whole(torch.cat([e1, e2]), torch.cat([l1, l2]))
    loss_b.backward()
    assert torch.equal(window.window.index, whole.window.index)
    torch.testing.assert_close((losses[0] + losses[1]) / 2, loss_b, rtol=1e-6, atol=0)
    assert ref.rel_err(window.window.row_grad(), whole.window.row_grad()) < 1e-6
    opt_w.step()
    opt_b.step()
    assert ref.rel_err(window.weight, whole.weight) < 1e-6


def test_undeclared_second_forward_raises_and_declared_labels_are_checked():
    head = make_head()
    (e1, l1), (e2, l2) = batch(30), batch(31)
    head(e1, l1).backward()
    with pytest.raises(ValueError, match=r"call head\.prefetch\(\[labels of each micro-batch\]\)"):
        head(e2, l2)
    pfc_ds.SparseSGD(head, lr=LR).zero_grad()
    stale = head(e1, l1)  # a graph whose window the next forward replaces
    head(e2, l2)
    with pytest.raises(RuntimeError, match="whose rows the head has dropped"):
        stale.backward()
    head.prefetch([l1, l2])
    with pytest.raises(RuntimeError, match="differ from the ones prefetch declared"):
        head(e1, l1.flip(0))
    head.prefetch([l1, l2])
    head(e1, l1.clone()).backward()  # equal values are fine
    with pytest.raises(ValueError, match="still holds row gradients"):
        head.prefetch([l1])


def test_sampler_rng_is_checkpointed():
    a = make_head(seed=7)
    emb, labels = batch(0)
    a(emb, labels)
    state = a.state_dict()
    a(emb, labels)
    b = make_head(seed=7)
    b.load_state_dict(state)
    b(emb, labels)
    assert torch.equal(a.window.index, b.window.index)
    c = make_head(seed=8)
    c(emb, labels)
    c(emb, labels)
    assert not torch.equal(a.window.index, c.window.index)


def test_sampler_state_is_two_integers_and_resumes_the_same_draws():
    a = ClassSampler(100_000, 0.1, seed=5, rank=1)
    a.sample(torch.tensor([1, 2, 3]))
    state = a.state()
    assert state.dtype == torch.int64 and state.shape == (2,)  # loads on a CPU or a GPU alike
    b = ClassSampler(100_000, 0.1, seed=0, rank=0)
    b.load_state(state)
    positives = torch.tensor([7, 70_000])
    assert torch.equal(a.sample(positives)[0], b.sample(positives)[0])
    with pytest.raises(ValueError, match="2 int64"):
        b.load_state(torch.Generator().manual_seed(3).get_state())


def test_to_moves_the_bank_but_dtype_casts_do_not_touch_it():
    head = make_head(dtype=torch.float16)
    head.to(torch.float32)  # a module-wide cast (e.g. model.float()) leaves storage alone
    assert head.weight.dtype == torch.float16
    head.to("cpu")
    assert head.weight.device.type == "cpu"
    assert set(head.state_dict()) == {"weight", "momentum", "rng", "rounding_rng", "meta"}


def test_two_forwards_before_one_backward_match_sequential_micro_batches():
    """Both forwards of a window share its rows; backward order does not matter."""
    (e1, l1), (e2, l2) = batch(0), batch(1)
    seq = make_head()
    seq.prefetch([l1, l2])
    seq(e1, l1).backward()
    seq(e2, l2).backward()
    both = make_head()
    both.prefetch([l1, l2])
    (both(e1, l1) + both(e2, l2)).backward()
    assert torch.equal(seq.window.index, both.window.index)
    assert (
        ref.rel_err(seq.window.row_grad(), both.window.row_grad()) < 1e-6
    )  # summed in another order
    opt_s, opt_b = (pfc_ds.SparseSGD(h, lr=LR, momentum=MOM, weight_decay=WD) for h in (seq, both))
    opt_s.step()
    opt_b.step()
    assert ref.rel_err(seq.weight, both.weight) < 1e-6
