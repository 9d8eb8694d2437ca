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

# Ansible logs in as `deploy` (SSH key only) and becomes root with sudo, as production
# inventories do. The key is made at run time and given to each host when it starts.
chroot "$root" useradd --create-home --shell /bin/bash deploy
install -d -m 0700 "$root/home/deploy/.ssh"
chroot "$root" chown deploy:deploy /home/deploy/.ssh
printf 'deploy ALL=(ALL:ALL) NOPASSWD: ALL\n' >"$root/etc/sudoers.d/deploy"
chmod 0440 "$root/etc/sudoers.d/deploy"

# sshd: loopback only, keys only, only `deploy`; each host gets its own port when it starts
# (testkit/hosts.py writes /etc/ssh/captcha-kit/port.conf), so sshd waits for that file.
cat >"$root/etc/ssh/sshd_config.d/10-captcha-kit.conf" <<'CONF'
Include /etc/ssh/captcha-kit/*.conf
ListenAddress 127.0.0.1
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AllowUsers deploy
HostKey /etc/ssh/ssh_host_ed25519_key
CONF
install -d -m 0755 "$root/etc/ssh/captcha-kit" "$root/etc/systemd/system/ssh.service.d"
cat >"$root/etc/systemd/system/ssh.service.d/captcha-kit.conf" <<'CONF'
[Unit]
ConditionPathExists=/etc/ssh/captcha-kit/port.conf
[Service]
# A host key is made per host at its first start, not shared by every host of the image; only
# an Ed25519 one (ssh-keygen -A also makes RSA 3072 and ECDSA keys: about a CPU-second per host).
ExecStartPre=
ExecStartPre=/bin/sh -c 'test -e /etc/ssh/ssh_host_ed25519_key || exec /usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key'
ExecStartPre=/usr/sbin/sshd -t
CONF
rm -f "$root"/etc/ssh/ssh_host_*

# No package cache in the image.
rm -f "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin
# (testkit/hosts.py dates /var/lib/apt/lists at the epoch after mmdebstrap cleans it.)
