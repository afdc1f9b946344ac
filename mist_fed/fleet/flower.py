"""What the fleet needs from Flower beyond its public API, kept in one place.

* :func:`local_identity`: Flower 1.42 builds every instruction ``Message`` (including those a
  strategy's ``configure_train`` returns) from the identity of the run the process belongs
  to, which only Flower's runtimes set. The in-process plain loop (the overhead benchmark's
  baseline, and tests without Ray) runs Flower's strategies outside any runtime, so for its
  duration it gives the process a run identity, as a runtime would, and restores it after.
  ``tests/test_flower_workarounds.py`` fails the day a Message can be built without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from flwr.supercore.task_identity import TaskIdentity

LOCAL_RUN_ID = 0
LOCAL_NODE_ID = 0  # the plain loop's "SuperLink"


def in_runtime() -> bool:
    """Whether this process has a Flower run identity (a runtime set it, or we did)."""
    try:
        TaskIdentity.run_id  # noqa: B018  (reading raises when unset)
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def local_identity() -> Iterator[None]:
    """A run identity for strategies driven outside Flower's runtimes (none if one is set)."""
    if in_runtime():
        yield
        return
    TaskIdentity.run_id = LOCAL_RUN_ID
    TaskIdentity.node_id = LOCAL_NODE_ID
    TaskIdentity.task_id = LOCAL_RUN_ID
    try:
        yield
    finally:
        # Back to "unset" through the same public setters (they take any value).
        TaskIdentity.run_id = None  # type: ignore[assignment]
        TaskIdentity.node_id = None  # type: ignore[assignment]
        TaskIdentity.task_id = None  # type: ignore[assignment]
