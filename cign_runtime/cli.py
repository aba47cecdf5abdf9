"""``cign-live``: classify a live camera + microphone (or files / streams) with an exported CIGN, without torch."""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from pathlib import Path

import click
from click.core import ParameterSource

from cign_runtime import enroll as en
from cign_runtime.enroll_cli import FIT_FLAGS, fit_flags, fit_options
from cign_runtime import latency
from cign_runtime import swap
from cign_runtime.audio import AudioSourceError, list_inputs, open_audio
from cign_runtime import manifest as mf
from cign_runtime.backends import BACKENDS, TORCH_MODES, BackendUnavailable, TensorRTRunner, open_model
from cign_runtime.live import JsonLines, Live, LiveOptions, Recorder, notice, overlay
from cign_runtime.video import VideoSource, VideoSourceError, list_cameras

#: Seconds an event's line (an enrolment prompt, a swap) stays in the window unless a newer one replaces it.
NOTICE_SECONDS = 5.0


class Display:
    """Sink: the annotated frame in an OpenCV window (q or Esc stops); :meth:`event` shows an event's line."""

    def __init__(self, window: str = "cign-live"):
        import cv2

        self.cv2, self.window = cv2, window
        self._note: tuple[str, float] = ("", 0.0)  # (line, perf_counter when it expires), replaced whole

    def event(self, event: dict) -> None:
        self._note = (notice(event), time.perf_counter() + NOTICE_SECONDS)

    def __call__(self, result: dict, rgb) -> None:
        line, until = self._note
        if rgb is not None:
            self.cv2.imshow(self.window, overlay(rgb, result, 0.0, line if time.perf_counter() < until else ""))
        if self.cv2.waitKey(1) & 0xFF in (ord("q"), 27):
            raise KeyboardInterrupt


def devices() -> str:
    cams = list_cameras()
    lines = ["cameras: " + (", ".join(cams) if cams else "none (a video file or stream URL works as --camera)"),
             "audio inputs:"]
    try:
        lines += [f"  {i}: {name} ({ch} ch, {rate:.0f} Hz)" for i, name, ch, rate in list_inputs()] or ["  none"]
    except AudioSourceError as e:
        lines.append(f"  none ({e})")
    return "\n".join(lines)


def register(model_dir: Path, plan: Path, precision: str | None) -> str:
    """``--register-engine``: check that TensorRT loads ``plan`` with the graph's tensors, then list it in the manifest."""
    if precision not in mf.PRECISIONS:
        raise click.UsageError(f"--register-engine needs --precision, one of {mf.PRECISIONS}")
    try:  # an engine rebuilt in place replaces its entry: every other artefact must be unchanged
        manifest = mf.Manifest.load(model_dir, verify=False).with_engine(model_dir, plan, precision)
        manifest.verify(model_dir)
        TensorRTRunner(plan).close()
        manifest.save(model_dir)
    except (BackendUnavailable, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    return f"registered {plan} as the {precision} engine of {model_dir / mf.FILENAME}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Export folder of cign-export (manifest.json).")
@click.option("--camera", default="0", show_default=True, help="Device index or path, video file, or stream URL.")
@click.option("--mic", default="default", show_default=True, help="'default', a PortAudio device name or index, or an audio/video file.")
@click.option("--task", type=click.IntRange(min=0), help="Token table of this task (tokens-as-input exports) [default: the export's].")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--precision", help="A precision the export has [default: the backend's best].")
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads (torch's on torch-cpu).")
@click.option("--torch-mode", metavar="MODE", help="torch-cuda / torch-cpu: " + ", ".join(TORCH_MODES) + " (compile modes "
              "as compile:MODE) [default: graph on CUDA, eager on the CPU].")
@click.option("--hop", type=click.FloatRange(min=0.01), default=0.25, show_default=True, help="Seconds between predictions.")
@click.option("--topk", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--smooth", type=click.IntRange(min=1), default=1, show_default=True, help="Average the last N predictions (1: off).")
@click.option("--headless", is_flag=True, help="No window: one JSON line per prediction on stdout.")
@click.option("--record", type=click.Path(dir_okay=False, path_type=Path), help="Write the annotated video (H.264 mp4).")
@click.option("--latency-log", type=click.Path(dir_okay=False, path_type=Path), help="Per-prediction stage latencies (JSONL).")
@click.option("--max-seconds", type=click.FloatRange(min=0), help="Stop after this many seconds.")
@click.option("--max-predictions", type=click.IntRange(min=1), help="Stop after this many predictions.")
@click.option("--no-realtime", is_flag=True, help="File inputs: step through them as fast as possible instead of at 1x.")
@click.option("--loop", is_flag=True, help="File inputs: start again at the end (a soak test; stop with --max-seconds).")
@click.option("--list-devices", is_flag=True, help="List cameras and audio inputs, then exit.")
@click.option("--summarize", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Print the summary of a latency log and write its histogram PNG, then exit.")
@click.option("--register-engine", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Add a TensorRT engine built on this device (trtexec.sh) to --model's manifest as --precision, "
                   "after loading it with TensorRT; then exit.")
@click.option("--no-watch", is_flag=True, help="Keep the opened version: do not swap in newer versions (EXPORT.rN "
              "beside it) of a tokens-as-input export.")
@click.option("--enroll", "enroll_name", metavar="NAME", help="Learn class NAME from --shots shots of the running "
              "camera and microphone while predicting, then swap the new version in.")
@click.option("--shots", type=click.IntRange(min=1), default=en.SHOTS, show_default=True, help="--enroll: shots to take.")
@click.option("--countdown", type=click.FloatRange(min=0), default=en.COUNTDOWN, show_default=True,
              help="--enroll: seconds of countdown before each shot.")
@fit_flags
def main(model_dir, camera, mic, task, backend, precision, threads, torch_mode, hop, topk, smooth, headless, record, latency_log,
         max_seconds, max_predictions, no_realtime, loop, list_devices, summarize, register_engine, no_watch,
         enroll_name, shots, countdown, **fit):
    """Live audio-visual classification: p_av = p_audio * p_visual every --hop seconds, with per-stage latency."""
    if list_devices:
        click.echo(devices())
        return
    if summarize:
        click.echo(latency.summarize(summarize))
        return
    if model_dir is None:
        raise click.UsageError("--model EXPORT_DIR is required (or --list-devices / --summarize)")
    if register_engine:
        click.echo(register(model_dir, register_engine, precision))
        return
    if no_realtime and not (Path(camera).is_file() and Path(mic).is_file()):
        raise click.UsageError("--no-realtime steps through files: give a video file as --camera and a file as --mic")
    if loop and no_realtime:
        raise click.UsageError("--loop plays files at 1x forever; it cannot be combined with --no-realtime")
    check_enroll_flags(enroll_name, no_watch, no_realtime, task)
    logging.basicConfig(level=logging.WARNING, format="cign-live: %(message)s", stream=sys.stderr)
    logging.getLogger("cign_runtime").setLevel(logging.INFO)  # swaps and enrolments are news, not warnings
    try:
        model = open_model(model_dir, backend, precision, task, threads, spinning=False, mode=torch_mode)
    except (BackendUnavailable, ValueError, KeyError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"model: {model}", err=True)
    if enroll_name is not None:
        try:  # refuse a baked-tokens export or a taken name before the sources open
            en.check_name(en.Export(model_dir).manifest, enroll_name)
        except en.EnrollError as e:
            model.close()
            raise click.ClickException(f"--enroll: {e}") from e
    spec = model.spec
    options = LiveOptions(hop, topk, smooth, not no_realtime, max_seconds, max_predictions)
    try:
        audio = open_audio(mic, spec.sample_rate, spec.clip_seconds, realtime=options.realtime, loop=loop)
        video = VideoSource(camera, realtime=options.realtime, loop=loop)
        audio.start()
        video.start()
    except (AudioSourceError, VideoSourceError) as e:
        raise click.ClickException(str(e)) from e
    out = JsonLines(sys.stdout) if headless else Display()
    sinks = [out]
    recorder = Recorder(str(record), hop) if record else None
    if recorder:
        sinks.append(recorder)
    watcher = None
    if model.manifest.tokens_as_input and not no_watch:
        watcher = swap.Watcher(model, task, emit=out.event).start()
        signal.signal(signal.SIGHUP, lambda *_: watcher.poke())
    with latency.LatencyLog(latency_log) as log:
        live = Live(model, video, audio, options, log, sinks, updates=watcher)
        signal.signal(signal.SIGTERM, lambda *_: live.stop())
        enrolment = (swap.enrol(live, watcher, enroll_name, shots, countdown, out.event, fit_options(fit))
                     if enroll_name else None)
        try:
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C, or q / Esc in the window
                live.run()
        finally:
            live.stop()  # abandons a capture still under way
            if enrolment:
                enrolment.join()
            if watcher:
                watcher.stop()
            video.stop()
            audio.stop()
            if recorder:
                recorder.close()
            live.model.close()
    click.echo(latency.summary_table(log), err=True)


def check_enroll_flags(enroll_name: str | None, no_watch: bool, no_realtime: bool, task: int | None) -> None:
    """UsageError for --shots / --countdown / the fit's flags without --enroll, and --enroll with --no-watch, --no-realtime or --task."""
    ctx = click.get_current_context()
    given = [f"--{p.replace('_', '-')}" for p in ("shots", "countdown", *FIT_FLAGS)
             if ctx.get_parameter_source(p) == ParameterSource.COMMANDLINE]
    if enroll_name is None:
        if given:
            raise click.UsageError(f"{' and '.join(given)} belong to --enroll NAME")
        return
    if no_watch:
        raise click.UsageError("--enroll swaps the enrolled version in, which --no-watch turns off")
    if no_realtime:
        raise click.UsageError("--enroll captures shots in real time; it cannot be combined with --no-realtime")
    if task is not None:
        raise click.UsageError("--enroll adds the class as a task of its own, which a pinned --task would not show; "
                               "leave --task out")


if __name__ == "__main__":
    main()
