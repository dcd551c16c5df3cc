"""The factory's privacy policy: node-config parsing, refusals and the stricter-of rule.

Every field of :class:`~fl_common.protocol.TrainInstruction`, whether it bears on a deployed
factory's privacy, and how the policy treats it (``test_every_instruction_field_is_classified``
keeps this table complete; ``test_no_field_weakens_a_deployed_policy`` tries each one):

==================  =======  =================================================================
record key          privacy  deployed factory
==================  =======  =================================================================
task                no       picks model and schema; the data is the factory's own file
run-id              no       names the run in the ledger; a new run plans from the budget left
planned-rounds      yes      sets the planned steps, hence the noise: floor/ceiling checked
local-epochs        yes      steps per round, hence the noise: floor/ceiling checked
batch-size          yes      sample rate, hence the noise: floor/ceiling checked
lr                  no       scales the clipped, noised gradient: post-processing
momentum            no       post-processing of the noised gradients
dp                  yes      must be true, else declined
epsilon             yes      above the budget: declined; below: taken as the session's cap
delta               yes      other than the ledger's delta: declined
accountant          yes      ignored: the node's accountant counts the spend
max-grad-norm       yes      outside min-/max-grad-norm: declined (noise scales with it)
grad-sample-mode    no       every mode clips each example to the same bound, same noise
seed                no       non-private randomness only; DP noise and sampling use OS entropy
server-round        no       the ledger charges every round it trains, repeated or not
proximal-mu         no       the proximal term depends on the weights, not on the data
min-run-epsilon     no       only makes the factory decline more
record-sketch-req.  no       a sketch is sent only under the node's own key; without: declined
data-dir            no       never read when the node config names a data-path
output-dir          no       never read: a deployed ledger is ledger-path or beside the data
attack*             no       integrity, not privacy: a deployed factory refuses any attack
==================  =======  =================================================================
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from fl_client.policy import (
    DEFAULT_ACCOUNTANT,
    DEFAULT_DELTA,
    DEFAULT_EPSILON_BUDGET,
    POLICY_PREFIX,
    PolicyError,
    PrivacyPolicy,
    effective_settings,
    plan_refusal,
    refusal,
)
from fl_common.protocol import TrainInstruction

#: Instruction fields whose value bears on a deployed factory's privacy (the table above).
PRIVACY_FIELDS = {
    "planned_rounds": "planned-rounds",
    "local_epochs": "local-epochs",
    "batch_size": "batch-size",
    "dp": "dp",
    "epsilon": "epsilon",
    "delta": "delta",
    "accountant": "accountant",
    "max_grad_norm": "max-grad-norm",
}
#: The others, with an adversarial value each (what an operator might try).
OTHER_FIELDS = {
    "task": "tep_fault",
    "run_id": "a-fresh-run",
    "lr": 100.0,
    "momentum": 0.99,
    "grad_sample_mode": "hooks",
    "seed": 12345,
    "server_round": 999,
    "proximal_mu": 10.0,
    "min_run_epsilon": 0.0,
    "record_sketch_required": True,
    "data_dir": "/elsewhere",
    "output_dir": "/tmp/fresh-ledger",
    "attack": "sign_flip",
    "attack_factories": "plant",
    "attack_fraction": 1.0,
    "attack_factor": 10.0,
    "attack_std": 5.0,
}

DEPLOYED = {"data-path": "/data/plant.parquet"}


def instruction(**changes) -> TrainInstruction:
    values = {
        "task": "molding_quality", "run_id": "r", "planned_rounds": 5, "local_epochs": 1,
        "batch_size": 64, "lr": 0.05, "momentum": 0.0, "dp": True, "epsilon": 3.0,
        "delta": 1e-5, "accountant": "rdp", "max_grad_norm": 1.0, "grad_sample_mode": "bk",
        "seed": 0, "server_round": 1,
    }  # fmt: skip
    values.update(changes)
    return TrainInstruction(**values)


def policy(**node) -> PrivacyPolicy:
    return PrivacyPolicy.from_node_config({**DEPLOYED, **node})


def test_every_instruction_field_is_classified() -> None:
    names = {f.name for f in dataclasses.fields(TrainInstruction)}
    assert names == set(PRIVACY_FIELDS) | set(OTHER_FIELDS)
    keys = {f.name: f.metadata["key"] for f in dataclasses.fields(TrainInstruction)}
    assert all(keys[name] == key for name, key in PRIVACY_FIELDS.items())


@pytest.mark.parametrize("name", sorted(OTHER_FIELDS))
def test_no_field_weakens_a_deployed_policy(name: str) -> None:
    """No other field changes what the deployed factory's privacy settings are."""
    p = policy(**{"epsilon-budget": 3.0, "max-grad-norm": 1.0})
    base = effective_settings(p, instruction())
    changed = instruction(**{name: OTHER_FIELDS[name]})
    assert refusal(p, changed) is None
    assert effective_settings(p, changed) == base


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"dp": False}, "dp"),
        ({"epsilon": 3.5}, "epsilon"),
        ({"epsilon": math.inf}, "epsilon"),
        ({"epsilon": math.nan}, "epsilon"),
        ({"delta": 1e-4}, "delta"),
        ({"delta": 1e-6}, "delta"),
        ({"max_grad_norm": 1.5}, "max-grad-norm"),
        ({"max_grad_norm": 0.05}, "max-grad-norm"),
    ],
)
def test_a_weakening_instruction_is_refused_naming_the_field(changes: dict, key: str) -> None:
    p = policy(**{"epsilon-budget": 3.0, "min-grad-norm": 0.1, "max-grad-norm": 1.0})
    declined = refusal(p, instruction(**changes))
    assert declined is not None
    assert declined.field == key
    assert str(declined).startswith(f"{POLICY_PREFIX}'{key}'")


def test_the_accountant_is_the_factorys_and_a_lower_epsilon_is_taken() -> None:
    p = policy(**{"epsilon-budget": 3.0, "accountant": "prv"})
    asked = instruction(epsilon=1.0, accountant="rdp", max_grad_norm=7.0)
    assert refusal(p, asked) is None  # no clipping range set: any bound (epsilon unchanged)
    settings = effective_settings(p, asked)
    assert (settings.dp, settings.epsilon_budget, settings.epsilon_cap) == (True, 3.0, 1.0)
    assert (settings.accountant, settings.delta, settings.max_grad_norm) == ("prv", 1e-5, 7.0)


def test_a_silent_deployed_node_config_gets_the_defaults() -> None:
    p = PrivacyPolicy.from_node_config(DEPLOYED)
    assert p.deployed
    assert (p.epsilon_budget, p.delta, p.accountant) == (
        DEFAULT_EPSILON_BUDGET, DEFAULT_DELTA, DEFAULT_ACCOUNTANT,
    )  # fmt: skip
    assert not p.limits_noise
    assert refusal(p, instruction(epsilon=DEFAULT_EPSILON_BUDGET)) is None
    assert refusal(p, instruction(epsilon=DEFAULT_EPSILON_BUDGET * 2)).field == "epsilon"


def test_a_simulated_factory_takes_the_servers_settings() -> None:
    p = PrivacyPolicy.from_node_config({"partition-id": 3})
    asked = instruction(dp=False, epsilon=math.inf, delta=1e-3, accountant="prv")
    assert not p.deployed and refusal(p, asked) is None
    assert plan_refusal(p, 0.01, 100.0) is None
    s = effective_settings(p, asked)
    assert (s.dp, s.epsilon_budget, s.delta, s.accountant) == (False, math.inf, 1e-3, "prv")
    own = PrivacyPolicy.from_node_config({"epsilon-budget": 2.0, "delta": 1e-6})
    s = effective_settings(own, asked)
    assert (s.epsilon_budget, s.epsilon_cap, s.delta) == (2.0, 2.0, 1e-6)


def test_the_plan_is_checked_against_the_floor_and_the_ceiling() -> None:
    floor = policy(**{"min-noise-multiplier": 0.8})
    assert floor.limits_noise
    assert plan_refusal(floor, 0.8, 5.0) is None
    low = plan_refusal(floor, 0.79, 0.1)
    assert low is not None and low.field == "planned-rounds"
    assert "'min-noise-multiplier'" in str(low) and str(low).startswith(POLICY_PREFIX)
    ceiling = policy(**{"max-round-epsilon": 0.5})
    assert plan_refusal(ceiling, 0.1, 0.5) is None
    high = plan_refusal(ceiling, 5.0, 0.51)
    assert high is not None and "'max-round-epsilon'" in str(high)


def test_a_coarser_privacy_unit_is_carried_through() -> None:
    p = policy(**{"privacy-unit": " machine "})
    assert p.privacy_unit == "machine"
    assert effective_settings(p, instruction()).privacy_unit == "machine"


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"epsilon-budget": "3"}, "node config 'epsilon-budget' must be a number, got str '3'"),
        ({"epsilon-budget": 0.0}, "node config 'epsilon-budget' must be above 0, got 0.0"),
        ({"epsilon-budget": math.inf}, "node config 'epsilon-budget' must be above 0, got inf"),
        ({"epsilon-budget": True}, "node config 'epsilon-budget' must be a number, got bool"),
        ({"delta": 1.0}, "node config 'delta' must be above 0 and below 1, got 1.0"),
        ({"delta": -1e-5}, "node config 'delta' must be above 0 and below 1, got -1e-05"),
        ({"accountant": "gdp"}, "node config 'accountant' must be one of rdp, prv, got 'gdp'"),
        ({"accountant": 1}, "node config 'accountant' must be one of rdp, prv, got 1"),
        (
            {"min-noise-multiplier": -0.5},
            "node config 'min-noise-multiplier' must be above 0, got -0.5",
        ),
        ({"max-round-epsilon": "x"}, "node config 'max-round-epsilon' must be a number"),
        ({"min-grad-norm": 0}, "node config 'min-grad-norm' must be above 0, got 0.0"),
        ({"max-grad-norm": math.nan}, "node config 'max-grad-norm' must be above 0, got nan"),
        (
            {"min-grad-norm": 2.0, "max-grad-norm": 1.0},
            "node config 'min-grad-norm' (2) must not exceed 'max-grad-norm' (1)",
        ),
        ({"privacy-unit": ""}, "node config 'privacy-unit' must be a non-empty string"),
        ({"privacy-unit": 3}, "node config 'privacy-unit' must be a non-empty string"),
    ],
)
@pytest.mark.parametrize("deployed", [True, False])
def test_bad_node_config_values_name_the_key(node: dict, message: str, deployed: bool) -> None:
    base = DEPLOYED if deployed else {"partition-id": 0}
    with pytest.raises(PolicyError) as err:
        PrivacyPolicy.from_node_config({**base, **node})
    assert str(err.value).startswith(message)
