"""benchmarks/fsdd_digits.py on a tiny FSDD-shaped archive served from 127.0.0.1: the index rule,
the clips' audio and frames, rejected recordings, resuming, errors, and cign-prepare reading the set."""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import socket
import sys
import tarfile
import threading
import wave
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner

from cign_train.cli.prepare import main as prepare_main
from cign_train.data.avdigits import CLASSES, AvdigitsConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fsdd_digits  # noqa: E402

DIGITS, SPEAKERS, INDICES = (3, 7), ("george", "theo"), (0, 6, 7, 10, 11, 37, 38)
CORRUPT, WRONG_RATE = "7_theo_11.wav", "3_george_7.wav"
N_RECORDINGS = len(DIGITS) * len(SPEAKERS) * len(INDICES)
TOP = "free-spoken-digit-dataset-1.0.10/recordings"


def tone_hz(digit: int) -> float:
    return 300.0 + 100.0 * digit


def wav_bytes(samples: np.ndarray, rate: int = 8000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return buffer.getvalue()


def tone(digit: int, seconds: float, rate: int = 8000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02)
    return np.round(10000 * fade * np.sin(2 * np.pi * tone_hz(digit) * t))


def make_archive(path: Path, leave_out: str | None = None) -> Path:
    """An FSDD-shaped .tar.gz: tones named {digit}_{speaker}_{index}.wav, one corrupt, one at 16 kHz."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as archive:
        for digit in DIGITS:
            for speaker in SPEAKERS:
                for index in INDICES:
                    name = f"{digit}_{speaker}_{index}.wav"
                    if name == leave_out:
                        continue
                    if name == CORRUPT:
                        data = b"RIFF\x10\x00\x00\x00WAVEnot really"
                    elif name == WRONG_RATE:
                        data = wav_bytes(tone(digit, 0.5, 16000), 16000)
                    else:
                        data = wav_bytes(tone(digit, rng.uniform(0.3, 0.8)))
                    member = tarfile.TarInfo(f"{TOP}/{name}")
                    member.size = len(data)
                    archive.addfile(member, io.BytesIO(data))
    return path


def build(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = fsdd_digits.main([*args, "--no-progress"])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny archive on an HTTP server at 127.0.0.1 (ephemeral port): (url, requests seen)."""
    folder = tmp_path_factory.mktemp("served")
    make_archive(folder / "v1.0.10.tar.gz")
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1.0.10.tar.gz", requests
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def built(served, tmp_path_factory) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("fsdd") / "fsdd_digits"
    rc, stdout, stderr = build("--out", str(out), "--url", served[0], "--expect-recordings", str(N_RECORDINGS))
    assert rc == 0, stderr
    return out, stdout, stderr


def expected_split(index: int) -> str | None:
    return "test" if index <= 6 else "val" if index <= 10 else "train" if index <= 37 else None


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "fsdd_digits.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_index_follows_the_recording_index_rule(built):
    out, stdout, _ = built
    listed = rows(out)
    assert list(listed[0]) == ["file", "label", "split"]
    seen = set()
    for row in listed:
        digit, speaker, index = Path(row["file"]).stem.split("_")
        assert row["file"] == f"clips/{digit}_{speaker}_{index}.mp4" and (out / row["file"]).is_file()
        assert row["label"] == CLASSES[int(digit)]
        assert row["split"] == expected_split(int(index))
        seen.add(f"{digit}_{speaker}_{index}.wav")
    wanted = {f"{d}_{s}_{i}.wav" for d in DIGITS for s in SPEAKERS for i in INDICES if i != 38}
    assert seen == wanted - {CORRUPT, WRONG_RATE}
    splits = [row["split"] for row in listed]
    assert splits == sorted(splits, key=["train", "val", "test"].index)
    assert (out / "classes.txt").read_text().split() == list(CLASSES)
    assert "train 7, val 7, test 8" in stdout and "2 rejected" in stdout
    source = (out / "SOURCE.md").read_text()
    assert "CC BY-SA 4.0" in source and "v1.0.10" in source and "test 0-6; val 7-10; train 11-37" in source


def test_clips_hold_the_recording_inside_the_window_and_avdigits_frames(built):
    out, _, _ = built
    config = AvdigitsConfig()
    lead = (config.clip_seconds - config.window_seconds) / 2
    onsets = []
    for row in rows(out):
        with av.open(str(out / row["file"])) as container:
            stream = container.streams.audio[0]
            assert stream.rate == 16000 and stream.layout.name == "mono"
            audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
        with av.open(str(out / row["file"])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert abs(len(audio) / 16000 - config.clip_seconds) < 0.1
        energy = audio.astype(np.float64) ** 2
        inside = energy[int(lead * 16000) : int((lead + config.window_seconds) * 16000)].sum()
        assert inside > 0.999 * energy.sum()
        spectrum = np.abs(np.fft.rfft(audio))
        peak_hz = np.argmax(spectrum) * 16000 / len(audio)
        digit = int(Path(row["file"]).stem.split("_")[0])
        assert abs(peak_hz - tone_hz(digit)) < 5  # the recording, at its own pitch
        onsets.append(np.flatnonzero(np.abs(audio) > 0.05)[0])
        assert len(frames) == round(config.clip_seconds * config.fps)
        assert frames[0].shape == (config.frame_size, config.frame_size, 3)
    assert len(set(onsets)) > len(onsets) // 2, "onsets are drawn per clip"


def test_bad_recordings_are_named_and_the_rest_built(built):
    out, _, stderr = built
    with open(out / "rejected.csv", newline="") as f:
        rejected = {row["file"]: row["problem"] for row in csv.DictReader(f)}
    assert set(rejected) == {f"recordings/{CORRUPT}", f"recordings/{WRONG_RATE}"}
    assert "unreadable wav" in rejected[f"recordings/{CORRUPT}"]
    assert "sample rate 16000 Hz" in rejected[f"recordings/{WRONG_RATE}"]
    assert CORRUPT in stderr and WRONG_RATE in stderr
    assert len(list((out / "clips").glob("*.mp4"))) == len(rows(out)) == 22


def test_a_second_run_rewrites_no_clip(built, served):
    out, _, _ = built
    url, requests = served
    before = {p.name: p.stat().st_mtime_ns for p in (out / "clips").iterdir()}
    index = (out / "fsdd_digits.csv").read_text()
    n_requests = len(requests)
    rc, stdout, stderr = build("--out", str(out), "--url", url, "--expect-recordings", str(N_RECORDINGS))
    assert rc == 0, stderr
    assert "0 built now" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "clips").iterdir()} == before
    assert (out / "fsdd_digits.csv").read_text() == index
    assert len(requests) == n_requests, "the finished download is reused"


def test_two_workers_write_the_same_bytes(built, tmp_path):
    out, _, _ = built
    rc, _, stderr = build("--out", str(tmp_path), "--archive", str(out / "download" / "v1.0.10.tar.gz"),
                          "--expect-recordings", str(N_RECORDINGS), "--workers", "2")
    assert rc == 0, stderr
    for clip in (out / "clips").iterdir():
        assert (tmp_path / "clips" / clip.name).read_bytes() == clip.read_bytes(), clip.name


def test_an_unreachable_url_is_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1.0.10.tar.gz"
    rc, _, stderr = build("--out", str(tmp_path / "out"), "--url", url)
    assert rc == 1 and f"could not download {url}" in stderr
    assert not list((tmp_path / "out").rglob("*.part"))


def test_missing_recordings_are_a_clear_error(tmp_path):
    archive = make_archive(tmp_path / "fsdd.tar.gz", leave_out="3_theo_37.wav")
    rc, _, stderr = build("--out", str(tmp_path / "out"), "--archive", str(archive))
    assert rc == 1
    assert f"expected 3000 FSDD recordings, found {N_RECORDINGS - 1}; missing: 3_theo_37.wav" in stderr
    assert not (tmp_path / "out" / "fsdd_digits.csv").exists()


def test_cign_prepare_reads_the_built_set(built, tmp_path):
    out, _, _ = built
    result = CliRunner().invoke(prepare_main, [
        "--dataset", "csv", "--index", str(out / "fsdd_digits.csv"), "--name", "fsdd_tiny",
        "--data-dir", str(tmp_path), "--preset", "cpu", "--classes", str(out / "classes.txt"), "--workers", "1",
    ])
    assert result.exit_code == 0, result.output
    head = next(line for line in result.output.splitlines() if "stored," in line)
    assert head.endswith("stored, 22 samples (train 7, val 7, test 8)"), head
