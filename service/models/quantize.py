"""Int8 weights and activations for a model's Linear layers, the CPU option of the model loader.

On a CPU the search's forwards are bound by reading weights, not by arithmetic: the 576 x 49,152
LM head of the default model at 8-16 rows takes about 18 ms in fp32 and a few ms in int8. Each
``Int8Linear`` holds its weight as int8 with one scale per output channel; at every call it
quantizes each input row with its own scale (dynamic, symmetric), multiplies in int8 with int32
accumulation (``torch._int_mm``, the kernel torchao's int8 paths build on) and rescales:

    y[r] = (round(x[r] / s_x[r]) @ round(W / s_w)^T) * s_x[r] * s_w + b

A row's result depends on that row alone (integer accumulation is exact), so answers do not
change with the rows batched beside them: the trie cache on or off, one request or many
together, the tokens are the same. That is why this is not ``torch.ao.quantization.quantize_dynamic``
(deprecated, and its fbgemm kernels quantize the whole batch with one activation scale, so a
row's logits depend on its neighbours) nor torchao's eager CPU int8 configs (0.18: slower than
fp32 on this machine, 41-58 ms for the LM head). Measured side by side: bench/README.md "Engine".
CUDA keeps bf16: this is a CPU-only option.
"""

from __future__ import annotations

import time

import torch
from torch import nn

QUANTIZE_MODES = ("auto", "none", "int8")


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights (per output channel) and int8 activations (per row)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # [out, in]
        scale = w.abs().amax(1).clamp_min(1e-12) / 127  # [out]
        self.register_buffer("weight_t", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).T.contiguous())  # [in, out]
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()  # [n, in]
        s_x = rows.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127  # [n, 1]
        y = torch._int_mm(torch.round(rows / s_x).to(torch.int8), self.weight_t).float()  # [n, out], exact int32 sums
        y.mul_(s_x).mul_(self.scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (on the CPU) by an ``Int8Linear``, in place.

    Embeddings and norms stay fp32 (a tied LM head keeps its fp32 copy as the embedding). Call it
    before installing row adapters: their hooks sit on the modules present then. Returns ``model``.
    """
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"int8 quantization runs on the CPU only, the model is on {device}; accepted on CUDA: SAFFRON_QUANTIZE=none or auto (bf16)")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model


def resolve_quantize(mode: str, device: torch.device) -> str:
    """``auto``: int8 on a CPU whose int8 matrix product is faster than fp32 (``int8_matmul_is_fast``), else none
    (fp32 on a CPU, bf16 on CUDA); explicit modes as given."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    return "int8" if device.type == "cpu" and int8_matmul_is_fast() else "none"


_FAST: bool | None = None


def int8_matmul_is_fast(rows: int = 64, repeats: int = 5) -> bool:
    """Is ``torch._int_mm`` faster than the fp32 product on this CPU, at the default policy's MLP shape? Measured once.

    Speed depends on the instruction set: where oneDNN has int8 dot-product kernels (AVX512-VNNI, AVX-VNNI,
    AMX) int8 wins; on an AVX2-only CPU (measured: an AMD EPYC without VNNI) ``_int_mm`` was 30x slower than
    fp32, so ``auto`` must not pick it there. Takes a few milliseconds (tens on a slow path).
    """
    global _FAST
    if _FAST is None:
        a8 = torch.randint(-127, 128, (rows, 576), dtype=torch.int8)
        b8 = torch.randint(-127, 128, (576, 1536), dtype=torch.int8)
        a, b = a8.float(), b8.float()
        timings = []
        for run in (lambda: torch._int_mm(a8, b8), lambda: a @ b):
            run()  # warm-up
            t0 = time.perf_counter()
            for _ in range(repeats):
                run()
            timings.append(time.perf_counter() - t0)
        _FAST = timings[0] < 0.8 * timings[1]
    return _FAST
