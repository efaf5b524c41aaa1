"""Typed configuration schemas.

Each dataclass mirrors one Hydra config group in ``conf/``. The library only
ever takes :class:`FedInferConfig` (never a raw ``DictConfig``); Hydra entry
points convert with ``OmegaConf.to_object``. ``MISSING`` marks required keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from fedinfer.policy.schema import SitePolicy

__all__ = [
    "DatasetConfig",
    "DeploymentConfig",
    "FaultsConfig",
    "FedInferConfig",
    "FederationConfig",
    "ModelConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "SecAggConfig",
    "ServingConfig",
    "SimulationConfig",
    "SitePolicy",
    "StrategyConfig",
    "TaskConfig",
    "TrackingConfig",
]


@dataclass
class DatasetConfig:
    """Which data the federation trains on (group ``dataset``)."""

    name: str = MISSING
    """``mnist1d``, ``digits``, ``breast_cancer``, ``csv`` (also Parquet / NPZ files), or read
    lazily from disk: ``folder`` (one folder per class of PNG/NPY samples), ``shards`` (a
    directory of NPZ/Parquet shards) or ``function`` (``dataset._target_``)."""
    num_samples: int = 10_000
    """mnist1d only: how many samples to generate (cached on disk by parameters)."""
    path: str | None = None
    """csv: one file to partition, or a directory with one file per site; folder / shards:
    the directory to read lazily (and partition over the sites of a simulation)."""
    _target_: str | None = None
    """function only: import path of ``load_site(site_id, split) -> torch Dataset``; a site
    imports it only if its own ``$FEDINFER_DATA_TARGETS`` allow-list names it."""
    num_classes: int | None = None
    """function only: the class count when the datasets carry no ``targets`` / ``labels``."""
    num_workers: int = 0
    """DataLoader worker processes reading samples (0: read in the training process)."""
    label_column: str = "label"
    """csv only: the column (or NPZ array) holding the labels: integer classes, or floats for
    ``task=regression``; ``'a,b,c'`` (quoted for Hydra) names several CSV/Parquet columns (``task=multilabel``, or
    several regression targets)."""
    cache_dir: str | None = None
    """Where generated datasets are cached (default: ``$FEDINFER_CACHE`` or ~/.cache/fedinfer)."""


@dataclass
class TaskConfig:
    """What is learned from the labels (group ``task``; table in :mod:`fedinfer.tasks`)."""

    kind: str = "multiclass"
    """``multiclass`` (integer classes), ``binary`` (labels 0/1, one logit), ``multilabel``
    (0/1 label vectors) or ``regression`` (float targets, MSE). Sets the loss, the metrics in
    the round table and results.json, and what a served model outputs."""
    threshold: float = 0.5
    """binary, multilabel: a probability at or above it predicts 1 (served labels, accuracy,
    F1)."""
    partition_bins: int = 10
    """regression: dirichlet / shards partition quantile bins of the target (iid ignores it)."""


@dataclass
class PartitionConfig:
    """How samples are split across sites (group ``partition``)."""

    name: str = MISSING
    """``iid``, ``dirichlet`` or ``shards``."""
    alpha: float = 0.5
    """dirichlet only: concentration; smaller is more non-IID."""
    labels_per_site: int = 2
    """shards only: how many distinct labels each site holds."""
    val_fraction: float = 0.1
    """Share of each site's samples held out for validation."""
    test_fraction: float = 0.2
    """Share of each site's samples held out for testing (pooled: the global test split)."""
    min_samples_per_site: int = 10
    """Every site gets at least this many samples in total."""


@dataclass
class ModelConfig:
    """The network every site trains (group ``model``); all are Opacus-compatible."""

    name: str = MISSING
    """``cnn1d``, ``mlp`` or ``logreg``."""
    hidden_sizes: list[int] = field(default_factory=lambda: [128, 64])
    """mlp only: widths of the hidden layers."""
    channels: int = 32
    """cnn1d only: convolution channels."""
    groups: int = 8
    """cnn1d only: GroupNorm groups (BatchNorm is never used: DP-SGD forbids it)."""
    _target_: str | None = None
    """custom only: import path of a ``torch.nn.Module`` class (``my_pkg.nets.Net``); a site
    imports it only if its own ``$FEDINFER_MODEL_TARGETS`` allow-list names it."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """custom only: keyword arguments of the constructor (``model.kwargs.width=64``)."""
    input_shape: list[int] | None = None
    """Per-sample input shape, e.g. ``[1, 8, 8]``; its product must equal the data's feature
    count. None: the flat ``[input_dim]``. Inputs are reshaped to ``(batch, *input_shape)``."""


@dataclass
class StrategyConfig:
    """Server aggregation (group ``strategy``); Flower's Message-API strategies."""

    name: str = MISSING
    """``fedavg``, ``fedprox``, ``fedadam``, ``fedavgm``, ``fedmedian``, ``trimmed_mean`` or
    ``krum``."""
    proximal_mu: float = 0.0
    """fedprox: weight of the proximal term (applied in local training)."""
    server_lr: float = 1.0
    """fedadam: eta; fedavgm: server learning rate."""
    server_momentum: float = 0.9
    """fedavgm: server momentum."""
    beta_1: float = 0.9
    """fedadam: first-moment decay."""
    beta_2: float = 0.99
    """fedadam: second-moment decay."""
    tau: float = 1e-3
    """fedadam: adaptivity (epsilon) term."""
    trim_beta: float = 0.2
    """trimmed_mean: fraction cut from each tail."""
    num_malicious: int = 0
    """krum: assumed number of malicious sites."""


@dataclass
class FederationConfig:
    """Sites, rounds and local training (group ``federation``)."""

    num_sites: int = 10
    rounds: int = 30
    fraction_train: float = 1.0
    """Share of sites sampled for training each round."""
    fraction_evaluate: float = 1.0
    """Share of sites sampled for federated evaluation each round."""
    min_sites: int = 2
    """Fewest sites that must be able to train; below it the federation ends cleanly."""
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    client_cpus: float = 1.0
    """Ray CPUs reserved per site (simulation)."""
    client_gpus: float = 0.0
    """Ray GPU fraction per site (simulation); a GPU is used whenever one is visible."""
    round_timeout_s: float = 600.0
    """Seconds the coordinator waits for replies in one exchange."""


@dataclass
class PrivacyConfig:
    """Differential privacy (group ``privacy``)."""

    mode: str = "none"
    """``none``, ``dpsgd`` (site-level DP-SGD with Opacus) or ``central`` (Flower DP wrappers)."""
    noise_multiplier: float | None = None
    """dpsgd: Gaussian noise std / max_grad_norm; or set ``target_epsilon`` instead."""
    target_epsilon: float | None = None
    """dpsgd: derive the noise multiplier so the planned rounds spend about this epsilon."""
    max_grad_norm: float = 1.0
    """dpsgd: per-sample clipping norm. central: the update clipping norm."""
    delta: float | None = None
    """dpsgd: None means 1 / (10 * local training samples), see the README."""
    max_epsilon: float = 10.0
    """dpsgd: the site budget; a site refuses a round that would exceed it."""
    accountant: str = "rdp"
    """dpsgd: ``rdp`` or ``prv``."""
    grad_sample_mode: str = "hooks"
    """dpsgd: Opacus per-sample gradient mode (``hooks``, ``functorch``, ``ew``)."""
    poisson_sampling: bool = True
    """dpsgd: Poisson sampling of batches; the accountant's guarantee needs it (false is refused)."""
    reproducible_noise: bool = False
    """Simulation only: DP noise and sampling seeded from ``seed`` (replayable, so NOT DP; marks
    results.json and the manifest ``"dp": false``; refused by deployed sites and coordinators)."""
    central_noise_multiplier: float = 1.0
    """central: noise multiplier of Flower's server-side DP wrapper."""
    central_adaptive: bool = False
    """central: use adaptive clipping instead of fixed."""
    fix_model: bool = False
    """dpsgd: replace layers Opacus cannot train privately (BatchNorm -> GroupNorm, ...) with
    ``opacus.validators.ModuleValidator.fix``; the replacement is logged and reported."""


@dataclass
class SecAggConfig:
    """Secure aggregation (group ``secagg``): the coordinator's request.

    A site's own floors (fewest participants, lowest threshold) are its policy's
    (``site_policy.secagg_min_participants``, ``site_policy.secagg_min_threshold``).
    """

    enabled: bool = False
    threshold: float = 0.6
    """Fewest surviving sites: a fraction of the round's sampled sites if <= 1, else an absolute
    count."""
    clip_range: float = 1.0
    """Updates are clipped to [-clip_range, clip_range] before quantization."""
    bits: int = 16
    """Quantization bits per coordinate of the update."""
    timeout_s: float = 120.0
    """A site silent this long in a secure-aggregation exchange counts as dropped."""
    on_abort: str = "skip"
    """When a round cannot be unmasked (too few survivors): ``skip`` the round or ``stop``."""


@dataclass
class FaultsConfig:
    """Fault injection for simulations (group-less key ``faults``)."""

    drop_sites: int = 0
    """How many of each round's sampled sites drop out (chosen by seed)."""
    drop_stage: str = "after_keys"
    """``before_keys``, ``after_keys`` (masks agreed, before upload) or ``after_upload``."""


@dataclass
class ServingConfig:
    """Serving at the end of a simulation (group ``serving``)."""

    enabled: bool = True
    """Start every site's inference server after training and query it once."""
    backend: str = "onnx"
    """``onnx`` (fastest here: bench/results/serving.md), ``torch`` or ``int8``."""
    max_batch_size: int = 4096
    """Most rows per forward pass of a site server (``fedinfer serve --max-batch-size``)."""
    max_queue_delay_ms: float = 0.0
    """Extra wait for a partial batch; 0 never delays an idle model."""
    workers: int = 1
    """Server processes per site sharing its port (``fedinfer serve --workers``; Linux)."""
    keep_alive: bool = False
    """Keep the site servers running after the demo requests (until Ctrl-C)."""
    base_port: int = 0
    """First port of the site servers (0: pick free ports)."""
    allow_torch_fallback: bool = False
    """Publish a custom model whose ONNX export fails or disagrees with eager torch, without a
    graph (sites then serve it with torch and need its target on ``$FEDINFER_MODEL_TARGETS``).
    False: such a model is refused before training, naming the failed check."""


@dataclass
class SimulationConfig:
    """How the simulation executes (key ``simulation``)."""

    runtime: str = "ray"
    """``ray`` (Flower's simulation runtime) or ``inprocess`` (sequential, for tests and
    debugging)."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    progress: bool = True
    """Show the per-round table."""
    flower_logs: bool = False
    """Also show Flower's per-message INFO logs (debugging)."""
    num_cpus: int | None = None
    """CPUs this run's Ray instance may use (None: all); a parallel sweep gives each job its
    share."""
    ray_address: str | None = None
    """Ray cluster to run the sites on: ``null`` (default) starts a private local Ray instance
    for this run (never one left by ``ray start``); ``auto`` joins the cluster started on this
    machine by ``ray start``; ``host:port`` (a head's GCS address) or ``ray://host:port`` (Ray
    Client) joins that cluster."""
    job_cpus: int = 2
    """CPUs of one sweep job run by a scheduler (``hydra/launcher=slurm``, ``slurm_local`` or
    ``ray_cluster``): the launcher asks for this many (Slurm ``cpus_per_task``, Ray
    ``num_cpus``) and the job's torch threads and private Ray instance use exactly these."""
    job_gpus: int = 0
    """GPUs of one scheduled sweep job (Slurm ``gpus_per_node``, Ray ``num_gpus``); the sites
    share them through ``federation.client_gpus``."""
    shared_data: bool = True
    """Ray runtime: write the sites' data once into ``<run dir>/site_data/`` as ``.npy`` files
    that the actors memory-map, instead of every actor rebuilding the whole federation."""


@dataclass
class TrackingConfig:
    """Optional experiment tracking (group ``tracking``).

    Needs ``pip install 'fedinfer[tracking]'``.
    """

    mlflow: bool = False
    """Log every round's metrics, the config and the run's artifacts to MLflow."""
    uri: str | None = None
    """MLflow tracking URI (None: ``$MLFLOW_TRACKING_URI`` or MLflow's own default)."""
    experiment: str = "fedinfer"
    """MLflow experiment the runs are filed under (created if missing)."""
    run_name: str | None = None
    """MLflow run name (None: the Hydra job's overrides, else the fedinfer run id)."""


@dataclass
class DeploymentConfig:
    """A real deployment (key ``deployment``): what a coordinator without data must be told."""

    input_dim: int | None = None
    """Features per sample; the coordinator builds the model from it (``fedinfer coordinator``
    needs it)."""
    num_classes: int | None = None
    """Classes of the federation (multilabel: labels; regression: targets, usually 1); sites
    check their labels against it."""
    connect_timeout_s: float = 600.0
    """How long the coordinator waits for ``federation.num_sites`` sites before round 1
    (it starts with ``federation.min_sites`` if fewer came)."""


@dataclass
class FedInferConfig:
    """The root config: everything a federation run needs."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    site_policy: SitePolicy = field(default_factory=SitePolicy)
    """Simulation only: every simulated site's own policy, applied on the site side and never
    sent by the coordinator (a deployed site reads its policy file instead)."""
    seed: int = 0
    output_dir: str | None = None
    """Where the run writes (default: Hydra's run directory, or the current directory)."""
