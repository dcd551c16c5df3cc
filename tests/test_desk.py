"""The server's payout desk: each round paid once, even across a restart."""

import pytest

from fl_server.config import compose_config
from fl_server.recorder import payout_metrics
from fl_server.rewards.allocation import RewardPolicy
from fl_server.rewards.desk import PayoutDesk, reward_policy
from fl_server.rewards.ledger import verify_ledger
from strategies.contribution.scorer import RoundContribution


def _round(r, scores):
    return RoundContribution(r, "exact", scores, evaluations=3, seconds=0.1, grand_utility=1.0)


def test_a_restarted_desk_never_pays_a_round_twice(tmp_path):
    policy = RewardPolicy(amount=1000, schedule="per_run", num_rounds=4)
    path = tmp_path / "ledger.sqlite"
    desk = PayoutDesk(policy, path, "run-1")
    first = desk.settle(1, _round(1, {"a": 0.75, "b": 0.25}), {"a": 1.0, "b": 1.5})
    assert [e.payout for e in first] == [188, 62]  # 187.5 : 62.5, tie to the larger score
    desk.settle(2, _round(2, {"a": -0.75, "b": 0.25}), {})
    head = desk.ledger.head()

    restarted = PayoutDesk(policy, path, "run-1")  # e.g. the server process was killed
    again = restarted.settle(2, _round(2, {"a": 5.0, "b": 0.0}), {})  # replayed round
    assert [e.payout for e in again] == [0, 250]  # the recorded payouts, not new ones
    assert restarted.ledger.head() == head
    third = restarted.settle(3, _round(3, {"a": 0.25}), {})
    book = restarted.book
    metrics = payout_metrics(third, sum(book.cumulative_payout.values()), book.carry)
    assert metrics["factory/a/contribution_cumulative"] == pytest.approx(0.25)
    assert [e.payout for e in third] == [83, 167]
    assert metrics["server/payout_total"] == 7.5  # 750 cents, logged in major units
    assert verify_ledger(path).ok
    paid = sum(e.payout for e in restarted.ledger.entries(run_id="run-1"))
    assert paid + restarted.book.carry == policy.released(3)


def test_an_unscored_round_carries_its_pool(tmp_path):
    desk = PayoutDesk(RewardPolicy(100, "per_round"), tmp_path / "l.sqlite", "r")
    assert desk.settle(1, None, {}) == []
    entries = desk.settle(2, _round(2, {"a": 1.0}), {"a": 2.0})
    assert [(e.factory_id, e.payout, e.epsilon) for e in entries] == [("a", 200, 2.0)]


def test_the_rewards_group_builds_the_policy():
    cfg = compose_config(["contribution=loo", "rewards=per_round", "rewards.amount=500"])
    assert reward_policy(cfg) == RewardPolicy(500, "per_round", int(cfg.federation.num_rounds))
    with pytest.raises(ValueError, match="rewards.schedule"):
        reward_policy(compose_config(["rewards.schedule=weekly"]))


def test_withheld_and_grouped_factories_are_named_in_the_ledger(tmp_path):
    desk = PayoutDesk(RewardPolicy(900, "per_round"), tmp_path / "l.sqlite", "r")
    guarded = RoundContribution(
        1,
        "exact",
        {"a": 0.5, "b": 0.25, "c": 0.25, "noise": 0.5},
        evaluations=7,
        seconds=0.1,
        grand_utility=1.5,
        withheld=("noise",),
        groups=(("b", "c"),),
    )
    entries = {e.factory_id: e for e in desk.settle(1, guarded, {})}
    assert entries["noise"].withheld and entries["noise"].payout == 0
    assert entries["b"].duplicate_group == entries["c"].duplicate_group == "b,c"
    assert [entries[f].payout for f in "abc"] == [450, 225, 225]
    # An unscored round brings no new evidence: the noise sender stays withheld, also after a
    # restart of the server.
    restarted = PayoutDesk(RewardPolicy(900, "per_round"), tmp_path / "l.sqlite", "r")
    assert restarted.withheld == ("noise",)
    second = {e.factory_id: e for e in restarted.settle(2, None, {})}
    assert second["noise"].withheld and second["noise"].payout == 0
    assert sum(e.payout for e in second.values()) == 900
    assert verify_ledger(desk.path).ok
