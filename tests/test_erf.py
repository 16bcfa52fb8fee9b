"""Effective receptive fields: a single convolution's is exactly its kernel's support; on untrained CP-ResNets ρ=1's is
narrower than ρ=9's and stays inside its maximal RF; `python -m emorf_jax.erf` draws checkpoints and baselines."""

import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import faresnet, vggish
from emorf_jax import erf, train, training_run
from emorf_jax.erf import __main__ as erf_command
from emorf_jax.models import receptive_field
from tests.process_output import stderr_excerpt

REPO = Path(__file__).resolve().parents[1]


class OneConv(nn.Module):
    """A single k x k convolution without padding, the smallest model with a last conv map."""

    kernel: int

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Conv(3, (self.kernel, self.kernel), padding="VALID")(x)


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_the_erf_of_one_convolution_is_exactly_its_kernels_support(kernel):
    model = OneConv(kernel)
    shape = (2, 16, 21, 1)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape[1:])))
    field = receptive_field.effective_receptive_field(model, variables, shape)
    top, left = (16 - kernel + 1) // 2, (21 - kernel + 1) // 2  # the centre unit of the VALID output map
    expected = np.zeros(shape[1:3], bool)
    expected[top : top + kernel, left : left + kernel] = True
    np.testing.assert_array_equal(field > 0, expected)


def _untrained(rho: int, shape) -> erf.ErfMap:
    fields = train.model_fields(training_run.with_rho(faresnet.get_config("test"), rho), 9)
    return erf.untrained_erf(fields, shape)


def test_an_untrained_rho1_sees_less_than_rho9_and_no_more_than_its_maximal_rf():
    shape = (4, 128, 128, 1)
    narrow, wide = _untrained(1, shape), _untrained(9, shape)
    assert narrow.extent[0] < wide.extent[0] and narrow.extent[1] < wide.extent[1], (narrow.extent, wide.extent)
    assert min(wide.extent) > receptive_field.exact_rf(1), "ρ=9 spreads 95 % of its gradient beyond ρ=1's whole RF"
    (top, bottom), (left, right) = narrow.rf_span
    assert bottom - top + 1 == right - left + 1 == receptive_field.exact_rf(1)
    rows, columns = np.nonzero(narrow.erf)
    assert top <= rows.min() and rows.max() <= bottom and left <= columns.min() and columns.max() <= right


def test_mass_extent_is_the_central_span_holding_the_fraction():
    mass = np.zeros((10, 30))
    mass[2:5, 10:20] = 1.0  # uniform mass on 3 rows x 10 columns
    assert erf.mass_extent(mass, fraction=0.95) == (3, 10)
    # the middle half: rows reach 1/4 in row 2 and 3/4 in row 4, columns 1/4 in column 12 and 3/4 in column 17
    assert erf.mass_extent(mass, fraction=0.5) == (3, 6)


def test_the_command_draws_a_checkpoint_and_an_untrained_baseline(random_checkpoints, tmp_path):
    output = tmp_path / "erf.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "emorf_jax.erf",
            f"--checkpoint={random_checkpoints[0]}",
            "--config=configs/vggish.py:test",
            "--frames=64",
            "--examples=2",
            f"--output={output}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, stderr_excerpt(result.stderr)
    lines = result.stdout.splitlines()
    rf = receptive_field.exact_rf(faresnet.get_config("test").model.rho)
    assert lines[0].startswith("FA-ResNet, rho=2") and f"maximal RF {rf} x {rf};" in lines[0]
    assert lines[1].startswith("VGG-ish") and "maximal RF not drawn" in lines[1]
    assert output.stat().st_size > 10_000


def test_the_erf_of_checkpoints_needs_no_training_package():
    """Only --config needs the [train] extra (a config's model fields are the training code's)."""
    code = (
        "import sys, emorf_jax.erf\n"
        "training = {'tensorflow', 'tensorflow_datasets', 'grain', 'clu'}\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] in training))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_command_refuses_rho_for_a_baseline(capsys, tmp_path):
    assert vggish.get_config("test").model.name == "vggish"
    with pytest.raises(SystemExit) as exit_info:
        erf_command.main(["--config=configs/vggish.py:test", "--rho=1", f"--output={tmp_path / 'erf.png'}"])
    assert exit_info.value.code == 2
    assert "rho sets the kernels of the CP-ResNet family" in capsys.readouterr().err
