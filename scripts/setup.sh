#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine: system libraries, then the package with its test extra.
# Safe to re-run: apt runs only when a library is missing; pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# libportaudio2: sounddevice's PortAudio; libgl1/libglib2.0-0: opencv-python's runtime libraries;
# pulseaudio, pulseaudio-utils (pactl, pacat), libasound2-plugins (ALSA's "pulse" device for PortAudio):
# tests/test_audio.py captures through a private PulseAudio null sink.
# gcc, libc6-dev: cign_runtime.isa builds its CPUID mask (cign-bench --cpu-isa avx2, tests/test_isa.py).
# ffmpeg: cign-download's yt-dlp fetches and cuts the VGGSound segments with it.
APT_PACKAGES=(libportaudio2 libgl1 libglib2.0-0 pulseaudio pulseaudio-utils libasound2-plugins gcc libc6-dev ffmpeg)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# torch/torchvision pinned to the releases these machines serve from disk (docs/deploying.md).
"$PYTHON" -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[train,download,test]"
