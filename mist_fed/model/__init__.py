"""The method in pure torch, no I/O beyond loading weights: backbone, gather, edge networks, cost."""

from mist_fed.model import imgfocus as _imgfocus  # noqa: F401  (registers dinov2_s14_imgfocus)
