"""Every YAML in configs/ parses against its recipe's typed `setup` (a config folder per recipe)."""

import inspect
import sys
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import bench  # noqa: E402
import qat  # noqa: E402
import qlora  # noqa: E402

RECIPES = {"qlora": qlora.setup, "qat": qat.setup, "bench": bench.setup}
CONFIGS = sorted((ROOT / "configs").glob("*/*.yaml"))


def parser_for(setup) -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(setup)
    return parser


def test_every_config_folder_has_a_recipe():
    assert CONFIGS and {p.parent.name for p in CONFIGS} <= set(RECIPES)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses(path):
    """Each YAML key reaches its recipe as written (none dropped, renamed or coerced to another value), and the
    parsed config has exactly the parameters of the recipe's setup."""
    setup = RECIPES[path.parent.name]
    parser = parser_for(setup)
    cfg = parser.parse_args(["--config", str(path)])
    parsed = cfg.as_dict()
    parsed.pop("config")  # the --config file itself
    written = yaml.safe_load(path.read_text())
    assert set(parsed) == set(inspect.signature(setup).parameters)
    for key, value in _leaves(written):
        got = _get(parsed, key)
        assert (str(got) if isinstance(got, Path) else got) == value, f"{path.name}: {key}"


def _leaves(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _get(tree: dict, key: tuple):
    for part in key:
        tree = tree[part]
    return tree


def test_cli_override_wins_over_yaml():
    path = ROOT / "configs" / "qlora" / "minilm-pydoc-nf4dq.yaml"
    cfg = parser_for(qlora.setup).parse_args(
        ["--config", str(path), "--quantize", "int8", "--train.max_steps", "20", "--out_dir", "runs/x"]
    )
    assert cfg.quantize == "int8" and cfg.train.max_steps == 20 and str(cfg.out_dir) == "runs/x"
    assert cfg.train.micro_batch_size == 16  # untouched keys come from the YAML


def test_bad_config_value_is_rejected():
    path = ROOT / "configs" / "qlora" / "minilm-pydoc-nf4dq.yaml"
    with pytest.raises(Exception, match="optimizer"):
        parser_for(qlora.setup).parse_args(["--config", str(path), "--train.optimizer", "sgd"])
