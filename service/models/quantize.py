"""Dynamic int8 quantization of a model's Linear layers, the CPU option of the model loader.

On a CPU the search's forwards are bound by reading weights, not by arithmetic: at 8-16 rows
the 576 x 49,152 LM head of the default model takes 17.6 ms in fp32 and 1.0 ms as an int8
dynamic-quantized layer (fbgemm kernels; weights int8 per channel, activations quantized per
call). torchao is the maintained successor of ``torch.ao.quantization``, but its eager CPU int8
kernels (torchao 0.18: ``Int8DynamicActivationInt8WeightConfig``, ``Int8WeightOnlyConfig``)
took 41-58 ms on the same layer on this machine, slower than fp32, so the fbgemm path is used
(measured side by side, bench/README.md "int8"). CUDA keeps bf16: this is a CPU-only option.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

QUANTIZE_MODES = ("none", "int8")


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (on the CPU) by its dynamic int8 version, in place.

    Embeddings and norms stay fp32. Call it before installing row adapters: their hooks sit on the
    modules present then. Returns ``model``.
    """
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"int8 dynamic quantization runs on the CPU only, the model is on {device}; accepted on CUDA: SAFFRON_QUANTIZE=none (bf16)")
    if torch.backends.quantized.engine not in ("fbgemm", "x86", "onednn", "qnnpack"):
        raise ValueError(f"no quantized CPU engine available ({torch.backends.quantized.supported_engines}); set SAFFRON_QUANTIZE=none")
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice (see the module docstring)
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model
