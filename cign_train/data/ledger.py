"""The download ledger of a clips folder and the summary a user acts on.

``download.jsonl`` holds one JSON record per listed row: ``id``, ``youtube_id``, ``start``,
``label``, ``path``, ``status`` (a key of :data:`cign_train.data.download.STATUSES`), ``attempts``
(over all runs), ``bytes`` and ``length`` (s) of the clip, ``seconds`` spent on the row in its last
run, ``message`` (yt-dlp's or ffmpeg's words for a failure) and ``time`` (UTC). Records are appended
as outcomes arrive; every run starts and ends by rewriting the file with one record per row.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter
from pathlib import Path

from cign_train.data import definitions as defs
from cign_train.data.download import LEDGER, SEGMENT_SECONDS, STATUSES, TEMP_PREFIX, Row


class Ledger:
    """The latest record of every row fetched into a clips folder."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LEDGER
        self.records: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a line torn by a kill
                    record = json.loads(line)
                    self.records[record["id"]] = record
            self.compact()

    def add(self, record: dict) -> None:
        """Record a row's outcome, adding up its attempts over runs."""
        record = {**record, "attempts": record["attempts"] + self.records.get(record["id"], {}).get("attempts", 0)}
        self.records[record["id"]] = record
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def compact(self) -> None:
        """Rewrite the file with one record per row, atomically."""
        temp = self.path.with_name(TEMP_PREFIX + LEDGER)
        temp.write_text("".join(json.dumps(r) + "\n" for r in self.records.values()), encoding="utf-8")
        os.replace(temp, self.path)

    def status(self, row: Row) -> str | None:
        """The row's status; None when it has none yet or its clip has gone."""
        status = self.records.get(row.id, {}).get("status")
        return None if status == "ok" and not Path(row.path).is_file() else status

    def pending(self, rows: list[Row], retry_failed: bool = False) -> list[Row]:
        """The rows a run fetches: all but the clips in place and, unless ``retry_failed``, the rows that
        failed for good."""
        def done(status: str | None) -> bool:
            return status == "ok" or (status in STATUSES and STATUSES[status].permanent and not retry_failed)
        return [row for row in rows if not done(self.status(row))]


def class_floor() -> int:
    """Clips a class needs for the paper's protocol: its rehearsal exemplars (50 per old class, Sec.
    4.1) are drawn from the class's train split, which holds SPLIT_RATIOS[0] of its clips."""
    from cign_train.settings import PRESETS  # imports torch: only the summary needs it

    return math.ceil(PRESETS["paper"]["buffer_per_class"] / defs.SPLIT_RATIOS[0])


def human_size(n: float) -> str:
    power, unit = next((p, unit) for p, unit in ((9, "GB"), (6, "MB"), (3, "kB"), (0, "B")) if n >= 10 ** p or not p)
    return f"{n / 10 ** power:.1f} {unit}"


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min {rest % 60} s" if rest >= 60 else f"{rest} s"


def summary(rows: list[Row], ledger: Ledger, floor: int, run_seconds: float | None = None) -> str:
    """Per class: listed / downloaded / failed / not yet tried, with the reasons; then the totals, the
    fraction obtained and the classes below ``floor`` clips."""
    statuses = [ledger.status(row) or "pending" for row in rows]  # one look at each clip on disk
    counts: dict[str, Counter] = {}
    for row, status in zip(rows, statuses):
        counts.setdefault(row.label, Counter())[status] += 1
    width = max([len("class"), *map(len, counts)])
    lines = [f"{'class':<{width}}  listed      ok  failed  pending  failed by reason"]
    for label, c in counts.items():
        listed, failed = sum(c.values()), sum(n for s, n in c.items() if s not in ("ok", "pending"))
        reasons = ", ".join(f"{s} {n}" for s, n in c.most_common() if s not in ("ok", "pending"))
        lines.append(f"{label:<{width}}  {listed:>6}  {c['ok']:>6}  {failed:>6}  {c['pending']:>7}  {reasons}")
    total = sum(counts.values(), Counter())
    ok = [ledger.records[row.id] for row, status in zip(rows, statuses) if status == "ok"]
    share = f" ({100 * len(ok) / len(rows):.1f} %)" if rows else ""
    lines.append(f"obtained {len(ok)} of {len(rows)} listed segments{share}: VGGSound's videos disappear from "
                 "YouTube over time (removed, made private, blocked), so every copy lacks some rows, later ones more")
    failures = [(s, n) for s, n in total.most_common() if s not in ("ok", "pending")]
    if failures:
        lines.append("failed: " + ", ".join(
            f"{s} {n} ({'for good' if STATUSES.get(s, STATUSES['error']).permanent else 'a rerun tries again'})"
            for s, n in failures))
    if total["pending"]:
        lines.append(f"not tried yet: {total['pending']}")
    short = sum(r["length"] < SEGMENT_SECONDS - 0.5 for r in ok)
    spent = f"; {_duration(sum(r['seconds'] for r in ok))} spent on them, all jobs together"
    this_run = f", this run took {_duration(run_seconds)}" if run_seconds is not None else ""
    lines.append(f"clips obtained: {len(ok)}, {human_size(sum(r['bytes'] for r in ok))}, {short} shorter than "
                 f"{SEGMENT_SECONDS:g} s (their video ends sooner){spent}{this_run}")
    low = sorted((c["ok"], label) for label, c in counts.items() if c["ok"] < floor)
    if low:
        named = ", ".join(f"{label} ({n})" for n, label in low[:10]) + (f" and {len(low) - 10} more" if low[10:] else "")
        lines.append(f"WARNING: {len(low)} of {len(counts)} classes have fewer than {floor} clips, the paper's "
                     f"protocol's need (rehearsal exemplars from the train split): {named}")
    return "\n".join(lines)
