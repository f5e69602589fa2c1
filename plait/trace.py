"""One timeline format for measured and simulated runs.

A :class:`Timeline` is a list of :class:`Event` (rank, name, kind, start, end in seconds). The
pipeline runtime records one for every action it executes; the planner's simulator produces the
same from its cost model. Either can be written as Chrome trace-event JSON (opens in Perfetto,
one track per rank) or drawn as a Gantt chart, and either gives the bubble (idle) fraction.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Event", "Timeline"]

# Colours by action kind, shared by every picture plait draws.
KIND_COLOURS = {
    "F": "#4C72B0",
    "B": "#DD8452",
    "W": "#55A868",
    "BW": "#C44E52",
    "SEND_ACT": "#8172B3",
    "RECV_ACT": "#937860",
    "SEND_GRAD": "#DA8BC3",
    "RECV_GRAD": "#8C8C8C",
    "comm": "#CCB974",
    "optimizer": "#64B5CD",
}
COMPUTE_KINDS = frozenset({"F", "B", "W", "BW"})


@dataclass(frozen=True)
class Event:
    """One interval on one rank's track."""

    rank: int
    name: str
    kind: str
    start: float
    end: float
    stage: int | None = None
    microbatch: int | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Timeline:
    """Events of one step (or several) over ``num_ranks`` tracks.

    Example::

        tl = Timeline(2, [Event(0, "F0.0", "F", 0.0, 1.0), Event(1, "F1.0", "F", 1.0, 2.0)])
        tl.bubble_fraction()  # 0.5: each rank computes half of the span
        tl.write_chrome_trace("step.json"); tl.draw("step.png")
    """

    num_ranks: int
    events: list[Event] = field(default_factory=list)
    source: str = "measured"

    def add(self, event: Event) -> None:
        self.events.append(event)

    @property
    def start(self) -> float:
        return min((e.start for e in self.events), default=0.0)

    @property
    def end(self) -> float:
        return max((e.end for e in self.events), default=0.0)

    @property
    def span(self) -> float:
        return self.end - self.start

    def busy(self, rank: int, kinds: frozenset[str] = COMPUTE_KINDS) -> float:
        """Seconds ``rank`` spent in actions of ``kinds`` (overlaps merged)."""
        spans = sorted((e.start, e.end) for e in self.events if e.rank == rank and e.kind in kinds)
        total, cur_s, cur_e = 0.0, None, None
        for s, e in spans:
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    total += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            total += cur_e - cur_s
        return total

    def bubble_fraction(self, kinds: frozenset[str] = COMPUTE_KINDS) -> float:
        """Share of rank-time not spent computing, over the whole span: ``1 - busy / (p * span)``."""
        if not self.events or self.span <= 0:
            return 0.0
        busy = sum(self.busy(r, kinds) for r in range(self.num_ranks))
        return 1.0 - busy / (self.num_ranks * self.span)

    def schedule_costs(self) -> tuple[float, float, float]:
        """Relative ``(F, B, W)`` durations measured here, for ``build_schedule(costs=...)``.

        Medians over the timeline's F, B and W actions, scaled so that F = 1: the costs the
        zero-bubble generators order by (``plait train --schedule-costs``). Needs a schedule that
        splits the backward (zb-h1, zb-v, ...); a timeline without B and W raises ValueError.

        Example::

            rt.train_step(x, y)   # a zb-v step, say
            build_schedule("zb-v", 2, 8, 2, costs=rt.gather_timeline().schedule_costs())
        """
        med = {}
        for kind in ("F", "B", "W"):
            d = [e.duration for e in self.events if e.kind == kind]
            if not d:
                kinds = sorted({e.kind for e in self.events} & COMPUTE_KINDS)
                raise ValueError(
                    f"no {kind} actions in this timeline (it has {kinds}); measure a schedule "
                    f"that splits the backward into B and W, such as zb-h1 or zb-v"
                )
            med[kind] = statistics.median(d)
        if med["F"] <= 0:
            raise ValueError("the forward actions of this timeline took no time")
        return (1.0, med["B"] / med["F"], med["W"] / med["F"])

    def shifted(self, offset: float) -> Timeline:
        return Timeline(
            self.num_ranks,
            [
                Event(**{**asdict(e), "start": e.start + offset, "end": e.end + offset})
                for e in self.events
            ],
            self.source,
        )

    # Chrome trace-event format (Perfetto opens it): one process per rank, complete events "X".
    def to_chrome_trace(self) -> dict:
        t0 = self.start
        out = []
        for r in range(self.num_ranks):
            out.append(
                {
                    "name": "process_name",
                    "ph": "M",
                    "pid": r,
                    "tid": 0,
                    "args": {"name": f"rank {r}"},
                }
            )
        for e in self.events:
            args = {
                k: v for k, v in (("stage", e.stage), ("microbatch", e.microbatch)) if v is not None
            }
            out.append(
                {
                    "name": e.name,
                    "cat": e.kind,
                    "ph": "X",
                    "pid": e.rank,
                    "tid": 0,
                    "ts": (e.start - t0) * 1e6,
                    "dur": e.duration * 1e6,
                    "args": args,
                }
            )
        return {
            "traceEvents": out,
            "displayTimeUnit": "ms",
            "otherData": {"source": self.source, "bubble_fraction": self.bubble_fraction()},
        }

    def write_chrome_trace(self, path: str | os.PathLike) -> Path:
        """Write the Chrome trace JSON atomically; returns the path."""
        return _atomic_write_text(Path(path), json.dumps(self.to_chrome_trace()))

    def draw(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Draw a Gantt chart, one row per rank; white space is the bubble."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        t0, scale = self.start, 1e3
        fig, ax = plt.subplots(figsize=(11, 0.6 * self.num_ranks + 1.4))
        for e in self.events:
            colour = KIND_COLOURS.get(e.kind, "#999999")
            height = 0.8 if e.kind in COMPUTE_KINDS else 0.3
            ax.broken_barh(
                [((e.start - t0) * scale, e.duration * scale)],
                (e.rank - height / 2, height),
                facecolors=colour,
                edgecolor="white",
                linewidth=0.3,
            )
            if e.kind in COMPUTE_KINDS and e.microbatch is not None and self.num_ranks <= 16:
                ax.text(
                    (e.start - t0 + e.duration / 2) * scale,
                    e.rank,
                    str(e.microbatch),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white",
                )
        ax.set_yticks(range(self.num_ranks), [f"rank {r}" for r in range(self.num_ranks)])
        ax.invert_yaxis()
        ax.set_xlabel("time (ms)")
        present = {e.kind for e in self.events}
        kinds = [k for k in KIND_COLOURS if k in present] + sorted(present - set(KIND_COLOURS))
        fig.legend(
            handles=[Patch(color=KIND_COLOURS.get(k, "#999999"), label=k) for k in kinds],
            loc="lower center",
            ncol=min(len(kinds), 8),
            frameon=False,
            fontsize=7,
        )
        ax.set_title(title or f"{self.source} timeline — bubble {self.bubble_fraction():.1%}")
        # Keep a strip at the bottom for the legend, below the time axis.
        fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        os.replace(tmp, path)
        return path


def _atomic_write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
