#!/bin/busybox sh
# Stockade kernel lab: /init of the guest's initramfs (stage 1), run by busybox as PID 1.
#
# It loads the virtio/9p modules the lab copied into /modules, mounts the host's root read-only
# over virtio-9p at /newroot, puts the kernel-facing filesystems a container runtime needs on top
# (pure cgroup v2 with every controller delegated, bpffs, tracefs, securityfs, debugfs), shares
# the project checkout read-write at its host path, makes /lib/modules/$(uname -r) resolve to the
# guest kernel's modules and headers, then switch_roots into the host root and runs the job
# script the lab wrote into the per-run share. Any failure prints a marker the host recognises
# and powers the guest off, so the host never waits for a timeout on a broken boot.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    echo "@@STOCKADE-LAB-FAIL $*@@"
    echo o > /proc/sysrq-trigger
    sleep 30
}

# Module probing is asynchronous (virtio_pci binds devices after insmod returns) and insmod
# fails until a module's dependencies are in: retry the whole list until every one is loaded.
tries=0
while :; do
    missing=""
    for m in $(cat /modules/order); do
        [ -d "/sys/module/$m" ] && continue
        insmod "/modules/$m.ko" 2>/dev/null || missing="$missing $m"
    done
    [ -z "$missing" ] && break
    tries=$((tries + 1))
    [ $tries -ge 100 ] && fail "modules did not load:$missing"
    usleep 50000
done

# mount_9p TAG DIR OPTIONS: retries until the virtio transport for TAG has been probed.
mount_9p() {
    n=0
    until mount -t 9p -o "trans=virtio,version=9p2000.L,msize=512000,$3" "$1" "$2" 2>/dev/null; do
        n=$((n + 1))
        [ $n -ge 200 ] && fail "cannot mount 9p share $1 on $2"
        usleep 25000
    done
}

R=/newroot
mkdir -p $R
mount_9p hostroot $R ro,cache=loose
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs $R/run || fail "tmpfs on /run"
mkdir -p $R/run/stockade-lab
mount_9p labrun $R/run/stockade-lab cache=none
. $R/run/stockade-lab/params || fail "no params in the run share"

mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm $R/dev/mqueue
mount -t devpts -o newinstance,ptmxmode=0666,gid=5,mode=620 devpts $R/dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $R/dev/shm
mount -t mqueue mqueue $R/dev/mqueue
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $R/tmp
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $R/var/tmp

# Pure cgroup v2 (the kernel command line carries cgroup_no_v1=all), every controller delegated
# from the root so Stockade can create its slices below it.
mount -t cgroup2 -o nsdelegate cgroup2 $R/sys/fs/cgroup || fail "cgroup2 mount"
for c in $(cat $R/sys/fs/cgroup/cgroup.controllers); do
    echo "+$c" > $R/sys/fs/cgroup/cgroup.subtree_control || fail "cannot enable cgroup controller $c"
done
mount -t bpf -o mode=0700 bpf $R/sys/fs/bpf || fail "bpffs mount"
mount -t securityfs securityfs $R/sys/kernel/security || fail "securityfs mount"
mount -t tracefs tracefs $R/sys/kernel/tracing || fail "tracefs mount"
mount -t debugfs debugfs $R/sys/kernel/debug || fail "debugfs mount"

# Read-write shares (the checkout first, then extra ones), each at its host path; SHARES is
# "tag=path tag=path ..." from params. A path under the guest's tmpfs /tmp is created first.
for s in $SHARES; do
    tag=${s%%=*}
    dir=${s#*=}
    mkdir -p "$R$dir" 2>/dev/null
    mount_9p "$tag" "$R$dir" cache=mmap
done
# The guest kernel's tree (vmlinuz, modules, headers) read-only at its host path.
mkdir -p "$R$KTREE" 2>/dev/null
mount_9p ktree "$R$KTREE" ro,cache=loose

# /lib/modules/$KREL must be the guest kernel's (modprobe, bcc's kernel headers): the host root
# is read-only, so a tmpfs over /lib/modules holds symlinks into the extracted kernel tree.
mods="$KTREE/lib/modules/$KREL"
mount -t tmpfs -o mode=0755 tmpfs $R/lib/modules || fail "tmpfs on /lib/modules"
mkdir -p "$R/lib/modules/$KREL"
for f in "$R$mods"/*; do
    name=${f##*/}
    case "$name" in build|source) continue ;; esac
    ln -s "$mods/$name" "$R/lib/modules/$KREL/$name"
done
ln -s "$KTREE/usr/src/linux-headers-$KREL" "$R/lib/modules/$KREL/build"
ln -s "$KTREE/usr/src/$HEADERS_COMMON" "$R/lib/modules/$KREL/source"

ip link set lo up || fail "loopback up"
hostname stockade-lab

exec switch_root $R /bin/sh /run/stockade-lab/job.sh
fail "switch_root failed"
