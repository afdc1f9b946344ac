"""Gather functions against hand-written loops over a tiny random ViT."""

import pytest
import torch

from mist_fed.cloud.gather import (
    GatherSpec,
    candidate_ks,
    feature_shape,
    gather,
    gather_many,
    pooled_grid,
)
from mist_fed.errors import ConfigError


def hand_loop(model, x):
    """z_0 .. z_N written out by hand from timm's modules."""
    z = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    zs = [z]
    for blk in model.blocks:
        z = blk(z)
        zs.append(z)
    return zs


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32)


def test_gather_star_equals_hand_loop_for_every_k(tiny_backbone, images):
    # Prepare
    with torch.no_grad():
        zs = hand_loop(tiny_backbone.model, images)
    n = tiny_backbone.num_blocks
    # Execute / Assert
    for k in range(n + 1):
        got = gather(tiny_backbone, images, GatherSpec("mist", k))
        want = sum(zs[: k + 1])
        assert got.shape == (4, tiny_backbone.num_tokens, tiny_backbone.embed_dim)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_side_block_final_match_hand_loop_and_timm(tiny_backbone, images):
    with torch.no_grad():
        zs = hand_loop(tiny_backbone.model, images)
        timm_final = tiny_backbone.model.forward_features(images)[:, 0]
    side = gather(tiny_backbone, images, GatherSpec("side"))
    assert side.shape == (
        4,
        tiny_backbone.num_blocks + 1,
        tiny_backbone.num_tokens,
        tiny_backbone.embed_dim,
    )
    torch.testing.assert_close(side, torch.stack(zs, dim=1))
    for k in range(tiny_backbone.num_blocks + 1):
        torch.testing.assert_close(gather(tiny_backbone, images, GatherSpec("block", k)), zs[k])
    torch.testing.assert_close(gather(tiny_backbone, images, GatherSpec("final")), timm_final)


def test_block_outputs_match_timm_forward_intermediates(tiny_backbone, images):
    n = tiny_backbone.num_blocks
    with torch.no_grad():
        inter = tiny_backbone.model.forward_intermediates(
            images,
            indices=n,
            norm=False,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )
    for k in range(1, n + 1):
        patches, prefix = inter[k - 1]  # timm returns (spatial, prefix)
        want = torch.cat([prefix, patches], dim=1)
        torch.testing.assert_close(gather(tiny_backbone, images, GatherSpec("block", k)), want)


def test_gather_many_is_one_pass_and_matches_single_specs(tiny_backbone, images):
    calls = []
    handles = [
        b.register_forward_hook(lambda *a: calls.append(1)) for b in tiny_backbone.model.blocks
    ]
    specs = [GatherSpec("mist", k) for k in candidate_ks(tiny_backbone.num_blocks)]
    try:
        out = gather_many(tiny_backbone, images, specs)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == tiny_backbone.num_blocks  # every block ran exactly once
    for spec in specs:
        torch.testing.assert_close(out[spec], gather(tiny_backbone, images, spec))


def test_pooled_gather_star_averages_2x2_patch_windows(tiny_backbone, images):
    # Prepare: Gather* at k=2 over the tiny ViT's 4x4 patch grid (one class token)
    spec = GatherSpec("mistpool", 2)
    full = gather(tiny_backbone, images, GatherSpec("mist", 2))
    grid = full[:, 1:].reshape(4, 4, 4, -1)  # [batch, row, col, dim]
    # Execute
    got = gather(tiny_backbone, images, spec)
    # Assert: class token untouched, each pooled token the mean of its 2x2 window, row-major
    assert got.shape == (4, *feature_shape(tiny_backbone, spec)) == (4, 5, 48)
    torch.testing.assert_close(got[:, 0], full[:, 0])
    for i, (r, c) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        want = grid[:, r : r + 2, c : c + 2].mean(dim=(1, 2))
        torch.testing.assert_close(got[:, 1 + i], want, rtol=1e-5, atol=1e-5)


def test_pooled_grid_keeps_a_partial_last_window_and_needs_a_square():
    assert pooled_grid(16 * 16) == 8
    assert pooled_grid(7 * 7) == 4
    with pytest.raises(ConfigError, match="square patch grid"):
        pooled_grid(12)


def test_candidate_ks_follow_thirds():
    assert candidate_ks(12) == (4, 8, 12)
    assert candidate_ks(3) == (1, 2, 3)
    assert candidate_ks(24) == (8, 16, 24)


def test_bad_specs_are_refused(tiny_backbone, images):
    with pytest.raises(ConfigError, match="unknown gather"):
        GatherSpec("avg", 1)
    with pytest.raises(ConfigError, match="needs a depth"):
        GatherSpec("mist")
    with pytest.raises(ConfigError, match="outside"):
        gather(tiny_backbone, images, GatherSpec("mist", tiny_backbone.num_blocks + 1))
