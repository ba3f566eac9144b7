#!/usr/bin/env bash
# Debian packages the tests drive: git-lfs (git clone + git lfs pull against the hub), chromium +
# chromium-driver (the headless browser test), tmux (the live view on a real terminal) and strace (which
# files a no-op re-run opens).
# Quick when they are already there.
set -euo pipefail
need=()
command -v git-lfs >/dev/null || need+=(git-lfs)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
fc-list 2>/dev/null | grep -qi dejavu || need+=(fonts-dejavu-core)
command -v tmux >/dev/null || need+=(tmux)
command -v strace >/dev/null || need+=(strace)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-tools: need ${need[*]}; run as root or: sudo apt-get install ${need[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
