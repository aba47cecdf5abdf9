"""Video sources on real media: an H.264 mp4 played in real time and stepped, a local MPEG-TS stream over UDP
that stops and comes back, a missing camera."""
from __future__ import annotations

import time

import numpy as np
import pytest

from cign_runtime.video import VideoSource, VideoSourceError, kind_of
from media import Streamer, free_udp_port, index_frame, write_clip

FPS = 10


def frame_index(rgb: np.ndarray) -> int:
    return int(round(float(rgb.mean()) / 10))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("video") / "count.mp4", seconds=2.0, fps=FPS, width=64, height=48,
                      frame_fn=index_frame)


def test_kinds():
    assert [kind_of(s) for s in (0, "1", "/dev/video0", "udp://127.0.0.1:1", "clip.mp4")] == \
        ["device", "device", "device", "stream", "file"]


def test_file_plays_in_real_time_keeping_only_the_newest_frame(clip):
    with VideoSource(str(clip), realtime=True) as src:
        time.sleep(0.75)
        frame = src.latest()
        assert frame is not None and frame.age() < 0.15
        # at 0.75 s into a 10 fps file the newest frame is frame 7 (give or take scheduling)
        assert 5 <= frame_index(frame.rgb) <= 8 and abs(frame.media_time - 0.7) <= 0.2
        time.sleep(1.6)
        assert src.ended and frame_index(src.latest().rgb) == 19
    # nobody read frames 1..6 nor 8..18: they were replaced, not queued
    assert src.stats.frames == 20 and src.stats.dropped >= 15


def test_file_stepped_without_realtime_gives_the_frame_at_each_media_time(clip):
    src = VideoSource(str(clip), realtime=False).start()
    try:
        got = [frame_index(src.frame_at(t).rgb) for t in (0.0, 0.05, 0.25, 0.31, 1.0, 1.95, 5.0)]
    finally:
        src.stop()
    assert got == [0, 0, 2, 3, 10, 19, 19]


def test_missing_camera_names_it_and_lists_cameras():
    with pytest.raises(VideoSourceError, match=r"camera '/dev/video97' cannot be opened \(device\); cameras on this machine"):
        VideoSource("/dev/video97").start()
    with pytest.raises(VideoSourceError, match="camera 'nothing.mp4': no such device or file"):
        VideoSource("nothing.mp4").start()


def wait_for(condition, seconds: float) -> bool:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_local_stream_that_stops_is_reconnected_and_the_gap_recorded():
    port = free_udp_port()
    url = f"udp://127.0.0.1:{port}"
    streamer = Streamer(port)
    streamer.__enter__()
    try:
        time.sleep(0.2)
        src = VideoSource(url).start()
        assert wait_for(lambda: src.latest() is not None and src.stats.frames > 10, 10)
        assert src.latest().age() < 0.5
    finally:
        streamer.__exit__()
    # the stream is gone: the last frame stays, aging; the capture thread is reconnecting
    time.sleep(2.0)
    stale = src.latest()
    assert stale.age() > 1.0 and src.stats.reconnects == 0
    with Streamer(port, first=12):
        assert wait_for(lambda: src.stats.reconnects == 1 and src.latest().seq > stale.seq, 20)
        fresh = src.latest()
        assert fresh.age() < 0.5
    src.stop()
    (start, seconds), = src.stats.gaps
    assert 1.5 < seconds < 20 and start == pytest.approx(stale.arrived, abs=0.1)


def test_wait_newer_returns_a_fresh_frame_as_it_arrives_and_at_once_after_the_end(clip):
    with VideoSource(str(clip), realtime=True) as src:
        assert wait_for(lambda: src.latest() is not None, 5)
        ages, waits = [], []
        for _ in range(5):
            seq = src.latest().seq
            t0 = time.perf_counter()
            frame = src.wait_newer(seq, timeout=1.0)
            waits.append(time.perf_counter() - t0)
            assert frame.seq > seq
            ages.append(frame.age())
        # a 10 fps file: each wait ends with the next frame (<= 0.1 s), which is then fresh
        assert max(waits) < 0.2 and max(ages) < 0.02, (waits, ages)
        assert wait_for(lambda: src.ended, 5)
        t0 = time.perf_counter()
        last = src.wait_newer(src.latest().seq, timeout=2.0)
        assert time.perf_counter() - t0 < 0.05 and frame_index(last.rgb) == 19
