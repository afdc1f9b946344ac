"""`mist-fed inspect`: the Table 1 row of each method, computed for ViT-B/16 at 224."""

import json

from mist_fed.cli import main


def test_inspect_vit_b16_figures(capsys):
    # Execute
    rc = main(
        [
            "inspect",
            "--backbone",
            "vit_base_patch16_224",
            "--random-init",
            "--num-classes",
            "100",
            "--json",
        ]
    )
    # Assert
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    m = report["methods"]
    assert set(m) == {"linear", "partial1", "side", "mist"}
    for row in m.values():
        assert set(row) >= {"transfer_bytes_per_image", "edge_params", "edge_macs", "cloud_macs"}
        assert all(isinstance(v, int) for v in row.values())
    assert m["mist"]["transfer_bytes_per_image"] == 605_184
    assert m["side"]["transfer_bytes_per_image"] == 13 * 605_184
    assert m["linear"]["transfer_bytes_per_image"] == 3_072
    assert m["partial1"]["transfer_bytes_per_image"] == 605_184
    assert abs(m["mist"]["cloud_macs"] - 17.6e9) / 17.6e9 < 0.01
    assert abs(m["mist"]["edge_block_params"] - 0.38e6) / 0.38e6 <= 0.05
    assert abs(m["mist"]["edge_macs"] - 0.09e9) / 0.09e9 <= 0.10
    assert m["partial1"]["cloud_macs"] < m["mist"]["cloud_macs"]
    assert m["partial1"]["edge_params"] > 7e6  # one ViT-B block
    assert m["linear"]["edge_params"] == 768 * 100 + 100


def test_inspect_bad_backbone_is_a_clear_error(capsys):
    rc = main(["inspect", "--backbone", "resnet_not_here", "--random-init"])
    assert rc == 2
    assert "unknown backbone" in capsys.readouterr().err
