#!/usr/bin/env bash
# The Debian packages the tests need besides .venv, installed if missing (scripts/setup.sh --tests
# runs this; so does CI). Without them the SSH tests would be skipped.
#   openssh-server: tests/test_edge_ssh.py starts a real sshd (/usr/sbin/sshd, ssh-keygen) on 127.0.0.1
#   rsync: Ray's cluster launcher copies file_mounts with it (ray_cluster*.yaml)
set -euo pipefail
missing=()
if [ ! -x /usr/sbin/sshd ] || ! command -v ssh-keygen >/dev/null; then missing+=(openssh-server); fi
if ! command -v rsync >/dev/null; then missing+=(rsync); fi
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "the tests need ${missing[*]} and there is no apt-get: install them by hand" >&2
    exit 1
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null; then
        echo "the tests need ${missing[*]}; not root and no sudo to install them: ask an administrator" >&2
        exit 1
    fi
    SUDO=(sudo -n)  # never prompt: CI has no one to answer
fi
# env, not export: sudo drops the caller's environment
APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get)
echo "installing ${missing[*]} for the tests"
# a fresh image may have no package lists yet: update only when the first try fails
"${APT[@]}" install -y -qq "${missing[@]}" >/dev/null 2>&1 \
    || { "${APT[@]}" update -qq >/dev/null && "${APT[@]}" install -y -qq "${missing[@]}" >/dev/null; } \
    || { echo "apt-get install ${missing[*]} failed: the tests need them; install them by hand" >&2; exit 1; }
