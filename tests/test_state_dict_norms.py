"""Bare state_dicts: normalisation layers, embeddings and tokens are not affine layers, whatever their shape.

The state_dicts are those of real modules (torch.nn's LayerNorm, GroupNorm, InstanceNorm, RMSNorm,
Embedding; a torchvision ViT with its class token and positional embedding), saved by torch.save.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import hpa


class Transformerish(nn.Module):
    """The parameter layout of a small text or vision transformer, plus a conv stem and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.wte = nn.Embedding(50, 16)  # GPT-2's token embedding
        self.position_embeddings = nn.Embedding(10, 16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16))
        self.pos_embed = nn.Parameter(torch.randn(1, 11, 16))
        self.ln_1 = nn.LayerNorm(16)
        self.input_layernorm = nn.RMSNorm(16)
        self.norm1 = nn.GroupNorm(4, 16)
        self.inorm = nn.InstanceNorm2d(16, affine=True)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))])
        self.head = nn.Linear(16, 5)


def load(tmp_path, state) -> hpa.ConvGraph:
    torch.save(state, tmp_path / "weights.pth")
    return hpa.load(str(tmp_path / "weights.pth"))


def test_norms_embeddings_and_tokens_are_listed_never_analysed(tmp_path):
    torch.manual_seed(0)
    state = Transformerish().state_dict()
    state["ln_1.weight"] = state["ln_1.weight"].reshape(1, 16)  # a 2-D LayerNorm weight, as exports store it
    graph = load(tmp_path, state)
    assert [layer.name for layer in graph] == ["stem", "blocks.0.0", "blocks.0.2", "head"]
    reasons = {s.name: s.reason for s in graph.skipped}
    for name in ("ln_1", "input_layernorm", "norm1"):
        assert reasons[name].startswith("normalisation layer (LayerNorm, GroupNorm, InstanceNorm or RMSNorm"), name
        assert "one scale per channel, not an affine layer" in reasons[name]
    assert "weight(1, 16)" in reasons["ln_1"]
    assert reasons["wte"] == ("embedding table without a bias: a lookup by index, not a linear layer of the input "
                              "(weight(50, 16))")
    assert reasons["position_embeddings"].startswith("positional embedding table without a bias")
    assert reasons["position_embeddings"].endswith("(weight(10, 16))")
    assert reasons["cls_token"] == ("class or register token (1, 1, 16): a learned vector put beside the input, "
                                    "not a layer")
    assert reasons["pos_embed"] == "positional embedding (1, 11, 16): a learned table added to the input, not a layer"
    # "inorm" is no word hpa knows: its 1-D weight is listed by shape, as before
    assert "1-D weight, a normalisation scale rather than an affine layer" in reasons["inorm"]


def test_with_linear_never_gives_a_norm_an_n_l(tmp_path):
    """The report's case: LayerNorm (1, 264) had an n_l from one "filter" under --with-linear."""
    state = {"conv.weight": torch.randn(8, 3, 3, 3), "norm.weight": torch.ones(1, 264), "norm.bias": torch.zeros(264),
             "encoder.embed_tokens.weight": torch.randn(30, 264)}
    path = tmp_path / "w.pt"
    torch.save(state, path)
    result = hpa.scan(str(path), statistics=["projection"], with_linear=True)
    assert list(result.statistics["projection"].layers) == ["conv"]
    skipped = {s["name"]: s["reason"] for s in result.to_dict()["skipped"]}
    assert skipped["norm"].startswith("normalisation layer") and skipped["encoder.embed_tokens"].startswith("embedding")


def test_a_linear_layer_named_like_an_embedding_keeps_its_bias_and_stays_linear(tmp_path):
    """nn.Embedding has no bias: a projection called "embedding" with a bias is a linear layer."""
    state = {"conv.weight": torch.randn(8, 3, 3, 3), "embedding.weight": torch.randn(4, 8),
             "embedding.bias": torch.zeros(4), "fc.weight": torch.randn(1, 8), "fc.bias": torch.zeros(1)}
    graph = load(tmp_path, state)
    assert [(layer.name, layer.kind) for layer in graph] == [("conv", "conv2d"), ("embedding", "linear"),
                                                            ("fc", "linear")]  # a one-output head stays a layer
    assert graph.skipped == []


def test_torchvision_vit_tokens_and_norms_are_listed(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=3)
    graph = load(tmp_path, model.state_dict())
    reasons = {s.name: s.reason for s in graph.skipped}
    assert reasons["class_token"].startswith("class or register token (1, 1, 16)")
    assert reasons["encoder.pos_embedding"].startswith("positional embedding (1, 5, 16)")
    assert reasons["encoder.ln"].startswith("normalisation layer")
    assert reasons["encoder.layers.encoder_layer_0.ln_1"].startswith("normalisation layer")
    assert "conv_proj" in graph and all(layer.kind in ("conv2d", "linear") for layer in graph)
    assert not any("ln" in layer.name.split(".")[-1] for layer in graph)
    np.testing.assert_array_equal(graph["conv_proj"].weight, model.conv_proj.weight.detach().numpy())


@pytest.mark.parametrize("norm", [nn.LayerNorm(16), nn.GroupNorm(4, 16), nn.RMSNorm(16)], ids=lambda n: type(n).__name__)
def test_each_norm_class_by_its_usual_name(tmp_path, norm):
    state = {"conv.weight": torch.randn(16, 3, 3, 3), **{f"block.norm.{k}": v for k, v in norm.state_dict().items()}}
    graph = load(tmp_path, state)
    assert [layer.name for layer in graph] == ["conv"]
    assert [s.name for s in graph.skipped] == ["block.norm"]
    assert graph.skipped[0].reason.startswith("normalisation layer")
