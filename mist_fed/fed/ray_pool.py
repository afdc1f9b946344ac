"""Replace a Flower simulation actor whose Ray worker died, so one crash fails one device.

Flower's ``BasicActorPool`` (flwr 1.x) puts the actor of a failed job back into its pool even
when the actor's worker process is gone, so after one worker dies (a segfault, the OOM
killer, ``os._exit``) every later job sent to that actor fails with ``ActorDiedError`` and the
rest of the run is lost. :func:`install` wraps the pool's result fetch once, in the driver: on
``RayActorError`` the dead actor is swapped for a fresh one before Flower returns it to the
pool, and the error still reaches Flower, which replies to that one device with an error
Message (recorded as ``failed`` by the ServerApp). On a Flower without that pool it only
logs that the guard is off.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

_MARK = "_mist_fed_replaces_dead_actors"


def install() -> bool:
    """Patch Flower's actor pool (idempotent); ``False`` when this Flower has no such pool."""
    try:
        import ray
        from flwr.simulation.ray_transport.ray_actor import BasicActorPool
    except ImportError:  # pragma: no cover - depends on the installed Flower
        log.warning("Flower's BasicActorPool not found: a dead Ray worker fails later devices too")
        return False
    original = BasicActorPool.fetch_result_and_return_actor_to_pool
    if getattr(original, _MARK, False):
        return True
    if not hasattr(BasicActorPool, "_future_to_actor") and "_future_to_actor" not in (
        BasicActorPool.__init__.__code__.co_names
    ):
        log.warning("Flower's actor pool changed: a dead Ray worker fails later devices too")
        return False

    def fetch(self: Any, future: Any) -> Any:
        try:
            return original(self, future)
        except ray.exceptions.RayActorError:
            # Flower adds the future's actor back to the pool after this error: make it a live one.
            if future in self._future_to_actor:
                self._future_to_actor[future] = self.create_actor_fn()
                log.warning("a Ray worker of the simulation died; its actor was replaced")
            raise

    setattr(fetch, _MARK, True)
    BasicActorPool.fetch_result_and_return_actor_to_pool = fetch  # type: ignore[method-assign]
    return True
