"""Fetch the VGGSound family's listed YouTube segments as the clips ``cign-prepare`` reads.

A listed row ``(youtube_id, start)`` becomes ``{youtube_id}_{start:06d}.mp4`` (the path
``cign-prepare`` reads it from): the segment [start, start + 10 s]. yt-dlp resolves the video and
hands the section to its ffmpeg downloader, which seeks in the source and fetches only that part;
ffmpeg cuts it exactly and encodes it in the same pass as H.264 + AAC, the video at most 360 px
high (the presets read one frame per clip resized to at most 224 px, so more is disk and bandwidth
spent for nothing), the audio at its source rate.

Nothing half-written is accepted: a clip is written under a temporary name (:data:`TEMP_PREFIX`),
checked with PyAV (it decodes, has a video and an audio stream and lasts the segment, or less when
the source ends sooner, at least :data:`MIN_SECONDS`) and only then renamed into place. A run
stopped by Ctrl-C, SIGTERM or a kill leaves whole clips only; the next run removes the temporary
files.

The ledger (:data:`LEDGER` in the clips folder) holds one record per row: its status (a key of
:data:`STATUSES`), attempts, bytes, length, seconds spent and the message of a failure. A rerun
skips the clips in place and the rows that failed for good (unless retried), and tries the
transient failures again. Downloads run in worker processes, started at most one per
``interval`` seconds over all of them.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import av
import yt_dlp

from cign_runtime.spec import PRESETS
from cign_train.data import definitions as defs

#: The data sets listed as YouTube segments.
DATASETS = ("vggsound100", "vgginstruments", "vggss")
SEGMENT_SECONDS = 10.0
MAX_HEIGHT = 360
#: A clip shorter than the presets' analysis window is refused: cign-prepare would pad it with silence.
MIN_SECONDS = max(spec.clip_seconds for spec in PRESETS.values())
YOUTUBE_URL = "https://www.youtube.com/watch?v={youtube_id}"
LEDGER = "download.jsonl"
#: Every temporary file of a run starts with this; a run removes those it finds when it starts.
TEMP_PREFIX = ".download-"
#: Backoff between tries of a transient failure doubles from ``--backoff`` up to this (s).
MAX_BACKOFF = 60.0
#: The best video of at most 360 px plus the best audio, else the best format holding both.
FORMAT = f"bv*[height<=?{MAX_HEIGHT}]+ba/b[height<=?{MAX_HEIGHT}]/wv*+ba/w"
#: ffmpeg's output options: the segment is re-encoded (yt-dlp's force_keyframes_at_cuts), so the cut is exact.
ENCODE = ["-vf", f"scale=-2:trunc(min(ih\\,{MAX_HEIGHT})/2)*2", "-c:v", "libx264", "-preset", "veryfast",
          "-crf", "23", "-pix_fmt", "yuv420p", "-c:a", "aac", "-movflags", "+faststart", "-f", "mp4"]


class Status(NamedTuple):
    permanent: bool  # a rerun skips it unless --retry-failed
    meaning: str


#: Every status a ledger record can have.
STATUSES = {
    "ok": Status(True, "downloaded and checked"),
    "unavailable": Status(True, "YouTube says the video is unavailable"),
    "private": Status(True, "private or members-only"),
    "removed": Status(True, "removed by its uploader, for a terms-of-service or copyright claim, or with its account"),
    "age_restricted": Status(True, "needs a signed-in adult account (--cookies, then --retry-failed)"),
    "geo_blocked": Status(True, "not available in this country"),
    "not_found": Status(True, "the server answers 404 or 410 (a mirror without the file)"),
    "not_media": Status(True, "the URL serves no media yt-dlp recognises (e.g. an HTML page)"),
    "no_audio": Status(True, "the video has no audio stream"),
    "no_video": Status(True, "the video has no video stream"),
    "too_short": Status(True, f"less than {MIN_SECONDS:g} s of the video follows the start time"),
    "decode_error": Status(True, "the media is corrupt or truncated"),
    "rate_limited": Status(False, "HTTP 429 or YouTube's bot check: wait, lower --jobs, or pass --cookies"),
    "http_error": Status(False, "another HTTP error (403, 5xx)"),
    "timeout": Status(False, "no answer within --timeout"),
    "network_error": Status(False, "the connection failed"),
    "no_formats": Status(False, "yt-dlp found no format to fetch: update it, give it a JavaScript runtime"),
    "error": Status(False, "any other failure (the message says which)"),
}
#: yt-dlp's and ffmpeg's messages to statuses: the first pattern found (case-insensitive) decides.
MESSAGES = (
    (r"in your country|geo.?restrict", "geo_blocked"),
    (r"private video|video is private|members.only|join this channel", "private"),
    (r"confirm your age|age.restrict|inappropriate for some users", "age_restricted"),
    (r"not a bot|http error 429|too many requests", "rate_limited"),
    (r"(?:http error|server returned) (?:404|410)", "not_found"),
    (r"http error|server returned", "http_error"),
    (r"timed? ?out", "timeout"),
    (r"requested format is not available|no video formats found", "no_formats"),
    (r"removed|terminated|copyright|terms of service", "removed"),
    (r"unavailable|not available|does not exist|live event will begin|premieres in", "unavailable"),
    (r"unsupported url", "not_media"),
    (r"moov atom not found|invalid data found|error while decoding|corrupt|partial file|end of file", "decode_error"),
    (r"connection|network|name resolution|name or service", "network_error"),
)


def classify(message: str) -> str:
    """The status a failure's message names (``error`` when none does)."""
    return next((status for pattern, status in MESSAGES if re.search(pattern, message, re.I)), "error")


@dataclass(frozen=True)
class Row:
    """One listed segment and the path cign-prepare reads it from."""

    id: str
    youtube_id: str
    start: int
    label: str
    path: str


@dataclass(frozen=True)
class Fetcher:
    """How rows are fetched (``cign-download``'s options)."""

    url_template: str = YOUTUBE_URL
    timeout: float = 30.0  # s without an answer before a network operation fails
    attempts: int = 3  # tries per row and run of a transient failure
    backoff: float = 5.0  # s before the second try, doubling up to MAX_BACKOFF
    interval: float = 1.0  # s between the starts of two downloads, over all workers
    cookies: str | None = None  # a Netscape cookies file for yt-dlp


def listed_rows(dataset: str, out: Path, index: Path | None = None, splits_dir: Path | None = None,
                classes: tuple[str, ...] | None = None, max_per_class: int | None = None) -> list[Row]:
    """The rows of ``dataset`` that cign-prepare lists from the same files, in class order: only
    ``classes`` when given, the first ``max_per_class`` of each class by clip id when given."""
    definition = defs.get_definition(dataset)
    candidates, _ = defs.vggsound_family_candidates(definition, Path(out), index, splits_dir)
    by_label: dict[str, dict[str, defs.Candidate]] = {}
    for c in sorted(candidates, key=lambda c: c.id):
        by_label.setdefault(c.label, {}).setdefault(c.id, c)
    rows = []
    for label in (c for c in definition.classes if classes is None or c in classes):
        for c in list(by_label.get(label, {}).values())[:max_per_class]:
            rows.append(Row(c.id, *defs.parse_vggsound_clip_id(c.id), label, c.path))
    return rows


def check_clip(path: Path) -> tuple[str, str, float]:
    """``(status, detail, length in s)`` of a written clip: ``ok`` when it decodes, has video and audio
    and lasts the segment within a frame, or less but at least MIN_SECONDS."""
    times, samples, period, rate = [], 0, 0.04, 1
    try:
        with av.open(str(path)) as container:
            streams = container.streams.video[:1] + container.streams.audio[:1]
            for frame in container.decode(*streams):
                if isinstance(frame, av.AudioFrame):
                    samples += frame.samples
                    rate = frame.sample_rate
                else:
                    times.append(float(frame.time))
            fps = container.streams.video[0].average_rate if container.streams.video else None
            period = 1 / float(fps) if fps else period
    except av.error.FFmpegError as e:
        return "decode_error", f"PyAV cannot decode the clip ({e})", 0.0
    if not times and not samples:  # ffmpeg seeked past the end of the video
        return "too_short", "nothing of the video follows the start time", 0.0
    if not times:
        return "no_video", "the video has no video stream (or no frame)", 0.0
    if not samples:
        return "no_audio", "the video has no audio stream (or no sample)", 0.0
    length = min(times[-1] - times[0] + period, samples / rate)
    if length > SEGMENT_SECONDS + period:
        return "decode_error", f"the clip lasts {length:.2f} s, more than the {SEGMENT_SECONDS:g} s segment", length
    if length < MIN_SECONDS:
        return "too_short", f"{length:.2f} s of the video follow the start time, less than {MIN_SECONDS:g} s", length
    return "ok", "", length


class _Quiet:
    """yt-dlp's logger: its errors arrive as exceptions, the rest is dropped."""

    def debug(self, msg):
        """Dropped."""

    info = warning = error = debug


@contextlib.contextmanager
def _stderr_into(file):
    """This process's fd 2 into ``file``: ffmpeg, run by yt-dlp, writes its errors there."""
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _params(fetcher: Fetcher, row: Row, temp: Path, cookies: Path | None) -> dict:
    timeout_us = str(int(fetcher.timeout * 1e6))
    return {
        "format": FORMAT,
        "outtmpl": str(temp).replace("%", "%%"),
        "download_ranges": yt_dlp.utils.download_range_func(None, [(row.start, row.start + SEGMENT_SECONDS)]),
        "force_keyframes_at_cuts": True,
        "external_downloader_args": {
            "ffmpeg_i": ["-loglevel", "error", "-nostats", "-xerror", "-rw_timeout", timeout_us],
            "ffmpeg_o": ENCODE,
        },
        "merge_output_format": "mp4",
        "socket_timeout": fetcher.timeout,
        "retries": 0,
        "extractor_retries": 0,
        "nopart": True,
        "overwrites": True,
        "noplaylist": True,
        "fixup": "never",
        "noprogress": True,
        "logger": _Quiet(),
        "cookiefile": None if cookies is None else str(cookies),
    }


def _attempt(fetcher: Fetcher, row: Row, temp: Path) -> tuple[str, str, float]:
    """One try: ``(status, message, length)``; on ``ok`` the checked clip is at ``temp``."""
    url = fetcher.url_template.format(youtube_id=row.youtube_id)
    cookies = None
    if fetcher.cookies:  # a private copy: yt-dlp writes the cookies file back when it closes
        cookies = temp.with_name(temp.name + ".cookies")
        shutil.copyfile(fetcher.cookies, cookies)
    try:
        with tempfile.TemporaryFile() as log:
            with _stderr_into(log), yt_dlp.YoutubeDL(_params(fetcher, row, temp, cookies)) as ydl:
                try:
                    info = ydl.extract_info(url, download=False, process=False)
                    if (info.get("duration") or float("inf")) - row.start < MIN_SECONDS:
                        return ("too_short", f"the video lasts {info['duration']:g} s, the segment starts at "
                                f"{row.start} s", 0.0)
                    ydl.process_ie_result(info, download=True)
                    error = ""
                except yt_dlp.utils.DownloadError as e:
                    error = str(e).removeprefix("ERROR: ")
            log.seek(0)
            ffmpeg = " ".join(log.read().decode(errors="replace").split())
    finally:
        if cookies is not None:
            cookies.unlink(missing_ok=True)
    if error:
        message = f"{error}; ffmpeg: {ffmpeg}" if ffmpeg else error
        return classify(message), message[:1000], 0.0
    if not temp.is_file():
        return "error", f"yt-dlp wrote no file ({ffmpeg or 'no message'})", 0.0
    return check_clip(temp)


def fetch(fetcher: Fetcher, row: Row, wait_turn=lambda: None) -> dict:
    """Fetch ``row`` (or check the clip in its place) with up to ``fetcher.attempts`` tries of a
    transient failure; returns its ledger record (``attempts`` counts this run's tries)."""
    started, final = time.monotonic(), Path(row.path)
    temp = final.with_name(f"{TEMP_PREFIX}{os.getpid()}-{final.name}")
    status, message, length, attempts = "error", "", 0.0, 0
    if final.is_file():  # put there by an earlier run stopped before its record was written
        status, message, length = check_clip(final)
        message = "found in place" if status == "ok" else message
    try:
        while status != "ok" and attempts < fetcher.attempts:
            if attempts:
                time.sleep(min(fetcher.backoff * 2 ** (attempts - 1), MAX_BACKOFF))
            wait_turn()
            attempts += 1
            try:
                status, message, length = _attempt(fetcher, row, temp)
            except Exception as e:  # one odd row must not stop the others
                status, message, length = "error", f"{type(e).__name__}: {e}", 0.0
            if status == "ok":
                os.replace(temp, final)
            elif STATUSES[status].permanent:
                break
    finally:
        temp.unlink(missing_ok=True)
    return {**asdict(row), "status": status, "attempts": attempts, "bytes": final.stat().st_size if status == "ok" else 0,
            "length": round(length, 3), "seconds": round(time.monotonic() - started, 2), "message": message,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def remove_temporaries(folder: Path) -> int:
    """Delete what runs stopped midway left in ``folder``; returns how many files."""
    found = list(Path(folder).glob(TEMP_PREFIX + "*"))
    for path in found:
        path.unlink(missing_ok=True)
    return len(found)


_turn = None  # a worker's shared start time of the next download (multiprocessing.Value)
_interval = 0.0


def _init_worker(turn, interval: float) -> None:
    global _turn, _interval
    _turn, _interval = turn, interval
    for sig in (signal.SIGINT, signal.SIGTERM):  # unwind: yt-dlp stops ffmpeg, fetch removes its temporary file
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))


def _wait_turn() -> None:
    with _turn.get_lock():
        now = time.time()
        start = max(now, _turn.value)
        _turn.value = start + _interval
    time.sleep(start - now)


def _fetch_in_worker(job: tuple[Fetcher, Row]) -> dict:
    return fetch(*job, wait_turn=_wait_turn)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def download(rows: list[Row], ledger, fetcher: Fetcher, jobs: int, on_record=lambda record: None) -> None:
    """Fetch ``rows`` with ``jobs`` worker processes, recording each outcome in ``ledger`` (a
    :class:`cign_train.data.ledger.Ledger`) and passing it to ``on_record``. SIGTERM stops it as Ctrl-C
    does: the workers stop (removing their temporary files), then KeyboardInterrupt is raised."""
    ctx = mp.get_context("spawn")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with ctx.Pool(max(1, min(jobs, len(rows))), _init_worker, (ctx.Value("d", 0.0), fetcher.interval)) as pool:
            for record in pool.imap_unordered(_fetch_in_worker, [(fetcher, row) for row in rows]):
                ledger.add(record)
                on_record(record)
    finally:
        signal.signal(signal.SIGTERM, previous)
        ledger.compact()
