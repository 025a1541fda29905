#!/bin/sh
# espeak-ng, the offline text-to-speech engine (a Debian package). Without it the bot still runs:
# it says at start that speaking is off, and Meta calls play beeps instead of a message.
command -v espeak-ng >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
{ $SUDO apt-get install -y -qq espeak-ng || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq espeak-ng; }; } >/dev/null 2>&1 \
    || echo "espeak-ng could not be installed (apt-get): speaking stays off" >&2
exit 0
