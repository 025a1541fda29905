#!/bin/sh
# Test-only Debian packages, installed idempotently:
# - Meta media interoperability peers: GStreamer's webrtcbin (libnice ICE, OpenSSL DTLS with an
#   RSA certificate), run by the system Python through python3-gi (tests/fakes/gst_edge.py).
#   Their tests skip without them, unless CALLBOT_REQUIRE_GSTREAMER=1.
# - prometheus (and its promtool): tests/test_metrics.py runs the binary itself, on a free
#   loopback port with a temporary config, to scrape the bot and check deploy/prometheus-rules.yml.
#   Skipped without it, unless CALLBOT_REQUIRE_PROMETHEUS=1.
# - haproxy: tests/test_replicas.py runs it with deploy/haproxy.cfg in front of several bot
#   processes. Skipped without it, unless CALLBOT_REQUIRE_HAPROXY=1.
# - prometheus-alertmanager: tests/test_oncall_watch.py runs it on a free loopback port with the
#   README's Watchdog route to the heartbeat endpoint. Skipped without it, unless
#   CALLBOT_REQUIRE_ALERTMANAGER=1.
# - chromium (+ fonts-dejavu-core, so screenshots show text): the Mini App softphone's tests
#   (tests/browser.py) drive Debian's headless Chromium with Playwright, never a downloaded
#   browser. Skipped without it, unless CALLBOT_REQUIRE_BROWSER=1.
# Debian's packages start system services (prometheus on :9090, haproxy with /etc/haproxy,
# alertmanager on :9093)
# when they are installed. Tests never use them, so they must not run: the install is made under
# a policy-rc.d that refuses every service start (exit 101, the documented "action forbidden"
# answer invoke-rc.d and deb-systemd-invoke honour), and under systemd the units are then
# disabled and stopped as well.
PACKAGES="python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-plugins-bad-1.0
gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-nice
prometheus haproxy prometheus-alertmanager chromium fonts-dejavu-core"
# shellcheck disable=SC2086
set -- $PACKAGES
installed=$(dpkg-query -W -f='${db:Status-Abbrev}\n' "$@" 2>/dev/null | grep -c '^ii')
[ "$installed" -eq $# ] && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
POLICY=/usr/sbin/policy-rc.d
ours=""
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null && $SUDO chmod 755 "$POLICY" \
        && ours=1
fi
{ $SUDO apt-get install -y -qq "$@" || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "$@"; }; } >/dev/null 2>&1 \
    || echo "test peers could not be installed (apt-get): the tests that need them are skipped" >&2
[ -n "$ours" ] && $SUDO rm -f "$POLICY"
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now prometheus.service prometheus-node-exporter.service \
        haproxy.service prometheus-alertmanager.service >/dev/null 2>&1 || true
fi
exit 0
