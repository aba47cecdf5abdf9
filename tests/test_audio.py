"""Audio sources: ring buffer, a real PortAudio capture through a PulseAudio null sink, media files."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import sounddevice as sd

from cign_runtime.audio import AudioSourceError, FileAudioSource, MicSource, RingBuffer, list_inputs, open_audio
from media import write_clip
from pulse import play


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.shape[0])))
    return float(np.fft.rfftfreq(x.shape[0], 1.0 / rate)[np.argmax(spectrum)])


def rms_db(x: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(np.square(x, dtype=np.float64)))))


@pytest.mark.parametrize("model_rate,channels", [(8000, 1), (22050, 2)])
def test_mic_captures_tone_at_48k(pulse, model_rate, channels):
    freq, amplitude = 1000.0, 0.5
    t = np.arange(int(9.0 * 48000)) / 48000
    with MicSource("pulse", model_rate, 3.0, device_rate=48000, channels=channels) as mic:
        player = play(amplitude * np.sin(2 * np.pi * freq * t), 48000)

        def poll(seconds: float, until=lambda audio: False) -> float:
            """Read windows as inference does (resampling in this thread) until ``until`` holds."""
            start = time.perf_counter()
            while time.perf_counter() - start < seconds and not until(mic.window()[0]):
                time.sleep(0.03)
            return time.perf_counter() - start

        onset = poll(5.0, lambda audio: np.abs(audio[-model_rate // 10 :]).max() > amplitude / 2)
        assert onset < 5.0, "the tone never reached the capture device"
        poll(3.3)  # the window now lies entirely inside the tone
        audio, age = mic.window()
        stats = mic.stats()
        player.terminate()
        player.wait(10)
    print(f"\n{model_rate} Hz model, {channels} ch: {stats}, onset {onset:.2f} s, age {age * 1e3:.1f} ms, peak {dominant_hz(audio, model_rate):.2f} Hz, "
          f"level {rms_db(audio) - 20 * np.log10(amplitude / np.sqrt(2)):+.3f} dB")
    assert audio.shape == (3 * model_rate,) and audio.dtype == np.float32
    assert abs(dominant_hz(audio, model_rate) - freq) < 2.0
    assert abs(rms_db(audio) - 20 * np.log10(amplitude / np.sqrt(2))) < 0.5
    assert age < 0.2
    assert stats.callbacks > 100
    assert stats.overflows == 0 and stats.underflows == 0
    # p99 bounds our code; the max also holds OS preemption on a busy 2-core machine (measured: 0.2-1.7 ms).
    assert stats.callback_p99_s < 1e-3 and stats.callback_max_s < 10e-3


def test_callback_counts_overflows_and_underflows(pulse):
    mic = MicSource("pulse", 8000, 1.0, device_rate=48000)
    block = np.full((480, 1), 0.25, dtype=np.float32)
    for flags in (0, sd._lib.paInputOverflow, sd._lib.paInputUnderflow, 0):
        mic._callback(block, 480, None, sd.CallbackFlags(flags))
    stats = mic.stats()
    assert (stats.callbacks, stats.overflows, stats.underflows) == (4, 1, 1)
    assert 0 < stats.callback_p99_s <= stats.callback_max_s
    assert mic.ring.written == 1920 and mic.window()[1] < 1.0


def test_unknown_device_names_it_and_lists_inputs(pulse):
    with pytest.raises(AudioSourceError, match=r"(?s)'no-such-mic'.*available input devices:.*pulse") as e:
        MicSource("no-such-mic", 8000, 3.0)
    assert "default" in str(e.value)
    with pytest.raises(AudioSourceError, match=r"(?s)device 999 not found.*pulse"):
        open_audio("999", 8000, 3.0)


def test_open_audio_dispatches_devices_and_files(pulse, tmp_path):
    assert isinstance(open_audio("pulse", 8000, 3.0), MicSource)
    assert open_audio("default", 8000, 3.0).device_name == "default"
    clip = write_clip(tmp_path / "clip.mp4", 1.0)
    source = open_audio(str(clip), 8000, 1.0, realtime=False)
    assert isinstance(source, FileAudioSource) and not source.realtime
    assert [i for i, name, ch, rate in list_inputs() if name == "pulse"]


def test_ring_wraps_around_correctly():
    rng = np.random.default_rng(0)
    ring = RingBuffer(1000)
    window, _ = ring.newest(300)
    assert not window.any()
    history = np.zeros(0, dtype=np.float32)
    for size in [7, 250, 999, 1, 1000, 1700, 333, 500, 64] * 5:
        block = rng.standard_normal(size).astype(np.float32)
        ring.write(block)
        history = np.concatenate([history, block])
        for n in (1, 137, 500):
            got, end = ring.newest(n)
            want = history[-n:]
            assert end == history.shape[0] == ring.written
            np.testing.assert_array_equal(got, np.pad(want, (n - want.shape[0], 0)))


def test_ring_write_allocates_no_sample_memory():
    ring = RingBuffer(48000)
    block = np.ones(4800, dtype=np.float32)  # 19.2 kB per block
    for _ in range(20):  # warm-up: first-call caches
        ring.write(block[:4799])
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(1000):
            ring.write(block[:4799])  # odd size: every wrap position, split copies
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 256, "write() keeps memory"
    assert peak - before < 2048, f"write() allocated {peak - before} B at peak (a block is {block.nbytes} B)"


def test_ring_reader_never_sees_a_torn_window():
    """A writer thread appends a ramp while the reader checks every window is contiguous."""
    ring = RingBuffer(4096)
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            ring.write((np.arange(i, i + 100) % 65536).astype(np.float32))
            i += 100

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(3000):
            window, end = ring.newest(2000)
            if end >= 2000:
                assert np.all(np.diff(window) % 65536 == 1)
                assert window[-1] == (end - 1) % 65536
    finally:
        stop.set()
        thread.join()


def tone_clip(path: Path) -> Path:
    """A 4 s H.264 + AAC mp4 at 22,050 Hz: 440 Hz for 2 s, then 880 Hz (amplitude 0.5)."""
    rate = 22050
    t = np.arange(4 * rate) / rate
    audio = 0.5 * np.sin(2 * np.pi * np.where(t < 2.0, 440.0, 880.0) * t)
    return write_clip(path, 4.0, audio=audio[None].astype(np.float32), sample_rate=rate)


def test_file_source_window_at_media_time(tmp_path):
    source = FileAudioSource(tone_clip(tmp_path / "tones.mp4"), 8000, 1.0, realtime=False)
    assert abs(source.duration - 4.0) < 0.05
    first, second = source.window_at(2.0), source.window_at(4.0)
    assert first.shape == second.shape == (8000,)
    assert abs(dominant_hz(first, 8000) - 440) < 2 and abs(dominant_hz(second, 8000) - 880) < 2
    assert abs(rms_db(first) - 20 * np.log10(0.5 / np.sqrt(2))) < 0.5
    # Before the start and after the end: zero padding, not wrapped audio.
    assert not source.window_at(0.0).any() and not source.window_at(5.1).any()
    assert not source.window_at(0.5)[:4000].any() and source.window_at(0.5)[4100:].any()


def test_file_source_steps_without_realtime(tmp_path):
    source = FileAudioSource(tone_clip(tmp_path / "tones.mp4"), 8000, 1.0, realtime=False, step_seconds=1.0)
    seen = []
    for _ in range(4):
        window, age = source.window()
        seen.append(round(dominant_hz(window, 8000)))
        assert age == 0.0 and not source.finished
    assert seen == [440, 440, 880, 880] and source.position == 4.0
    assert source.window()[1] > 0.9 and source.finished  # 5 s: past the end, the window is stale


def test_file_source_plays_in_real_time(tmp_path):
    source = FileAudioSource(tone_clip(tmp_path / "tones.mp4"), 8000, 1.0, realtime=True)
    with pytest.raises(AudioSourceError, match="not started"):
        source.window()
    with source:
        t0 = time.perf_counter()
        time.sleep(1.5)
        window, age = source.window()
        elapsed = time.perf_counter() - t0
        position = source.position
        assert age == 0.0 and abs(dominant_hz(window, 8000) - 440) < 2
        assert elapsed - 0.01 <= position <= time.perf_counter() - t0 + 0.01  # media time runs at 1x
        time.sleep(1.0)
        assert abs(dominant_hz(source.window()[0], 8000) - 880) < 2
    looping = FileAudioSource(tone_clip(tmp_path / "tones.mp4"), 8000, 1.0, realtime=True, loop=True).start()
    looping._started_at -= 9.5  # 9.5 s in: the third pass, near 1.5 s
    window, age = looping.window()
    assert age == 0.0 and abs(looping.position - 9.5 % looping.duration) < 0.05 and abs(dominant_hz(window, 8000) - 440) < 2


def test_file_source_mixes_channels_down(tmp_path):
    stereo = write_clip(tmp_path / "stereo.mp4", 2.0, channels=2, with_video=False)  # 440 Hz left, 880 Hz right
    window = FileAudioSource(stereo, 8000, 1.0, realtime=False).window_at(1.5)
    spectrum = np.abs(np.fft.rfft(window * np.hanning(8000)))
    assert sorted(np.argsort(spectrum)[-2:]) == [440, 880]  # 1 Hz bins: both channels, equal parts
    assert abs(rms_db(window) - 20 * np.log10(0.15)) < 0.5  # the mean of two 0.3 sines


def test_file_without_audio_is_a_clear_error(tmp_path):
    silent = write_clip(tmp_path / "video-only.mp4", 1.0, with_audio=False)
    with pytest.raises(AudioSourceError, match=r"video-only\.mp4.*has no audio stream"):
        FileAudioSource(silent, 8000, 1.0)


def test_imports_and_decodes_without_torch(tmp_path, torchless_env):
    clip = write_clip(tmp_path / "clip.mp4", 1.0)
    code = textwrap.dedent(f"""
        import sys
        from cign_runtime.audio import FileAudioSource, RingBuffer, list_inputs
        source = FileAudioSource({str(clip)!r}, 8000, 0.5, realtime=False)
        assert source.window_at(1.0).any()
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=120, env=torchless_env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
