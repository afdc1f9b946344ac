"""Gather* maps of DINOv2-S/14 on 16 Fashion-MNIST test images: OpenVINO bfloat16 and torch
bfloat16 autocast against float32 torch, and against each other (relative L2 per image)."""

import torch

from mist_fed.cloud.backbone import create_backbone
from mist_fed.cloud.gather import gather_many
from mist_fed.core.specs import GatherSpec, candidate_ks
from mist_fed.data import get_task


def rel(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return (got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1)


bb = create_backbone("dinov2_s14_imgfocus")
split = get_task("fashion-mnist").split("test")
tf = bb.transform()
x = torch.stack([tf(split.image(i).convert("RGB")) for i in range(16)])
specs = [GatherSpec("mist", k) for k in candidate_ks(bb.num_blocks)] + [GatherSpec("final")]
ref = gather_many(bb.configured("float32", "torch"), x, specs)
ov = gather_many(bb.configured("bfloat16", "openvino"), x, specs)
tb = gather_many(bb.configured("bfloat16", "torch"), x, specs)
print(bb.configured("bfloat16", "openvino").weights_id)
for s in specs:
    e = rel(ov[s], ref[s])
    print(
        "openvino bf16 vs float32",
        s.label(),
        f"max {e.max() * 100:.2f}% mean {e.mean() * 100:.2f}%",
    )
for s in specs:
    print(
        "openvino vs torch bf16",
        s.label(),
        f"max {rel(ov[s], tb[s]).max() * 100:.2f}%",
        f"| torch bf16 vs f32 max {rel(tb[s], ref[s]).max() * 100:.2f}%",
    )
