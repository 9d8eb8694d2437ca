"""The retrying hvac adapter of captcha_kit.vault (module_utils/vault_client.py), against a real
OpenBao: which failures it retries, over which addresses, and that it always gives up."""

from __future__ import annotations

import hvac
import pytest
import requests
from ansible_collections.captcha_kit.vault.plugins.module_utils import (
    vault_client,
)

from testkit.net import free_port


def client(vault, addrs, token=None, **opts):
    return hvac.Client(
        url=addrs[0],
        token=vault.root_token() if token is None else token,
        verify=str(vault.ca_file),
        timeout=5,
        adapter=vault_client.RetryingAdapter,
        addrs=addrs[1:],
        **opts,
    )


def dead_addr() -> str:
    return f"https://127.0.0.1:{free_port()}"


def test_a_dead_first_address_moves_on_to_the_next(solo_vault):
    """Refused on the first address: the call is answered by the second, which is used first
    from then on."""
    c = client(solo_vault, [dead_addr(), solo_vault.addr])
    assert c.auth.token.lookup_self()["data"]["policies"] == ["root"]
    assert c.adapter.retries == 1
    c.sys.list_mounted_secrets_engines()
    assert c.adapter.retries == 1, "the address that answered is tried first next time"
    assert c.adapter.base_uri == solo_vault.addr


def test_a_single_unreachable_address_gives_up_after_a_bounded_number_of_tries(solo_vault):
    sleeps: list[float] = []
    c = client(solo_vault, [dead_addr()], sleep=sleeps.append)
    with pytest.raises(requests.exceptions.ConnectionError):
        c.sys.list_mounted_secrets_engines()
    assert 1 <= c.adapter.retries <= 10
    assert sleeps, "it waits between rounds"
    assert max(sleeps) <= 2.0


def test_several_unreachable_addresses_give_up_within_the_retry_budget(solo_vault):
    sleeps: list[float] = []
    c = client(solo_vault, [dead_addr(), dead_addr()], retry_timeout=3, sleep=sleeps.append)
    with pytest.raises(requests.exceptions.ConnectionError):
        c.sys.list_mounted_secrets_engines()
    assert c.adapter.retries >= 2, "both addresses were tried"
    assert sum(sleeps) <= 3


def test_client_errors_are_not_retried(solo_vault):
    """403 (bad token) and 404 are answers, not outages: no retry."""
    c = client(solo_vault, [solo_vault.addr, dead_addr()], token="s.not-a-real-token")  # noqa: S106
    with pytest.raises(hvac.exceptions.Forbidden):
        c.sys.list_mounted_secrets_engines()
    root = client(solo_vault, [solo_vault.addr, dead_addr()])
    with pytest.raises(hvac.exceptions.InvalidPath):
        root.secrets.kv.v2.read_secret_version(
            "no/such/path", mount_point="secret", raise_on_deleted_version=True
        )
    assert c.adapter.retries == 0
    assert root.adapter.retries == 0


def test_a_wrong_ca_is_not_retried(solo_vault, ha_vault):
    """TLS failures are configuration errors: the next address is not even tried."""
    c = hvac.Client(
        url=solo_vault.addr,
        token="x",  # noqa: S106 - never valid
        verify=str(ha_vault.ca_file),  # another CA
        adapter=vault_client.RetryingAdapter,
        addrs=[dead_addr()],
    )
    with pytest.raises(requests.exceptions.SSLError):
        c.sys.list_mounted_secrets_engines()
    assert c.adapter.retries == 0


def test_addresses_from_url_and_urls_are_merged_without_duplicates():
    params = {"url": "https://a:1/, https://b:2", "urls": ["https://b:2", "https://c:3"]}
    assert vault_client.node_addresses(params) == ["https://a:1", "https://b:2", "https://c:3"]


def test_cluster_env_names_the_other_nodes_for_fail_over(ha_vault):
    """``python -m testkit.vault env`` of a cluster exports the other nodes for fail-over,
    and still never the token."""
    env = ha_vault.env()
    assert env["VAULT_ADDR"] == ha_vault.addrs[0]
    assert env["CAPTCHA_KIT_VAULT_ADDRS"].split(",") == ha_vault.addrs[1:]
    exports = ha_vault.shell_exports()
    assert f'export CAPTCHA_KIT_VAULT_ADDRS="{",".join(ha_vault.addrs[1:])}"' in exports
    assert ha_vault.root_token() not in exports
