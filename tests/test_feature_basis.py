"""The pool's public feature basis for a head refit under DP: whitened principal coordinates, a
head fitted on them folds back exactly into a head on raw features, and the basis crosses the
Flower codec as its own record."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from medveil.federated.feature_basis import fold_head, pool_feature_basis, to_basis
from medveil.federated.messages import FitInstructions
from medveil.models import ViTConfig, VisionTransformer


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                                       decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2))


def test_basis_whitens_the_pool_features_and_folds_a_head_exactly():
    vit, pool = tiny_vit(), torch.rand(80, 1, 16, 16)
    basis = pool_feature_basis(vit, pool, dims=8)
    assert basis["mean"].shape == (32,) and basis["basis"].shape == (32, 8)
    with torch.no_grad():
        z = to_basis(vit.forward_features(pool), basis)
    assert torch.allclose(z.mean(0), torch.zeros(8), atol=1e-4)  # centred and whitened on the pool
    assert torch.allclose(z.std(0), torch.ones(8), atol=1e-3)
    head = nn.Linear(8, 3)
    folded = nn.Linear(32, 3)
    folded.load_state_dict(fold_head(head, basis))
    x = torch.randn(10, 32)
    with torch.no_grad():
        assert torch.allclose(folded(x), head(to_basis(x, basis)), atol=1e-4)
    assert pool_feature_basis(vit, pool[:5], dims=8)["basis"].shape == (32, 4)  # k <= M - 1
    assert pool_feature_basis(vit, pool[:1], dims=8) == {}  # no pool: the site refits on raw features
    assert torch.equal(to_basis(x, {}), x) and torch.equal(fold_head(folded, {})["weight"], folded.weight)


def test_the_basis_crosses_the_flower_codec():
    pytest.importorskip("flwr")
    from medveil.federated.flower.codec import decode_instructions, encode_instructions

    vit = tiny_vit()
    state = {k: v for k, v in vit.state_dict().items() if not k.startswith("decoder")}
    head = {"weight": torch.randn(3, 32), "bias": torch.zeros(3)}
    basis = pool_feature_basis(vit, torch.rand(40, 1, 16, 16), dims=6)
    for features in (basis, {}):
        ins = FitInstructions("a", 3, vit.cfg.to_dict(), state, head, features)
        back, extra = decode_instructions(encode_instructions(ins, seed=1))
        assert extra == {"seed": 1} and back.features.keys() == features.keys()
        assert all(torch.equal(back.features[k], features[k]) for k in features)
        assert all(torch.equal(back.backbone[k], state[k]) for k in state)
