#!/bin/sh
# Enable BPF-LSM at the next boot: make sure GRUB_CMDLINE_LINUX carries an lsm= list ending in
# "bpf", then regenerate the GRUB config. Idempotent: a second run changes nothing.
#
#   enable-bpf-lsm.sh [--grub-file FILE] [--no-update]
#
# --grub-file edits FILE instead of /etc/default/grub (the test suite edits copies); --no-update
# skips update-grub, which is also skipped for any FILE other than /etc/default/grub. The lsm=
# list keeps the LSMs the running kernel has active (/sys/kernel/security/lsm) in their order,
# or Debian's and Ubuntu's default order when that cannot be read, and appends bpf.
# Prints "changed" or "unchanged"; exits non-zero with a message when FILE is missing.
set -eu

grub=/etc/default/grub
update=1
while [ $# -gt 0 ]; do
    case "$1" in
        --grub-file) grub=${2:?--grub-file needs a path}; shift 2 ;;
        --no-update) update=0; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "enable-bpf-lsm: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ "$grub" = /etc/default/grub ] || update=0
if [ ! -f "$grub" ]; then
    echo "enable-bpf-lsm: $grub not found (is GRUB the boot loader?)" >&2
    exit 1
fi

active=""
if [ -r /sys/kernel/security/lsm ]; then
    active=$(cat /sys/kernel/security/lsm)
fi
[ -n "$active" ] || active="lockdown,capability,landlock,yama,apparmor"

# The value of the last GRUB_CMDLINE_LINUX= line, without its quotes.
old=$(sed -n 's/^[[:space:]]*GRUB_CMDLINE_LINUX=//p' "$grub" | tail -n 1)
case "$old" in
    \"*\") old=${old#\"}; old=${old%\"} ;;
    \'*\') old=${old#\'}; old=${old%\'} ;;
esac

# awk: keep every parameter; add bpf to an existing lsm= list, or add lsm=<active>,bpf.
new=$(printf '%s\n' "$old" | awk -v active="$active" '
    function with_bpf(list,    n, i, parts, out) {
        n = split(list, parts, ",")
        out = ""
        for (i = 1; i <= n; i++)
            if (parts[i] != "bpf" && parts[i] != "") out = out (out == "" ? "" : ",") parts[i]
        return out (out == "" ? "" : ",") "bpf"
    }
    {
        found = 0; out = ""
        for (i = 1; i <= NF; i++) {
            p = $i
            if (p ~ /^lsm=/) { found = 1; p = "lsm=" with_bpf(substr(p, 5)) }
            out = out (out == "" ? "" : " ") p
        }
        if (!found) out = out (out == "" ? "" : " ") "lsm=" with_bpf(active)
        print out
    }')

if [ "$new" = "$old" ] && grep -q '^[[:space:]]*GRUB_CMDLINE_LINUX=' "$grub"; then
    echo unchanged
    exit 0
fi

tmp="$grub.stockade.$$"
trap 'rm -f "$tmp"' EXIT
if grep -q '^[[:space:]]*GRUB_CMDLINE_LINUX=' "$grub"; then
    # Rewrite only the last assignment (the one that wins when the file is sourced).
    last=$(grep -n '^[[:space:]]*GRUB_CMDLINE_LINUX=' "$grub" | tail -n 1 | cut -d: -f1)
    awk -v last="$last" -v value="$new" 'NR == last { print "GRUB_CMDLINE_LINUX=\"" value "\""; next } { print }' \
        "$grub" > "$tmp"
else
    cat "$grub" > "$tmp"
    printf 'GRUB_CMDLINE_LINUX="%s"\n' "$new" >> "$tmp"
fi
cat "$tmp" > "$grub"  # keeps the file's owner and mode
echo changed

if [ "$update" = 1 ]; then
    if command -v update-grub >/dev/null 2>&1; then
        update-grub
    else
        grub-mkconfig -o /boot/grub/grub.cfg
    fi
    echo "enable-bpf-lsm: reboot to activate: lsm=${new##*lsm=}" >&2
fi
