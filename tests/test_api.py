"""The Lightning-free entry point (`quantize_`, `convert`) against the plugins, the Trainer, and the layering."""

import ast
import copy
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import BNB_MODES, make_net, setup_quantized
from lightning.fabric import Fabric

import fabric_quant as fq
from fabric_quant.nn import Int8Linear, QuantizedLinear
from fabric_quant.qat.layers import FakeQuantLayer

PACKAGE = Path(fq.__file__).parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def test_library_never_imports_the_plugin_layer():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        # the plugin layer itself, and the integrations above it (they hand the plugins to Lightning's clients)
        if path.parent.name in ("plugins", "integrations"):
            continue
        bad = {
            name for name in _imports(path)
            if name.startswith(("fabric_quant.plugins", "lightning.fabric.plugins", "lightning.pytorch.plugins"))
        }  # fmt: skip
        if bad:
            offenders[str(path.relative_to(PACKAGE))] = sorted(bad)
    assert offenders == {}
    # and importing the package (which registers every mode) loads no plugin module
    code = "import sys, fabric_quant as fq; fq.available_modes(); print([m for m in sys.modules if 'plugins' in m])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "fabric_quant.plugins" not in out


# The package's layers, bottom up (docs/architecture.md): a module imports from its own layer and those below only.
LAYERS = [
    ("foundation", ["_bnb", "options", "memory", "registry"]),
    ("numerics", ["numerics"]),
    ("nn", ["nn"]),
    ("model tools", ["modules", "hf", "calibration", "checkpoint", "footprint", "kernels", "kernel_report", "report"]),
    ("families", ["bnb", "qat", "ptq", "woq"]),
    ("entry points", ["api", "loading"]),
    ("distributed", ["distributed"]),
    ("demo", ["demo"]),
    ("finetune", ["finetune"]),
    ("plugins", ["plugins"]),
    ("integrations", ["integrations", "litgpt"]),  # the plugins inside Lightning clients (litgpt)
]
RANK = {top: rank for rank, (_, tops) in enumerate(LAYERS) for top in tops}


def _top(dotted: str) -> str:
    """The package's top-level module or folder a dotted name lies in (``fabric_quant.woq.folder`` -> ``woq``)."""
    return dotted.split(".")[1]


def test_no_module_imports_from_a_higher_layer():
    offenders, unplaced = {}, []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue  # the package root re-exports every layer
        top = parts[0]
        if top not in RANK:
            unplaced.append(top)
            continue
        ours = {name for name in _imports(path) if name.startswith("fabric_quant.")}
        up = {name for name in ours if RANK.get(_top(name), -1) > RANK[top]}
        if up:
            offenders[str(path.relative_to(PACKAGE))] = sorted(up)
    assert unplaced == []  # a new module or folder is given its layer in LAYERS (and in docs/architecture.md)
    assert offenders == {}


def _bytes(model: torch.nn.Module) -> dict[str, bytes]:
    """Every tensor of the state dict as raw bytes (packed data viewed as float may hold NaN patterns)."""
    return {k: v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            for k, v in model.state_dict().items()}  # fmt: skip


@pytest.mark.parametrize("mode", BNB_MODES)
def test_quantize_bnb_equals_the_fabric_plugin(mode):
    x = torch.randn(4, 512)
    lib = fq.quantize_(make_net(), mode, dtype=torch.float32)
    _, wrapped = setup_quantized(mode, make_net())
    assert isinstance(lib.fc1, QuantizedLinear) and lib.fc1.is_quantized()
    assert _bytes(lib) == _bytes(wrapped.module)
    with torch.no_grad():
        assert torch.equal(lib(x), wrapped(x))


class SharedLinearNet(torch.nn.Module):
    """A ModuleDict whose first and last entries are one Linear, used twice in the forward (weight sharing by
    module, as in a decoder reusing a projection)."""

    def __init__(self) -> None:
        super().__init__()
        shared = torch.nn.Linear(128, 128)
        self.layers = torch.nn.ModuleDict(
            {"first": shared, "up": torch.nn.Linear(128, 256), "down": torch.nn.Linear(256, 128), "last": shared}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers["first"](x)
        h = h + self.layers["down"](torch.nn.functional.gelu(self.layers["up"](h)))
        return self.layers["last"](h)


def _shared_net() -> SharedLinearNet:
    torch.manual_seed(0)
    return SharedLinearNet()


@pytest.mark.parametrize("mode", ["nf4-dq", "int8"])
def test_a_linear_registered_twice_is_quantized_once_and_alike_on_every_path(mode):
    """quantize_, the plugin's setup and the plugin's init_module (quantize-on-load) give the same bytes and outputs,
    in the CPU's default compute dtype; the shared Linear is one quantized layer under both names (it used to stay
    float under its second name, a float copy only init_module's layers did not have)."""
    lib = fq.quantize_(_shared_net(), mode)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=fq.precision_plugin(mode))
    wrapped = fabric.setup(_shared_net())
    with fabric.init_module():
        built = SharedLinearNet()
    built.load_state_dict(_shared_net().state_dict())
    built = fabric.setup(built)
    for net in (lib, wrapped.module, built.module):
        assert net.layers["first"] is net.layers["last"] and isinstance(net.layers["last"], QuantizedLinear)
        assert not [n for n, m in net.named_modules(remove_duplicate=False) if type(m) is torch.nn.Linear]
    assert _bytes(lib) == _bytes(wrapped.module) == _bytes(built.module)
    x = torch.randn(4, 128)
    with torch.no_grad():
        out = lib(x.to(lib.layers["up"].bias.dtype)).float()  # the plugin casts its input to the compute dtype
        assert torch.equal(out, wrapped(x)) and torch.equal(out, built(x))


def test_ignoring_either_name_of_a_shared_linear_keeps_it_float_everywhere():
    net = fq.quantize_(_shared_net(), "nf4", dtype=torch.float32, ignore_modules={"layers.last"})
    assert type(net.layers["first"]) is torch.nn.Linear and net.layers["first"] is net.layers["last"]
    assert isinstance(net.layers["up"], QuantizedLinear)


def test_quantize_bnb_on_an_explicit_device_and_with_ignore_modules():
    net = fq.quantize_(make_net(), "nf4-dq", dtype="bf16", ignore_modules={"fc2"}, device="cpu")
    assert net.fc1.weight.dtype == torch.uint8 and type(net.fc2) is torch.nn.Linear
    assert net.fc2.weight.dtype == torch.bfloat16 and net.norm.weight.dtype == torch.bfloat16


def test_quantize_qat_equals_the_plugin_and_converts():
    torch.manual_seed(1)
    x = torch.randn(8, 512)
    lib = fq.quantize_(make_net(), "qat-int8")
    plugin = fq.precision_plugin("qat-int8")
    fabric = Fabric(accelerator="cpu", devices=1, plugins=plugin)
    wrapped = fabric.setup_module(make_net())
    assert isinstance(lib.fc1, FakeQuantLayer)
    with torch.no_grad():
        assert torch.equal(lib(x), wrapped(x))
    fq.apply_schedule(lib, 0, fq.qat.QATSchedule(start_step=5))
    assert not lib.fc1.fake_quant_enabled
    fq.apply_schedule(lib, 5, fq.qat.QATSchedule(start_step=5))
    real, via_plugin = fq.convert(lib), plugin.convert(wrapped.module)
    assert isinstance(real.fc1, Int8Linear) and real.fc1.qweight.dtype == torch.int8
    assert _bytes(real) == _bytes(via_plugin)


@pytest.mark.parametrize("mode", ["ptq-dynamic-int8", "ptq-dynamic-int8-bf16", "ptq-static-int8"])
def test_quantize_ptq_equals_the_plugin(mode):
    torch.manual_seed(2)
    x = torch.randn(8, 512)
    options = {"calibration_data": list(torch.randn(64, 512).split(16))} if "static" in mode else {}
    lib = fq.quantize_(make_net(), mode, progress=False, **options)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=fq.precision_plugin(mode, **options))
    wrapped = fabric.setup_module(make_net())
    assert isinstance(lib.fc1, Int8Linear) and lib.fc1.qweight.dtype == torch.int8
    assert _bytes(lib) == _bytes(wrapped.module)
    with torch.no_grad():
        assert torch.equal(lib(x.to(lib.norm.weight.dtype)).float(), wrapped(x))


def test_ptq_options_are_checked_by_quantize_():
    with pytest.raises(ValueError, match="'ptq-static-int8' needs calibration_data"):
        fq.quantize_(make_net(), "ptq-static-int8")
    with pytest.raises(ValueError, match=r"observer='best' is not supported. Valid choices"):
        fq.quantize_(make_net(), "ptq-dynamic-int8", observer="best")


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()
        self.data = torch.randn(32, 512), torch.randint(0, 64, (32,))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*self.data), batch_size=8)


def _fit(plugin, steps: int = 3) -> TinyModule:
    module = TinyModule()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, plugins=plugin, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module)
    assert trainer.global_step == steps
    return module


def test_trainer_fits_with_an_nf4_dq_base():
    module = TinyModule()
    before = module.net.norm.weight.detach().clone()
    plugin = fq.precision_plugin("nf4-dq", dtype=torch.float32)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, plugins=plugin, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module)
    assert trainer.global_step == 3
    fc1 = module.net.fc1
    assert isinstance(fc1, QuantizedLinear) and fc1.weight.dtype == torch.uint8 and fc1.weight.quant_state.nested
    assert not torch.equal(module.net.norm.weight, before)  # the float LayerNorm trained


@pytest.mark.parametrize("convert", [fq.convert, fq.qat.convert, fq.QATPrecision.convert],
                         ids=["fq.convert", "fq.qat.convert", "QATPrecision.convert"])  # fmt: skip
def test_every_convert_copies_by_default_and_converts_in_place_when_asked(convert):
    # one default for the three doors to the same conversion, torch.ao's: the fake-quant model stays as it was
    # (to compare with the converted one, or to train further)
    import inspect

    assert inspect.signature(convert).parameters["inplace"].default is False
    x = torch.randn(8, 512)
    qat = fq.quantize_(make_net(), "qat-int8")
    with torch.no_grad():
        before = qat(x)
    real = convert(qat)
    assert real is not qat and isinstance(real.fc1, Int8Linear) and isinstance(qat.fc1, FakeQuantLayer)
    with torch.no_grad():
        assert torch.equal(qat(x), before)
    same = fq.quantize_(make_net(), "qat-int8")
    assert convert(same, inplace=True) is same and isinstance(same.fc1, Int8Linear)


def test_trainer_runs_the_qat_schedule_and_converts():
    plugin = fq.precision_plugin("qat-int8", start_step=2)
    module = _fit(plugin, steps=3)
    assert isinstance(module.net.fc1, FakeQuantLayer) and module.net.fc1.fake_quant_enabled
    assert plugin.state_dict() == {"qat_steps": 3}
    late = fq.precision_plugin("qat-int8", start_step=10)
    assert not _fit(late, steps=3).net.fc1.fake_quant_enabled  # the schedule has not reached its start
    real = fq.convert(module.net)
    assert isinstance(real.fc1, Int8Linear) and real.fc1.qweight.dtype == torch.int8


def test_trainer_fits_a_float_head_on_a_ptq_int8_body():
    module = TinyModule()
    head = module.net.fc2.weight.detach().clone()
    plugin = fq.precision_plugin("ptq-dynamic-int8", ignore_modules={"net.fc2"})
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, plugins=plugin, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module)
    assert isinstance(module.net.fc1, Int8Linear) and module.net.fc1.qweight.dtype == torch.int8
    assert not torch.equal(module.net.fc2.weight, head)


def test_one_plugin_object_keeps_fabric_semantics_until_the_trainer_connects_it():
    plugin = fq.precision_plugin("nf4", dtype=torch.float32)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=plugin)
    model = fabric.setup_module(copy.deepcopy(make_net()))
    model(torch.randn(2, 512)).sum().backward()  # Fabric's own hooks: plain backward() is allowed
    assert model.module.norm.weight.grad is not None


_WITHOUT_BITSANDBYTES = """
import sys
sys.modules["bitsandbytes"] = None  # as if it were not installed: every import of it fails
import torch
import fabric_quant as fq

def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))

x = torch.randn(2, 64)
for mode in ("woq-int8", "ptq-dynamic-int8"):
    model = fq.quantize_(net(), mode)
    assert model(x).shape == (2, 8) and fq.footprint(model).quantized_bytes > 0, mode
try:
    fq.quantize_(net(), "nf4")
except ModuleNotFoundError as err:
    print("ERROR:", err)
"""


def test_the_package_and_its_other_families_work_without_bitsandbytes():
    out = subprocess.run([sys.executable, "-c", _WITHOUT_BITSANDBYTES], capture_output=True, text=True, check=True)
    assert "ERROR:" in out.stdout and "bitsandbytes" in out.stdout.split("ERROR:")[1]
    assert "pip install bitsandbytes" in out.stdout


def test_unwrap_returns_the_model_fabric_wrapped_and_nothing_else():
    from fabric_quant.modules import unwrap

    net = make_net()
    fabric = Fabric(accelerator="cpu", devices=1)
    wrapped = fabric.setup_module(net)
    assert wrapped is not net and unwrap(wrapped) is net
    assert unwrap(net) is net
    compiled = torch.compile(net)  # a compiled model keeps its own state-dict names (_orig_mod.)
    assert unwrap(compiled) is compiled
    assert unwrap(fabric.setup_module(torch.compile(make_net()))).__class__ is type(net)
    quantized = fq.quantize_(make_net(), "ptq-dynamic-int8", progress=False)
    via_fabric = Fabric(accelerator="cpu", devices=1).setup_module(quantized)
    assert fq.footprint(via_fabric) == fq.footprint(quantized)
    assert fq.dequantized_state_dict(via_fabric).keys() == fq.dequantized_state_dict(quantized).keys()


def test_unwrap_leaves_a_peft_model_as_it_is():
    peft = pytest.importorskip("peft")
    from fabric_quant.modules import unwrap

    model = peft.get_peft_model(make_net(), peft.LoraConfig(r=2, target_modules=["fc1"]))
    assert unwrap(model) is model
    assert unwrap(Fabric(accelerator="cpu", devices=1).setup_module(model)) is model
