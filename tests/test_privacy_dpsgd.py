"""DP-SGD with Opacus: model validation, real private training, and what the ledger is charged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedinfer.config.schema import ModelConfig, PrivacyConfig
from fedinfer.errors import ConfigError, PrivacyBudgetExceeded
from fedinfer.models import build_model
from fedinfer.privacy import (
    GRAD_SAMPLE_MODES,
    LEDGER_FILENAME,
    PrivacyLedger,
    epsilon_from_history,
    make_private,
    plan_round,
    validate_model,
)

pytestmark = [
    # Opacus hooks the first layer, whose input (the data) never requires grad; torch notes
    # that the hook then sees output gradients only, which is all Opacus uses.
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

INPUT_DIM, NUM_CLASSES = 40, 10


def model_named(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name=name), input_dim=INPUT_DIM, num_classes=NUM_CLASSES)


def synthetic(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, INPUT_DIM, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)
    )


class CountingDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Synthetic records that count how often they are read."""

    def __init__(self, n: int) -> None:
        self.inner = synthetic(n)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        return self.inner[index]  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- validation


def batchnorm_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(INPUT_DIM, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16)),
        nn.Linear(16, NUM_CLASSES),
    )


def test_a_batchnorm_model_is_rejected_with_every_offending_layer() -> None:
    # Execute
    with pytest.raises(ConfigError) as rejected:
        validate_model(batchnorm_model())
    # Assert
    message = str(rejected.value)
    assert "1 (BatchNorm1d)" in message and "3.1 (BatchNorm1d)" in message
    assert "validate_model(model, fix=True)" in message and "ModuleValidator.fix" in message


def test_fix_replaces_batchnorm_with_groupnorm() -> None:
    # Prepare
    original = batchnorm_model()
    # Execute
    fixed = validate_model(original, fix=True)
    # Assert
    assert isinstance(fixed[1], nn.GroupNorm) and isinstance(fixed[3][1], nn.GroupNorm)
    assert isinstance(original[1], nn.BatchNorm1d), "the original is not modified"
    assert validate_model(fixed) is fixed


@pytest.mark.parametrize("name", ["cnn1d", "mlp", "logreg"])
def test_our_models_are_valid_as_they_are(name: str) -> None:
    model = model_named(name)
    assert validate_model(model) is model


def test_make_private_refuses_an_unfixed_batchnorm_model() -> None:
    model = batchnorm_model()
    with pytest.raises(ConfigError, match="BatchNorm1d"):
        make_private(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(synthetic(64), batch_size=8),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"noise_multiplier": 0.0}, "privacy.noise_multiplier"),
        ({"max_grad_norm": -1.0}, "privacy.max_grad_norm"),
        ({"grad_sample_mode": "ghost"}, "privacy.grad_sample_mode"),
    ],
    ids=["zero-noise", "negative-clip", "unsupported-mode"],
)
def test_make_private_names_the_bad_key(overrides: dict[str, object], key: str) -> None:
    model = model_named("logreg")
    arguments: dict[str, object] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
    arguments.update(overrides)
    with pytest.raises(ConfigError, match=key):
        make_private(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(synthetic(64), batch_size=8),
            **arguments,
        )  # type: ignore[arg-type]


# ---------------------------------------------------------------------- per-sample gradients


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("name", ["cnn1d", "mlp", "logreg"])
def test_per_sample_gradients_match_one_sample_at_a_time(name: str, mode: str) -> None:
    """Every grad-sample mode computes exact per-sample gradients on our models."""
    # Prepare
    x, y = synthetic(6).tensors
    reference = model_named(name)
    expected = []
    for i in range(len(x)):
        reference.zero_grad()
        F.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]).backward()
        expected.append([p.grad.clone() for p in reference.parameters()])  # type: ignore[union-attr]
    model = model_named(name)
    private = make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=6),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        grad_sample_mode=mode,
    )
    # Execute
    F.cross_entropy(private.model(x), y).backward()
    # Assert
    for param, per_sample in zip(model.parameters(), zip(*expected, strict=True), strict=True):
        torch.testing.assert_close(
            param.grad_sample,
            torch.stack(per_sample),  # type: ignore[attr-defined]
            atol=1e-5,
            rtol=1e-4,
        )


def test_an_empty_poisson_batch_still_releases_a_noisy_step() -> None:
    """With hooks (the default) an empty batch is a noise-only step, counted like any other."""
    # Prepare
    model = model_named("cnn1d")
    private = make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(synthetic(64), batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    before = [p.detach().clone() for p in model.parameters()]
    # Execute
    private.optimizer.zero_grad()
    F.cross_entropy(private.model(torch.zeros(0, INPUT_DIM)), torch.zeros(0).long()).backward()
    private.optimizer.step()
    # Assert
    assert private.steps == 1
    for old, new in zip(before, model.parameters(), strict=True):
        assert torch.isfinite(new).all() and not torch.equal(old, new)


# ---------------------------------------------------------------------- training and charging


def test_a_real_dpsgd_round_charges_the_steps_and_rate_really_used(tmp_path: Path) -> None:
    """Train with Poisson DP-SGD; the ledger gets the loader's rate and the real steps.

    372 records in batches of 4 make 93 batches: Opacus samples at rate 1/93, but its
    DPDataLoader runs int(1 / (1 / 93)) = 92 batches per epoch, one fewer than planned.
    """
    # Prepare
    model = model_named("mlp")
    before = [p.detach().clone() for p in model.parameters()]
    loader = DataLoader(synthetic(372), batch_size=4)
    ledger = PrivacyLedger.open(tmp_path, accountant="rdp", delta=None, num_samples=372)
    private = make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=loader,
        noise_multiplier=1.3,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(0),
    )
    # Execute
    batch_sizes = []
    for x, y in private.data_loader:
        private.optimizer.zero_grad()
        F.cross_entropy(private.model(x), y).backward()
        private.optimizer.step()
        batch_sizes.append(len(y))
    entry = ledger.charge(
        server_round=1,
        run_id="run-1",
        noise_multiplier=private.noise_multiplier,
        sample_rate=private.sample_rate,
        steps=private.steps,
    )
    # Assert
    assert len(loader) == 93 and len(batch_sizes) == 92
    assert private.steps == 92 and entry.steps == 92
    assert private.sample_rate == private.data_loader.sample_rate == 1 / 93  # type: ignore[attr-defined]
    assert entry.sample_rate == 1 / 93 and entry.noise_multiplier == 1.3
    assert len(set(batch_sizes)) > 1, "Poisson sampling: batch sizes vary"
    assert PrivacyLedger.read(tmp_path).epsilon == pytest.approx(
        epsilon_from_history([(1.3, 1 / 93, 92)], delta=1 / 3720, accountant="rdp")
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def train_round(
    *, privacy: PrivacyConfig, state_dir: Path, dataset: CountingDataset, server_round: int
) -> float:
    """What a site's train handler does: plan (budget check), train, charge. Returns epsilon."""
    loader = DataLoader(dataset, batch_size=16)
    ledger = PrivacyLedger.open(
        state_dir, accountant=privacy.accountant, delta=privacy.delta, num_samples=len(dataset)
    )
    plan = plan_round(
        privacy=privacy,
        ledger=ledger,
        steps_per_epoch=len(loader),
        local_epochs=1,
        planned_rounds=3,
    )
    model = model_named("logreg")
    private = make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
    )
    for x, y in private.data_loader:
        private.optimizer.zero_grad()
        F.cross_entropy(private.model(x), y).backward()
        private.optimizer.step()
    entry = plan.ledger.charge(
        server_round=server_round,
        run_id="run-1",
        noise_multiplier=plan.noise_multiplier,
        sample_rate=private.sample_rate,
        steps=private.steps,
    )
    assert entry.epsilon_after is not None
    return entry.epsilon_after


def test_a_site_out_of_budget_refuses_before_touching_its_data(tmp_path: Path) -> None:
    """Rounds run until the next would pass max_epsilon; that one is refused, data unread."""
    # Prepare
    privacy = PrivacyConfig(mode="dpsgd", noise_multiplier=1.0, max_epsilon=3.0)
    spent = [
        train_round(
            privacy=privacy, state_dir=tmp_path, dataset=CountingDataset(160), server_round=r
        )
        for r in (1, 2)
    ]
    ledger_before = (tmp_path / LEDGER_FILENAME).read_bytes()
    untouched = CountingDataset(160)
    # Execute
    with pytest.raises(PrivacyBudgetExceeded) as refused:
        for server_round in range(3, 100):
            spent.append(
                train_round(
                    privacy=privacy,
                    state_dir=tmp_path,
                    dataset=untouched,
                    server_round=server_round,
                )
            )
            untouched = CountingDataset(160)
            ledger_before = (tmp_path / LEDGER_FILENAME).read_bytes()
    # Assert
    assert untouched.reads == 0
    assert (tmp_path / LEDGER_FILENAME).read_bytes() == ledger_before
    assert refused.value.spent == pytest.approx(spent[-1])
    assert spent[-1] <= 3.0 < refused.value.projected
    assert refused.value.budget == 3.0
