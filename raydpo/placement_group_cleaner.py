"""One placement-group cleaner per Ray session (per driver), in place of Ray Train's one per run.

Why: a Ray Train run's placement group is created by its controller actor, and Ray removes a
non-detached placement group only once both its creator actor and its job are gone. If the controller
dies ungracefully (killed, out of memory, or with its owner: a Tune trial stopped by force) while the
driver lives on, its workers' CPUs stay reserved and every later run waits at "Requesting resources".
Ray 2.60 guards against that with a detached PlacementGroupCleaner actor for every run: a new process
that imports Ray Train (~2.8 s of CPU on the 2-core machine) and asks the state API (through the
dashboard) about its controller every second, ~4.4 CPU s per run in all, and whose stop at the run's
end waits for its next poll (bench/RESULTS.md, "One placement-group cleaner per session").

`SessionCleaner` keeps that guarantee for every run of the session from one process: each run's
controller registers its placement group when its worker group starts, and unregisters it when it
shuts down (`SessionCleanerCallback`, which train/trainer.py's RunTrainer puts in place of Ray's);
once a second, the cleaner removes the placement group of any registered controller found dead. It is
owned by the driver, so it outlives every controller and Tune trial of the session, and it ends with
the driver, whose job's placement groups Ray then removes itself. Where no driver-owned cleaner can be
found (a DPOTrainer inside a user's own Ray task or Tune trainable), Ray Train's per-run cleaner stays
(`session_cleaner` returns None).

This module imports Ray and Ray Train's callback classes, not torch: the cleaner's process imports it
once per session, and each run's controller to run the callback.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import ray
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

logger = logging.getLogger(__name__)

NAME = "raydpo_placement_group_cleaner"  # in the job's namespace: one per driver
CHECK_INTERVAL_S = 1.0  # as Ray Train's PlacementGroupCleanerCallback


@ray.remote(num_cpus=0)
class SessionCleaner:
    """Removes the placement group of each registered Ray Train controller found dead."""

    def __init__(self):
        self._lock = threading.Lock()
        self._watched = {}  # controller actor id (hex) -> its worker group's PlacementGroup
        self._registered = 0  # registrations so far (tests count the runs that used this cleaner)
        self._removed = []  # placement group ids removed after their controller died
        threading.Thread(target=self._monitor, name="raydpo-placement-group-cleaner", daemon=True).start()

    def watch(self, controller_id: str, placement_group) -> None:
        """A controller's (new) worker group: after a restart, its new group replaces the old one."""
        with self._lock:
            self._watched[controller_id] = placement_group
            self._registered += 1

    def unwatch(self, controller_id: str) -> None:
        """The controller shuts down and removes its placement group itself."""
        with self._lock:
            self._watched.pop(controller_id, None)

    def status(self) -> dict:
        with self._lock:
            return {"watched": {c: pg.id.hex() for c, pg in self._watched.items()},
                    "registered": self._registered, "removed": list(self._removed)}

    def _monitor(self):
        while True:
            time.sleep(CHECK_INTERVAL_S)
            try:
                self._sweep()
            except Exception:  # never let the thread die: Ray 2.60's cleaner thread died on an RpcError
                logger.exception("raydpo's placement-group cleaner: check failed; trying again")

    def _sweep(self):
        from ray._private.state import actors
        from ray.util.placement_group import remove_placement_group

        with self._lock:
            watched = dict(self._watched)
        for controller_id, group in watched.items():
            # Asked of the GCS directly: ~0.3 ms of CPU a check, where the state API that Ray's cleaner asks
            # costs ~4 ms here and more in the dashboard, and needs a dashboard it can find.
            if actors(controller_id).get("State", "DEAD") != "DEAD":  # as Ray's cleaner: unknown counts as dead
                continue
            already_removed = ray.util.placement_group_table(group).get("state", "REMOVED") == "REMOVED"
            if not already_removed:
                logger.warning("The Ray Train controller %s is dead: removing its placement group %s, which "
                               "would otherwise hold its workers' resources until the driver exits",
                               controller_id, group.id.hex())
                remove_placement_group(group)
            with self._lock:
                if not already_removed:
                    self._removed.append(group.id.hex())
                if self._watched.get(controller_id) is group:
                    del self._watched[controller_id]


CLEANER_TIMEOUT_S = 60  # for the cleaner's answer; it answers at once unless its process is gone or stuck


class SessionCleanerCallback(ControllerCallback, WorkerGroupCallback):
    """Ray Train's PlacementGroupCleanerCallback, with the session's cleaner instead of a new actor per run
    (placement_group_cleaner.py says why). Runs in the controller: registers each worker group's placement
    group with the cleaner, and unregisters it when the controller shuts down or aborts."""

    def __init__(self, cleaner):
        self._cleaner = cleaner
        self._controller_id = None

    def after_controller_start(self, train_run_context):
        self._controller_id = ray.get_runtime_context().get_actor_id()

    def after_worker_group_start(self, worker_group):
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        self._call("watch", group)

    async def before_controller_shutdown(self):
        self._call("unwatch")

    def before_controller_abort(self):
        self._call("unwatch")

    def _call(self, method: str, *args):
        try:
            ray.get(getattr(self._cleaner, method).remote(self._controller_id, *args), timeout=CLEANER_TIMEOUT_S)
        except Exception as error:  # as Ray's callback: the run goes on, without the safety net
            logger.warning(
                "raydpo's placement-group cleaner did not answer %s (%s): if this run's controller dies "
                "ungracefully, its placement group stays until the driver exits", method, error)


def session_cleaner() -> Optional["ray.actor.ActorHandle"]:
    """The session's cleaner (cluster.driver_actor), or None where no driver made one: then Ray Train's
    per-run cleaner stays."""
    from raydpo.cluster import driver_actor

    return driver_actor(SessionCleaner, NAME)
