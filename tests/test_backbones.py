"""Backbones: insightface-identical sizes, output shapes, gradients and checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pfc_ds.backbones import BackboneSpec, available_backbones, get_backbone, register_backbone

# Parameter counts at embedding 512, including the frozen ``features.weight`` of the IResNets.
# Computed by instantiating insightface arcface_torch's own backbones/{iresnet,mobilefacenet,vit}.py
# (get_model settings); our state_dict keys and shapes match theirs one to one.
EXPECTED_PARAMS = {
    "iresnet18": 24_025_600,
    "iresnet34": 34_139_328,
    "iresnet50": 43_590_848,
    "iresnet100": 65_156_160,
    "iresnet200": 118_833_920,
    "mobilefacenet": 2_059_520,
    "mobilefacenet_large": 6_314_880,
    "vit_t": 19_137_792,
    "vit_s": 76_023_296,
    "vit_b": 113_833_472,
    "vit_l": 255_684_352,
    "tiny": 155_504,
}
ALIASES = {
    "r18": "iresnet18",
    "r34": "iresnet34",
    "r50": "iresnet50",
    "r100": "iresnet100",
    "r200": "iresnet200",
    "mbf": "mobilefacenet",
    "mbf_large": "mobilefacenet_large",
    "vit_t_dp005_mask0": "vit_t",
    "vit_s_dp005_mask_0": "vit_s",
    "vit_b_dp005_mask_005": "vit_b",
    "vit_l_dp005_mask_005": "vit_l",
}
SMALL = ["iresnet18", "mobilefacenet", "vit_t", "tiny"]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_has_the_documented_names():
    assert set(EXPECTED_PARAMS) | set(ALIASES) <= set(available_backbones())


@pytest.mark.parametrize("name", EXPECTED_PARAMS)
def test_param_count_and_output_shape(name):
    with torch.device("meta"):  # no memory, no init cost: vit_l is 256M parameters
        model = get_backbone(name)
        assert _count(model) == EXPECTED_PARAMS[name]
        for training in (True, False):
            assert model.train(training)(torch.empty(2, 3, 112, 112)).shape == (2, 512)


@pytest.mark.parametrize("alias", ALIASES)
def test_insightface_aliases(alias):
    with torch.device("meta"):
        assert _count(get_backbone(alias)) == EXPECTED_PARAMS[ALIASES[alias]]


@pytest.mark.parametrize(
    ("name", "drop_path_rate", "mask_ratio"),
    [
        ("vit_t", 0.1, 0.1),
        ("vit_t_dp005_mask0", 0.05, 0.0),
        ("vit_b_dp005_mask_005", 0.05, 0.05),
        ("vit_l", 0.05, 0.05),
    ],
)
def test_vit_regularisation_defaults_and_override(name, drop_path_rate, mask_ratio):
    with torch.device("meta"):
        model = get_backbone(name)
        assert model.mask_ratio == mask_ratio
        assert model.blocks[0].drop_path == 0.0
        assert model.blocks[-1].drop_path == pytest.approx(drop_path_rate)
        assert get_backbone(name, mask_ratio=0.0, drop_path_rate=0.0).blocks[-1].drop_path == 0.0


@pytest.mark.parametrize("name", SMALL)
def test_embedding_size(name):
    with torch.device("meta"):
        assert get_backbone(name, 128).train()(torch.empty(2, 3, 112, 112)).shape == (2, 128)


def test_insightface_state_dict_names():
    """Same keys as insightface, so its pretrained backbones load with strict=True."""
    expected = {
        "iresnet18": ["layer1.0.downsample.0.weight", "layer4.1.bn3.running_var", "features.bias"],
        "mobilefacenet": ["layers.3.layers.0.layers.0.layers.0.weight", "features.layers.2.weight"],
        "vit_t": ["blocks.11.attn.qkv.weight", "feature.3.running_mean", "mask_token"],
    }
    for name, keys in expected.items():
        with torch.device("meta"):
            state = get_backbone(name).state_dict()
        assert set(keys) <= set(state), name


def _forward_backward(model: nn.Module, x: torch.Tensor):
    """Output, gradients of a fixed linear loss, and how many module forwards ran."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in model.modules()]
    torch.manual_seed(0)  # ViT masking and drop-path draw from the global RNG
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, len(calls)


@pytest.mark.parametrize("name", SMALL)
def test_forward_backward_and_checkpointing(name):
    torch.manual_seed(0)
    model = get_backbone(name).train()
    x = torch.randn(2, 3, 112, 112)
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    out, grads, calls = _forward_backward(model, x)
    assert out.shape == (2, 512) and out.isfinite().all()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in grads]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, g in grads.items() if not g.isfinite().all()]
    assert not bad, f"non-finite gradients in {bad}"
    assert any(g.abs().sum() > 0 for g in grads.values())
    stepped = {n: b.clone() for n, b in model.named_buffers()}

    # Same weights and RNG, now recomputing activations: identical output, gradients and
    # BatchNorm statistics (the recompute must not update running stats a second time).
    for n, b in model.named_buffers():
        b.copy_(buffers[n])
    model.gradient_checkpointing = True
    out_ckpt, grads_ckpt, calls_ckpt = _forward_backward(model, x)
    assert calls_ckpt > calls  # blocks really were recomputed in backward
    torch.testing.assert_close(out_ckpt, out, rtol=1e-5, atol=1e-6)
    for n, g in grads.items():
        torch.testing.assert_close(grads_ckpt[n], g, rtol=1e-4, atol=1e-6, msg=n)
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, stepped[n], msg=n)


def test_tiny_is_per_sample():
    """No batch statistics: a split batch gives the same embeddings as the whole batch."""
    torch.manual_seed(0)
    model = get_backbone("tiny").train()
    x = torch.randn(4, 3, 112, 112)
    torch.testing.assert_close(torch.cat([model(x[:2]), model(x[2:])]), model(x))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", ["tiny", "vit_t"])
def test_fp16_autocast_returns_float32(name):
    model = get_backbone(name, fp16=True).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.dtype == torch.float32 and out.isfinite().all()


def test_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet50'.*iresnet50.*vit_t"):
        get_backbone("resnet50")
    with pytest.raises(ValueError, match=r"'vit_t' got unknown options \['width'\].*mask_ratio"):
        get_backbone("vit_t", width=3)
    with pytest.raises(ValueError, match="dropout"):
        get_backbone("mobilefacenet", dropout=0.1)
    with pytest.raises(ValueError, match="embedding_size"):
        get_backbone("tiny", 0)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("tiny", BackboneSpec(nn.Identity))
