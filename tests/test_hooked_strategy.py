"""The strategy wrapper on real Flower messages: only valid updates reach FedAvg, and each
round ends with one record handed to the server."""

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp.strategy import FedAvg

from fl_common.protocol import RECORD_SKETCH, REPLY_RECORD, encode_sketch
from fl_server.recorder import factory_metrics
from strategies.hooked import FactoryFedStrategy
from strategies.validation import NO_SKETCH, ValidationRules


def _update(factory_id, value, n, status="accepted", shape=(2, 3), metrics=None):
    content = RecordDict(
        {REPLY_RECORD: ConfigRecord({"factory-id": factory_id, "status": status, "reason": ""})}
    )
    if status == "accepted":
        content["arrays"] = ArrayRecord([np.full(shape, value, np.float32)])
    content["metrics"] = MetricRecord({"num-examples": n, **(metrics or {})})
    return content


def _strategy(inner, **kwargs):
    """The wrapper and the dict its round records land in (what the server's recorder gets)."""
    records = {}
    strategy = FactoryFedStrategy(
        inner, on_round=lambda r: records.__setitem__(r.server_round, r), **kwargs
    )
    return strategy, records


def test_only_valid_updates_are_aggregated(identity):
    strategy, records = _strategy(FedAvg(fraction_evaluate=0.0), min_accepted=2)
    strategy.remember_global(ArrayRecord([np.zeros((2, 3), np.float32)]))
    replies = [
        identity(1, _update("factory_000", 1.0, 10)),
        identity(2, _update("factory_001", 3.0, 30)),
        identity(3, _update("factory_002", np.nan, 10)),
        identity(4, _update("factory_003", 9.0, 10, shape=(3, 2))),
        identity(5, _update("factory_004", 0.0, 10, status="declined", metrics={"epsilon": 8.0})),
        identity(6, _update("factory_005", 9.0, 0)),
        identity(9, Error(code=1, reason="worker crashed")),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    (aggregated,) = arrays.to_numpy_ndarrays()
    np.testing.assert_allclose(aggregated, 2.5)  # (1*10 + 3*30) / 40
    record = records[1]
    report = record.report
    status = {f: o.status for f, o in report.outcomes.items()}
    assert status == {
        "factory_000": "accepted",
        "factory_001": "accepted",
        "factory_002": "rejected",
        "factory_003": "rejected",
        "factory_004": "declined",
        "factory_005": "rejected",
        "node-9": "error",
    }
    assert "NaN" in report.outcomes["factory_002"].reason
    assert "shape" in report.outcomes["factory_003"].reason
    assert "num-examples" in report.outcomes["factory_005"].reason
    assert report.outcomes["node-9"].reason == "worker crashed"
    assert record.aggregated == ("factory_000", "factory_001")
    assert record.epsilons == {"factory_004": 8.0}  # taken from the replies once
    assert record.contribution is None  # no scorer
    metrics = factory_metrics(report, set())
    assert metrics["factory/factory_004/epsilon"] == 8.0
    assert metrics["factory/factory_002/rejected"] == 1.0


def test_a_federation_that_requires_sketches_rejects_replies_without_one(identity):
    """``validation.require_record_sketch``: a reply without the factory's record sketch is
    rejected with the rule named and never aggregated; one with a sketch is accepted."""
    strategy, records = _strategy(
        FedAvg(fraction_evaluate=0.0),
        min_accepted=1,
        rules=ValidationRules(require_record_sketch=True),
    )
    strategy.remember_global(ArrayRecord([np.zeros((2, 3), np.float32)]))
    sketched = _update("factory_000", 1.0, 10)
    sketched[REPLY_RECORD][RECORD_SKETCH] = encode_sketch(np.arange(1, 9, dtype=np.uint64))
    replies = [identity(1, sketched), identity(2, _update("factory_001", 3.0, 30))]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], 1.0)
    outcome = records[1].report.outcomes["factory_001"]
    assert outcome.status == "rejected" and outcome.reason == NO_SKETCH
    assert "validation.require_record_sketch" in NO_SKETCH
    assert records[1].aggregated == ("factory_000",)


def test_an_error_reply_is_recorded_against_the_factory_the_node_answered_as(identity):
    """Flower's error replies (a crashed ClientApp, a timeout) carry no factory record: once a
    node has answered as a factory, its errors are that factory's, so MLflow and the failure
    table name the firm; a node never heard from keeps its node name."""
    strategy, records = _strategy(FedAvg(fraction_evaluate=0.0), min_accepted=1)
    strategy.remember_global(ArrayRecord([np.zeros((2, 3), np.float32)]))
    strategy.aggregate_train(
        1,
        [identity(7, _update("factory_000", 1.0, 10)), identity(8, _update("factory_001", 2.0, 9))],
    )
    crash = Error(code=1, reason="ClientApp crashed")
    strategy.aggregate_train(
        2, [identity(7, _update("factory_000", 1.0, 10)), identity(8, crash), identity(9, crash)]
    )
    outcomes = records[2].report.outcomes
    assert {f: o.status for f, o in outcomes.items()} == {
        "factory_000": "accepted",
        "factory_001": "error",
        "node-9": "error",
    }
    assert outcomes["factory_001"].node_id == 8
    metrics = factory_metrics(records[2].report, set(records[1].report.outcomes))
    assert metrics["factory/factory_001/failed"] == 1.0


def _nodes(**names):
    """What the SuperLink's runtime API answers for ``grid.get_nodes()``."""
    return [NodeInfo(node_id=int(k[1:]), name=v) for k, v in names.items()]


def test_a_node_cannot_answer_as_another_registered_factory(identity):
    """In a deployment the SuperLink authenticates each SuperNode by its key and knows the name
    it was registered under: a reply claiming another factory's id is rejected, recorded under
    the sender's own name, and neither aggregated nor credited to the claimed factory."""
    strategy, records = _strategy(FedAvg(fraction_evaluate=0.0), min_accepted=1)
    strategy.remember_global(ArrayRecord([np.zeros((2, 3), np.float32)]))
    strategy.learn_registrations(_nodes(n1="factory_000", n2="factory_001"))
    arrays, _ = strategy.aggregate_train(
        1,
        [
            identity(1, _update("factory_000", 1.0, 10)),
            identity(2, _update("factory_000", 50.0, 10)),  # factory_001 poses as factory_000
            identity(3, _update("factory_001", 70.0, 10)),  # a nameless node takes a name
            identity(4, _update("factory_003", 3.0, 10)),  # nameless, unclaimed name: accepted
        ],
    )
    (aggregated,) = arrays.to_numpy_ndarrays()
    np.testing.assert_allclose(aggregated, 2.0)  # only factory_000's and factory_003's
    outcomes = records[1].report.outcomes
    assert {f: o.status for f, o in outcomes.items()} == {
        "factory_000": "accepted",
        "factory_001": "rejected",
        "node-3": "rejected",
        "factory_003": "accepted",
    }
    assert "registered as 'factory_001' but answered as 'factory_000'" in (
        outcomes["factory_001"].reason
    )
    assert "'factory_001' is registered to node 2" in outcomes["node-3"].reason
    # An error reply from a registered node is its factory's, even before it ever answered.
    strategy.learn_registrations(_nodes(n5="factory_005"))
    strategy.aggregate_train(2, [identity(5, Error(code=1, reason="lost"))])
    assert records[2].report.outcomes["factory_005"].status == "error"


def test_a_nameless_federation_is_not_bound(identity):
    """Simulation nodes have no registered names: factory ids are taken as claimed."""
    strategy, records = _strategy(FedAvg(fraction_evaluate=0.0), min_accepted=1)
    strategy.remember_global(ArrayRecord([np.zeros((2, 3), np.float32)]))
    strategy.learn_registrations([NodeInfo(node_id=1), NodeInfo(node_id=2)])
    assert strategy.registered == {}
    strategy.aggregate_train(1, [identity(1, _update("factory_007", 1.0, 10))])
    assert records[1].report.accepted == ["factory_007"]


def test_too_few_valid_updates_leave_the_model_unchanged(identity):
    strategy, records = _strategy(FedAvg(fraction_evaluate=0.0), min_accepted=2)
    strategy.remember_global(ArrayRecord([np.zeros((2, 3), np.float32)]))
    replies = [
        identity(1, _update("factory_000", 1.0, 10)),
        identity(2, _update("factory_001", np.inf, 10)),
    ]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert records[1].report.accepted == ["factory_000"]
    assert records[1].aggregated == ()  # nothing went into the model


def test_a_server_optimiser_keeps_the_models_dtype(identity):
    """FedAdam computes in float64; honest float32 replies must still validate next round."""
    from flwr.serverapp.strategy import FedAdam

    strategy = FactoryFedStrategy(FedAdam(fraction_evaluate=0.0, eta=0.1), min_accepted=1)
    current = [np.zeros((2, 3), np.float32)]
    strategy.remember_global(ArrayRecord(current))
    strategy.inner.current_arrays = {k: v.numpy() for k, v in ArrayRecord(current).items()}
    replies = [
        identity(1, _update("factory_000", 1.0, 10)),
        identity(2, _update("factory_001", 2.0, 10)),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    (aggregated,) = arrays.to_numpy_ndarrays()
    assert aggregated.dtype == np.float32 and np.all(aggregated > 0)
    strategy.remember_global(arrays)
    again = [identity(1, _update("factory_000", 0.5, 10))]
    assert strategy.classify(again[0]).status == "accepted"


def test_a_resumed_run_sees_the_true_round_everywhere(identity):
    """The offset is given once: the inner strategy, the record and the evaluation see it."""
    inner = FedAvg(fraction_evaluate=0.0)
    seen = []
    original = inner.aggregate_train
    inner.aggregate_train = lambda rnd, replies: (seen.append(rnd), original(rnd, replies))[1]
    strategy, records = _strategy(inner, min_accepted=1, round_offset=4)
    strategy.remember_global(ArrayRecord([np.zeros((2, 3), np.float32)]))
    strategy.aggregate_train(1, [identity(1, _update("factory_000", 1.0, 10))])
    assert seen == [5] and list(records) == [5]
    assert strategy.true_round(0) == 4  # the evaluation of the model resumed from


def test_malformed_replies_are_rejected_with_the_protocol_reason(identity):
    strategy, records = _strategy(FedAvg(fraction_evaluate=0.0), min_accepted=1)
    strategy.remember_global(ArrayRecord([np.zeros((2, 3), np.float32)]))
    two_metrics = _update("factory_001", 1.0, 10)
    two_metrics["extra"] = MetricRecord({"x": 1.0})
    strategy.aggregate_train(
        1,
        [
            identity(1, _update("factory_000", 1.0, 10, status="paid-twice")),
            identity(2, two_metrics),
            identity(3, _update("factory_002", 2.0, 10)),
        ],
    )
    outcomes = records[1].report.outcomes
    assert outcomes["factory_000"].status == "rejected"
    assert outcomes["factory_000"].reason == "unknown status 'paid-twice'"
    assert outcomes["factory_001"].reason == "reply must hold one ArrayRecord and one MetricRecord"
    assert records[1].aggregated == ("factory_002",)
