"""Config validation: collect every problem, then raise one ConfigError naming each key."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence

from fedinfer.config.schema import FedInferConfig, PrivacyConfig
from fedinfer.errors import ConfigError
from fedinfer.serving import MAX_WORKERS

__all__ = [
    "check_ray_address",
    "DATASETS",
    "DROP_STAGES",
    "did_you_mean",
    "MEAN_STRATEGIES",
    "MODELS",
    "PARTITIONS",
    "PRIVACY_MODES",
    "ROBUST_STRATEGIES",
    "validate_config",
    "validate_privacy",
]

DATASETS = ("breast_cancer", "csv", "digits", "folder", "function", "mnist1d", "shards")
PARTITIONS = ("dirichlet", "iid", "shards")
MODELS = ("cnn1d", "custom", "logreg", "mlp")
MEAN_STRATEGIES = ("fedadam", "fedavg", "fedavgm", "fedprox")
ROBUST_STRATEGIES = ("fedmedian", "krum", "trimmed_mean")
PRIVACY_MODES = ("central", "dpsgd", "none")
DROP_STAGES = ("before_keys", "after_keys", "after_upload")
_FIX = "set it in conf/ or on the command line"


def did_you_mean(word: str, choices: Sequence[str], *, template: str = "`{}`") -> str:
    """``"; did you mean X?"`` for the choice closest to a mistyped ``word``, or ``""``.

    Examples
    --------
    >>> did_you_mean("federaton.num_sites", ["federation.num_sites", "federation.rounds"])
    '; did you mean `federation.num_sites`?'
    >>> did_you_mean("zzz", ["fedavg"])
    ''
    """
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close and "." in word:  # a typo in the section alone: match the last part too
        leaf = word.rpartition(".")[2]
        close = [c for c in choices if c.rpartition(".")[2] == leaf][:1]
        close = difflib.get_close_matches(word, close, n=1, cutoff=0.4)
    return f"; did you mean {template.format(close[0])}?" if close else ""


def _one_of(problems: list[str], key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = did_you_mean(str(value), allowed, template=f"{key}={{}}")
        problems.append(f"`{key}` is {value!r} (choose one of {', '.join(allowed)}){hint}")


def _positive(problems: list[str], key: str, value: float, *, strict: bool = True) -> None:
    if math.isnan(value) or ((value <= 0) if strict else (value < 0)):
        rule = "> 0" if strict else ">= 0"
        problems.append(f"`{key}` must be {rule} (got {value})")


def _fraction(problems: list[str], key: str, value: float) -> None:
    if not 0 < value <= 1:
        problems.append(f"`{key}` must be in (0, 1] (got {value})")


def validate_config(cfg: FedInferConfig) -> None:
    """Check ``cfg`` before anything starts; raise one ConfigError listing every problem.

    Examples
    --------
    >>> from fedinfer.config.schema import FedInferConfig
    >>> cfg = FedInferConfig()
    >>> cfg.federation.num_sites = 0
    >>> validate_config(cfg)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ConfigError: `federation.num_sites` must be > 0 (got 0)
    """
    problems: list[str] = []
    _check_data(cfg, problems)
    _check_task(cfg, problems)
    _check_federation(cfg, problems)
    _check_privacy(cfg.privacy, problems)
    if cfg.privacy.mode == "central" and cfg.strategy.name not in ("fedavg", "fedprox"):
        problems.append(
            f"`strategy.name`={cfg.strategy.name} with privacy.mode=central: the noise is "
            "calibrated for a mean of clipped updates; use strategy=fedavg or strategy=fedprox"
        )
    _check_secagg(cfg, problems)
    _check_serving(cfg, problems)
    _check_site_policy(cfg, problems)
    if problems:
        raise ConfigError("; ".join(problems) + f" ({_FIX})")


def _check_site_policy(cfg: FedInferConfig, problems: list[str]) -> None:
    from fedinfer.policy import validate_policy

    try:
        validate_policy(cfg.site_policy, source="site_policy")
    except ConfigError as exc:
        problems.append(str(exc))  # "site_policy: `max_epsilon` must be ..."


def _check_task(cfg: FedInferConfig, problems: list[str]) -> None:
    from fedinfer.tasks import TASK_KINDS

    task = cfg.task
    _one_of(problems, "task.kind", task.kind, TASK_KINDS)
    if task.kind in ("binary", "multilabel") and not 0 < task.threshold < 1:
        problems.append(f"`task.threshold` must be in (0, 1) (got {task.threshold})")
    if task.kind == "regression" and task.partition_bins < 2:
        problems.append(f"`task.partition_bins` must be >= 2 (got {task.partition_bins})")
    if task.kind == "multilabel" and cfg.dataset.name not in ("csv", "shards", "function"):
        problems.append(
            f"`task.kind`=multilabel needs 0/1 label vectors, which dataset={cfg.dataset.name} "
            "does not have; use dataset=csv or dataset=shards with NPZ holding a 2-D `y` (or "
            "Parquet and dataset.label_column='a,b,c'), or dataset=function"
        )
    if task.kind == "regression" and cfg.dataset.name == "folder":
        problems.append(
            "`task.kind`=regression: dataset=folder carries one class per sample (its folder); "
            "give the targets as NPZ/Parquet shards (dataset=shards) or dataset=function"
        )


def _check_data(cfg: FedInferConfig, problems: list[str]) -> None:
    _one_of(problems, "dataset.name", cfg.dataset.name, DATASETS)
    if cfg.dataset.name == "mnist1d" and cfg.dataset.num_samples < 10:
        problems.append(f"`dataset.num_samples` must be >= 10 (got {cfg.dataset.num_samples})")
    if cfg.dataset.name == "csv" and not cfg.dataset.path:
        problems.append(
            "`dataset.path` is required for dataset=csv (a file, or a directory of site files)"
        )
    if cfg.dataset.name in ("folder", "shards") and not cfg.dataset.path:
        problems.append(
            f"`dataset.path` is required for dataset={cfg.dataset.name} (the data directory)"
        )
    if cfg.dataset.name == "function" and not cfg.dataset._target_:
        problems.append(
            "`dataset._target_` is required for dataset=function (my_pkg.data.load_site)"
        )
    if cfg.dataset.num_workers < 0:
        problems.append(f"`dataset.num_workers` must be >= 0 (got {cfg.dataset.num_workers})")
    _one_of(problems, "partition.name", cfg.partition.name, PARTITIONS)
    if cfg.partition.name == "dirichlet":
        _positive(problems, "partition.alpha", cfg.partition.alpha)
    if cfg.partition.labels_per_site < 1:
        problems.append(
            f"`partition.labels_per_site` must be >= 1 (got {cfg.partition.labels_per_site})"
        )
    split = cfg.partition.val_fraction + cfg.partition.test_fraction
    if cfg.partition.val_fraction < 0 or cfg.partition.test_fraction < 0 or split >= 1:
        problems.append(
            "`partition.val_fraction` and `partition.test_fraction` must be >= 0 and sum to < 1 "
            f"(got {cfg.partition.val_fraction} + {cfg.partition.test_fraction})"
        )
    _one_of(problems, "model.name", cfg.model.name, MODELS)
    if cfg.model.name == "custom" and not cfg.model._target_:
        problems.append(
            "`model._target_` is required for model=custom; set model._target_=my_pkg.nets.Net"
        )
    shape = cfg.model.input_shape
    if shape is not None and (not shape or any(d < 1 for d in shape)):
        problems.append(f"`model.input_shape` must be positive sizes like [1, 8, 8] (got {shape})")


def _check_federation(cfg: FedInferConfig, problems: list[str]) -> None:
    fed = cfg.federation
    for key in ("num_sites", "rounds", "local_epochs", "batch_size", "min_sites"):
        _positive(problems, f"federation.{key}", getattr(fed, key))
    _positive(problems, "federation.lr", fed.lr)
    _positive(problems, "federation.momentum", fed.momentum, strict=False)
    _positive(problems, "federation.client_cpus", fed.client_cpus)
    _positive(problems, "federation.client_gpus", fed.client_gpus, strict=False)
    _positive(problems, "federation.round_timeout_s", fed.round_timeout_s)
    _fraction(problems, "federation.fraction_train", fed.fraction_train)
    _fraction(problems, "federation.fraction_evaluate", fed.fraction_evaluate)
    if fed.min_sites > fed.num_sites > 0:
        problems.append(
            f"`federation.min_sites`={fed.min_sites} exceeds `federation.num_sites`={fed.num_sites}"
        )
    _one_of(problems, "strategy.name", cfg.strategy.name, MEAN_STRATEGIES + ROBUST_STRATEGIES)
    _positive(problems, "strategy.proximal_mu", cfg.strategy.proximal_mu, strict=False)
    if not 0 <= cfg.strategy.trim_beta < 0.5:
        problems.append(f"`strategy.trim_beta` must be in [0, 0.5) (got {cfg.strategy.trim_beta})")
    _positive(problems, "seed", cfg.seed, strict=False)
    _one_of(problems, "simulation.runtime", cfg.simulation.runtime, ("inprocess", "ray"))
    ray_problem = check_ray_address(cfg.simulation.ray_address)
    if ray_problem:
        problems.append(ray_problem)


def validate_privacy(privacy: PrivacyConfig) -> None:
    """Check the ``privacy`` group alone (what a site needs before it plans a DP round).

    Exactly the privacy rules of :func:`validate_config`: at least one of
    ``noise_multiplier`` and ``target_epsilon`` for ``mode=dpsgd``; when both are set the
    target wins (each site derives its own noise from it).

    Examples
    --------
    >>> validate_privacy(PrivacyConfig(mode="dpsgd", noise_multiplier=1.0))
    """
    problems: list[str] = []
    _check_privacy(privacy, problems)
    if problems:
        raise ConfigError("; ".join(problems) + f" ({_FIX})")


def _check_privacy(dp: PrivacyConfig, problems: list[str]) -> None:
    _one_of(problems, "privacy.mode", dp.mode, PRIVACY_MODES)
    _positive(problems, "privacy.max_grad_norm", dp.max_grad_norm)
    if dp.mode == "central":
        _positive(
            problems, "privacy.central_noise_multiplier", dp.central_noise_multiplier, strict=False
        )
        if dp.central_adaptive:
            problems.append(
                "`privacy.central_adaptive`=true: adaptive clipping spends budget on a noisy "
                "count we do not account for; set privacy.central_adaptive=false"
            )
    if dp.mode != "dpsgd":
        return
    if dp.noise_multiplier is None and dp.target_epsilon is None:
        problems.append(
            "set `privacy.noise_multiplier` or `privacy.target_epsilon` "
            "(e.g. privacy.noise_multiplier=1.2 or privacy.target_epsilon=8)"
        )
    if dp.noise_multiplier is not None:
        _positive(problems, "privacy.noise_multiplier", dp.noise_multiplier)
    if dp.target_epsilon is not None:
        _positive(problems, "privacy.target_epsilon", dp.target_epsilon)
    if dp.delta is not None and not 0 < dp.delta < 1:
        problems.append(f"`privacy.delta` must be in (0, 1) (got {dp.delta})")
    _positive(problems, "privacy.max_epsilon", dp.max_epsilon)
    if not dp.poisson_sampling:
        problems.append(
            "`privacy.poisson_sampling`=false: the accountant's epsilon assumes Poisson "
            "sampling and would understate the spend of shuffled batches; set "
            "privacy.poisson_sampling=true"
        )
    _one_of(problems, "privacy.accountant", dp.accountant, ("prv", "rdp"))
    _one_of(problems, "privacy.grad_sample_mode", dp.grad_sample_mode, ("ew", "functorch", "hooks"))


def _check_secagg(cfg: FedInferConfig, problems: list[str]) -> None:
    sa = cfg.secagg
    if not sa.enabled:
        if cfg.faults.drop_sites:
            problems.append(
                "`faults.drop_sites` needs secagg=on (dropouts are a secure-aggregation study)"
            )
        return
    if cfg.strategy.name in ROBUST_STRATEGIES:
        problems.append(
            f"`strategy.name`={cfg.strategy.name!r} needs every site's individual update, which "
            "secure aggregation hides by design; use secagg=off with a robust strategy, or a "
            f"mean-based strategy ({', '.join(MEAN_STRATEGIES)}) with secagg=on"
        )
    if cfg.privacy.mode == "central":
        problems.append(
            "`privacy.mode`=central clips each site's update at the coordinator, which secure "
            "aggregation prevents; use privacy=dpsgd with secagg=on, or secagg=off"
        )
    if not 2 <= sa.bits <= 24:
        problems.append(f"`secagg.bits` must be in [2, 24] (got {sa.bits})")
    _positive(problems, "secagg.clip_range", sa.clip_range)
    _positive(problems, "secagg.timeout_s", sa.timeout_s)
    if sa.threshold <= 0 or (sa.threshold > 1 and sa.threshold != int(sa.threshold)):
        problems.append(
            "`secagg.threshold` must be a fraction in (0, 1] or a whole count >= 2 "
            f"(got {sa.threshold})"
        )
    _one_of(problems, "secagg.on_abort", sa.on_abort, ("skip", "stop"))
    _one_of(problems, "faults.drop_stage", cfg.faults.drop_stage, DROP_STAGES)
    _positive(problems, "faults.drop_sites", cfg.faults.drop_sites, strict=False)


def _check_serving(cfg: FedInferConfig, problems: list[str]) -> None:
    _one_of(problems, "serving.backend", cfg.serving.backend, ("int8", "onnx", "torch"))
    _positive(problems, "serving.max_batch_size", cfg.serving.max_batch_size)
    _positive(problems, "serving.max_queue_delay_ms", cfg.serving.max_queue_delay_ms, strict=False)
    if not 1 <= cfg.serving.workers <= MAX_WORKERS:
        problems.append(
            f"`serving.workers` must be in 1..{MAX_WORKERS} (got {cfg.serving.workers})"
        )


def check_ray_address(address: str | None) -> str | None:
    """The problem with ``simulation.ray_address`` as written, or None (no network access)."""
    if address is None or address == "auto":
        return None
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return (
            f"`simulation.ray_address`={address!r} is not a Ray address; use null (a private "
            "local Ray), auto (the cluster `ray start` began here), host:port or ray://host:port"
        )
    return None
