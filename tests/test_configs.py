"""Every YAML in configs/ parses against its recipe's typed `setup` (a config folder per recipe)."""

import sys
from pathlib import Path

import pytest
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
    cfg = parser_for(RECIPES[path.parent.name]).parse_args(["--config", str(path)])
    assert cfg is not None


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
