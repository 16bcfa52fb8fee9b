"""notebooks/tag_music.ipynb executed top to bottom in a real kernel, as Colab would run it, minus its Colab-only
cells (install, upload), against two real checkpoints and a real MP3."""

import subprocess
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from data_prep import metadata

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "tag_music.ipynb"


def test_the_notebook_tags_a_file_as_predict_does_and_draws_its_figures(
    random_checkpoints, synthetic_tree, monkeypatch
):
    track = metadata.read_split(synthetic_tree / "data", 0, "test")[0]
    audio = str(synthetic_tree / "audio" / track.path)
    monkeypatch.setenv("EMORF_CHECKPOINT", ":".join(random_checkpoints))  # the kernel inherits the environment
    monkeypatch.setenv("EMORF_AUDIO", audio)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    colab_only = [cell for cell in notebook.cells if "colab" in cell.metadata.get("tags", [])]
    assert len(colab_only) == 2 and all("google.colab" in cell.source for cell in colab_only)
    notebook.cells = [cell for cell in notebook.cells if cell not in colab_only]
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    printed = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout").splitlines()
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(figures) == 3  # spectrogram, top tags, taggram
    assert any(line.startswith("model            FA-ResNet") for line in printed)  # the model card

    command = [
        sys.executable,
        "-m",
        "emorf_jax.predict",
        "--no_progress",
        audio,
        *(f"--checkpoint={path}" for path in random_checkpoints),
    ]
    cli = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.splitlines() == [line for line in printed if line.startswith(audio)]
