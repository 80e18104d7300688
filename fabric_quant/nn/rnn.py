"""Dynamically quantized LSTM / GRU: int8 weights (a scale per gate row), float recurrence.

The notes' choosing table sends RNNs to dynamic quantization. The maintained stack has no int8 recurrent kernel
(torch.ao's fbgemm LSTM is deprecated with it), so this layer stores int8 weights (the checkpoint is ~4x smaller)
and runs torch's fused float LSTM/GRU on weights dequantized once and cached: same speed as float, exact int8
numerics of the weights.
"""

from __future__ import annotations

import torch

from fabric_quant.nn.base import QuantizedLinear, Storage
from fabric_quant.numerics.quant import absmax_scale

RNN_TYPES = (torch.nn.LSTM, torch.nn.GRU)


class DynamicInt8RNN(QuantizedLinear, torch.nn.Module):
    fq_mode = "ptq-dynamic-int8"

    @classmethod
    def from_float(cls, rnn: torch.nn.LSTM | torch.nn.GRU) -> DynamicInt8RNN:
        return cls(rnn)

    def __init__(self, rnn: torch.nn.LSTM | torch.nn.GRU) -> None:
        super().__init__()
        if getattr(rnn, "proj_size", 0):
            raise ValueError("LSTM with proj_size > 0 is not supported by dynamic quantization")
        self.rnn_type = type(rnn)
        self.config = {k: getattr(rnn, k) for k in ("input_size", "hidden_size", "num_layers", "bias",
                                                   "batch_first", "dropout", "bidirectional")}  # fmt: skip
        self.names = list(rnn._flat_weights_names)
        weights = [i for i, name in enumerate(self.names) if name.startswith("weight")]
        self.storage_keys = tuple(f"{k}{i}" for i in weights for k in ("qweight", "weight_scale"))
        for i, name in enumerate(self.names):
            tensor = getattr(rnn, name).detach().float()
            if name.startswith("weight"):
                scale = absmax_scale(tensor, 8)
                self.register_buffer(f"qweight{i}", torch.round(tensor / scale[:, None]).to(torch.int8))
                self.register_buffer(f"weight_scale{i}", scale)
            else:
                self.register_buffer(f"bias{i}", tensor.clone())
        self._float = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._float = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _float_weights(self) -> list[torch.Tensor]:
        # the recurrence runs in the biases' dtype (bf16 after quantize_dynamic(dtype=torch.bfloat16))
        biases = [b for key, b in self._buffers.items() if key.startswith("bias")]
        dtype = biases[0].dtype if biases else torch.float32
        return [
            (self._buffers[f"qweight{i}"].float() * self._buffers[f"weight_scale{i}"][:, None]).to(dtype)
            if name.startswith("weight")
            else self._buffers[f"bias{i}"]
            for i, name in enumerate(self.names)
        ]

    def _runner(self) -> torch.nn.Module:
        if self._float is None:  # kept outside the module tree: not saved, rebuilt after a load
            with torch.device("meta"):
                rnn = self.rnn_type(**self.config)
            for name, value in zip(self.names, self._float_weights(), strict=True):
                setattr(rnn, name, torch.nn.Parameter(value, requires_grad=False))
            rnn.flatten_parameters()
            self._float = [rnn.eval()]
        return self._float[0]

    def forward(self, x, hx=None):
        return self._runner()(x, hx)

    # QuantizedLinear interface (footprint, checkpoints)
    def is_quantized(self) -> bool:
        return True

    def weight_storage(self) -> Storage:
        numel = nbytes = 0
        for i, name in enumerate(self.names):
            if name.startswith("weight"):
                numel += self._buffers[f"qweight{i}"].numel()
                nbytes += self._buffers[f"qweight{i}"].numel() + self._buffers[f"weight_scale{i}"].numel() * 4
        return Storage(numel=numel, per_weight_bytes=nbytes, table_bytes=0)

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError(
            "a recurrent layer has several weights; use dequantized_rnn_state() for a float LSTM/GRU state dict"
        )

    def dequantized_rnn_state(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self._float_weights(), strict=True))

    def extra_repr(self) -> str:
        return f"{self.rnn_type.__name__}({', '.join(f'{k}={v}' for k, v in self.config.items())}), int8 weights"
