"""Spoken words from eSpeak NG (the PyPI package ``espeakng-loader``) through a ctypes binding.

Only the classic ``speak_lib.h`` API is bound, in ``AUDIO_OUTPUT_SYNCHRONOUS`` mode: the synth
callback receives int16 sample blocks and ``espeak_Synchronize`` returns once the text is spoken.

eSpeak keeps synthesis state between utterances (pitch flutter and glottal wave phase), seeds its
breath-noise generator from the clock, and some voices draw on libc ``rand()``. So that every
utterance is a pure function of its arguments (and data set generation does not depend on how
clips are spread over worker processes), each call loads a fresh copy of the library, initialises
it, fixes both random seeds, speaks, and unloads it again (about 4 ms). Calls hold a lock: the
library is process-global, and ``srand`` resets libc's shared generator.
"""
from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass
from pathlib import Path

import _ctypes
import espeakng_loader
import numpy as np

#: English accents (eSpeak language names) shared by all voice pools.
ACCENTS = (
    "en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029",
    "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
)
#: Voice variants (files in ``espeak-ng-data/voices/!v``); the data set splits these into pools.
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "croak", "whisper",
    "Alex", "Andy", "Annie", "Denis", "Gene", "Jacky", "Lee", "Mike", "Storm",
    "adam", "anika", "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed",
    "edward", "grandma", "grandpa", "gustave", "iven", "john", "linda", "max", "michel",
    "norbert", "paul", "pedro", "quincy", "rob", "robert", "steph", "travis",
)

# speak_lib.h facts (ESPEAK_API_REVISION 12)
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT
_POS_CHARACTER = 1  # espeak_POSITION_TYPE
_CHARS_UTF8 = 1  # espeak_Synth flags
_EE_OK = 0  # espeak_ERROR
_RATE, _PITCH, _RANGE = 1, 3, 4  # espeak_PARAMETER
# int SynthCallback(short *wav, int numsamples, espeak_EVENT *events); return 0 to continue
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

_LOCK = threading.Lock()  # the library has process-global state
_LIBC = ctypes.CDLL(None)  # some voices also draw noise from libc rand()


@dataclass(frozen=True)
class Voice:
    """An eSpeak voice (``accent+variant``) with prosody settings."""

    accent: str
    variant: str
    speed: int = 175  # words per minute, 80..450
    pitch: int = 50  # base pitch, 0..100
    pitch_range: int = 50  # intonation range, 0 (monotone)..100

    @property
    def name(self) -> str:
        return f"{self.accent}+{self.variant}"


@functools.cache
def variant_names() -> tuple[str, ...]:
    """Variant files shipped in the installed ``espeak-ng-data``."""
    return tuple(sorted(p.name for p in (Path(espeakng_loader.get_data_path()) / "voices" / "!v").iterdir()))


def synthesise(text: str, voice: Voice) -> tuple[np.ndarray, int]:
    """Speak ``text``; returns (float32 mono samples in [-1, 1], sample rate in Hz)."""
    if voice.variant not in variant_names():
        # espeak_SetVoiceByName silently ignores an unknown variant
        raise ValueError(f"unknown eSpeak voice variant {voice.variant!r}")
    with _LOCK:
        blocks: list[np.ndarray] = []

        def collect(wav, n, _events):
            if wav and n > 0:
                blocks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        callback = _SYNTH_CALLBACK(collect)
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        try:
            rate = _speak(lib, callback, text, voice)
        finally:
            _ctypes.dlclose(lib._handle)
    if not blocks:
        raise RuntimeError(f"eSpeak produced no audio for {text!r} with voice {voice.name}")
    return np.concatenate(blocks).astype(np.float32) / 32768.0, rate


def _speak(lib: ctypes.CDLL, callback, text: str, voice: Voice) -> int:
    """Initialise a freshly loaded library, speak ``text`` into ``callback``, terminate."""
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
        ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]
    rate = lib.espeak_Initialize(
        _AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0
    )
    if rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed ({rate})")
    try:
        lib.espeak_SetSynthCallback(callback)
        # breath noise comes from eSpeak's own generator, seeded from the clock at initialisation
        _check(lib.espeak_ng_SetRandSeed(ctypes.c_long(0)), "random seed")
        _LIBC.srand(0)
        _check(lib.espeak_SetVoiceByName(voice.name.encode()), f"voice {voice.name}")
        for parameter, value in ((_RATE, voice.speed), (_PITCH, voice.pitch), (_RANGE, voice.pitch_range)):
            _check(lib.espeak_SetParameter(parameter, value, 0), f"parameter {parameter}={value}")
        data = text.encode() + b"\0"
        _check(
            lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None),
            f"synthesis of {text!r}",
        )
        _check(lib.espeak_Synchronize(), "synchronize")
    finally:
        lib.espeak_Terminate()
    return rate


def _check(status: int, what: str) -> None:
    if status != _EE_OK:
        raise RuntimeError(f"eSpeak failed on {what} (espeak_ERROR {status})")
