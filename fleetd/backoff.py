"""Restart decisions: capped exponential backoff, reset after a stable run, crash-loop detection.

Pure logic over timestamps (monotonic seconds), testable without QEMU.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fleetd.policy import RestartPolicy


@dataclass
class RestartTracker:
    """Failure history of one replica under a :class:`RestartPolicy`."""

    policy: RestartPolicy
    failures: deque[float] = field(default_factory=deque)
    consecutive: int = 0

    def wants_restart(self, *, failed: bool) -> bool:
        """Whether the policy restarts a guest that ended (``failed`` or completed)."""
        p = self.policy.policy
        return p == "always" or (p == "on-failure" and failed)

    def record_failure(self, now: float, ran_for: float | None) -> None:
        """Count a failure; a run that lasted ``stable_after`` resets the backoff first."""
        if ran_for is not None and ran_for >= self.policy.stable_after:
            self.consecutive = 0
        self.consecutive += 1
        self.failures.append(now)
        horizon = now - self.policy.crash_loop_window
        while self.failures and self.failures[0] < horizon:
            self.failures.popleft()

    def record_success(self) -> None:
        self.consecutive = 0

    def crash_loop(self) -> bool:
        """True when ``crash_loop_failures`` failures fell within ``crash_loop_window``."""
        return len(self.failures) >= self.policy.crash_loop_failures

    def delay(self) -> float:
        """Seconds to wait before the next restart: initial * factor^(n-1), capped."""
        if self.consecutive <= 0:
            return 0.0
        p = self.policy
        d = p.backoff_initial * (p.backoff_factor ** (self.consecutive - 1))
        return min(d, p.backoff_max)

    def describe_loop(self) -> str:
        p = self.policy
        return (f"crash loop: {len(self.failures)} failures within {p.crash_loop_window:g}s "
                f"(limit {p.crash_loop_failures})")
