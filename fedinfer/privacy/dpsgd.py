"""Opacus DP-SGD glue: model validation and a keyword-only ``make_private`` façade.

The privacy accounting itself lives in the site's :class:`~fedinfer.privacy.ledger.PrivacyLedger`;
here we only make the model, optimizer and data loader private and record what
the optimizer really did (noise multiplier, sample rate, steps), so the ledger is
charged with facts rather than with the plan.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from fedinfer.errors import ConfigError
from fedinfer.privacy.accountant import HistoryEntry

__all__ = [
    "DEFAULT_GRAD_SAMPLE_MODE",
    "GRAD_SAMPLE_MODES",
    "PrivateTraining",
    "make_private",
    "validate_model",
]

GRAD_SAMPLE_MODES: tuple[str, ...] = ("ew", "functorch", "hooks")
"""Opacus per-sample-gradient modes ``privacy.grad_sample_mode`` accepts."""

DEFAULT_GRAD_SAMPLE_MODE = "hooks"
"""Fastest correct mode on our models (cnn1d, mlp, logreg): see bench/results/dp_overhead.md."""


def validate_model(model: nn.Module, *, fix: bool = False) -> nn.Module:
    """Check that Opacus can compute per-sample gradients of every layer of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        The model to check.
    fix : bool
        Replace unsupported layers with ``opacus.validators.ModuleValidator.fix``
        (BatchNorm -> GroupNorm, LSTM -> DPLSTM, ...) instead of refusing
        (default: False). The fixed model has other parameters than the original,
        so fix where the model is *built*, on the coordinator and every site alike.

    Returns
    -------
    torch.nn.Module
        ``model`` itself when it is valid, else the fixed copy (``fix=True``).

    Raises
    ------
    ConfigError
        Listing every offending layer by name, with the fix.

    Examples
    --------
    >>> validate_model(nn.Sequential(nn.Linear(4, 2)))
    Sequential(...)
    """
    problems = _unsupported_layers(model)
    if problems and fix:
        model = ModuleValidator.fix(model)
        problems = _unsupported_layers(model)
        if problems:
            raise ConfigError(
                "opacus.validators.ModuleValidator.fix could not repair these layers for DP-SGD: "
                f"{'; '.join(problems)}; replace them in the model definition"
            )
    if problems:
        raise ConfigError(
            f"the model has layers DP-SGD cannot train (per-sample gradients): "
            f"{'; '.join(problems)}. Use privacy-safe layers (GroupNorm/LayerNorm instead of "
            "BatchNorm), or build the model through validate_model(model, fix=True), which "
            "replaces them with opacus.validators.ModuleValidator.fix"
        )
    return model


def _unsupported_layers(model: nn.Module) -> list[str]:
    """``"name (Type): reason"`` for every submodule an Opacus validator rejects.

    Unlike ``ModuleValidator.validate`` this names the layers and also looks at
    layers without trainable parameters (a non-affine BatchNorm still mixes samples).
    """
    problems = []
    for name, module in model.named_modules():
        validator = ModuleValidator.VALIDATORS.get(type(module))
        for error in validator(module) if validator else []:
            reason = str(error).split(". ")[0].rstrip(".")
            problems.append(f"{name or '<root>'} ({type(module).__name__}): {reason}")
    return problems


@dataclass
class PrivateTraining:
    """The private model, optimizer and loader, and what the optimizer really did.

    Use :attr:`model` for the forward/backward passes; the original module passed to
    :func:`make_private` shares its parameters, so read and load weights through it.
    """

    model: nn.Module
    optimizer: DPOptimizer
    data_loader: DataLoader[tuple[torch.Tensor, ...]]
    noise_multiplier: float
    sample_rate: float
    """Poisson rate the loader really samples with: ``1 / len(original loader)``."""
    _accountant: IAccountant = field(repr=False)
    _hook_sample_rate: float = field(repr=False)

    @property
    def steps(self) -> int:
        """Optimizer steps that released a noisy gradient (skipped steps excluded).

        Counted by the step hook Opacus calls after noising each gradient.

        Raises
        ------
        RuntimeError
            If a step accumulated several batches (its sample rate is a multiple of the
            loader's), which a single ledger entry cannot describe.
        """
        history = self._accountant.history
        expected = (self.noise_multiplier, self._hook_sample_rate)
        if any((nm, q) != expected for nm, q, _ in history):
            raise RuntimeError(
                f"DP-SGD steps used other mechanisms than {expected}: {history}; "
                "gradient accumulation is not supported"
            )
        return sum(int(steps) for _, _, steps in history)

    @property
    def history(self) -> list[HistoryEntry]:
        """What to charge: ``[(noise_multiplier, sample_rate, steps)]``."""
        return [(self.noise_multiplier, self.sample_rate, self.steps)]


def make_private(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[tuple[torch.Tensor, ...]],
    noise_multiplier: float,
    max_grad_norm: float,
    poisson_sampling: bool = True,
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
    noise_generator: torch.Generator | None = None,
) -> PrivateTraining:
    """Wrap a model, optimizer and loader for DP-SGD (Opacus ``PrivacyEngine.make_private``).

    Parameters
    ----------
    model : torch.nn.Module
        The model to train; validated with :func:`validate_model` (never fixed here).
    optimizer : torch.optim.Optimizer
        An optimizer over ``model``'s parameters.
    data_loader : torch.utils.data.DataLoader
        The ordinary training loader; its ``batch_size`` sets the expected batch size.
    noise_multiplier : float
        Gaussian noise std divided by ``max_grad_norm``; must be > 0.
    max_grad_norm : float
        Per-sample gradient clipping norm; must be > 0.
    poisson_sampling : bool
        Sample each record independently with rate ``1 / len(data_loader)``, as the
        accountants assume (default: True).
    grad_sample_mode : str
        ``hooks``, ``functorch`` or ``ew`` (default: :data:`DEFAULT_GRAD_SAMPLE_MODE`).
    noise_generator : torch.Generator or None
        Source of the Gaussian noise (default: None, torch's global RNG). A site passes a
        generator seeded from ``os.urandom`` (:mod:`fedinfer.privacy.noise`), so nobody who
        knows the config can replay the noise; the Poisson sampler draws from
        ``data_loader.generator``, which the site seeds the same way.

    Returns
    -------
    PrivateTraining
        The wrapped objects plus the ``sample_rate`` and, after training, the ``steps`` to
        charge the ledger with.

    Examples
    --------
    >>> private = make_private(model=model, optimizer=opt, data_loader=loader,
    ...                        noise_multiplier=1.1, max_grad_norm=1.0)
    >>> for x, y in private.data_loader: ...
    >>> ledger.charge(..., noise_multiplier=private.noise_multiplier,
    ...               sample_rate=private.sample_rate, steps=private.steps)
    """
    _check_arguments(noise_multiplier, max_grad_norm, grad_sample_mode)
    validate_model(model)
    model.train()
    with warnings.catch_warnings():
        # We do not offer secure_mode (needs torchcsprng); the README documents the choice.
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant="rdp")
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=poisson_sampling,
        grad_sample_mode=grad_sample_mode,
        noise_generator=noise_generator,
    )
    return PrivateTraining(
        model=private_model,
        optimizer=private_optimizer,
        data_loader=private_loader,
        noise_multiplier=float(noise_multiplier),
        sample_rate=_sampling_rate(private_loader),
        _accountant=engine.accountant,
        # The expression PrivacyEngine.make_private hands to its accountant's step hook.
        _hook_sample_rate=1 / len(private_loader),
    )


def _sampling_rate(loader: DataLoader[tuple[torch.Tensor, ...]]) -> float:
    """Return the rate a DPDataLoader samples with, else ``1 / len(loader)`` as Opacus assumes.

    Opacus's own accountant uses ``1 / len(DPDataLoader)``, and that length is
    ``int(1 / (1 / k))``, which float rounding makes ``k - 1`` for some ``k`` (93, 99 ...):
    a slightly too large rate. We charge the rate the sampler really uses.
    """
    if isinstance(loader, DPDataLoader):
        return float(loader.sample_rate)
    return 1 / len(loader)


def _check_arguments(noise_multiplier: float, max_grad_norm: float, grad_sample_mode: str) -> None:
    if not noise_multiplier > 0:
        raise ConfigError(
            f"`privacy.noise_multiplier` must be > 0 for DP-SGD (got {noise_multiplier}); "
            "use privacy.mode=none to train without DP"
        )
    if not max_grad_norm > 0:
        raise ConfigError(f"`privacy.max_grad_norm` must be > 0 (got {max_grad_norm})")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(
            f"`privacy.grad_sample_mode` is {grad_sample_mode!r}; choose one of "
            f"{', '.join(GRAD_SAMPLE_MODES)}"
        )
