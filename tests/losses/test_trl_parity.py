"""alignlib's losses against TRL 1.16's own loss code, on the same inputs.

Each case runs one loss variant over typical, batch-1 and extreme inputs (summed
log-probs down to -1e4) and beta from 0.01 to 10, through TRL's trainer method
(on a stub, see helpers/trl_reference.py) and through alignlib, and compares the
loss, the gradient with respect to every input, and the per-pair outputs or
logged metrics. docs/parity.md is written from the same rows.
"""

import pytest
from helpers.parity import ROW_BUILDERS

ROWS = [row for build in ROW_BUILDERS.values() for row in build()]


def test_every_loss_type_is_covered():
    from alignlib.losses import CPO_LOSS_TYPES, DPO_LOSS_TYPES

    variants = {(row.family, row.variant.split(",")[0]) for row in ROWS}
    assert {("dpo_loss", t) for t in DPO_LOSS_TYPES} <= variants
    assert {("cpo_loss", t) for t in CPO_LOSS_TYPES} <= variants
    assert ("orpo_loss", "odds-ratio term") in variants
    assert any(row.family == "reward_ranking_loss" for row in ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.family}:{r.variant}" for r in ROWS])
def test_matches_trl(row):
    assert row.compared > 0, "nothing was compared"
    assert not row.failures, "\n".join(row.failures[:10])
    assert row.worst_excess <= 1.0
