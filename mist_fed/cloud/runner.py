"""A feature server in a background thread: ``running_cloud`` (tests, simulations) and
``in_background`` (also ``mist-fed cloud serve``, whose main thread stays free for signals)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from mist_fed.cloud.backbone import Backbone
from mist_fed.cloud.config import ServeConfig
from mist_fed.cloud.server import FeatureServer

log = logging.getLogger(__name__)


@contextmanager
def running_cloud(
    config: ServeConfig | None = None,
    backbone: Backbone | None = None,
    server_cls: type[FeatureServer] = FeatureServer,
) -> Iterator[str]:
    """Serve on ``config.host`` (port 0 picks a free one) until the block exits; yields the location.

    ``backbone`` reuses an already built backbone (it must match ``config``'s); ``server_cls``
    lets tests inject faults.
    """
    config = config or ServeConfig(port=0)
    server = server_cls(config, backbone=backbone)
    scheme = "grpc+tls" if config.tls else "grpc+tcp"
    location = f"{scheme}://{config.host}:{server.port}"
    with in_background(server):
        yield location
    log.debug("feature server at %s stopped", location)


@contextmanager
def in_background(server: FeatureServer) -> Iterator[threading.Thread]:
    """Block on ``server`` in a daemon thread until the block exits, then shut it down once.

    The server serves from construction on; ``wait`` only blocks until shutdown. Not
    ``serve``: that installs Arrow's own SIGINT/SIGTERM handlers, process-wide, so Ctrl-C
    would stop the server and never reach the main thread as KeyboardInterrupt.
    """
    thread = threading.Thread(target=server.wait, name="mist-fed-cloud", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        server.shutdown()
        thread.join(timeout=10)
