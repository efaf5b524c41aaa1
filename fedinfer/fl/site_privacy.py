"""DP-SGD at the site: the planned spend reserved before the data is touched, settled after."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedinfer.config.schema import FedInferConfig
from fedinfer.fl.site import SiteEnv
from fedinfer.privacy import PrivacyLedger, make_private, plan_round
from fedinfer.privacy.budget import RoundPlan
from fedinfer.privacy.dpsgd import PrivateTraining
from fedinfer.training import TrainResult, train_epochs

__all__ = ["private_train"]


def private_train(
    *,
    cfg: FedInferConfig,
    env: SiteEnv,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    device: torch.device,
    after_step: Callable[[], None] | None,
    server_round: int,
    run_id: str,
    noise_generator: torch.Generator | None = None,
) -> tuple[TrainResult, dict[str, float]]:
    """Train one round with DP-SGD and charge the site's ledger with the steps really taken.

    Raises
    ------
    PrivacyBudgetExceeded
        If the round would push the site past ``privacy.max_epsilon`` (checked first).
    """
    dp = cfg.privacy
    ledger = PrivacyLedger.open(
        env.state_dir,
        accountant=dp.accountant,
        delta=dp.delta,
        num_samples=len(env.data.train),
        key=env.state_key,
    )
    plan = plan_round(
        privacy=dp,
        ledger=ledger,
        steps_per_epoch=len(loader),
        local_epochs=cfg.federation.local_epochs,
        planned_rounds=cfg.federation.rounds,
        server_round=server_round,
        run_id=run_id,
    )
    reservation = plan.reservation
    assert reservation is not None  # planned for a round: reserved under the ledger's lock
    try:
        result, private = _train(
            cfg, model, optimizer, loader, device, after_step, plan, noise_generator
        )
    except BaseException:
        ledger.release(reservation)  # the failed round sends nothing: nothing left the site
        raise
    entry = ledger.settle(
        reservation,
        noise_multiplier=private.noise_multiplier,
        sample_rate=private.sample_rate,
        steps=private.steps,
    )
    return result, {
        "epsilon": float(
            entry.epsilon_after if entry.epsilon_after is not None else ledger.epsilon
        ),
        "delta": ledger.delta,
        "noise-multiplier": private.noise_multiplier,
        "sample-rate": private.sample_rate,
        "dp-steps": float(private.steps),
    }


def _train(
    cfg: FedInferConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    device: torch.device,
    after_step: Callable[[], None] | None,
    plan: RoundPlan,
    noise_generator: torch.Generator | None,
) -> tuple[TrainResult, PrivateTraining]:
    dp = cfg.privacy
    private = make_private(
        model=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=dp.poisson_sampling,
        grad_sample_mode=dp.grad_sample_mode,
        noise_generator=noise_generator,
    )
    with warnings.catch_warnings():
        # Opacus' hooks on the first layer, whose input needs no gradient: harmless, expected.
        warnings.filterwarnings(
            "ignore", message="Full backward hook is firing", category=UserWarning
        )
        result = train_epochs(
            private.model,
            private.data_loader,
            private.optimizer,
            epochs=cfg.federation.local_epochs,
            device=device,
            after_step=after_step,
            skip_empty=False,
            task=cfg.task.kind,
            threshold=cfg.task.threshold,
        )
    return result, private
