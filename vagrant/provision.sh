#!/bin/sh
# Vagrant provisioning, after enable-bpf-lsm.sh and the reboot: check that the kernel now runs
# BPF-LSM, then install Stockade and run its tests with the README's commands.
#
#   provision.sh [CHECKOUT]          (default /stockade, the Vagrantfile's synced folder)
#
# STOCKADE_PROVISION_SKIP_TESTS=1 stops after the setup (for `vagrant up` without the ~minutes
# of tests); STOCKADE_PROVISION_CHECK_ONLY=1 stops after the kernel checks (the test suite runs
# it in the QEMU lab). The Vagrantfile sets STOCKADE_REQUIRE_KERNEL_TESTS=1 so no kernel test skips.
set -eu
checkout=${1:-/stockade}
cd "$checkout"

if ! mountpoint -q /sys/kernel/security; then
    mount -t securityfs securityfs /sys/kernel/security
fi
lsm=$(cat /sys/kernel/security/lsm)
case ",$lsm," in
    *,bpf,*) echo "provision: active LSMs $lsm" ;;
    *) echo "provision: bpf is not an active LSM ($lsm); did the reboot after enable-bpf-lsm.sh happen?" >&2
       exit 1 ;;
esac
if [ ! -f /sys/fs/cgroup/cgroup.controllers ]; then
    echo "provision: /sys/fs/cgroup is not cgroup v2; boot with systemd.unified_cgroup_hierarchy=1" >&2
    exit 1
fi

if [ "${STOCKADE_PROVISION_CHECK_ONLY:-0}" = 1 ]; then
    echo "provision: kernel ready (BPF-LSM active, cgroup v2)"
    exit 0
fi

# scripts/setup installs Debian's packages; Ubuntu names its kernel headers by flavour.
if [ -r /etc/os-release ] && . /etc/os-release && [ "${ID:-}" = ubuntu ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "linux-headers-$(uname -r)" >/dev/null
fi

./scripts/setup
.venv/bin/stockade doctor || true
if [ "${STOCKADE_PROVISION_SKIP_TESTS:-0}" != 1 ]; then
    ./scripts/test
fi
