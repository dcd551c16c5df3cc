"""A round's outcomes: plain data, no Flower runtime."""

from fl_common.protocol import ACCEPTED, DECLINED, REJECTED
from strategies.reports import FactoryOutcome, RoundRecord, RoundReport


def test_the_report_counts_and_summarises_outcomes():
    report = RoundReport(3)
    report.add(FactoryOutcome("f0", ACCEPTED, metrics={"num-examples": 10}))
    report.add(FactoryOutcome("f1", DECLINED, "budget"))
    report.add(FactoryOutcome("f2", REJECTED, "NaN"))
    assert report.accepted == ["f0"]
    assert [o.factory_id for o in report.failures] == ["f1", "f2"]
    assert report.summary_line() == "1/3 accepted; f1 declined; f2 rejected"
    assert RoundRecord(report).server_round == 3


def test_first_answer_of_a_factory_wins():
    report = RoundReport(1)
    first = FactoryOutcome("f0", ACCEPTED)
    report.add(first)
    report.add(FactoryOutcome("f0", REJECTED, "dup"))
    assert report.outcomes["f0"] is first
