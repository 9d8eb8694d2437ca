"""The test kit: the one home of the local parts the suites, benchmarks and molecule scenarios
run the product against. Everything here is real and listens on 127.0.0.1 only.

- ``testkit.paths``: the repository, the venv's bin directory, the test Vault's place.
- ``testkit.creds``: keys and names made at run time, 0600 files, the leak assertion.
- ``testkit.net``: free loopback ports.
- ``testkit.vault``: a real OpenBao server (TLS, raft; one node or a cluster) — ``LocalVault``.
- ``testkit.vault_ops``: root-client chores on it (put a key, AppRole credential files, a snapshot).
- ``testkit.emulator``: the CaptchaAI emulator (in.php / res.php) and its admin client.
- ``testkit.hosts``: the Debian systemd host image and SSH-reachable host containers.
- ``testkit.worker``: ``captcha-solver serve`` processes (config written by the solver's own
  ``render_config``, health read by its own status client) and fleets of them.
- ``testkit.worker_hosts``: worker hosts deployed by the kit's own playbook.
- ``testkit.playbook``: one ``ansible-playbook`` runner and the inventories it is given.
- ``testkit.rotation``: rotation environments, workers and runs of playbooks/rotate-key.yml.
- ``testkit.faults``: the fault tests' environments, provisioning and rotation inventories.
- ``testkit.loadgen``: solve traffic against workers.
- ``testkit.fixtures``: the pytest fixtures built on these (the shared test Vault and friends).
- ``testkit.portlock``: one test run at a time on this machine (the fixed test ports).

Suites import from here and from the product only; nothing here imports a suite.
"""
