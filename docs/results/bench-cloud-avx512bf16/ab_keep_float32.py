"""A/B: OpenVINO bfloat16 trunk with and without the float32 patch embedding and layer norms.

Both graphs compiled in one process, the same 64 Fashion-MNIST test images at batch 8, timed
interleaved 5 times on a quiet host.
"""

import statistics
import time

import torch

from mist_fed.cloud import engine
from mist_fed.cloud.backbone import create_backbone
from mist_fed.data import get_task

torch.set_num_threads(2)
bb = create_backbone("dinov2_s14_imgfocus")
split = get_task("fashion-mnist").split("test")
tf = bb.transform()
x = torch.stack([tf(split.image(i).convert("RGB")) for i in range(64)]).numpy()
marked = engine.OpenVINOTrunk(bb, "bfloat16", 12, 2)
saved = engine.KEEP_FLOAT32
engine.KEEP_FLOAT32 = ()
plain = engine.OpenVINOTrunk(bb, "bfloat16", 12, 2)
engine.KEEP_FLOAT32 = saved


def run(trunk: engine.OpenVINOTrunk) -> float:
    start = time.perf_counter()
    for i in range(0, 64, 8):
        trunk.request.infer({0: x[i : i + 8]})
    return 64 / (time.perf_counter() - start)


run(marked)
run(plain)
a, b = [], []
for _ in range(5):
    a.append(run(marked))
    b.append(run(plain))
ma, mb = statistics.median(a), statistics.median(b)
print(
    f"marked (conv+norms f32): best {max(a):.2f} median {ma:.2f} img/s; plain bf16: best "
    f"{max(b):.2f} median {mb:.2f}; ratio best {max(a) / max(b):.3f} median {ma / mb:.3f}"
)
