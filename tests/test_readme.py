"""The README's promises: its set-up commands and its example."""

import re
from pathlib import Path

import pyro
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_the_install_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    assert first_block.split("\n")[:2] == ['pip install -e ".[dev]"', "pytest"]


def test_readme_python_example_runs_and_prunes_the_null_coefficients():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    pyro.set_rng_seed(0)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    keep = namespace["bmr"].masks["w"]
    assert keep[:5].all() and not keep[5:].any()
    assert isinstance(namespace["X"], torch.Tensor)
