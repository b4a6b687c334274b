#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the report's browser test, when it is missing.
#
# A no-op when a Chromium is already there. Never fatal: without apt (or without root) it says
# why and exits 0, and the browser test then skips with that reason. CI (MMPIPE_REQUIRE_CHROMIUM=1)
# makes a failed install an error, so the browser test cannot silently skip there.
set -uo pipefail

find_chromium() {
    for c in "${CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser /usr/bin/google-chrome; do
        if [[ -n "$c" && -x "$c" ]]; then echo "$c"; return 0; fi
    done
    return 1
}

fail() {
    echo "ensure_chromium: $*" >&2
    if [[ "${MMPIPE_REQUIRE_CHROMIUM:-0}" == "1" ]]; then exit 1; fi
    echo "ensure_chromium: the browser test will be skipped" >&2
    exit 0
}

if found=$(find_chromium); then
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || fail "chromium is missing and apt-get is not available; install Chromium and set CHROMIUM=/path/to/it"
SUDO=""
if [[ "$(id -u)" != "0" ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        fail "chromium is missing and installing it needs root (run: sudo apt-get install -y chromium)"
    fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "ensure_chromium: installing Debian's chromium (once) ..." >&2
# Retries: a mirror hiccup or a dpkg lock held by another apt run must not fail CI.
for attempt in 1 2 3; do
    if $SUDO apt-get update -qq \
        && $SUDO apt-get install -y -qq --no-install-recommends -o Dpkg::Lock::Timeout=120 \
            chromium fonts-dejavu-core >/dev/null; then
        break
    fi
    echo "ensure_chromium: attempt $attempt failed; retrying" >&2
    sleep $((attempt * 5))
done
find_chromium >/dev/null || fail "apt-get install chromium did not install /usr/bin/chromium"
echo "ensure_chromium: $(find_chromium) ($("$(find_chromium)" --version 2>/dev/null || echo 'version unknown'))" >&2
