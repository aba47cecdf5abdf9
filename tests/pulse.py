"""A private PulseAudio daemon with a 48 kHz null sink: a real capture device for tests and benchmarks.

The sink's monitor is the default source, so PortAudio's ``pulse`` (and ``default``) input records
whatever :func:`play` writes into the sink. PortAudio reaches the daemon through ALSA's ``pulse``
plugin; PULSE_SERVER points every client of this process (and its children) at the daemon's socket.
Needs Debian's pulseaudio, pulseaudio-utils (pactl, pacat) and libasound2-plugins.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

SINK = "cign_test"


class PulseUnavailable(RuntimeError):
    """The daemon or its tools are missing or did not come up; the message says which."""


@contextmanager
def null_sink(runtime: Path | None = None) -> Iterator[str]:
    """Start the daemon, make ``SINK.monitor`` the default source, yield the server address; stop it after."""
    import sounddevice as sd

    from cign_runtime.audio import list_inputs

    for tool in ("pulseaudio", "pactl", "pacat"):
        if shutil.which(tool) is None:
            raise PulseUnavailable(f"{tool} is not installed (Debian packages pulseaudio, pulseaudio-utils, "
                                   "libasound2-plugins)")
    runtime = Path(tempfile.mkdtemp(prefix="pulse-")) if runtime is None else runtime
    runtime.chmod(0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), HOME=str(runtime))
    # -n: no default.pa (no hardware, dbus or X11 modules); anonymous auth: no cookie to share.
    # As root pulseaudio only warns ("not intended to be run as root") without --system.
    log = runtime / "pulseaudio.log"
    daemon = subprocess.Popen(
        ["pulseaudio", "--daemonize=no", "-n", "--use-pid-file=no", "--exit-idle-time=-1", "--disallow-exit",
         "--load=module-native-protocol-unix auth-anonymous=1",
         f"--load=module-null-sink sink_name={SINK} rate=48000 channels=2",
         "--log-target=stderr", "--log-level=error"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    server = f"unix:{runtime}/pulse/native"
    saved = {k: os.environ.get(k) for k in ("PULSE_SERVER", "PULSE_SOURCE", "PULSE_SINK")}
    os.environ.update(PULSE_SERVER=server, PULSE_SOURCE=f"{SINK}.monitor", PULSE_SINK=SINK)
    try:
        for _ in range(100):
            if daemon.poll() is not None:
                raise PulseUnavailable(f"pulseaudio exited with {daemon.returncode}: "
                                       f"{log.read_text(errors='replace')[-2000:]}")
            if subprocess.run(["pactl", "info"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise PulseUnavailable("pulseaudio did not answer pactl within 10 s")
        subprocess.run(["pactl", "set-default-source", f"{SINK}.monitor"], check=True)
        # PortAudio enumerated devices when sounddevice was imported, before the daemon ran.
        sd._terminate()
        sd._initialize()
        if "pulse" not in [name for _, name, *_ in list_inputs()]:
            raise PulseUnavailable(f"PortAudio sees no 'pulse' input (is libasound2-plugins installed?): "
                                   f"{list_inputs()}")
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        daemon.terminate()
        daemon.wait(10)
        sd._terminate()
        sd._initialize()


def play(signal: np.ndarray, rate: int) -> subprocess.Popen:
    """Play mono float32 into the null sink (pacat reads raw samples from stdin)."""
    proc = subprocess.Popen(["pacat", "--playback", f"--device={SINK}", "--format=float32le", f"--rate={rate}",
                             "--channels=1", "--raw", "--latency-msec=50"], stdin=subprocess.PIPE)
    threading.Thread(target=proc.communicate, args=(signal.astype("<f4").tobytes(),), daemon=True).start()
    return proc
