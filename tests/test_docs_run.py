"""Docs that run: every shell block an operator is told to run, executed as the reader meets it.

The blocks of the docs in ``testkit.docs.DOCS`` (README.md, docs/tokens.md, docs/provisioning.md,
docs/scheduler-setup.md, docs/scheduled-rotation.md, docs/runbooks.md, docs/interfaces.md,
docs/design.md, monitoring/README.md, docs/awx.md, docs/demo.md, roles/vault_provision/README.md,
roles/captcha_worker/README.md) run in that order,
each doc top to bottom, against a local OpenBao of this test's own (testkit.vault.LocalVault in a
temporary state dir on free ports: the docs name the default layout, envs dev/staging/prod on
``secret`` and ``approle``, which the shared test server on 18250 gives to the molecule scenarios
running beside this suite) and the CaptchaAI emulator, with the reader's placeholders filled
(the list is in ``testkit/docs.py``: ``inventories/prod`` -> a copy pointed at this server,
``<env>`` -> ``prod``, ``/tmp/`` -> a directory of the run, ``VAULT_ADDR``/``VAULT_CACERT`` of
this server, ``bao`` and ``vault`` from the venv, ``$KEY`` a fresh key, typed on stdin where a
block reads it, ``<old accessor>`` the accessor of the rotator's secret-id a block replaces).
Before docs/runbooks.md the run starts two ``captcha-solver serve`` workers of prod (with
secret-ids whose metadata names their hosts, as the deploy issues them), points the prod copy's
worker group at them and stages a key, so the runbook's rotation check plans a real rotation.

Markers, on the line right before a block's fence (the docs show them in their source):

- ``<!-- docs-test: skip (reason) -->``: the block cannot run here (worker hosts, an AWX
  server, a real CaptchaAI, the scheduler host's users, the demo's own ports); the reason is
  required and shown by ``python -m testkit.docs list``;
- ``<!-- docs-test: as vault-admin -->``: the block runs with a Vault administrator's own token
  (here the server's root token); ``as provisioner``, ``as deployer-<env>``, ``as rotator-<env>``
  and ``as stager-<env>`` give a token of that kit policy;
- no marker: the block runs with no VAULT_TOKEN and must obtain its token itself.

Every shell block is either run or marked with a reason, and every fenced block names its
language, so a new unmarked block runs (and fails CI when it does not work) and a block that
drifts from the kit fails CI. No block may print a token or key (checked on every output).

docs/bad-inputs.md, docs/faults.md and docs/scale.md hold no operator command of their own
(``NO_OPERATOR_COMMANDS``): each is checked to hold no marked block and no shell block but the
kit's own test commands, so an operator command added there fails until its doc is covered.
A block that drifts fails: ``test_a_block_that_drifts_fails`` runs a doc's own staging block
again (refused by check-and-set) and a block with a wrong path, and both must fail.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testkit.docs import (
    DOCS,
    NO_OPERATOR_COMMANDS,
    Block,
    DocsRun,
    all_blocks,
    blocks,
    commands,
    is_operator_block,
    operator_blocks,
    run_docs,
)
from testkit.docs import docs_run as private_docs_run
from testkit.paths import REPO


def test_every_shell_block_is_run_or_marked() -> None:
    problems = []
    for block in all_blocks(DOCS):
        if not block.lang:
            problems.append(f"{block.where}: a fenced block without a language (diagrams: text)")
        error = block.marker_error()
        if error:
            problems.append(error)
    assert not problems, "\n".join(problems)
    shell = [b for b in all_blocks(DOCS) if b.is_shell]
    assert [b for b in shell if b.skip_reason is None], "no block of the docs runs"


def test_every_doc_is_covered_or_listed() -> None:
    docs = {str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")}
    covered = {d for d in DOCS if d.startswith("docs/")}
    assert not covered & set(NO_OPERATOR_COMMANDS), "a doc both covered and without commands"
    missing = sorted(docs - covered - set(NO_OPERATOR_COMMANDS))
    assert not missing, f"docs neither run by tests/test_docs_run.py nor listed: {missing}"
    assert all((REPO / d).is_file() for d in [*DOCS, *NO_OPERATOR_COMMANDS])


@pytest.mark.parametrize("doc", sorted(NO_OPERATOR_COMMANDS))
def test_a_doc_without_operator_commands_has_none(doc: str) -> None:
    """No block to run and nothing to mark: any block with a command other than the kit's own
    test suites (or any docs-test marker) means the doc must join DOCS."""
    found = [
        f"{b.where} ({b.lang or 'unlabelled'}): {commands(b) or b.marker}"
        for b in operator_blocks(doc)
    ]
    assert not found, f"{doc} ({NO_OPERATOR_COMMANDS[doc]}) holds operator commands: {found}"


def test_the_no_operator_check_sees_an_operator_command() -> None:
    """The check above is not vacuous: a covered doc's blocks and a marked block are operator
    blocks; the kit's test commands and a text block are not."""
    assert operator_blocks("docs/runbooks.md")
    tests_only = Block("x.md", 1, "sh", ".venv/bin/pytest tests/a.py \\\n  tests/b.py\nmake test\n")
    assert commands(tests_only) == [".venv/bin/pytest tests/a.py tests/b.py", "make test"]
    assert not is_operator_block(tests_only)
    assert not is_operator_block(Block("x.md", 1, "text", "bao kv get secret/x\n"))
    assert is_operator_block(Block("x.md", 1, "", "make test\nbao kv get secret/x\n"))
    assert is_operator_block(Block("x.md", 1, "sh", "make test\n", "skip (why)"))


@pytest.fixture(scope="module")
def docs_run() -> Iterator[DocsRun]:
    with private_docs_run() as run:
        yield run


def test_docs_run_as_written(docs_run: DocsRun) -> None:
    ran, skipped, failures = [], [], []
    for result in run_docs(docs_run):
        block = result.block
        if result.rc is None:
            skipped.append(f"{block.where}: {block.skip_reason}")
            continue
        ran.append(f"{block.where} ({result.seconds:.1f} s)")
        leaks = docs_run.leaks(result.output)
        if result.rc != 0 or leaks:
            failures.append(
                f"--- {block.where} exited {result.rc}"
                + (f"; printed secrets: {leaks}" if leaks else "")
                + "\n"
                + docs_run.scrub(result.output)[-4000:]
            )
    print("ran:\n  " + "\n  ".join(ran) + "\nskipped:\n  " + "\n  ".join(skipped))
    assert not failures, "doc blocks that fail as written:\n" + "\n".join(failures)


def test_a_block_that_drifts_fails(docs_run: DocsRun) -> None:
    """After the docs ran: the stager's first staging block of scheduled-rotation.md again (the
    doc says staging twice fails the cas=0 check), and the runbook's record read on a path that
    does not exist, must both fail: a failing command inside a block fails the block."""
    stage = next(
        b for b in blocks("docs/scheduled-rotation.md") if b.is_shell and "-cas=0" in b.text
    )
    again = docs_run.run(stage)
    assert again.rc not in (0, None), docs_run.scrub(again.output)
    assert "check-and-set" in again.output, docs_run.scrub(again.output)
    status = next(b for b in blocks("docs/runbooks.md") if b.is_shell and b.identity)
    drifted = Block(
        status.doc,
        status.line,
        status.lang,
        status.text.replace("captchaai/prod", "captchaai/prd", 1),
        status.marker,
    )
    result = docs_run.run(drifted)
    assert result.rc not in (0, None), docs_run.scrub(result.output)
    assert not docs_run.leaks(again.output + result.output)
