# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The kit's one contract: names, patterns and paths every part of the kit agrees on.

Standard library only and free of Ansible imports: the collection's modules and filters import
it as ``ansible_collections.captcha_kit.vault.plugins.module_utils.contract``, and the solver
package reads the same file as ``captcha_solver.contract`` (a symlink), so the roles, the
modules and the workers cannot drift apart.

``ENV_NAME_PATTERN`` ``^[a-z][a-z0-9-]{0,23}$``
    An environment name ends up in Vault names (the policies and AppRoles
    ``captcha-worker-<env>``, ``captcha-rotator-<env>``, ``captcha-stager-<env>``), in KV paths
    (``captchaai/<env>``), in rotation ids and in the workers' configuration. The kit used to
    spell three rules (``[A-Za-z0-9_-]+`` in the rotation module, ``^[a-z0-9][a-z0-9_-]*$`` in
    the solver); this one, from vault_provision, is the strictest of them, so every name that
    passes provisioning passed the others too, and nothing a role can create is refused later
    by the rotation or the worker. Lowercase only (Vault lowercases policy names), a letter
    first, hyphens but no underscores (one spelling per name), at most 24 characters (the bound
    provisioning always had; it keeps derived names such as ``captcha-rotator-<env>`` within 40
    characters).

``KEY_PATTERN`` ``^[0-9a-f]{32}$``
    A CaptchaAI API key: 32 lowercase hex characters. Anchored so the Jinja ``match`` test and
    ``re.fullmatch`` agree; use :func:`valid_key` (``re.fullmatch``) in Python, which also
    refuses a trailing newline that ``$`` alone lets through.

``ROTATION_RECORD_FIELDS``
    The rotation record kept in the KV v2 ``custom_metadata`` of an environment's key path,
    written by ``captcha_kit.vault.key_rotation_state`` and reported by the workers. All values
    are strings; absent fields are not written.

``VERSION_ROTATION_FIELD`` ``rotation_id``
    The field of a key version's data that names the rotation which wrote it (not secret; the
    workers read only ``api_key`` and ``backup_keys``). The rotation writes the version with
    check-and-set first and its record after, so the one atomic step decides which of two runs
    started at once rotates, and a run cut off between the two steps leaves a version that still
    says whose it is: the next run rebuilds the record from it.

``mask_key(key)``
    How a key may ever be shown: ``***`` and its last four characters (``***ab12``).

``DEFAULT_KV_MOUNT``, ``KEY_PATH_TEMPLATE``, ``STAGED_PATH_TEMPLATE``
    Where an environment's key (and the staged next key) live by default: ``secret`` /
    ``captchaai/<env>`` (``captchaai-staged/<env>``). The path prefixes stay configurable in
    the roles (``captcha_kit_key_path_prefix``); these are the defaults the kit ships.
"""

from __future__ import annotations

import re

ENV_NAME_PATTERN = r"^[a-z][a-z0-9-]{0,23}$"
KEY_PATTERN = r"^[0-9a-f]{32}$"
ROTATION_RECORD_FIELDS = (
    "rotation_id",
    "rotation_state",
    "previous_version",
    "new_version",
    "started_at",
    "converged_at",
    "confirmed_at",
    "actor",
)
VERSION_ROTATION_FIELD = "rotation_id"
# Values of rotation_state: the two in progress, then the two ends.
ROTATION_STATES = ("propagating", "awaiting_revocation", "complete", "rolled_back")
ROTATION_IN_PROGRESS = ("propagating", "awaiting_revocation")

DEFAULT_KV_MOUNT = "secret"
KEY_PATH_TEMPLATE = "captchaai/{env}"
STAGED_PATH_TEMPLATE = "captchaai-staged/{env}"

_ENV_NAME_RE = re.compile(ENV_NAME_PATTERN)
_KEY_RE = re.compile(KEY_PATTERN)


def valid_env_name(name: object) -> bool:
    """Whether ``name`` is a string matching :data:`ENV_NAME_PATTERN` completely."""
    return isinstance(name, str) and _ENV_NAME_RE.fullmatch(name) is not None


def valid_key(key: object) -> bool:
    """Whether ``key`` is a string matching :data:`KEY_PATTERN` completely (no stripping)."""
    return isinstance(key, str) and _KEY_RE.fullmatch(key) is not None


def mask_key(key: object) -> str:
    """The masked fingerprint of a key: ``***`` and its last four characters; ``""`` for none."""
    if not key:
        return ""
    return "***" + str(key)[-4:]


def key_path(env: str) -> str:
    """The default key path of ``env`` inside the KV v2 mount: ``captchaai/<env>``.

    Raises ``ValueError`` for a name that is not a valid env name, so a bad name can never
    become a path such as ``captchaai/../other``.
    """
    if not valid_env_name(env):
        raise ValueError(f"not a valid environment name (must match {ENV_NAME_PATTERN}): {env!r}")
    return KEY_PATH_TEMPLATE.format(env=env)


def staged_path(env: str) -> str:
    """The default staged next-key path of ``env``: ``captchaai-staged/<env>``."""
    if not valid_env_name(env):
        raise ValueError(f"not a valid environment name (must match {ENV_NAME_PATTERN}): {env!r}")
    return STAGED_PATH_TEMPLATE.format(env=env)


# The values the ``captcha_kit.vault.contract`` filter hands out, by name.
CONTRACT = {
    "env_name_pattern": ENV_NAME_PATTERN,
    "key_pattern": KEY_PATTERN,
    "key_path_template": KEY_PATH_TEMPLATE,
    "staged_path_template": STAGED_PATH_TEMPLATE,
    "rotation_record_fields": ROTATION_RECORD_FIELDS,
    "rotation_states": ROTATION_STATES,
    "default_kv_mount": DEFAULT_KV_MOUNT,
}
