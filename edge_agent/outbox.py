"""A durable local outbox: reports wait here until MLflow has taken them.

Every report (a measurement or a failure) is written here *before* it is sent, so neither a
dropped server nor a killed agent loses it; it is removed only after the server accepted all of
it. Files are written to a temp name, fsynced and renamed: a half-written file never carries the
``.json`` name, and leftovers of an interrupted write (``*.partial``) are ignored.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_agent.fileio import atomic_write_bytes


@dataclass(frozen=True)
class Report:
    """What the agent owes the server for one (model version, device) pair."""

    result_id: str  # unique per measurement: names it in the run's measurement artifact
    model_name: str
    version: str
    run_id: str
    device: str
    status: str  # contract.DONE or contract.FAILED
    timestamp_ms: int  # every metric is logged at this time: a retry finds what already landed
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # contract.REPORT_TAGS only
    error: str = ""
    agent_id: str = ""  # the agent that measured
    # the rest of what was measured (Measurement.to_json: windows, image count, device info,
    # library versions, rails) and the protocol's settings: the run's JSON artifact, not tags
    measurement: dict[str, object] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.model_name}-v{self.version}-{self.device}"


class Outbox:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def put(self, report: Report) -> Path:
        """Store a report durably (atomic write); a second put for the same key replaces it."""
        path = self._path(report.key)
        atomic_write_bytes(path, json.dumps(asdict(report), indent=1, sort_keys=True).encode())
        return path

    def pending(self) -> list[Report]:
        """Reports not yet delivered, oldest first. An unreadable file is skipped, not deleted."""
        out = []
        for path in sorted(self.root.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                out.append(Report(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return out

    def has(self, model_name: str, version: str, device: str) -> bool:
        return self._path(f"{model_name}-v{version}-{device}").is_file()

    def done(self, report: Report) -> None:
        self._path(report.key).unlink(missing_ok=True)
