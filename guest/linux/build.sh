#!/usr/bin/env bash
# Build the Linux guest profile for fleetd:
#   guest/linux/build/vmlinuz             Debian 12's stock kernel (linux-image-6.1.*-amd64)
#   guest/linux/build/initramfs.cpio.gz   busybox-static + virtio-net (and friends) modules + /init
#
# Both come from Debian packages fetched with `apt-get download` and unpacked with `dpkg-deb -x`
# into a temporary directory: nothing is installed on the host and nothing but apt's own
# package mirror is contacted. Idempotent: a second run with the same package versions and the
# same init/build.sh is a no-op ("up to date"). Needs: apt-get, apt-cache, dpkg-deb, gzip, flock
# (all in a base Debian 12); `apt-get update` is run once (as root, or via sudo) only when apt's
# package lists do not know linux-image-amd64 yet.
#
# Usage: guest/linux/build.sh [--force]      (--force rebuilds even when up to date)
set -euo pipefail
export LC_ALL=C          # apt-cache output is parsed: no translations

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT="$HERE/build"
KERNEL_META=linux-image-amd64
BUSYBOX_PKG=busybox-static
# Modules /init loads, in this order, each after its dependencies (resolved from the modules'
# own `depends=`): the virtio PCI transport and NIC, pvpanic (QEMU's `-device pvpanic`, which
# fleetd always adds, so a kernel panic pauses the VM for a post-mortem), and the ACPI power
# button + evdev (so busybox acpid can power off on fleetd's graceful `system_powerdown`).
ROOT_MODULES=(virtio_pci virtio_net pvpanic_mmio button evdev)

FORCE=0
for arg in "$@"; do
    case $arg in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

log() { echo "build.sh: $*" >&2; }
die() { echo "build.sh: error: $*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb gzip flock sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not found (this script needs a Debian/Ubuntu host)"
done

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
# As root, apt-get download would drop to the _apt user, who cannot write into our directory.
APT_DL=(apt-get -q)
if [ "$(id -u)" = 0 ]; then APT_DL+=(-o APT::Sandbox::User=root); fi

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9          # one build at a time (make and a test may race)
rm -rf "$OUT"/.work.*   # left over by an interrupted build

candidate() {    # candidate version of a package, empty when apt does not know it
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { if ($2 != "(none)") print $2; exit }'
}

kernel_pkg() {   # the linux-image-<abi>-amd64 package the metapackage depends on
    apt-cache depends "$KERNEL_META" 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

KPKG=$(kernel_pkg || true)
if [ -z "$KPKG" ]; then
    log "apt does not know $KERNEL_META yet: running apt-get update"
    if ! $SUDO apt-get update -qq; then
        log "apt-get update failed"
    fi
    KPKG=$(kernel_pkg || true)
fi
if [ -z "$KPKG" ]; then
    if [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initramfs.cpio.gz" ]; then
        log "cannot resolve $KERNEL_META through apt; keeping the existing build"
        exit 0
    fi
    die "cannot resolve $KERNEL_META through apt (is this Debian 12 with a working apt mirror?)"
fi
KVER_PKG=$(candidate "$KPKG")
BBVER=$(candidate "$BUSYBOX_PKG")
[ -n "$KVER_PKG" ] || die "no installable version of $KPKG"
[ -n "$BBVER" ] || die "no installable version of $BUSYBOX_PKG"

STAMP="kernel=$KPKG=$KVER_PKG busybox=$BUSYBOX_PKG=$BBVER modules=${ROOT_MODULES[*]}
$(cd "$HERE" && sha256sum init build.sh)"
if [ "$FORCE" = 0 ] && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initramfs.cpio.gz" ] \
        && [ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$STAMP" ]; then
    log "up to date: $KPKG $KVER_PKG, $BUSYBOX_PKG $BBVER ($OUT)"
    exit 0
fi

# fetch PKG VERSION: path of the cached .deb (build/debs/PKG/), downloading it when needed
fetch() {
    local pkg=$1 ver=$2 dir="$OUT/debs/$1" deb
    mkdir -p "$dir"
    for deb in "$dir"/*.deb; do
        if [ -f "$deb" ] && [ "$(dpkg-deb -f "$deb" Version 2>/dev/null)" = "$ver" ]; then
            echo "$deb"; return
        fi
    done
    rm -f "$dir"/*.deb "$dir"/*.partial
    log "downloading $pkg=$ver"
    (cd "$dir" && "${APT_DL[@]}" download "$pkg=$ver" >&2) || die "apt-get download $pkg=$ver failed"
    for deb in "$dir"/*.deb; do
        [ -f "$deb" ] && { echo "$deb"; return; }
    done
    die "apt-get download $pkg=$ver left no .deb in $dir"
}

T0=$SECONDS
KDEB=$(fetch "$KPKG" "$KVER_PKG")
BBDEB=$(fetch "$BUSYBOX_PKG" "$BBVER")

WORK=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
log "unpacking $(basename "$KDEB") and $(basename "$BBDEB")"
dpkg-deb -x "$KDEB" "$WORK/kernel"
dpkg-deb -x "$BBDEB" "$WORK/busybox"

BB="$WORK/busybox/bin/busybox"
[ -x "$BB" ] || die "$BUSYBOX_PKG has no bin/busybox"

KREL=$(cd "$WORK/kernel/lib/modules" && ls)
[ "$(echo "$KREL" | wc -l)" = 1 ] || die "expected one kernel release in $KPKG, found: $KREL"
VMLINUZ="$WORK/kernel/boot/vmlinuz-$KREL"
[ -f "$VMLINUZ" ] || die "$KPKG has no boot/vmlinuz-$KREL"
MODDIR="$WORK/kernel/lib/modules/$KREL"

# ---- kernel modules: resolve dependencies from each module's .modinfo `depends=` -------------
# Module names use '_' (a file pvpanic-mmio.ko is module pvpanic_mmio). Compressed modules
# (.ko.xz/.ko.zst/.ko.gz; Debian 12's 6.1 ships plain .ko, CONFIG_MODULE_COMPRESS_NONE=y) are
# decompressed here, so busybox insmod never has to.
declare -A MODPATH=() BUILTIN=() SEEN=()
while IFS= read -r -d '' f; do
    base=${f##*/}; name=${base%%.ko*}; name=${name//-/_}
    MODPATH[$name]=$f
done < <(find "$MODDIR/kernel" -name '*.ko*' -print0)
if [ -f "$MODDIR/modules.builtin" ]; then
    while IFS= read -r f; do
        base=${f##*/}; name=${base%%.ko*}; BUILTIN[${name//-/_}]=1
    done < "$MODDIR/modules.builtin"
fi

ko_cat() {       # the uncompressed bytes of a module file
    case $1 in
        *.ko) cat "$1" ;;
        *.ko.xz) "$BB" unxz -c "$1" ;;
        *.ko.gz) gzip -dc "$1" ;;
        *.ko.zst) command -v zstd >/dev/null || die "zstd needed for $1"; zstd -dc "$1" ;;
        *) die "unknown module format: $1" ;;
    esac
}

ORDER=()
visit() {
    local name=$1 dep deps
    [ -n "${SEEN[$name]-}" ] && return 0
    SEEN[$name]=1
    if [ -n "${BUILTIN[$name]-}" ]; then return 0; fi
    [ -n "${MODPATH[$name]-}" ] || die "module $name is neither built in nor in $KPKG"
    deps=$(ko_cat "${MODPATH[$name]}" | LC_ALL=C grep -a -o -m1 'depends=[A-Za-z0-9_,-]*' | head -n1 || true)
    deps=${deps#depends=}
    for dep in ${deps//,/ }; do visit "${dep//-/_}"; done
    ORDER+=("$name")
}
for m in "${ROOT_MODULES[@]}"; do visit "$m"; done

# ---- the initramfs tree --------------------------------------------------------------------
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,www,var/log,var/run}
chmod 1777 "$ROOT/tmp"
cp "$BB" "$ROOT/bin/busybox"
chmod 0755 "$ROOT/bin/busybox"
while IFS= read -r applet; do
    [ -e "$ROOT/$applet" ] || [ -L "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
done < <("$BB" --list-full)
[ -L "$ROOT/bin/sh" ] || die "busybox has no sh applet"

KMOD="$ROOT/lib/modules/$KREL"
mkdir -p "$KMOD"
: > "$KMOD/load-order"
for name in "${ORDER[@]}"; do
    src=${MODPATH[$name]}
    rel=${src#"$MODDIR"/}; rel=${rel%%.ko*}.ko
    mkdir -p "$(dirname "$KMOD/$rel")"
    ko_cat "$src" > "$KMOD/$rel"
    echo "$rel" >> "$KMOD/load-order"
done
cp "$MODDIR/modules.builtin" "$MODDIR/modules.order" "$KMOD/" 2>/dev/null || true
"$BB" depmod -b "$ROOT" "$KREL"      # modules.dep etc., so `modprobe` works in the guest too

install -m 0755 "$HERE/init" "$ROOT/init"
echo "root:x:0:0:root:/root:/bin/sh" > "$ROOT/etc/passwd"
echo "root:x:0:" > "$ROOT/etc/group"
echo "nameserver 10.0.2.3" > "$ROOT/etc/resolv.conf"    # QEMU user-mode network's DNS
printf '127.0.0.1 localhost\n' > "$ROOT/etc/hosts"
# busybox acpid runs /etc/acpi/PWRF/00000080 on the ACPI power button (QMP system_powerdown).
mkdir -p "$ROOT/etc/acpi/PWRF"
cat > "$ROOT/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
echo "fleet-linux: ACPI power button: powering off" > /dev/ttyS0
sync
poweroff -f
EOF
chmod 0755 "$ROOT/etc/acpi/PWRF/00000080"
cat > "$ROOT/etc/fleet-linux.txt" <<EOF
kernel=$KPKG $KVER_PKG ($KREL)
busybox=$BUSYBOX_PKG $BBVER
modules=${ORDER[*]}
EOF

# Sorted names, fixed mtimes, owner root, no gzip timestamp. (Not byte-for-byte reproducible:
# busybox cpio records inode numbers, which differ from one build to the next.)
EPOCH=${SOURCE_DATE_EPOCH:-0}
find "$ROOT" -exec touch -h -d "@$EPOCH" {} +
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | "$BB" cpio -o -H newc -R 0:0 2>/dev/null) \
    | gzip -n -9 > "$WORK/initramfs.cpio.gz"
cp "$VMLINUZ" "$WORK/vmlinuz"
chmod 0644 "$WORK/vmlinuz" "$WORK/initramfs.cpio.gz"

mv -f "$WORK/vmlinuz" "$OUT/vmlinuz"
mv -f "$WORK/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz"
cp "$ROOT/etc/fleet-linux.txt" "$OUT/manifest.txt"
echo "$KREL" > "$OUT/kernel.release"
printf '%s\n' "$STAMP" > "$OUT/.stamp"
log "built in $((SECONDS - T0)) s: $OUT/vmlinuz ($(stat -c %s "$OUT/vmlinuz") bytes)," \
    "$OUT/initramfs.cpio.gz ($(stat -c %s "$OUT/initramfs.cpio.gz") bytes)"
log "kernel $KREL ($KPKG $KVER_PKG), busybox $BBVER, modules: ${ORDER[*]}"
