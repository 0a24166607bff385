#!/usr/bin/env bash
# System packages some tests drive for real (they skip, saying why, where these are missing):
# a headless Chromium for interactive_modify, Slurm and munge for the cluster launch tests, and
# iproute2 + util-linux (ip netns, nsenter, unshare) for the emulated multi-host cluster.
# Needs root and Debian's apt; run once per machine (CI runs it before the tests).
set -euo pipefail
PACKAGES=(chromium chromium-driver slurm-wlm munge slurmctld slurmd slurm-client iproute2 util-linux)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: not root or no apt-get; the tests needing ${missing[*]} will be skipped" >&2
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
