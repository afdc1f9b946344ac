"""The cloud's side of the method: the frozen timm backbone, the gather functions, weight loading.

Built-in backbones that need more than a timm name (``dinov2_s14_imgfocus``) register on first
use of the backbone registry, so importing a sibling module does not import them.
"""
