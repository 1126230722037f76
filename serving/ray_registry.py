"""The variants' targets under `engine = "ray"`: which artifact every replica of a variant should hold.

One replica (no CPU reserved) of a small Serve deployment in the application. A target is the
configured artifact until a reload rolls another one out: the ingress replica that rolls it
claims the variant (`claim`), broadcasts the artifact to the model replicas, and settles the
roll (`settle`: the new target, or the previous one restored). Model replicas that start later
(a replacement after a crash, a scale-up) load the target; ingress replicas follow targets that
are settled (`state` "ready"). The state lives in this replica's memory: if it is lost, the
registry starts again from the configured artifacts with versions unknown, and the first ingress
replica to notice tells it what it serves (`adopt`).
"""

from __future__ import annotations

import time

from ray import serve

# A roll not settled this long after its claim is taken to be abandoned (its ingress replica died):
# another claim may take over. Longer than any roll: loading an artifact takes minutes at most.
STALE_ROLL_S = 900.0


class RollRefused(RuntimeError):
    """Another ingress replica is rolling this variant out; the reload is refused (retry after it)."""


@serve.deployment(ray_actor_options={"num_cpus": 0})
class VariantRegistry:
    """Targets by variant: {"path", "version" (None until an ingress replica loaded it), "state"
    ("ready" or "rolling"), "owner" (the rolling ingress replica), "since"}."""

    def __init__(self, paths: dict[str, str]):
        self._targets = {name: _target(path, None) for name, path in paths.items()}
        self._previous: dict[str, dict] = {}

    def targets(self) -> dict[str, dict]:
        return {name: dict(target) for name, target in self._targets.items()}

    def adopt(self, name: str, path: str, version: str) -> dict:
        """Record the version of a target that has none yet (first load, or after losing the
        registry's state); returns the target now in force, which may be another one."""
        target = self._targets[name]
        if target["version"] is None and target["state"] == "ready":
            self._targets[name] = _target(path, version)
        return dict(self._targets[name])

    def claim(self, name: str, path: str, version: str, owner: str) -> dict:
        """Start rolling `path` out: it becomes the target (model replicas that start now load
        it) while its roll is unsettled. Returns the previous target.

        Raises:
            RollRefused: another ingress replica's roll of this variant is in progress.
        """
        target = self._targets[name]
        if (
            target["state"] == "rolling"
            and target["owner"] != owner
            and time.time() - target["since"] < STALE_ROLL_S
        ):
            raise RollRefused(
                f"variant {name!r} is being rolled out to {target['path']} by another ingress "
                "replica; retry when that reload has finished"
            )
        previous = self._previous.get(name, target) if target["state"] == "rolling" else target
        self._previous[name] = previous
        self._targets[name] = {**_target(path, version), "state": "rolling", "owner": owner}
        return dict(previous)

    def settle(self, name: str, owner: str, rolled: bool) -> dict:
        """End a roll: the claimed target stays (rolled) or the previous one is restored."""
        target = self._targets[name]
        if target["state"] != "rolling" or target["owner"] != owner:
            return dict(target)  # taken over after it went stale: the newer claim decides
        previous = self._previous.pop(name)
        self._targets[name] = _target(target["path"], target["version"]) if rolled else previous
        return dict(self._targets[name])


def _target(path: str, version: str | None) -> dict:
    return {"path": path, "version": version, "state": "ready", "owner": None, "since": time.time()}
