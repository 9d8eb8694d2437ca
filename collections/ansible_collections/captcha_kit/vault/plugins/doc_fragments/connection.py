# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Documentation every captcha_kit.vault module shares: author, connection options, check and
diff mode."""

from __future__ import annotations


class ModuleDocFragment:
    """Use with ``extends_documentation_fragment: [captcha_kit.vault.connection]`` (the
    connection options and check mode) plus ``captcha_kit.vault.connection.changes`` (diff mode)
    or ``captcha_kit.vault.connection.no_diff`` (no diff)."""

    # validate-modules takes an author line only as "Name (@github-handle)" or "Name (!UNKNOWN)";
    # the kit has no GitHub account or handle of its own, so the contributors are !UNKNOWN.
    DOCUMENTATION = r"""
author:
  - captcha key vault kit contributors (!UNKNOWN)
options:
  url:
    description: Vault address, for example C(https://127.0.0.1:8200). Defaults to E(VAULT_ADDR).
    type: str
  ca_cert:
    description:
      - CA certificate (PEM) that signed the server certificate. Defaults to E(VAULT_CACERT).
      - Omitted means the system CAs.
    type: path
  token:
    description:
      - Vault token. Defaults to E(VAULT_TOKEN). Never logged or returned.
    type: str
  timeout:
    description: Request timeout in seconds.
    type: int
    default: 30
  urls:
    description:
      - More addresses of the same Vault cluster (HA), tried in turn after O(url) when a node
        does not answer, is sealed, or is a standby without an active node.
      - The addresses in E(CAPTCHA_KIT_VAULT_ADDRS) (comma separated) are always tried too,
        after these.
    type: list
    elements: str
  retry_timeout:
    description:
      - Seconds to keep retrying connection errors, 5xx answers and leader elections, with
        backoff from 0.25 s to 2 s. Client errors (4xx) and TLS errors are never retried.
      - Defaults to E(CAPTCHA_KIT_VAULT_RETRY_TIMEOUT), else 30.
    type: float
attributes:
  check_mode:
    description: Reads and compares, reports what would change, writes nothing.
    support: full
requirements:
  - hvac
"""

    # Diff mode, one fragment per kind of module (check mode is above: all the kit's modules
    # support it).
    CHANGES = r"""
options: {}
attributes:
  diff_mode:
    description: Shows the settings (never a secret) before and after.
    support: full
"""

    NO_DIFF = r"""
options: {}
attributes:
  diff_mode:
    description: No diff; the values handled are secrets or carry none.
    support: none
"""
