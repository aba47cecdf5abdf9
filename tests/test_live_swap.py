"""Hot swap in a running cign-live on a tokens-as-input export of the tiny trained run: a new version written
beside it is taken up between two predictions (no restart, no gap), a tampered one is refused by hash while
the old model keeps predicting, a changed graph gets a session of its own, and ``--enroll`` learns a new
sound from the running stream camera and PulseAudio microphone, then names it. The cign-live processes
run where torch cannot be imported."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from cign_export.exporter import Exporter, ExportOptions
from cign_runtime import enroll as en
from cign_runtime import latency
from cign_runtime import manifest as mf
from cign_runtime.backends import open_model
from cign_runtime.swap import Watcher
from media import Streamer, free_udp_port, gradient_frame, tone
from pulse import play

HOP = 0.5  # the 8 fps test clips make a prediction wait up to 0.1 s for its frame: gaps are judged against this


@pytest.fixture(scope="module")
def export(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("swap") / "export"
    Exporter(tiny_run, 1, out, ExportOptions(tokens_as_input=True, parity_samples=4))()
    return out


@pytest.fixture
def model_dir(export, tmp_path) -> Path:
    """A copy of the export in a folder of its own, where its versions appear."""
    return Path(shutil.copytree(export, tmp_path / "models" / "tiny"))


@pytest.fixture(scope="module")
def clip(tiny_avdigits) -> Path:
    rows = [r.split(",") for r in (tiny_avdigits / "avdigits" / "avdigits.csv").read_text().splitlines()]
    r = next(r for r in rows if r[3] == "test")
    return tiny_avdigits / "avdigits" / "clips" / f"{r[0]}_{int(r[1]):06d}.mp4"


class LiveProcess:
    """cign-live in a subprocess, its stdout JSON lines collected by a thread as they come."""

    def __init__(self, *args, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-m", "cign_runtime.cli", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[dict] = []
        self.err = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    @property
    def predictions(self) -> list[dict]:
        return [x for x in self.lines if "index" in x]

    def events(self, kind: str) -> list[dict]:
        return [x for x in self.lines if x.get("event") == kind]

    def wait(self, condition, seconds: float, what: str) -> None:
        deadline = time.perf_counter() + seconds
        while not condition():
            if self.proc.poll() is not None or time.perf_counter() > deadline:
                self.proc.kill()
                _, err = self.proc.communicate()
                pytest.fail(f"{what}: not within {seconds} s (exit {self.proc.returncode}); stderr: {err[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> int:
        """SIGTERM, then the exit status; stderr in ``self.err``."""
        self.proc.terminate()
        _, self.err = self.proc.communicate(timeout=60)
        self._reader.join(10)
        return self.proc.returncode


def gaps(records: list[dict]) -> np.ndarray:
    return np.diff([r["t"] for r in records])


def test_a_new_version_is_swapped_in_between_predictions_without_a_gap(model_dir, clip, tmp_path, torchless_env):
    """A renamed class in a version written while cign-live runs: within a poll the predictions come from the new
    revision with the new class list, on the same onnxruntime session; the predictions before and after are a hop
    apart as always; SIGHUP makes the watcher look (and does not end the process)."""
    classes = mf.Manifest.load(model_dir).classes
    log_path = tmp_path / "lat.jsonl"
    live = LiveProcess("--model", model_dir, "--camera", clip, "--mic", clip, "--loop", "--headless", "--hop", HOP,
                       "--topk", 10, "--latency-log", log_path, "--max-seconds", 60, env=torchless_env)
    live.wait(lambda: len(live.predictions) >= 3, 30, "three predictions")
    written = time.time()
    new = en.rename(model_dir, classes[0], "renamed")
    assert new == model_dir.parent / "tiny.r1"
    live.wait(lambda: live.events("swap"), 10, "the swap")
    swapped_at = len(live.predictions)
    live.proc.send_signal(signal.SIGHUP)
    live.wait(lambda: len(live.predictions) >= swapped_at + 4, 10, "predictions after the swap and SIGHUP")
    assert live.stop() == 0, live.err[-3000:]

    (event,) = live.events("swap")
    assert event["revision"] == 1 and event["path"] == str(new) and event["session"] == "kept"
    assert event["classes"] == ["renamed", *classes[1:]] and event["task"] == 1
    assert event["t"] - written < 2.0, "the watcher polls the folder every 0.5 s"
    preds = live.predictions
    assert [p["index"] for p in preds] == list(range(len(preds)))
    first_new = next(i for i, p in enumerate(preds) if p["revision"] == 1)
    assert all(p["revision"] == 0 for p in preds[:first_new]) and all(p["revision"] == 1 for p in preds[first_new:])
    assert all({x["class"] for x in p["top"]} == set(classes) for p in preds[:first_new])
    assert all({x["class"] for x in p["top"]} == set(event["classes"]) for p in preds[first_new:])
    assert "now running revision 1" in live.err and "swap: 1" in live.err

    records = [r for r in latency.read_log(log_path) if "index" in r]
    assert len(records) == len(preds)
    (at,) = [i for i, r in enumerate(records) if "swap" in r]
    assert at == first_new and records[at]["swap"]["revision"] == 1 and records[at]["counts"]["swap"] == 1
    assert [r["revision"] for r in records] == [p["revision"] for p in preds]
    around = gaps(records[max(0, at - 3): at + 4])
    print(f"gaps around the swap (hop {HOP} s): {np.round(around, 3)}; prepared in {event['prepare_ms']} ms")
    assert around.max() < 1.5 * HOP, around


def test_a_tampered_version_is_refused_once_and_the_running_model_goes_on(model_dir, clip, tmp_path, torchless_env):
    """A version whose token table changed after it was written arrives complete (renamed in): it is refused by
    its hash, reported on stderr, in the JSON lines and in the latency log, and the running revision keeps
    predicting; the next good version is swapped in past it."""
    classes = mf.Manifest.load(model_dir).classes
    log_path = tmp_path / "lat.jsonl"
    staging = Path(shutil.copytree(model_dir, tmp_path / "staging" / "tiny"))
    tampered = en.rename(staging, classes[1], "tampered")
    table = np.load(tampered / "tokens_task1.npy")
    np.save(tampered / "tokens_task1.npy", table + 1.0)

    live = LiveProcess("--model", model_dir, "--camera", clip, "--mic", clip, "--loop", "--headless", "--hop", HOP,
                       "--latency-log", log_path, "--max-seconds", 60, env=torchless_env)
    live.wait(lambda: len(live.predictions) >= 2, 30, "two predictions")
    os.rename(tampered, model_dir.parent / "tiny.r1")
    live.wait(lambda: live.events("swap_refused"), 10, "the refusal")
    refused_at = len(live.predictions)
    live.wait(lambda: len(live.predictions) >= refused_at + 3, 10, "predictions after the refusal")
    good = en.rename(model_dir, classes[2], "good")
    assert good.name == "tiny.r2"
    live.wait(lambda: live.events("swap"), 10, "the swap to the good version")
    live.wait(lambda: live.predictions[-1]["revision"] == 2, 5, "a prediction of revision 2")
    assert live.stop() == 0, live.err[-3000:]

    (refusal,) = live.events("swap_refused")  # once, not at every poll
    assert refusal["revision"] == 1 and "tokens_task1.npy" in refusal["reason"] and "sha256" in refusal["reason"]
    assert "revision 1 refused" in live.err and "tokens_task1.npy" in live.err
    assert live.events("swap")[0]["revision"] == 2
    revisions = [p["revision"] for p in live.predictions]
    assert 1 not in revisions and revisions.count(0) >= refused_at + 3 and revisions[-1] == 2
    records = [r for r in latency.read_log(log_path) if "index" in r]
    (noted,) = [r for r in records if "swap_refused" in r]
    assert noted["swap_refused"][0]["revision"] == 1 and noted["revision"] == 0
    assert records[-1]["counts"]["swap_refused"] == 1 and records[-1]["counts"]["swap"] == 1
    assert gaps(records).max() < 1.5 * HOP


def with_new_graph(model_dir: Path, out: Path) -> Path:
    """A version of ``model_dir`` at ``out`` whose fp32 graph has other bytes (one more metadata entry), the same
    function."""
    shutil.copytree(model_dir, out)
    graph = onnx.load(str(out / "model_fp32.onnx"))
    onnx.helper.set_model_props(graph, {**{p.key: p.value for p in graph.metadata_props}, "copy": "1"})
    onnx.save(graph, str(out / "model_fp32.onnx"))
    manifest = mf.Manifest.load(model_dir)
    artefacts = [mf.Artefact.of(out, out / a.path, a.role, precision=a.precision, task=a.task)
                 for a in manifest.artefacts]
    dataclasses.replace(manifest, artefacts=artefacts, revision=1).save(out)
    return out


def taken(watcher: Watcher, seconds: float) -> list:
    """The watcher's first non-empty ``take()`` within ``seconds`` (else [])."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if updates := watcher.take():
            return updates
        time.sleep(0.01)
    return []


def test_a_version_with_another_graph_gets_its_own_session_and_the_old_one_is_closed(model_dir, tmp_path):
    """Watcher in-process, polling once a minute: a poke makes it look at once; a version whose graph bytes differ
    opens a runner of its own, which predicts what the old one did; after the take, the replaced runner closes."""
    model = open_model(model_dir, "ort-cpu")
    rng = np.random.default_rng(0)
    feeds = mf.feed(rng.integers(0, 255, (2, *model.spec.frame_shape), dtype=np.uint8),
                    rng.normal(size=(2, *model.spec.spectrogram_shape)).astype(np.float32))
    before = model.predict(feeds[mf.FRAME], feeds[mf.SPECTROGRAM])
    watcher = Watcher(model, interval=60).start()
    try:
        time.sleep(0.2)  # its first look, with nothing newer there
        new = with_new_graph(model_dir, tmp_path / "staging").rename(model_dir.parent / "tiny.r1")
        poked = time.perf_counter()
        watcher.poke()
        (update,) = taken(watcher, 10)
        print(f"poke to prepared version: {time.perf_counter() - poked:.3f} s")
        assert update.path == new and update.session == "new" and update.model.runner is not model.runner
        after = update.model.predict(feeds[mf.FRAME], feeds[mf.SPECTROGRAM])
        for name in mf.OUTPUTS:
            np.testing.assert_allclose(after[name], before[name], rtol=1e-6)
        deadline = time.perf_counter() + 5
        while model.runner.session is not None and time.perf_counter() < deadline:
            time.sleep(0.01)
        assert model.runner.session is None, "the replaced runner was not closed"
    finally:
        watcher.stop()
    watcher.model.close()


def test_a_version_fixed_after_its_refusal_is_taken_and_refusals_name_the_problem(model_dir, tmp_path):
    """A refused version is tried again once its files change; a version of another spec, without a token-table
    input or without the table asked for is refused with the reason."""
    model = open_model(model_dir, "ort-cpu")
    classes = model.manifest.classes
    staging = Path(shutil.copytree(model_dir, tmp_path / "staging" / "tiny"))
    new = en.rename(staging, classes[0], "renamed")
    good = (new / "tokens_task1.npy").read_bytes()
    np.save(new / "tokens_task1.npy", np.load(new / "tokens_task1.npy") * 2)
    new = new.rename(model_dir.parent / new.name)
    watcher = Watcher(model, interval=0.05).start()
    try:
        (refusal,) = taken(watcher, 10)
        assert refusal.model is None and refusal.path == new and "tokens_task1.npy" in refusal.reason
        assert taken(watcher, 0.5) == []  # not again while its files stay as they were
        (tmp_path / "tokens_task1.npy").write_bytes(good)
        os.replace(tmp_path / "tokens_task1.npy", new / "tokens_task1.npy")  # whole, as a person restoring it would
        (update,) = taken(watcher, 10)
        assert update.model.classes[0] == "renamed" and update.session == "kept"
    finally:
        watcher.stop()
    manifest = mf.Manifest.load(new)
    other_spec = dataclasses.replace(manifest, spec=dataclasses.replace(manifest.spec, sample_rate=8000))
    with pytest.raises(ValueError, match="preprocessing spec differs"):
        update.model.version(new, other_spec)
    with pytest.raises(ValueError, match="baked into its graph"):
        update.model.version(new, dataclasses.replace(manifest, tokens_as_input=False))
    with pytest.raises(ValueError, match="no token table of task 5"):
        update.model.version(new, manifest, task=5)
    update.model.close()


def test_bad_enroll_flags_are_clear_errors(model_dir, clip, torchless_env):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "cign_runtime.cli", "--model", str(model_dir), "--camera",
                               str(clip), "--mic", str(clip), "--headless", *map(str, args)], capture_output=True,
                              text=True, timeout=120, env=torchless_env)

    proc = run("--shots", 3)
    assert proc.returncode == 2 and "--shots belong to --enroll NAME" in proc.stderr
    proc = run("--enroll", "x", "--no-watch")
    assert proc.returncode == 2 and "--no-watch" in proc.stderr
    proc = run("--enroll", "x", "--task", 1)
    assert proc.returncode == 2 and "leave --task out" in proc.stderr
    proc = run("--enroll", mf.Manifest.load(model_dir).classes[3])
    assert proc.returncode == 1 and "exists already" in proc.stderr


def test_enroll_inside_cign_live_learns_a_new_sound_from_the_running_stream_and_microphone(model_dir, pulse, tmp_path,
                                                                                        torchless_env):
    """A tone played into the PulseAudio null sink and a colour pattern streamed over UDP: ``--enroll tone --shots
    2`` captures from the sources cign-live is predicting from, without stopping the predictions; the enrolled
    version is swapped in and the predictions then name the tone."""
    port = free_udp_port()
    frames = [gradient_frame(64, 48, t) for t in range(25)]
    player = play(tone(60.0, 48000)[0], 48000)
    log_path = tmp_path / "lat.jsonl"
    try:
        with Streamer(port, frames=frames):
            live = LiveProcess("--model", model_dir, "--camera", f"udp://127.0.0.1:{port}", "--mic", "pulse",
                               "--headless", "--enroll", "tone", "--shots", 2, "--countdown", 0.5, "--hop", 0.25,
                               "--positive-weight", 0.5,  # the default's tenth is tuned to a trained model
                               "--latency-log", log_path, "--max-seconds", 60, env=torchless_env)
            live.wait(lambda: live.events("swap") or live.events("enroll_failed"), 45, "the enrolment and swap")
            swapped_at = len(live.predictions)
            live.wait(lambda: len(live.predictions) >= swapped_at + 6, 10, "predictions after the swap")
            assert live.stop() == 0, live.err[-3000:]
    finally:
        player.kill()
    assert not live.events("enroll_failed"), live.events("enroll_failed")
    kinds = [x["event"] for x in live.lines if "event" in x]
    assert kinds[:3] == ["prompt", "recording", "shot"] and kinds.count("shot") == 2, kinds
    assert kinds[-3:] == ["fitting", "enrolled", "swap"], kinds
    (enrolled,) = live.events("enrolled")
    assert enrolled["path"] == str(model_dir.parent / "tiny.r1") and enrolled["checks"]["fp32"]["shots_top1_new"] == 1.0
    (swap,) = live.events("swap")
    assert swap["classes"][-1] == "tone" and swap["task"] == 2
    # the loop predicted all along: from the first prompt to the swap, one prediction per hop
    first_prompt = live.events("prompt")[0]["t"]
    during = [p for p in live.predictions if first_prompt <= p["t"] <= swap["t"]]
    assert len(during) >= 0.8 * (swap["t"] - first_prompt) / 0.25, (len(during), swap["t"] - first_prompt)
    after = [p for p in live.predictions if p["revision"] == 1]
    named = [p["top"][0]["class"] == "tone" for p in after if p["modality"] == "audio_visual"]
    assert len(named) >= 5 and np.mean(named) >= 0.8, [p["top"][0]["class"] for p in after]
    assert "enrolled 'tone' from 2 shots" in live.err and "swap: 1" in live.err
    records = [r for r in latency.read_log(log_path) if "index" in r]
    print(f"{sum(named)}/{len(named)} predictions after the swap name the tone; enrolment took "
          f"{enrolled['seconds']} s; prediction gaps (hop 0.25 s) from start to end: max {gaps(records).max():.3f} s")


def test_the_window_writes_the_newest_enrolment_step_over_the_frame():
    from cign_runtime.live import notice, overlay

    events = [{"event": "prompt", "shot": 1, "of": 3, "countdown_s": 3.0},
              {"event": "refused", "shot": 1, "reason": "capture 1: silent shot"},
              {"event": "swap", "revision": 2, "path": "x.r2"}]
    assert [notice(e) for e in events] == ["shot 1/3: recording in 3 s", "shot 1 refused: capture 1: silent shot",
                                           "now running revision 2"]
    result = {"label": "dog", "modality": "audio_visual", "latency_ms": 20.0,
              "top": [{"class": "dog", "p_av": 0.5, "p_audio": 0.7, "p_visual": 0.7}]}
    frame = np.full((240, 320, 3), 40, np.uint8)
    plain, noted = overlay(frame, result, 4.0), overlay(frame, result, 4.0, notice(events[0]))
    changed = np.argwhere((plain != noted).any(axis=2))
    assert len(changed) and changed[:, 0].min() > noted.shape[0] - 50  # the line above the status line only
