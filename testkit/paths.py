"""Where things are: the repository, the venv's executables and the shared test Vault."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: ansible-playbook, captcha-solver, bao
STATE = REPO / ".state"
PLAYBOOKS = REPO / "playbooks"
PROVISION = PLAYBOOKS / "provision-vault.yml"
DEPLOY = PLAYBOOKS / "deploy-workers.yml"
ROTATE = PLAYBOOKS / "rotate-key.yml"
# The kit's Ansible collection (its modules, module_utils and filters).
COLLECTION = REPO / "collections" / "ansible_collections" / "captcha_kit" / "vault"

# The test OpenBao the playbook suites, the solver's integration suite and the molecule
# scenarios share (docs/interfaces.md); `make test` starts it before its lanes.
TEST_VAULT_DIR = STATE / "test" / "vault"
TEST_VAULT_PORT = 18250
