"""Loading the experiment config tree (``conf/``) for the ServerApp and the runner.

There is one source of truth, the Hydra tree in ``conf/``. The simulation runner composes it
with Hydra and hands the ServerApp the resolved file; an operator using ``flwr run`` directly
passes Hydra overrides instead and the ServerApp composes the same tree itself.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from fl_server.config_schema import validate_config

#: The Hydra config tree, shipped next to the packages (and inside the Flower app bundle).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def quote_choices(overrides: list[str]) -> list[str]:
    """Quote group choices Hydra would otherwise parse as numbers (``attack=nan``).

    Hydra reads a bare ``nan`` as a float and then refuses it as a config-group choice; the
    ``nan`` attack is named so in the catalogue, so ``attack=nan`` is made to mean the file.
    """
    return [
        f"{o.split('=')[0]}='nan'" if o.endswith("=nan") and "." not in o.split("=")[0] else o
        for o in overrides
    ]


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides, as ``python -m experiments.run`` does."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=quote_choices(list(overrides or [])))


def data_dir_for(cfg: DictConfig, root: Path | None = None) -> Path:
    """The folder holding the factories' data for this task, federation size, seed and split.

    Named by its parameters so sweeps over them never overwrite each other's data.
    """
    p = cfg.partition
    name = (
        f"{cfg.task.name}-n{cfg.federation.num_factories}-s{cfg.seed}-{p.scheme}"
        f"-a{p.alpha}-q{p.quantity_skew}-f{p.feature_shift}"
    )
    base = Path(root) if root is not None else Path(cfg.data_root)
    return (base / name).resolve()


def resolve_tracking_uri(uri: str, base: Path) -> str:
    """Make a relative ``sqlite:///file.db`` URI absolute against ``base``."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((base / uri[len(prefix) :]).resolve())
    return uri


def finalize(cfg: DictConfig, base: Path, output_dir: Path) -> DictConfig:
    """Check a composed config, then fill in its run-specific absolute paths.

    The whole config is validated first (:func:`fl_server.config_schema.validate_config`), so a
    bad value stops here, before any data, Flower process or MLflow run exists. ``data_dir``
    set by the user names a folder of the user's own factory files (``data_given``: checked,
    never generated into); otherwise the generated data's folder under ``data_root`` is used.
    """
    validate_config(cfg)
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    if cfg.get("data_dir") is not None and not cfg.get("data_given"):
        given = Path(str(cfg.data_dir)).expanduser()
        cfg.data_dir = str((given if given.is_absolute() else base / given).resolve())
        cfg.data_given = True
    else:
        root = Path(cfg.data_root)
        cfg.data_dir = str(data_dir_for(cfg, root if root.is_absolute() else base / root))
    cfg.output_dir = str(output_dir.resolve())
    cfg.tracking.uri = resolve_tracking_uri(str(cfg.tracking.uri), base)
    art_root = str(cfg.tracking.artifact_root)
    if "://" not in art_root and not art_root.startswith("mlflow-artifacts:"):
        art = Path(art_root)  # a local folder; URIs (s3://, mlflow-artifacts:) stay as given
        cfg.tracking.artifact_root = str(art if art.is_absolute() else (base / art).resolve())
    if cfg.run_name is None:
        eps = cfg.privacy.epsilon if cfg.privacy.enabled else "none"
        cfg.run_name = f"{cfg.task.name}-{cfg.strategy.name}-eps{eps}-s{cfg.seed}"
    OmegaConf.resolve(cfg)
    return cfg


def load_from_run_config(run_config: Mapping[str, Any]) -> DictConfig:
    """Build the ServerApp's config from Flower's run config.

    ``config-file`` (a resolved config written by the runner) wins; otherwise ``conf/`` is
    composed with the Hydra ``overrides``, and relative paths resolve against the working
    directory, with ``data-dir``/``output-dir`` from the run config when given. Either way the
    config is validated before it is returned (a ``ConfigError`` names the bad key).
    """
    config_file = str(run_config.get("config-file", "") or "")
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"run config 'config-file': {path} does not exist")
        loaded = OmegaConf.load(path)
        assert isinstance(loaded, DictConfig)
        validate_config(loaded)
        return loaded
    overrides = shlex.split(str(run_config.get("overrides", "") or ""))
    cfg = compose_config(overrides)
    base = Path.cwd()
    out = str(run_config.get("output-dir", "") or "")
    output_dir = (
        Path(out)
        if out
        else base / "outputs" / datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f-flwr")
    )
    cfg = finalize(cfg, base, output_dir)
    data = str(run_config.get("data-dir", "") or "")
    if data:
        # An operator's own folder: it holds the server's validation and test files only.
        cfg.data_dir = str(Path(data).resolve())
        cfg.data_given = False
        cfg.holdout_only = True
    return cfg


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config flattened to ``a.b.c -> value`` strings (MLflow params)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def malicious_factories(cfg: DictConfig) -> list[str]:
    """Ids of the factories that carry out ``cfg.attack`` (empty without an attack).

    ``attack.factories`` names them explicitly; otherwise ``attack.num_malicious`` of the
    simulated factories ``factory_000 ...`` are drawn with the run seed, so a sweep over
    strategies attacks the same factories in every run.
    """
    attack = cfg.get("attack")
    if attack is None or str(attack.name) == "none":
        return []
    explicit = attack.get("factories")
    if explicit:
        return sorted(str(f) for f in explicit)
    k, n = int(attack.num_malicious), int(cfg.federation.num_factories)
    if not 0 <= k <= n:
        raise ValueError(f"attack.num_malicious must be between 0 and {n} factories, got {k}")
    rng = np.random.default_rng([int(cfg.seed), 0xA77AC])
    return sorted(f"factory_{i:03d}" for i in rng.choice(n, size=k, replace=False))


def train_recipe(train: DictConfig, dp: bool) -> tuple[int, float]:
    """The batch size and learning rate factories train with: the task's DP-SGD recipe
    (``dp_batch_size``, ``dp_lr``, each where set) when the federation asks for DP, else the
    plain ``batch_size`` and ``lr``.

    DP-SGD and plain SGD want different settings: clipping bounds every step, and the Gaussian
    noise is drawn once a step for every parameter whatever the batch, so under DP fewer,
    larger batches at a larger rate cost less and lose nothing where plain SGD at the same
    settings takes steps too large (``conf/task/rul.yaml`` and ``tep_fault.yaml`` give the
    measurements).
    """
    batch, lr = int(train.batch_size), float(train.lr)
    if dp:
        dp_batch, dp_lr = train.get("dp_batch_size"), train.get("dp_lr")
        batch = batch if dp_batch is None else int(dp_batch)
        lr = lr if dp_lr is None else float(dp_lr)
    return batch, lr
