"""playbooks/awx-rotation-gate.yml, the gate of the AWX rotation workflow (docs/awx.md): it lets
the workflow go on to the approval node only for a rotation awaiting revocation."""

from __future__ import annotations

import pytest

from testkit.playbook import run_playbook

GATE = "playbooks/awx-rotation-gate.yml"
AWAITING = {
    "env": "prod",
    "outcome": "awaiting_revocation",
    "rotation_id": "prod-20261202T101500Z-ab12cd",
    "rotation": {"previous_version": "3", "new_version": "4"},
}


def test_the_gate_opens_for_a_rotation_awaiting_revocation():
    result = run_playbook(GATE, extra_vars={"key_rotation": AWAITING})
    assert result.rc == 0, result.failure_messages()
    shown = [str(r.get("msg", "")) for _, r in result.task_results()]
    assert any("prod-20261202T101500Z-ab12cd of prod awaits" in m for m in shown), shown
    assert any("(version 3)" in m for m in shown), shown


@pytest.mark.parametrize(
    "summary",
    [
        {**AWAITING, "outcome": "complete"},
        {**AWAITING, "outcome": "noop", "rotation_id": ""},
        {**AWAITING, "outcome": "failed"},
        {**AWAITING, "rotation_id": ""},
        None,
    ],
)
def test_the_gate_stays_shut_for_anything_else(summary):
    result = run_playbook(GATE, extra_vars={"key_rotation": summary} if summary else None)
    assert result.rc != 0
    assert "Nothing awaits revocation" in result.failure_messages()
