# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Documentation of the connection options every captcha_kit.vault module shares."""

from __future__ import annotations


class ModuleDocFragment:
    """Use with ``extends_documentation_fragment: [captcha_kit.vault.connection]``."""

    DOCUMENTATION = r"""
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
requirements:
  - hvac
"""
