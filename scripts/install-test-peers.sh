#!/bin/sh
# Test peers for Meta media interoperability: GStreamer's webrtcbin (libnice ICE, OpenSSL DTLS
# with an RSA certificate), run by the system Python through python3-gi (tests/fakes/gst_edge.py).
# Only tests use it; they skip without it, unless CALLBOT_REQUIRE_GSTREAMER=1.
PACKAGES="python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-plugins-bad-1.0
gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-nice"
# shellcheck disable=SC2086
set -- $PACKAGES
installed=$(dpkg-query -W -f='${db:Status-Abbrev}\n' "$@" 2>/dev/null | grep -c '^ii')
[ "$installed" -eq $# ] && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
{ $SUDO apt-get install -y -qq "$@" || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "$@"; }; } >/dev/null 2>&1 \
    || echo "GStreamer test peers could not be installed (apt-get): their tests are skipped" >&2
exit 0
