"""Kernel schedules, published and exact receptive fields, the inverse ρ for a maximal RF, the CLI and the ERF."""

import subprocess
import sys

import numpy as np
import pytest

from emorf_jax import erf
from emorf_jax.models import CPResNet, receptive_field, registry, resnet
from emorf_jax.models.receptive_field import __main__ as receptive_field_command
from tests.test_models import random_variables

# The RF per ρ as the authors published it (docs/fidelity.md, "Model").
PUBLISHED_RF = {
    0: 9,
    1: 17,
    2: 33,
    3: 49,
    4: 65,
    5: 81,
    6: 113,
    7: 145,
    8: 177,
    9: 209,
    10: 241,
    11: 273,
    12: 305,
    13: 337,
    14: 369,
    15: 401,
}


@pytest.mark.parametrize("rho", sorted(PUBLISHED_RF))
def test_published_rf_table_both_ways(rho):
    rf = PUBLISHED_RF[rho]
    assert receptive_field.published_rf(rho) == rf
    assert receptive_field.rho_for_max_rf(rf) == rho
    assert receptive_field.rho_for_max_rf(rf + 1) == rho  # the next ρ's RF is larger still
    if rho > 0:
        assert receptive_field.rho_for_max_rf(rf - 1) == rho - 1


@pytest.mark.parametrize("rho", range(16))
def test_exact_rf_both_ways(rho):
    rf = receptive_field.exact_rf(rho)
    assert rf > receptive_field.exact_rf(rho - 1) if rho else rf == 23  # stem, 3x3 and three pools at ρ=0
    assert receptive_field.rho_for_max_rf(rf, kind="exact") == rho
    if rho > 0:
        assert receptive_field.rho_for_max_rf(rf - 1, kind="exact") == rho - 1


def test_exact_rf_named_values():
    assert receptive_field.exact_rf(5) == 87
    assert receptive_field.exact_rf(7) == 135


def test_kernel_schedule_counts_rho_after_the_fixed_first_block():
    schedule = receptive_field.kernel_schedule(5)
    assert len(schedule) == 24
    assert schedule[:2] == [("stage1.block1.conv1", 3), ("stage1.block1.conv2", 1)]
    assert [kernel for _, kernel in schedule[2:]] == [3] * 5 + [1] * 17
    assert schedule[-1] == ("stage3.block4.conv2", 1)
    assert [kernel for _, kernel in receptive_field.kernel_schedule(0)[2:]] == [1] * 22
    assert [kernel for _, kernel in receptive_field.kernel_schedule(22)[2:]] == [3] * 22


@pytest.mark.parametrize("bad_rho", [-1, 23, 2.5, True, "5"])
def test_bad_rho_is_named(bad_rho):
    with pytest.raises(ValueError, match="rho must be an integer in 0..22"):
        receptive_field.kernel_schedule(bad_rho)


def test_rho_for_max_rf_rejects_too_small_rf_and_unknown_kind():
    with pytest.raises(ValueError, match="max_rf=8 is below the smallest published RF, 9"):
        receptive_field.rho_for_max_rf(8)
    with pytest.raises(ValueError, match="kind must be one of"):
        receptive_field.rho_for_max_rf(100, kind="effective")


def test_layer_table_rows():
    table = receptive_field.layer_table(5)
    assert table[0] == receptive_field.Layer("in_c.0", 5, 2, 2, 5)
    pools = [layer for layer in table if layer.name.endswith("pool")]
    assert [layer.name for layer in pools] == ["stage1.block1.pool", "stage1.block2.pool", "stage1.block4.pool"]
    assert table[-1].jump == 16
    assert len(table) == 1 + 24 + 3


def test_cli_prints_table_and_both_rfs():
    result = subprocess.run(
        [sys.executable, "-m", "emorf_jax.models.receptive_field", "--max_rf", "100"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["layer", "kernel", "stride", "jump", "RF"]
    assert lines[1].split() == ["in_c.0", "5", "2", "2", "5"]
    assert "rho = 5" in lines
    assert "published RF (the authors' formula): 81" in lines
    assert "exact RF (layer by layer): 87" in lines


def test_cli_rejects_an_impossible_rf(capsys):
    with pytest.raises(SystemExit):
        receptive_field_command.main(["--max_rf", "3"])
    assert "max_rf=3 is below the smallest published RF" in capsys.readouterr().err


def test_effective_rf_is_zero_outside_the_exact_rf_and_reaches_its_edges():
    rho = 3
    model = CPResNet(num_classes=3, rho=rho, base_channels=8)
    input_shape = (8, 112, 112, 1)
    variables = random_variables(model, (1, 112, 112, 1), seed=0)
    erf = receptive_field.effective_receptive_field(model, variables, input_shape)
    assert erf.shape == (112, 112)
    rows, columns = np.nonzero(erf)
    rf = receptive_field.exact_rf(rho)
    assert min(rows.min(), columns.min()) > 0 and max(rows.max(), columns.max()) < 111, "RF must fit the input"
    assert rows.max() - rows.min() + 1 == rf
    assert columns.max() - columns.min() + 1 == rf
    assert rf > receptive_field.published_rf(rho)  # the published formula undercounts


def test_a_resnets_maximal_rf_is_the_support_of_its_centre_units_gradient():
    """`resnet.max_rf` (what an RF sweep's baseline rows show) against the input a ResNet-18's centre unit really
    depends on: the rows and columns with any gradient, over random inputs and an untrained model."""
    assert [resnet.max_rf(name) for name in ("resnet18", "resnet34", "resnet50")] == [435, 899, 427]
    model = registry.build({"name": "resnet18", "num_classes": 3, "base_channels": 2})
    shape = (2, 448, 448, 1)
    field = receptive_field.effective_receptive_field(model, erf.untrained_variables(model, shape), shape)
    for profile in (field.sum(axis=1), field.sum(axis=0)):
        support = np.nonzero(profile)[0]
        assert support[-1] - support[0] + 1 == resnet.max_rf("resnet18")
