"""testkit.net.free_port: the test servers' ports never come from the kernel's ephemeral range,
where the run's outgoing connections take their local ports (a CI run failed when one held the
port a test OpenBao was about to bind: "port 36152 is still in use after 15 s")."""

from __future__ import annotations

from pathlib import Path

from testkit.net import free_port


def test_free_ports_are_below_the_ephemeral_range_and_above_the_kits_fixed_ports() -> None:
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert all(19000 <= port < first_ephemeral for port in ports), ports
    assert len(set(ports)) > 1, "always the same port"
