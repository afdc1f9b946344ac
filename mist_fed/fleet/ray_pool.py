"""Two repairs of Flower's Ray actor pool (flwr 1.x ``BasicActorPool``), patched in the driver.

* A dead worker fails one device, not the rest of the run. The pool puts the actor of a
  failed job back even when its worker process is gone, so after one worker dies (a segfault,
  the OOM killer, ``os._exit``) every later job sent to that actor fails with
  ``ActorDiedError``. On ``RayActorError`` the dead actor is swapped for a fresh one before
  Flower returns it to the pool; the error still reaches Flower, which replies to that one
  device with an error Message (recorded as ``failed`` by the ServerApp).
* Stopping does not wait on busy devices. Flower ends a run (normally, on an error, or on
  Ctrl-C) by terminating the idle actors and calling ``ray.shutdown()``; a Flower thread still
  in ``ray.get`` on a busy actor's job then blocks forever, and the interpreter cannot exit.
  Termination first kills the busy actors and waits (bounded) until their jobs resolve, so
  those threads get ``RayActorError`` and end.

On a Flower without that pool :func:`install` only logs that the guards are off.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

_MARK = "_mist_fed_replaces_dead_actors"
_TERMINATING = "_mist_fed_terminating"
KILL_WAIT_S = 10.0  # bound on waiting for killed actors' jobs to resolve


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
    original_terminate = BasicActorPool.terminate_all_actors

    def fetch(self: Any, future: Any) -> Any:
        try:
            return original(self, future)
        except ray.exceptions.RayActorError:
            # Flower adds the future's actor back to the pool after this error: make it a live
            # one, unless the run is ending (then the pool is done and Ray about to stop).
            if future in self._future_to_actor and not getattr(self, _TERMINATING, False):
                self._future_to_actor[future] = self.create_actor_fn()
                log.warning("a Ray worker of the simulation died; its actor was replaced")
            raise

    def terminate(self: Any) -> None:
        setattr(self, _TERMINATING, True)
        busy = dict(self._future_to_actor)
        if busy:
            log.info("stopping %d device job(s) still running", len(busy))
            # Flower's threads log each killed job as an error with its traceback: noise here,
            # since whatever ended the run early was already reported.
            logging.getLogger("flwr").setLevel(logging.CRITICAL)
            for actor in busy.values():
                ray.kill(actor, no_restart=True)
            ray.wait(list(busy), num_returns=len(busy), timeout=KILL_WAIT_S)
        original_terminate(self)

    setattr(fetch, _MARK, True)
    BasicActorPool.fetch_result_and_return_actor_to_pool = fetch  # type: ignore[method-assign]
    BasicActorPool.terminate_all_actors = terminate  # type: ignore[method-assign]
    return True
