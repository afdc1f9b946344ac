"""The method's pure parts, importable on an edge device: specs, geometry, edge nets, methods, cost.

Nothing here imports timm, torchvision, flwr, pandas or matplotlib; :mod:`mist_fed.core.specs`
imports not even torch. The cloud-side backbone and gather functions live in
:mod:`mist_fed.cloud` (backbone.py, gather.py).
"""
