"""Real-asset check: linear probing vs MIST on a real task with the offline DINOv2 backbone.

Embeds the task once (every candidate k of Gather* plus the final normed class token, one
backbone pass per image) and caches the features as fp16 under the mist-fed cache, so reruns
only train. Training is a minimal loop (AdamW, batch 32, cosine to zero); k is chosen on val.

    python simulations/check_real.py --task fashion-mnist --test-limit 1000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mist_fed.data import get_task
from mist_fed.defaults import cache_dir
from mist_fed.model.backbone import Backbone, create_backbone
from mist_fed.model.gather import GatherSpec, candidate_ks, gather_many
from mist_fed.core.methods import build_edge_net
from mist_fed.wire.dtypes import QUANTIZED, dequantize, quantize

log = logging.getLogger("check_real")


def embed(backbone: Backbone, task_name: str, test_limit: int, batch: int = 16) -> dict:
    """Features for train / val / test: ``{split: {"final": [n, d], k: [n, t, d], "y": [n]}}``."""
    out_path = cache_dir() / "check_real" / f"{backbone.name}-{task_name}-test{test_limit}.pt"
    if out_path.is_file():
        return torch.load(out_path, weights_only=True)
    task = get_task(task_name, protocol="vtab-1k", seed=0)
    tf = backbone.transform()
    ks = candidate_ks(backbone.num_blocks)
    specs = [GatherSpec("final"), *[GatherSpec("mist", k) for k in ks]]
    feats: dict = {}
    t0 = time.time()
    for name in ("train", "val", "test"):
        split = task.split(name)
        n = len(split) if name != "test" else min(len(split), test_limit)
        parts: dict = {s: [] for s in specs}
        for start in range(0, n, batch):
            x = torch.stack([tf(split.image(i)) for i in range(start, min(n, start + batch))])
            for s, v in gather_many(backbone, x, specs).items():
                parts[s].append(v.to(torch.float16))
            log.info(
                "%s %d/%d (%.1f img/s)",
                name,
                start + len(x),
                n,
                (start + len(x)) / (time.time() - t0),
            )
        feats[name] = {"y": torch.tensor(list(split.labels)[:n])}
        for s in specs:
            feats[name]["final" if s.kind == "final" else s.k] = torch.cat(parts[s])
        t0 = time.time()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, out_path)
    return feats


def train_eval(net, xtr, ytr, evals, *, lr, epochs=30, batch=32, wd=1e-4, seed=0):
    """AdamW + cosine to zero; returns accuracy on each (x, y) in ``evals``."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * math.ceil(len(xtr) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(xtr), generator=gen).split(batch):
            loss = F.cross_entropy(net(xtr[idx].float()), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log.debug("epoch done, last loss %.4f", loss.item())
    net.eval()
    accs = []
    with torch.inference_mode():
        for x, y in evals:
            pred = torch.cat([net(c.float()).argmax(-1) for c in x.split(256)])
            accs.append(float((pred == y).float().mean()))
    return accs


def round_trip(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """``x`` after an int8 wire's round trip: ``int8`` (per-token scales), ``int8ch`` (per channel)."""
    q, scale = quantize(x.float().numpy(), dtype)
    return torch.from_numpy(dequantize(q, scale, dtype))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="fashion-mnist")
    p.add_argument("--backbone", default="dinov2_s14_imgfocus")
    p.add_argument("--test-limit", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument(
        "--select-epochs",
        type=int,
        help="epochs of the k-selection runs (default: --epochs); the chosen k is then "
        "retrained for --epochs",
    )
    p.add_argument("--linear-lr", type=float, default=3e-2)
    p.add_argument("--mist-lr", type=float, default=2e-3)
    p.add_argument("--ks", type=int, nargs="*", help="candidate k (default: N/3, 2N/3, N)")
    p.add_argument(
        "--int8-eval",
        action="store_true",
        help="also test each MIST net on test features round-tripped through each int8 wire "
        "(int8: per-token scales, int8ch: per-channel): quantization cost at inference alone",
    )
    p.add_argument(
        "--train-int8",
        nargs="?",
        const="int8",
        choices=QUANTIZED,
        help="train and test MIST on features round-tripped through this int8 wire (default "
        "int8, per-token scales; int8ch: per-channel), as a device on that wire would",
    )
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    log.info("torch threads: %d", torch.get_num_threads())

    backbone = create_backbone(args.backbone)
    f = embed(backbone, args.task, args.test_limit)
    nc = int(max(f["train"]["y"].max(), f["test"]["y"].max())) + 1
    tr, va, te = f["train"], f["val"], f["test"]
    ks = args.ks or list(candidate_ks(backbone.num_blocks))
    if args.train_int8:
        for split in (tr, va, te):
            for k in ks:
                split[k] = round_trip(split[k], args.train_int8)
    views = {k: {d: round_trip(te[k], d) for d in QUANTIZED} if args.int8_eval else {} for k in ks}
    top, ref = max(ks), te[max(ks)].float()
    int8_error = {n: float((v - ref).norm() / ref.norm()) for n, v in views[top].items()}
    if int8_error:
        log.info("int8 relative error of the test features at k=%d: %s", top, int8_error)

    def mist_evals(k: int) -> list:
        return [(va[k], va["y"]), (te[k], te["y"]), *[(v, te["y"]) for v in views[k].values()]]

    results: dict = {
        "task": args.task,
        "backbone": backbone.weights_id,
        "n_test": len(te["y"]),
        "mist_features": f"{args.train_int8} round trip" if args.train_int8 else "fp16",
        "runs": [],
    }
    for seed in args.seeds:
        lin = build_edge_net("linear", backbone, nc)
        lv, lt = train_eval(
            lin,
            tr["final"],
            tr["y"],
            [(va["final"], va["y"]), (te["final"], te["y"])],
            lr=args.linear_lr,
            epochs=args.epochs,
            seed=seed,
        )
        log.info("seed %d linear: val %.4f test %.4f", seed, lv, lt)
        sel_epochs = args.select_epochs or args.epochs
        per_k = {}
        for k in ks:
            net = build_edge_net("mist", backbone, nc)
            per_k[k] = train_eval(
                net, tr[k], tr["y"], mist_evals(k), lr=args.mist_lr, epochs=sel_epochs, seed=seed
            )
            log.info(
                "seed %d mist k=%d (%d epochs): val %.4f test %.4f%s",
                seed,
                k,
                sel_epochs,
                *per_k[k][:2],
                "".join(f", {n} {a:.4f}" for n, a in zip(views[k], per_k[k][2:], strict=True)),
            )
        best = max(ks, key=lambda k: (per_k[k][0], k))
        final = per_k[best]
        if sel_epochs != args.epochs:
            net = build_edge_net("mist", backbone, nc)
            final = train_eval(
                net,
                tr[best],
                tr["y"],
                mist_evals(best),
                lr=args.mist_lr,
                epochs=args.epochs,
                seed=seed,
            )
        run = {
            "seed": seed,
            "linear": {"val": lv, "test": lt},
            "mist_select": {str(k): {"val": v[0], "test": v[1]} for k, v in per_k.items()},
            "select_epochs": sel_epochs,
            "k": best,
            "mist": {"val": final[0], "test": final[1]},
            "mist_test": final[1],
        }
        if args.int8_eval:  # the fp16-trained net tested on int8 round-tripped features
            run["mist_int8_inference"] = dict(zip(views[best], final[2:], strict=True))
            run["int8_relative_error"] = int8_error
        results["runs"].append(run)
        log.info("seed %d: linear %.4f, MIST (k=%d on val) %.4f", seed, lt, best, final[1])
    lin_mean = sum(r["linear"]["test"] for r in results["runs"]) / len(results["runs"])
    mist_mean = sum(r["mist_test"] for r in results["runs"]) / len(results["runs"])
    results["mean"] = {"linear": lin_mean, "mist": mist_mean}
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text)
    log.info(
        "mean test accuracy over %d seeds: linear %.4f, MIST %.4f",
        len(args.seeds),
        lin_mean,
        mist_mean,
    )
    print(text)


if __name__ == "__main__":
    main()
