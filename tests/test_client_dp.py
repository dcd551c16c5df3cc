"""Client-level central DP: config group, Flower wrappers, accountant and budget guard."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Krum,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf
from opacus.accountants import RDPAccountant

from fl_common.protocol import REPLY_RECORD as FACTORY_RECORD
from fl_server.config import CONF_DIR, compose_config
from strategies.client_dp import (
    CLIENT_DP_WEIGHT_KEY,
    ClientDPAdaptiveClipping,
    ClientDPBudget,
    ClientDPBudgetExceeded,
    ClientDPFixedClipping,
    ClientLevelAccountant,
    adaptive_effective_noise_multiplier,
    client_dp_accountant,
    client_dp_budget,
    parse_client_dp,
    wrap_client_dp,
)
from strategies.hooked import FactoryFedStrategy

FIXED = {
    "mode": "fixed",
    "noise_multiplier": 1.0,
    "clipping_norm": 1.0,
    "epsilon": 8.0,
    "delta": 1e-3,
    "num_sampled_clients": None,
}
ADAPTIVE = {
    "mode": "adaptive",
    "noise_multiplier": 1.0,
    "initial_clipping_norm": 0.1,
    "target_clipped_quantile": 0.5,
    "clip_norm_lr": 0.2,
    "clipped_count_stddev": 1.0,
    "epsilon": 8.0,
    "delta": 1e-3,
    "num_sampled_clients": None,
}


def _compose(choice, *overrides):
    """The config with ``client_dp=<choice>``, whether or not the defaults list has the group.

    ``client_dp`` is not in ``conf/config.yaml``'s defaults until the server wires it in; until
    then it is added with ``+client_dp=...``.
    """
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").defaults)
    listed = any(isinstance(d, dict) and "client_dp" in d for d in defaults)
    return compose_config([*overrides, f"{'' if listed else '+'}client_dp={choice}"])


class _Grid:
    """Just what FedAvg.configure_train asks of a Grid: the connected node ids."""

    def __init__(self, n):
        self.nodes = list(range(1, n + 1))

    def get_node_ids(self):
        return self.nodes


def _global(d=6, seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(d,)).astype(np.float64), "b": rng.normal(size=(2,))}


def _record(state):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()})


def _reply(identity, node, state, n):
    return identity(
        node, RecordDict({"arrays": _record(state), "metrics": MetricRecord({"num-examples": n})})
    )


def _flat(state, keys=("w", "b")):
    return np.concatenate([np.asarray(state[k]).ravel() for k in keys])


def _configured(strategy, n, global_state):
    """Run the wrapper's real configure_train, as the ServerApp loop does before aggregating."""
    msgs = list(strategy.configure_train(1, _record(global_state), ConfigRecord(), _Grid(n)))
    assert len(msgs) == n
    return strategy


# -- config group and wrap_client_dp ---------------------------------------------------------
def test_none_returns_the_inner_strategy_itself():
    cfg = _compose("none")
    inner = instantiate(cfg.strategy.flower)
    assert wrap_client_dp(inner, cfg.client_dp, cfg.federation.num_factories) is inner
    assert client_dp_budget(cfg.client_dp, cfg.federation.num_factories) is None


@pytest.mark.parametrize(
    ("choice", "flower_cls", "ours"),
    [
        ("fixed", DifferentialPrivacyServerSideFixedClipping, ClientDPFixedClipping),
        ("adaptive", DifferentialPrivacyServerSideAdaptiveClipping, ClientDPAdaptiveClipping),
    ],
)
@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_each_mode_wraps_with_flowers_server_side_class(choice, flower_cls, ours, strategy):
    cfg = _compose(choice, f"strategy={strategy}")
    n = cfg.federation.num_factories
    inner = instantiate(cfg.strategy.flower)
    wrapped = wrap_client_dp(inner, cfg.client_dp, n)
    assert isinstance(wrapped, flower_cls) and type(wrapped) is ours
    assert wrapped.strategy is inner
    assert wrapped.num_sampled_clients == n  # null: every factory, every round
    budget = wrapped.client_dp_budget
    assert isinstance(budget, ClientDPBudget)
    assert budget.epsilon_budget == cfg.client_dp.epsilon
    assert budget.accountant.sample_rate == 1.0
    assert budget.max_rounds >= 1
    if choice == "fixed":
        assert wrapped.clipping_norm == cfg.client_dp.clipping_norm
        assert wrapped.noise_multiplier == cfg.client_dp.noise_multiplier
        assert budget.accountant.noise_multiplier == cfg.client_dp.noise_multiplier
    else:
        assert wrapped.clipping_norm == cfg.client_dp.initial_clipping_norm
        assert wrapped.clipped_count_stddev == cfg.client_dp.clipped_count_stddev
        assert budget.accountant.noise_multiplier < cfg.client_dp.noise_multiplier


def test_sample_rate_is_sampled_over_all_factories():
    acc = client_dp_accountant({**FIXED, "num_sampled_clients": 5}, 20)
    assert acc.sample_rate == 0.25
    inner = FedAvg(fraction_train=0.25, min_train_nodes=2)
    wrapped = wrap_client_dp(inner, {**FIXED, "num_sampled_clients": 5}, 20)
    assert wrapped.num_sampled_clients == 5
    assert wrapped.client_dp_budget.accountant.sample_rate == 0.25


# -- accountant ------------------------------------------------------------------------------
def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    acc = ClientLevelAccountant(1.0, 1.0, 1e-3)
    eps = [acc.epsilon_after(t) for t in range(0, 30)]
    assert eps[0] == 0.0
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False))
    by_noise = [ClientLevelAccountant(z, 1.0, 1e-3).epsilon_after(10) for z in (0.7, 1, 2, 4)]
    assert all(b < a for a, b in zip(by_noise, by_noise[1:], strict=False))
    assert ClientLevelAccountant(0.0, 1.0, 1e-3).epsilon_after(1) == math.inf


@pytest.mark.parametrize(("z", "q", "rounds"), [(1.0, 1.0, 10), (2.0, 0.5, 25), (1.3, 0.1, 100)])
def test_epsilon_matches_opacus_rdp_accountant(z, q, rounds):
    opacus = RDPAccountant()
    opacus.history = [(z, q, rounds)]
    ours = ClientLevelAccountant(z, q, 1e-3).epsilon_after(rounds)
    assert ours == pytest.approx(opacus.get_epsilon(delta=1e-3), rel=1e-12)


def test_epsilon_without_subsampling_is_the_gaussian_closed_form():
    """q = 1: RDP of T Gaussian rounds is T * a / (2 z^2); Balle et al.'s conversion to eps."""
    z, rounds, delta = 2.0, 10, 1e-3
    a = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = rounds * a / (2 * z**2)
    expected = np.min(rdp - (np.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a))
    assert ClientLevelAccountant(z, 1.0, delta).epsilon_after(rounds) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("z", "q", "budget"), [(1.0, 1.0, 8.0), (2.0, 1.0, 8.0), (1.5, 0.5, 3.0), (0.9, 0.2, 20.0)]
)
def test_max_rounds_is_the_exact_boundary(z, q, budget):
    acc = ClientLevelAccountant(z, q, 1e-3)
    t = acc.max_rounds(budget)
    assert t >= 1
    assert acc.epsilon_after(t) <= budget < acc.epsilon_after(t + 1)


def test_max_rounds_is_zero_when_one_round_is_over_budget():
    acc = ClientLevelAccountant(0.5, 1.0, 1e-3)
    assert acc.epsilon_after(1) > 1.0
    assert acc.max_rounds(1.0) == 0
    assert ClientLevelAccountant(0.0, 1.0, 1e-3).max_rounds(100.0) == 0


def test_adaptive_is_charged_the_effective_noise_multiplier():
    z, sigma_b = 2.0, 2.0
    z_eff = adaptive_effective_noise_multiplier(z, sigma_b, 4)
    sigma_delta = (z**-2 - (2 * sigma_b) ** -2) ** -0.5  # Flower's update noise (Andrew et al.)
    assert z_eff == pytest.approx((sigma_delta**-2 + sigma_b**-2) ** -0.5)
    assert z_eff == pytest.approx((z**-2 + 3 / (4 * sigma_b**2)) ** -0.5)
    assert z_eff < z
    opts = {**ADAPTIVE, "noise_multiplier": z, "clipped_count_stddev": sigma_b}
    assert client_dp_accountant(opts, 4).noise_multiplier == pytest.approx(z_eff)
    wrapped = wrap_client_dp(FedAvg(), opts, 4)
    assert wrapped.noise_multiplier == pytest.approx(sigma_delta)
    # Flower's default clipped_count_stddev (num_sampled_clients / 20) is resolved the same way.
    many = {**ADAPTIVE, "noise_multiplier": 1.0, "clipped_count_stddev": None}
    assert client_dp_accountant(many, 100).noise_multiplier == pytest.approx(
        adaptive_effective_noise_multiplier(1.0, 5.0, 100)
    )


# -- budget guard ----------------------------------------------------------------------------
def test_budget_refuses_the_first_round_past_the_budget():
    budget = ClientDPBudget(ClientLevelAccountant(2.0, 1.0, 1e-3), 8.0)
    last = budget.max_rounds
    for r in range(1, last + 1):
        budget.check(r)
        assert budget.epsilon(r) <= 8.0
    with pytest.raises(ClientDPBudgetExceeded) as info:
        budget.check(last + 1)
    exc = info.value
    assert isinstance(exc, PrivacyBudgetExhausted)
    assert exc.server_round == last + 1 and exc.budget == 8.0
    assert exc.epsilon == pytest.approx(budget.epsilon(last + 1)) and exc.epsilon > 8.0
    text = str(exc)
    assert "epsilon=8" in text and f"round {last + 1}" in text and f"{exc.epsilon:.4g}" in text


def test_wrapper_refuses_to_configure_a_round_past_the_budget(identity):
    wrapped = wrap_client_dp(FedAvg(), {**FIXED, "noise_multiplier": 2.0}, 4)
    last = wrapped.client_dp_budget.max_rounds
    msgs = wrapped.configure_train(last, _record(_global()), ConfigRecord(), _Grid(4))
    assert len(list(msgs)) == 4
    with pytest.raises(ClientDPBudgetExceeded, match=f"round {last + 1}"):
        wrapped.configure_train(last + 1, _record(_global()), ConfigRecord(), _Grid(4))


# -- the wrappers really clip and noise ------------------------------------------------------
def test_fixed_clipping_clips_each_update_around_the_global_model(identity):
    g = _global()
    wrapped = _configured(
        ClientDPFixedClipping(FedAvg(), 0.0, 1.0, 3),
        3,
        g,
    )
    rng = np.random.default_rng(1)
    directions = [rng.normal(size=8) for _ in range(3)]
    directions[2] *= 1e-3 / np.linalg.norm(directions[2])  # small: left alone
    states = [{"w": g["w"] + 1e6 * d[:6], "b": g["b"] + 1e6 * d[6:]} for d in directions[:2]] + [
        {"w": g["w"] + directions[2][:6], "b": g["b"] + directions[2][6:]}
    ]
    sizes = [10, 10_000, 1]  # very unequal num-examples: must not weight the DP mean
    replies = [
        _reply(identity, i + 1, s, n) for i, (s, n) in enumerate(zip(states, sizes, strict=True))
    ]
    arrays, _ = wrapped.aggregate_train(1, replies)
    clipped = [d / max(1.0, np.linalg.norm(d)) for d in directions]
    for d in clipped[:2]:
        assert np.linalg.norm(d) == pytest.approx(1.0)
    expected = _flat(g) + np.mean(clipped, axis=0)
    got = _flat({k: v.numpy() for k, v in arrays.items()})
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    assert np.linalg.norm(got - _flat(g)) <= 1.0 + 1e-9
    assert wrapped.strategy.weighted_by_key == "num-examples"  # inner strategy left as it was


def _noisy_round(identity, wrapped, g, k, seed):
    rng = np.random.default_rng(seed)
    replies = [
        _reply(identity, i + 1, {key: v + rng.normal(size=v.shape) for key, v in g.items()}, 5)
        for i in range(k)
    ]
    arrays, _ = wrapped.aggregate_train(1, replies)
    return {key: v.numpy() for key, v in arrays.items()}


def test_fixed_clipping_noise_differs_across_runs_and_is_scaled_to_the_aggregated_count(
    identity,
):
    g = _global(d=20_000)
    opts = {**FIXED, "noise_multiplier": 1.0, "clipping_norm": 0.5}
    first = _noisy_round(identity, _configured(wrap_client_dp(FedAvg(), opts, 4), 4, g), g, 4, 3)
    second = _noisy_round(identity, _configured(wrap_client_dp(FedAvg(), opts, 4), 4, g), g, 4, 3)
    assert not np.allclose(first["w"], second["w"])
    # Same replies, zero noise: the noise is the difference. Two of four factories replied, so
    # the mean's sensitivity is C / 2 and the noise stdev must be z * C / 2 (not z * C / 4).
    quiet = _noisy_round(
        identity,
        _configured(ClientDPFixedClipping(FedAvg(), 0.0, 0.5, 4), 4, g),
        g,
        2,
        5,
    )
    noisy = _noisy_round(identity, _configured(wrap_client_dp(FedAvg(), opts, 4), 4, g), g, 2, 5)
    assert np.std(noisy["w"] - quiet["w"]) == pytest.approx(1.0 * 0.5 / 2, rel=0.03)


def test_replies_in_another_key_order_are_clipped_key_by_key(identity):
    g = _global()
    wrapped = _configured(
        ClientDPFixedClipping(FedAvg(), 0.0, 100.0, 2),
        2,
        g,
    )
    upd = {"b": g["b"] + 1.0, "w": g["w"] + 2.0}  # reversed order, inside the clipping norm
    arrays, _ = wrapped.aggregate_train(1, [_reply(identity, i + 1, upd, 1) for i in range(2)])
    np.testing.assert_allclose(arrays["w"].numpy(), g["w"] + 2.0)
    np.testing.assert_allclose(arrays["b"].numpy(), g["b"] + 1.0)


def test_aggregating_before_configure_train_is_an_error(identity):
    wrapped = wrap_client_dp(FedAvg(), FIXED, 2)
    with pytest.raises(RuntimeError, match="configure_train"):
        wrapped.aggregate_train(1, [_reply(identity, 1, _global(), 1)])


@pytest.mark.parametrize(("start", "direction"), [(0.1, 1), (10.0, -1)])
def test_adaptive_clipping_norm_moves_toward_the_update_norms(identity, start, direction):
    g = _global()
    wrapped = ClientDPAdaptiveClipping(FedAvg(), 0.0, 4, initial_clipping_norm=start)
    norms = []
    for r in range(1, 40):
        wrapped.configure_train(r, _record(g), ConfigRecord(), _Grid(4))
        upd = {"w": g["w"] + np.eye(6)[0], "b": g["b"]}  # every update has norm 1
        wrapped.aggregate_train(r, [_reply(identity, i + 1, upd, 5) for i in range(4)])
        norms.append(wrapped.clipping_norm)
    assert (norms[0] - start) * direction > 0
    assert 0.5 < norms[-1] < 2.0  # settles around the (all-equal) update norm


def test_adaptive_noise_uses_the_norm_the_updates_were_clipped_to(identity):
    g = _global(d=20_000)
    opts = {**ADAPTIVE, "noise_multiplier": 1.0, "clipped_count_stddev": 1.0}
    quiet = ClientDPAdaptiveClipping(FedAvg(), 0.0, 4, 1.0, clipped_count_stddev=1.0)
    noisy = wrap_client_dp(FedAvg(), {**opts, "initial_clipping_norm": 1.0}, 4)
    a = _noisy_round(identity, _configured(quiet, 4, g), g, 4, 9)
    b = _noisy_round(identity, _configured(noisy, 4, g), g, 4, 9)
    sigma_delta = noisy.noise_multiplier
    assert np.std(b["w"] - a["w"]) == pytest.approx(sigma_delta * 1.0 / 4, rel=0.03)
    assert noisy.clipping_norm != 1.0  # adapted, after the noise


# -- bad options -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({**FIXED, "mode": "central"}, "client_dp.mode"),
        ({**FIXED, "noise_multiplier": -1.0}, "client_dp.noise_multiplier"),
        ({**FIXED, "noise_multiplier": "1.0"}, "client_dp.noise_multiplier"),
        ({k: v for k, v in FIXED.items() if k != "noise_multiplier"}, "client_dp.noise_multiplier"),
        ({**FIXED, "clipping_norm": 0.0}, "client_dp.clipping_norm"),
        ({**FIXED, "epsilon": 0.0}, "client_dp.epsilon"),
        ({**FIXED, "epsilon": math.inf}, "client_dp.epsilon"),
        ({**FIXED, "delta": 0.0}, "client_dp.delta"),
        ({**FIXED, "delta": 0.3}, "client_dp.delta"),  # >= 1/4 factories
        ({**FIXED, "num_sampled_clients": 0}, "client_dp.num_sampled_clients"),
        ({**FIXED, "num_sampled_clients": 5}, "client_dp.num_sampled_clients"),
        ({**FIXED, "num_sampled_clients": 2.5}, "client_dp.num_sampled_clients"),
        ({**FIXED, "noise_multipler": 1.0}, "client_dp.noise_multipler"),
        ({**FIXED, "initial_clipping_norm": 1.0}, "client_dp.initial_clipping_norm"),
        ({**ADAPTIVE, "initial_clipping_norm": -1.0}, "client_dp.initial_clipping_norm"),
        ({**ADAPTIVE, "target_clipped_quantile": 1.5}, "client_dp.target_clipped_quantile"),
        ({**ADAPTIVE, "clip_norm_lr": 0.0}, "client_dp.clip_norm_lr"),
        ({**ADAPTIVE, "clipped_count_stddev": -1.0}, "client_dp.clipped_count_stddev"),
        ({**ADAPTIVE, "clipped_count_stddev": 0.4}, "client_dp.clipped_count_stddev"),
        ({**ADAPTIVE, "clipped_count_stddev": None}, "client_dp.clipped_count_stddev"),
        ({**ADAPTIVE, "clipping_norm": 1.0}, "client_dp.clipping_norm"),
    ],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        parse_client_dp(options, 4)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        wrap_client_dp(FedAvg(), options, 4)


@pytest.mark.parametrize("strategy_cls", [FedAdam, Krum])
def test_strategies_that_do_not_release_the_mean_are_refused(strategy_cls):
    with pytest.raises(ValueError, match="strategy"):
        wrap_client_dp(strategy_cls(), FIXED, 4)
    assert wrap_client_dp(strategy_cls(), {"mode": "none"}, 4) is not None


def test_sample_size_must_match_what_the_strategy_samples():
    with pytest.raises(ValueError, match=r"client_dp\.num_sampled_clients"):
        wrap_client_dp(FedProx(fraction_train=1.0), {**FIXED, "num_sampled_clients": 2}, 4)
    with pytest.raises(ValueError, match=r"client_dp\.num_sampled_clients"):
        wrap_client_dp(FedAvg(fraction_train=0.5, min_train_nodes=2), FIXED, 4)


def test_uniform_weight_stays_internal_and_the_inner_key_is_restored(identity):
    """The DP mean weights factories equally; the inner FedAvg keeps its own weighting key."""
    g = _global()
    wrapped = _configured(ClientDPFixedClipping(FedAvg(), 0.0, 1.0, 2), 2, g)
    replies = [
        identity(
            i + 1,
            RecordDict(
                {
                    "arrays": _record(g),
                    "metrics": MetricRecord({"num-examples": n, "train_loss": loss}),
                }
            ),
        )
        for i, (n, loss) in enumerate([(3, 1.0), (300, 3.0)])
    ]
    _, metrics = wrapped.aggregate_train(1, replies)
    assert CLIENT_DP_WEIGHT_KEY not in metrics
    assert metrics["train_loss"] == pytest.approx(2.0)  # unweighted, as the arrays
    assert wrapped.strategy.weighted_by_key == "num-examples"


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_factory_sending_the_global_model_back_does_not_crash(identity, adaptive):
    """Flower divides the clipping norm by the update norm; a zero update must not crash."""
    g = _global()
    wrapped = (
        ClientDPAdaptiveClipping(FedAvg(), 0.0, 2, initial_clipping_norm=1.0)
        if adaptive
        else ClientDPFixedClipping(FedAvg(), 0.0, 1.0, 2)
    )
    _configured(wrapped, 2, g)
    moved = {"w": g["w"] + 10 * np.eye(6)[1], "b": g["b"]}
    arrays, _ = wrapped.aggregate_train(
        1, [_reply(identity, 1, g, 4), _reply(identity, 2, moved, 4)]
    )
    np.testing.assert_allclose(arrays["w"].numpy(), g["w"] + 0.5 * np.eye(6)[1])
    np.testing.assert_allclose(arrays["b"].numpy(), g["b"])
    assert wrapped.aggregate_train(2, []) == (None, None)


def test_composes_with_the_factoryfed_wrapper(identity):
    """FactoryFedStrategy drops a rejected update; the DP mean is over the accepted ones."""
    g = _global(d=4)
    dp = ClientDPFixedClipping(FedAvg(fraction_train=1.0, min_train_nodes=1), 0.0, 1.0, 3)
    records = []
    strategy = FactoryFedStrategy(dp, min_accepted=1, on_round=records.append)
    list(strategy.configure_train(1, _record(g), ConfigRecord(), _Grid(3)))
    states = [
        {"w": g["w"] + 5 * np.eye(4)[0], "b": g["b"]},
        {"w": g["w"] + 5 * np.eye(4)[1], "b": g["b"]},
        {"w": np.full(4, np.nan), "b": g["b"]},  # rejected by validation, never aggregated
    ]
    replies = []
    for i, state in enumerate(states):
        content = RecordDict(
            {"arrays": _record(state), "metrics": MetricRecord({"num-examples": 10 * (i + 1)})}
        )
        content[FACTORY_RECORD] = ConfigRecord(
            {"factory-id": f"f{i}", "status": "accepted", "reason": ""}
        )
        replies.append(identity(i + 1, content))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert len(records[0].report.accepted) == 2
    np.testing.assert_allclose(arrays["w"].numpy(), g["w"] + 0.5 * (np.eye(4)[0] + np.eye(4)[1]))


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_federation_stops_at_its_client_level_budget(tmp_path):
    """Through the real server: rounds are cut to the budget and the spend is logged."""
    from mlflow.tracking import MlflowClient

    from experiments.inprocess import run_inprocess
    from fl_server.config import finalize

    db = tmp_path / "mlflow.db"
    cfg = compose_config(
        [
            "task=molding_quality",
            "federation.num_factories=4",
            "federation.num_rounds=6",
            "privacy=none",
            "contribution=none",
            "client_dp=fixed",
            "client_dp.noise_multiplier=1.0",
            "client_dp.epsilon=6",
            f"tracking.uri=sqlite:///{db}",
            f"tracking.artifact_root={tmp_path / 'artifacts'}",
            "tracking.register_model=false",
            f"data_root={tmp_path / 'data'}",
        ]
    )
    cfg = finalize(cfg, base=tmp_path, output_dir=tmp_path / "out")
    budget = client_dp_budget(cfg.client_dp, 4)
    assert 1 <= budget.max_rounds < 6
    summary = run_inprocess(cfg, quiet=True)
    assert summary["rounds_run"] == budget.max_rounds
    assert [r["round"] for r in summary["rounds"]] == list(range(budget.max_rounds + 1))
    assert summary["epsilon_client_level"] <= 6.0
    history = MlflowClient(f"sqlite:///{db}").get_metric_history(
        summary["mlflow_run_id"], "server/epsilon_client_level"
    )
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(values) == budget.max_rounds + 1 and values[0] == 0.0  # round 0: nothing released
    assert values == sorted(values) and values[-1] <= 6.0
