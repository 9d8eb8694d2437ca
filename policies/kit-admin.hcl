# kit-admin: the rights `playbooks/provision-vault.yml` (role vault_provision) needs, for the
# default layout (KV v2 mount `secret`, key prefix `captchaai`, AppRole mount `approle`).
# Change the mount names here if the inventory changes them. Write it once with a root or
# operator token:  bao policy write kit-admin policies/kit-admin.hcl   (or: vault policy write ...)
# and give the operator or CI job that provisions a token with it:
#   bao token create -policy=kit-admin -ttl=1h
# Token lookup and sys/capabilities-self (the pre-flight check) come from the `default` policy.

# Secrets engines: list them; enable and tune the KV v2 mount; its max_versions / cas_required.
path "sys/mounts" {
  capabilities = ["read"]
}
path "sys/mounts/secret" {
  capabilities = ["create", "read", "update"]
}
path "sys/mounts/secret/tune" {
  capabilities = ["read", "update"]
}
# The mount's own config is read, never changed: secret/ is usually shared with other teams.
path "secret/config" {
  capabilities = ["read"]
}

# Auth methods: list them; enable and tune AppRole (enabling an auth method needs sudo).
path "sys/auth" {
  capabilities = ["read"]
}
path "sys/auth/approle" {
  capabilities = ["create", "read", "update", "sudo"]
}
# Tuning (the description, the user lockout) is a root-protected path: it needs sudo too.
path "sys/auth/approle/tune" {
  capabilities = ["read", "update", "sudo"]
}

# The kit's policies (captcha-worker-<env>, captcha-rotator-<env>, captcha-stager-<env>).
path "sys/policy/captcha-*" {
  capabilities = ["create", "read", "update"]
}
path "sys/policies/acl/captcha-*" {
  capabilities = ["create", "read", "update"]
}

# The kit's AppRole roles and their role-ids (no secret-ids: deploying workers issues those).
path "auth/approle/role/captcha-*" {
  capabilities = ["create", "read", "update"]
}

# Which role-ids the user lockout holds locked: a failed deploy names a locked env role-id as
# the cause (captcha_kit.vault.vault_approle_lockout; read-only, never shows a role-id).
path "sys/locked-users" {
  capabilities = ["read"]
}

# Audit devices: list them (sudo); enable the file device where the server allows it (Vault).
path "sys/audit" {
  capabilities = ["read", "sudo"]
}
path "sys/audit/file" {
  capabilities = ["create", "update", "sudo"]
}

# Check-and-set and the version limit of the kit's key paths (KV v2 metadata per secret, not
# the mount's config), and nothing else of their metadata (the rotation record stays the
# rotator's). The first keys are create-only (check-and-set 0): their version number is read.
path "secret/metadata/captchaai/*" {
  capabilities = ["create", "read", "update"]
  allowed_parameters = {
    "cas_required" = []
    "max_versions" = []
  }
}
path "secret/metadata/captchaai-staged/*" {
  capabilities = ["create", "read", "update"]
  allowed_parameters = {
    "cas_required" = []
    "max_versions" = []
  }
}
path "secret/data/captchaai/*" {
  capabilities = ["create"]
}
