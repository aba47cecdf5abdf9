"""Hot swap: a running ``cign-live`` takes up a newer version of its export between two predictions.

``cign_runtime.enroll`` writes each new version of a tokens-as-input export as a sibling folder
``<base>.r<N>``, renamed into place complete. A :class:`Watcher` thread polls the parent folder
(every ``interval`` s, and at once on :meth:`Watcher.poke`, which ``cign-live`` calls on SIGHUP) for
a revision above the running one. Off the live loop it loads the newest such version's manifest with
every hash verified and builds its model (``Model.version``: the running onnxruntime session when the
graph is byte-identical, else a runner of its own); the loop takes it between two predictions
(:meth:`Watcher.take`) by replacing one reference, so no prediction waits on hashing or loading. A
version that cannot take the running model's place (a hash mismatch, no token-table input, no
artefact of the running precision, another spec) is refused with the reason and skipped until its
files change; the running model keeps going.

:func:`enrol` is ``cign-live --enroll``: a guided capture from the running sources, then
``enroll.enroll`` on the running version, on a thread of its own; the watcher swaps the result in.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cign_runtime import enroll as en
from cign_runtime import manifest as mf
from cign_runtime.backends import Model

log = logging.getLogger("cign_runtime")


@dataclass
class Update:
    """A newer version the watcher prepared (``model`` set) or refused (``reason`` set)."""

    revision: int
    path: Path
    model: Model | None = None
    reason: str = ""
    prepare_ms: float = 0.0  # verifying and loading it, on the watcher thread
    session: str = ""  # "kept": served by the running session; "new": a runner of its own

    def record(self) -> dict:
        """Its fields in the latency log and the event lines."""
        if self.model is None:
            return {"revision": self.revision, "path": str(self.path), "reason": self.reason}
        return {"revision": self.revision, "path": str(self.path), "task": self.model.task,
                "classes": self.model.classes, "session": self.session, "prepare_ms": round(self.prepare_ms, 1)}


def fingerprint(folder: Path) -> tuple:
    """(name, size, mtime) of every file in ``folder`` (empty when it is gone): a refused version is tried
    again once it changes."""
    found = []
    try:
        for p in folder.iterdir():
            stat = p.stat()
            found.append((p.name, stat.st_size, stat.st_mtime_ns))
    except FileNotFoundError:
        return ()
    return tuple(sorted(found))


class Watcher:
    """Prepares newer versions of ``model``'s lineage on a thread; the live loop swaps them in with :meth:`take`.

    ``task``: the token table every version runs (``--task``), or None for each version's newest.
    ``emit``: called with an event dict per swap (``swap``) and refusal (``swap_refused``)."""

    def __init__(self, model: Model, task: int | None = None, interval: float = 0.5,
                 emit: Callable[[dict], None] = lambda event: None):
        self.model, self.task, self.interval, self.emit = model, task, interval, emit
        self._lock = threading.Lock()
        self._ready: Update | None = None  # one at a time: the loop takes it before the next is prepared
        self._refused: list[Update] = []
        self._retired: list[Model] = []  # replaced models whose runner is theirs alone, closed here
        self._skip: dict[Path, tuple] = {}  # refused version -> its fingerprint when refused
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="swap-watcher", daemon=True)

    def start(self) -> "Watcher":
        self._thread.start()
        return self

    def poke(self) -> None:
        """Look now (SIGHUP, or an enrolment that just wrote a version)."""
        self._wake.set()

    def stop(self) -> None:
        """End the thread; close replaced runners and a prepared version the loop never took."""
        self._stop.set()
        self._wake.set()
        self._thread.join()
        with self._lock:
            if self._ready is not None and self._ready.model.runner is not self.model.runner:
                self._retired.append(self._ready.model)
            self._ready = None
        self._close_retired()

    def take(self) -> list[Update]:
        """For the loop, between predictions: the refusals since the last call, then the prepared version if any,
        whose model is the running one from now on (the replaced runner, unless shared, is closed off the loop)."""
        with self._lock:
            updates, self._refused = self._refused, []
            if self._ready is not None:
                update, self._ready = self._ready, None
                if update.model.runner is not self.model.runner:
                    self._retired.append(self.model)
                self.model = update.model
                updates.append(update)
        if updates and updates[-1].model is not None:
            update = updates[-1]
            log.info("now running revision %d (%s): %d classes, %s session", update.revision, update.path,
                     len(update.model.classes), update.session)
            self.emit({"event": "swap", **update.record()})
            self._wake.set()  # close the replaced runner, look for a newer version
        return updates

    def _run(self) -> None:
        while True:
            self._wake.clear()
            if self._stop.is_set():
                return
            self._close_retired()
            if self._ready is None:
                self._look()
            self._wake.wait(self.interval)

    def _close_retired(self) -> None:
        with self._lock:
            retired, self._retired = self._retired, []
        for model in retired:
            model.close()

    def _look(self) -> None:
        """Prepare the newest version above the running one that is not refused; refuse those that fail."""
        running = self.model
        _, current = en.lineage(running.root)
        for revision, path in reversed(en.revisions(running.root)):
            if revision <= current:
                return
            seen = fingerprint(path)
            if self._skip.get(path) == seen:
                continue
            update = self._prepare(running, revision, path)
            with self._lock:
                if update.model is not None:
                    self._ready = update
                    return
                self._refused.append(update)
            self._skip[path] = seen
            log.warning("revision %d refused, still running %s: %s", revision, running.root, update.reason)
            self.emit({"event": "swap_refused", **update.record()})

    def _prepare(self, running: Model, revision: int, path: Path) -> Update:
        started = time.perf_counter()
        try:
            model = running.version(path, mf.Manifest.load(path), self.task)  # load verifies every sha256
        except Exception as e:  # refused with the reason (onnxruntime raises types of its own); the loop goes on
            reason = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
            return Update(revision, path, reason=reason)
        return Update(revision, path, model, prepare_ms=(time.perf_counter() - started) * 1e3,
                      session="kept" if model.runner is running.runner else "new")


def enrol(live, watcher: Watcher, name: str, shots: int, countdown: float, emit: Callable[[dict], None],
          opt: en.FitOptions = en.FitOptions()) -> threading.Thread:
    """``cign-live --enroll``: on a started thread, capture ``shots`` from ``live``'s running sources (the loop
    keeps predicting), enrol ``name`` into the version running then, and poke ``watcher`` to swap it in.

    Every capture event goes to ``emit``; so does the outcome (``fitting``, ``enrolled`` or ``enroll_failed``
    with the reason, also logged): a failure ends the enrolment, not the loop. ``live.stop()`` abandons the
    capture."""

    def run() -> None:
        try:
            taken = en.capture_shots(live.video, live.audio, live.model.spec, shots, countdown, emit,
                                     stopped=live.stopped)
            emit({"event": "fitting", "name": name, "shots": len(taken)})
            out, record = en.enroll(live.model.root, name, taken, opt)
        except Exception as e:  # reported; the live loop keeps predicting with the running model
            reason = str(e) if isinstance(e, (en.EnrollError, OSError)) else f"{type(e).__name__}: {e}"
            log.warning("enrolment of %r failed: %s", name, reason)
            emit({"event": "enroll_failed", "name": name, "reason": reason})
            return
        log.info("enrolled %r from %d shots in %.1f s: %s", name, record["shots"], record["seconds"], out)
        emit({"event": "enrolled", "name": name, "path": str(out), "shots": record["shots"],
              "seconds": record["seconds"], "checks": record["checks"]})
        watcher.poke()

    thread = threading.Thread(target=run, name="enrol")
    thread.start()
    return thread
