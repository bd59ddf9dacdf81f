"""The example plugin package, installed with pip and selected by name like any third-party plugin."""

import os
import subprocess
import sys
from pathlib import Path

SELECT_AND_ENCODE = """
from plugins.manager import build_plugin_manager, load_models
from plugins.models import ModelContext
from tests.support.imagegen import product_image
models = load_models(build_plugin_manager(), "whole-image", "colour-histogram", "event-attrs",
                     ModelContext("cpu"), {"colour-histogram": {"bins": [4, 4, 4]}})
vectors = models.encoder.encode([product_image(1), product_image(2)])
print(type(models.encoder).__module__, vectors.shape, round(float((vectors ** 2).sum(axis=1)[0]), 4))
"""


def test_installed_example_plugin_is_listed_and_selectable(example_plugin_site):
    target = example_plugin_site  # pip-installed by the fixture, found through its entry point
    root = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(root)])}
    listed = subprocess.run([sys.executable, "-m", "indexer", "plugins"], env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "colour_histogram (lookstream-colour-histogram 0.1.0)\n  encoders: colour-histogram" in listed.stdout

    used = subprocess.run([sys.executable, "-c", SELECT_AND_ENCODE], env=env, capture_output=True, text=True)
    assert used.returncode == 0, used.stderr
    assert used.stdout.split() == ["lookstream_colour_histogram.plugin", "(2,", "64)", "1.0"]
