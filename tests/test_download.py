"""cign-download end to end, offline: real mp4s served over HTTP on 127.0.0.1, fetched through the real yt-dlp
and ffmpeg, checked with PyAV, then prepared and trained on; every failure mode ends in its ledger status."""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner

from cign_train.cli.download import main as download_main
from cign_train.data import download as dl
from cign_train.data.definitions import get_definition
from media import tone, write_clip

FPS, RATE = 10, 24000
BURST_AT = 17.0  # s into every served source: a loud 2 kHz burst over a quiet tone
CLASSES = get_definition("vggsound100").classes
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    """Requests to 127.0.0.1 bypass any proxy; ffmpeg must be there (scripts/setup.sh installs it)."""
    if shutil.which("ffmpeg") is None:
        if os.environ.get("CI"):
            pytest.fail("ffmpeg is required in CI (scripts/setup.sh installs it)")
        pytest.skip("ffmpeg is not installed (scripts/setup.sh installs it)")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1")
        ENV[name] = "127.0.0.1"


def second_frame(width: int, height: int, i: int) -> np.ndarray:
    """Frame ``i``: a flat grey of level 8 x its second, so a frame says where in the source it was."""
    return np.full((height, width, 3), 8 * (i // FPS), np.uint8)


def source(path: Path, seconds: float, with_audio: bool = True) -> bytes:
    """A real H.264 + AAC mp4, 400 px high (above the 360 px cap), of ``seconds``; its bytes."""
    audio = tone(seconds, RATE, freq=300.0, amplitude=0.05)
    burst = slice(int(BURST_AT * RATE), int((BURST_AT + 0.3) * RATE))
    audio[0, burst] += tone(0.3, RATE, freq=2000.0, amplitude=0.6)[0, : audio[0, burst].size]
    write_clip(path, seconds, audio=audio, sample_rate=RATE, width=48, height=400, fps=FPS,
               with_audio=with_audio, frame_fn=second_frame)
    return path.read_bytes()


@dataclass
class Route:
    """What the server answers for one id."""

    body: bytes = b""
    kind: str = "video/mp4"
    status: int = 200
    delay: float = 0.0  # s before answering each request
    fail_first: int = 0  # the first requests get a 503


class MediaServer:
    """HTTP on 127.0.0.1 (port 0) in a thread: GET /{id}.mp4 answers ``routes[id]`` (404 without one), with
    byte ranges as a video host does; ``hits`` counts the requests per id, ``cookies`` keeps their Cookie headers."""

    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.hits: Counter = Counter()
        self.cookies: dict[str, set] = {}
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                owner.answer(self)

            def log_message(self, *args):
                """Quiet."""

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.template = f"http://127.0.0.1:{self.httpd.server_address[1]}/{{youtube_id}}.mp4"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, request: BaseHTTPRequestHandler) -> None:
        name = request.path.lstrip("/").removesuffix(".mp4")
        with self.lock:
            self.hits[name] += 1
            n = self.hits[name]
            self.cookies.setdefault(name, set()).add(request.headers.get("Cookie"))
        route = self.routes.get(name, Route(status=404))
        time.sleep(route.delay)
        try:
            if route.status != 200 or n <= route.fail_first:
                request.send_error(route.status if route.status != 200 else 503)
                return
            body = route.body
            ranged = re.match(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
            first = int(ranged[1]) if ranged else 0
            last = min(int(ranged[2]) if ranged and ranged[2] else len(body) - 1, len(body) - 1)
            if first >= len(body):
                request.send_response(416)
                request.send_header("Content-Range", f"bytes */{len(body)}")
                request.send_header("Content-Length", "0")
                request.end_headers()
                return
            request.send_response(206 if ranged else 200)
            request.send_header("Content-Type", route.kind)
            request.send_header("Accept-Ranges", "bytes")
            request.send_header("Content-Length", str(last - first + 1))
            if ranged:
                request.send_header("Content-Range", f"bytes {first}-{last}/{len(body)}")
            request.end_headers()
            request.wfile.write(body[first : last + 1])
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout, a seek)
            pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    media = MediaServer()
    yield media
    media.httpd.shutdown()


@pytest.fixture(scope="module")
def long_source(tmp_path_factory) -> bytes:
    return source(tmp_path_factory.mktemp("media") / "long.mp4", 30.0)


def video_page(media_url: str, seconds: int) -> bytes:
    """An HTML page describing a video (schema.org JSON-LD, as video sites publish) with its duration."""
    about = {"@context": "https://schema.org", "@type": "VideoObject", "name": "clip", "contentUrl": media_url,
             "duration": f"PT{seconds}S"}
    return (f'<html><head><title>clip</title><script type="application/ld+json">{json.dumps(about)}</script>'
            "</head><body></body></html>").encode()


def write_index(path: Path, rows) -> Path:
    """A vggsound.csv: rows (youtube_id, start, label) in the train split."""
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows((yid, start, label, "train") for yid, start, label in rows)
    return path


def cign_download(server: MediaServer, *args):
    """cign-download in this process (its downloads run in worker processes)."""
    return CliRunner().invoke(download_main, ["--url-template", server.template, "--interval", "0", *args])


def ledger(out: Path) -> dict[str, dict]:
    lines = (out / dl.LEDGER).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len({r["id"] for r in records}) == len(records), "one record per row"
    return {r["id"]: r for r in records}


def clips(out: Path) -> list[str]:
    """The ids of the whole clips in ``out``."""
    return sorted(p.stem for p in out.glob("*.mp4") if not p.name.startswith(dl.TEMP_PREFIX))


def leftovers(out: Path) -> list[str]:
    """Files in ``out`` other than whole clips and the ledger."""
    return sorted(p.name for p in out.iterdir() if p.name != dl.LEDGER and not re.fullmatch(r"[\w-]+_\d{6}\.mp4", p.name))


def markers(path: Path) -> tuple[float, dict[int, float], int, int, str, str]:
    """(time of the audio burst, mean grey level at the middle of each second, audio rate, video height, codecs)."""
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        codecs = (v.codec_context.name, a.codec_context.name)
        rate, height = a.codec_context.sample_rate, v.codec_context.height
        levels, audio = {}, []
        for frame in c.decode(v, a):
            if isinstance(frame, av.AudioFrame):
                audio.append(frame.to_ndarray().mean(axis=0))
            elif abs(frame.time % 1 - 0.5) < 0.05:
                levels[int(frame.time)] = float(frame.to_ndarray(format="gray").mean())
    samples = np.concatenate(audio)
    return int(np.argmax(np.abs(samples) > 0.3)) / rate, levels, rate, height, *codecs


def test_segments_are_cut_where_their_start_puts_them_and_prepare_and_train_use_them(server, long_source, tmp_path):
    """vggsound100 from an index: a dry run fetches nothing (and counts --max-per-class); the run fetches the
    rows of --classes (never another class's; yt-dlp sends the --cookies), each the 10 s from its start time (the frame of each second and
    the audio burst where the start puts them), H.264 + AAC at most 360 px high at the source's audio rate, named
    as cign-prepare reads them; the printed cign-prepare command and a tiny cign-train run use them unchanged."""
    first, second, other = CLASSES[0], CLASSES[50], CLASSES[1]  # one class in each of two tasks
    rows = [(f"vid{k}{i:02d}", 8 + 2 * (i % 4), label) for k, label in enumerate((first, second, other))
            for i in range(5)]
    for yid, _, _ in rows:
        server.routes[yid] = Route(long_source)
    index = write_index(tmp_path / "vggsound.csv", rows + [("dog0000001", 30, "dog barking")])
    (tmp_path / "classes.txt").write_text(f"{first}\n{second}\n")
    cookies = tmp_path / "cookies.txt"
    cookies.write_text("# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t0\tsession\tmine\n")
    out = tmp_path / "clips"
    args = ["--dataset", "vggsound100", "--index", str(index), "--out", str(out), "--classes",
            str(tmp_path / "classes.txt"), "--jobs", "2", "--cookies", str(cookies)]
    dry = cign_download(server, *args, "--dry-run", "--max-per-class", "3")
    assert dry.exit_code == 0, dry.output[-3000:]
    assert "6 rows listed, 0 done or failed for good, 6 to fetch" in dry.output and "would fetch 6 rows" in dry.output
    assert sum(server.hits[yid] for yid, _, _ in rows) == 0 and clips(out) == []

    done = cign_download(server, *args)
    assert done.exit_code == 0, done.output[-3000:]
    fetched = {f"{yid}_{start:06d}": start for yid, start, label in rows if label != other}
    records = ledger(out)
    assert set(records) == set(fetched) and all(r["status"] == "ok" for r in records.values()), records
    assert all(server.hits[yid] == 0 for yid, _, label in rows if label == other) and server.hits["dog0000001"] == 0
    assert clips(out) == sorted(fetched) and leftovers(out) == []
    # yt-dlp sends them; ffmpeg (given them by yt-dlp) matches a cookie's domain against host:port, so it sends
    # none to a server on another port than 80 or 443
    assert all("session=mine" in server.cookies[cid.split("_")[0]] for cid in fetched), server.cookies
    for cid, start in fetched.items():
        burst, levels, rate, height, vcodec, acodec = markers(out / f"{cid}.mp4")
        assert abs(burst - (BURST_AT - start)) < 0.05, (cid, burst)
        assert sorted(levels) == list(range(10)), (cid, levels)
        assert all(abs(level - 8 * (start + s)) < 4 for s, level in levels.items()), (cid, start, levels)
        assert (rate, height, vcodec, acodec) == (RATE, 360, "h264", "aac")
        assert abs(records[cid]["length"] - 10) < 1 / FPS and records[cid]["bytes"] == (out / f"{cid}.mp4").stat().st_size
    assert re.search(rf"{re.escape(first)}\s+5\s+5\s+0\s+0", done.output)
    assert "obtained 10 of 10 listed segments (100.0 %)" in done.output
    assert "WARNING: 2 of 2 classes have fewer than 63 clips" in done.output

    command = shlex.split(re.search(r"^next: (.*)$", done.output, re.M)[1])
    assert command == ["cign-prepare", "--dataset", "vggsound100", "--index", str(index), "--clips-dir", str(out)]
    data = tmp_path / "data"
    prep = subprocess.run([sys.executable, "-m", "cign_train.cli.prepare", *command[1:], "--data-dir", str(data),
                           "--preset", "cpu", "--workers", "1"], capture_output=True, text=True, timeout=120, env=ENV)
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert "stored, 10 samples" in prep.stdout and "5 missing file" in prep.stdout  # the class not downloaded
    run = tmp_path / "run"
    train = subprocess.run([sys.executable, "-m", "cign_train.cli.train", "--dataset", "vggsound100", "--data-dir",
                            str(data), "--preset", "cpu", "--tasks", "2", "--epochs", "1", "--batch-size", "4", "--dim",
                            "32", "--depth", "1", "--heads", "4", "--buffer-per-class", "2", "--workers", "0",
                            "--lr-schedule", "constant", "--threads", "1", "--no-progress", "--out", str(run)],
                           capture_output=True, text=True, timeout=300, env=ENV)
    assert train.returncode == 0, train.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]["audio"]) == 2


def test_every_failure_ends_in_its_status_with_nothing_partial_and_reruns_skip_or_retry_it(server, long_source,
                                                                                           tmp_path):
    """404, a truncated file, no audio stream, a source ending before the segment or less than 3 s into it (not
    fetched at all when its page says its duration), an HTML page and an answer slower than --timeout each end in
    their status, leaving no file; a source ending later within the segment is kept with its real length. A rerun asks again only for the transient failure
    (the timeout), --retry-failed for all; a failure that passes is retried with backoff in the same run."""
    short = source(tmp_path / "short.mp4", 15.0)
    tiny = source(tmp_path / "tiny.mp4", 11.0)
    before_start = source(tmp_path / "before.mp4", 8.0)
    silent = source(tmp_path / "silent.mp4", 30.0, with_audio=False)
    server.routes.update({
        "trunc01": Route(long_source[: len(long_source) // 2]),
        "noaud01": Route(silent),
        "tiny001": Route(tiny),
        "short01": Route(short),
        "ended01": Route(before_start),
        "html001": Route(b"<!doctype html><html><head><title>Video</title></head><body>gone</body></html>",
                         kind="text/html; charset=utf-8"),
        "slow001": Route(long_source, delay=2.5),
        "flaky01": Route(long_source, fail_first=1),
        "ldmedia": Route(before_start),
        "ldpage1": Route(video_page(server.template.format(youtube_id="ldmedia"), 8), kind="text/html"),
    })
    expected = {"gone001": "not_found", "trunc01": "decode_error", "noaud01": "no_audio", "tiny001": "too_short",
                "ended01": "too_short", "ldpage1": "too_short", "html001": "not_media", "slow001": "timeout",
                "short01": "ok", "flaky01": "ok"}
    index = write_index(tmp_path / "vggsound.csv", [(yid, 10, CLASSES[3]) for yid in expected])
    out = tmp_path / "clips"
    args = ["--dataset", "vggsound100", "--index", str(index), "--out", str(out), "--jobs", "2", "--timeout", "1",
            "--attempts", "2", "--backoff", "0.2"]
    done = cign_download(server, *args)
    assert done.exit_code == 0, done.output[-3000:]
    records = ledger(out)
    assert {cid.split("_")[0]: r["status"] for cid, r in records.items()} == expected, records
    assert records["short01_000010"]["length"] == pytest.approx(5.0, abs=1 / FPS)
    assert records["flaky01_000010"]["attempts"] == 2 and server.hits["flaky01"] >= 2
    assert records["slow001_000010"]["attempts"] == 2 and "timed out" in records["slow001_000010"]["message"]
    assert "404" in records["gone001_000010"]["message"]
    assert server.hits["ldmedia"] == 0, "a video known to end before the segment is not fetched"
    assert all(records[f"{yid}_000010"]["attempts"] == 1 for yid in ("gone001", "trunc01", "noaud01", "html001", "ended01"))
    assert clips(out) == ["flaky01_000010", "short01_000010"] and leftovers(out) == []
    assert "1 shorter than 10 s" in done.output and "timeout 1 (a rerun tries again)" in done.output

    before = server.hits.copy()
    again = cign_download(server, *args, "--attempts", "1")
    assert again.exit_code == 0, again.output[-3000:]
    assert {yid for yid in expected if server.hits[yid] != before[yid]} == {"slow001"}
    assert ledger(out)["slow001_000010"]["attempts"] == 3
    retried = cign_download(server, *args, "--attempts", "1", "--retry-failed")
    assert retried.exit_code == 0, retried.output[-3000:]
    assert {yid for yid in expected if server.hits[yid] != before[yid]} == set(expected) - {"short01", "flaky01"}
    assert leftovers(out) == []


@pytest.mark.parametrize("kill", ["SIGTERM", "SIGKILL"])
def test_a_killed_download_leaves_whole_clips_and_its_rerun_fetches_only_the_rest(server, long_source, tmp_path, kill):
    """SIGTERM to cign-download, or SIGKILL to it with its workers and ffmpeg, while a slow server serves: only
    whole clips are left (SIGTERM also removes its temporary files, a rerun those of a kill), and the rerun
    fetches the other clips without asking the server for one it already has."""
    ids = [f"{kill[3:].lower()}{i:03d}" for i in range(6)]
    for yid in ids:
        server.routes[yid] = Route(long_source, delay=0.3)
    index = write_index(tmp_path / "vggsound.csv", [(yid, 12, CLASSES[5]) for yid in ids])
    out = tmp_path / "clips"
    args = ["--dataset", "vggsound100", "--index", str(index), "--out", str(out), "--jobs", "1"]
    cmd = [sys.executable, "-m", "cign_train.cli.download", "--url-template", server.template, "--interval", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(clips(out)) < 2:
        time.sleep(0.05)
    if kill == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 130
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    have = clips(out)
    assert 2 <= len(have) < len(ids), "the kill must land mid-run"
    assert all(dl.check_clip(out / f"{cid}.mp4")[0] == "ok" for cid in have)
    if kill == "SIGTERM":
        assert leftovers(out) == []

    before = server.hits.copy()
    for yid in ids:
        server.routes[yid].delay = 0.0
    rerun = cign_download(server, *args)
    assert rerun.exit_code == 0, rerun.output[-3000:]
    assert all(server.hits[cid.split("_")[0]] == before[cid.split("_")[0]] for cid in have)
    records = ledger(out)
    assert len(records) == len(ids) and all(r["status"] == "ok" for r in records.values())
    assert leftovers(out) == []


@pytest.mark.parametrize("message, status", [
    ("[youtube] abc: Private video. Sign in if you've been granted access to this video", "private"),
    ("[youtube] abc: Video unavailable. This video has been removed by the uploader", "removed"),
    ("[youtube] abc: Video unavailable. This video is no longer available because the YouTube account associated "
     "with this video has been terminated.", "removed"),
    ("[youtube] abc: Video unavailable", "unavailable"),
    ("[youtube] abc: Sign in to confirm your age. This video may be inappropriate for some users.", "age_restricted"),
    ("[youtube] abc: Video unavailable. The uploader has not made this video available in your country", "geo_blocked"),
    ("[youtube] abc: Join this channel to get access to members-only content like this video", "private"),
    ("[youtube] abc: Sign in to confirm you’re not a bot. Use --cookies-from-browser or --cookies", "rate_limited"),
    ("[youtube] abc: Unable to download API page: HTTP Error 503: Service Unavailable", "http_error"),
    ("[generic] abc: Unable to download webpage: HTTP Error 404: Not Found", "not_found"),
    ("ffmpeg exited with code 1; ffmpeg: [in#0] Error opening input: Connection refused", "network_error"),
    ("[youtube] abc: Requested format is not available. Use --list-formats for a list of available formats",
     "no_formats"),
    ("something new", "error"),
])
def test_messages_are_classified_into_the_statuses(message, status):
    assert dl.classify(message) == status and status in dl.STATUSES


def test_the_page_lists_every_status_and_the_class_floor():
    """docs/cign-download.md's table has a row per status, for good or not as STATUSES says; the floor it
    explains is the one the summary warns with."""
    from cign_train.data.ledger import class_floor

    page = (Path(__file__).parents[1] / "docs" / "cign-download.md").read_text()
    table = dict(re.findall(r"^\| `(\w+)` \| (yes|no|—) \|", page, re.M))
    assert table == {s: "—" if s == "ok" else "yes" if v.permanent else "no" for s, v in dl.STATUSES.items()}
    assert f"fewer than {class_floor()} clips" in page
