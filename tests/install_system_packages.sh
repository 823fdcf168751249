#!/usr/bin/env bash
# System packages the test suite needs: a real single-node Slurm cluster for tests/test_slurm.py,
# shellcheck for slurm/*.sh, perl with XML::Parser for ROUGE-1.5.5 (GLGE's official ROUGE) and a
# Java runtime for METEOR 1.5 (default-jre-headless, only when no `java` is on PATH).
# Idempotent and quiet: nothing happens when they are already installed. Needs root and apt-get;
# elsewhere it warns and the Slurm tests skip (outside CI) or fail (CI=true) with the reason.
set -euo pipefail
SYSTEM_PACKAGES=(slurmd slurmctld slurm-client munge shellcheck perl libxml-parser-perl)
command -v java >/dev/null || SYSTEM_PACKAGES+=(default-jre-headless)
missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "installing system packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "warning: cannot install ${missing[*]} (needs root and apt-get); tests that need them will skip or fail" >&2
    fi
fi
