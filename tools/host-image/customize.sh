#!/bin/sh
# mmdebstrap customize hook for the worker host image: $1 = root of the new tree, $2 = a directory
# with the host's extra CA certificates (*.crt, may be empty).
set -eu
root="$1"
cadir="$2"

# HTTPS (apt, pip) inside the containers must trust what the host trusts.
for crt in "$cadir"/*.crt; do
  [ -e "$crt" ] || continue
  install -m 0644 "$crt" "$root/usr/local/share/ca-certificates/"
done
chroot "$root" update-ca-certificates --fresh >/dev/null

# systemd generates a machine id at first boot when the file is empty.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
echo captcha-kit-host >"$root/etc/hostname"

# Units that have nothing to do in a container and would only degrade the boot.
for unit in \
  getty@tty1.service console-getty.service \
  systemd-remount-fs.service systemd-firstboot.service \
  sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
  systemd-modules-load.service apt-daily.timer apt-daily-upgrade.timer; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done

# No package cache in the image.
rm -f "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin
# (tools/host_image.py dates /var/lib/apt/lists at the epoch after mmdebstrap cleans it.)
