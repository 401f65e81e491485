#!/usr/bin/env bash
# Installs the Debian packages the built-in corpus needs (speech synthesizers,
# festival's English voices, public-domain text) when any is missing. Quick and
# silent when everything is already there.
set -euo pipefail

packages=(espeak-ng festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts fortunes fortunes-zh)

present() {
  command -v espeak-ng >/dev/null &&
    command -v festival >/dev/null &&
    [ -d /usr/share/festival/voices/english/kal_diphone ] &&
    [ -d /usr/share/festival/voices/english/ked_diphone ] &&
    [ -d /usr/share/festival/voices/us/cmu_us_slt_arctic_hts ] &&
    [ -f /usr/share/games/fortunes/literature ] &&
    [ -f /usr/share/games/fortunes/tang300 ]
}

present && exit 0

if ! command -v apt-get >/dev/null; then
  echo "echoic setup: apt-get is not available; install these packages by hand: ${packages[*]}" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
  else
    echo "echoic setup: need root to run apt-get; run: sudo apt-get install -y ${packages[*]}" >&2
    exit 1
  fi
fi
echo "echoic setup: installing ${packages[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
present || { echo "echoic setup: packages installed but a voice or text file is still missing" >&2; exit 1; }
