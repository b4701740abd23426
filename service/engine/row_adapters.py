"""LoRA adapters applied per batch row on one shared base model.

The MRM is a rank-4 LoRA (plus an LM-head bias) on the policy's own backbone. Merged into a second
copy of the backbone, every search step reads the backbone's weights twice: once for the policy
rows, once for the MRM rows. Here the base weights are read once for all rows, and each adapter's
low-rank delta is added only to its own rows — the batching idea of Punica, S-LoRA and vLLM's LoRA
support (segmented per-adapter matmuls over a shared base GEMM), in plain PyTorch forward hooks:

    y[rows_a] += scale_a * (x[rows_a] @ A_a^T) @ B_a^T      for each adapter a in the batch
    logits[rows_a] += head_bias_a

The hooks work on any module whose forward maps ``x[..., in] -> y[..., out]``, so the base may be
fp32, bf16 or dynamically quantized int8 (quantize first, then add adapters: the hooks sit on the
modules present when ``add`` runs). Rows with no adapter see exactly the base model.
Unmerged, an adapter row equals the merged model up to float rounding (W x + B A x vs (W + B A) x).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

# peft's saved key: "base_model.model.<module path>.lora_A.weight"
_PEFT_PREFIX = "base_model.model."
_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform")


@dataclass
class Adapter:
    """One LoRA: per target module the factors, the scale folded into B."""

    name: str
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module path -> (A^T [in, r], (scale * B)^T [r, out])
    head_bias: torch.Tensor | None = None  # [V] added to the output-embedding rows of this adapter


def lora_scale(adapter_config: dict) -> float:
    """peft's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    r, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    return alpha / r**0.5 if adapter_config.get("use_rslora") else alpha / r


class RowAdapters:
    """Adapters installed as forward hooks on ``model``; ``active`` says which rows each one gets."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapters: dict[str, Adapter] = {}
        self._modules = dict(model.named_modules())
        self._hooked: set[str] = set()  # module paths that carry a hook
        self._rows: dict[str, slice | torch.Tensor] = {}  # adapter name -> its rows in the running forward

    def add(self, name: str, adapter_config: dict, lora_state: dict[str, torch.Tensor], head_bias: torch.Tensor | None = None) -> Adapter:
        """Install a LoRA saved by peft (``adapter_config.json`` as a dict, its state dict) under ``name``."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is installed already; installed: {sorted(self.adapters)}")
        bad = [k for k in _UNSUPPORTED if adapter_config.get(k)]
        if bad or adapter_config.get("bias", "none") != "none":
            raise ValueError(f"adapter {name!r}: unsupported LoRA options {bad or ['bias']}; supported: plain LoRA (optionally rsLoRA) on Linear layers")
        scale = lora_scale(adapter_config)
        head = self.model.get_output_embeddings()
        ref = next(self.model.parameters())
        adapter = Adapter(name)
        for key, a in lora_state.items():
            if not key.endswith(".lora_A.weight"):
                if not key.endswith(".lora_B.weight"):
                    raise ValueError(f"adapter {name!r}: unexpected tensor {key!r} (expected only lora_A / lora_B weights)")
                continue
            path = key.removeprefix(_PEFT_PREFIX).removesuffix(".lora_A.weight")
            b = lora_state.get(key.replace(".lora_A.", ".lora_B."))
            module = self._modules.get(path)
            if b is None or module is None:
                raise ValueError(f"adapter {name!r}: {key!r} has no lora_B or no module {path!r} in the base model")
            if (a.shape[1], b.shape[0]) != (module.in_features, module.out_features) or a.shape[0] != b.shape[1]:
                raise ValueError(f"adapter {name!r}: {path} LoRA shapes A {list(a.shape)} B {list(b.shape)} "
                                 f"do not fit a {module.in_features} -> {module.out_features} layer")
            # Stored transposed and contiguous, as the hooks multiply: x @ A^T, then @ (scale * B)^T.
            adapter.lora[path] = (a.T.contiguous().to(ref.device, ref.dtype), (b.float() * scale).T.contiguous().to(ref.device, ref.dtype))
        if head_bias is not None:
            if head_bias.numel() != head.out_features:
                raise ValueError(f"adapter {name!r}: head bias has {head_bias.numel()} entries, the LM head {head.out_features} outputs")
            adapter.head_bias = head_bias.to(ref.device, ref.dtype)
        self.adapters[name] = adapter
        for path in adapter.lora:
            self._hook(path)
        if head_bias is not None:
            self._hook(next(p for p, m in self._modules.items() if m is head), head=True)
        return adapter

    @contextmanager
    def active(self, row_adapters: list[str | None]) -> Iterator[None]:
        """For one forward: row b gets adapter ``row_adapters[b]`` (None: the base model alone)."""
        assert not self._rows, f"nested forwards with row adapters: {sorted(self._rows)}"
        device = next(self.model.parameters()).device
        for name in set(row_adapters) - {None}:
            assert name in self.adapters, f"{name=} is not installed; installed: {sorted(self.adapters)}"
            rows = [b for b, a in enumerate(row_adapters) if a == name]
            # A contiguous run of rows (the usual case: engines' rows are batched one after the other)
            # is a slice, so the hooks work on views instead of gathering and scattering rows.
            contiguous = rows == list(range(rows[0], rows[-1] + 1))
            self._rows[name] = slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows, device=device)  # type: ignore[index]
        try:
            yield
        finally:
            self._rows = {}

    def _hook(self, path: str, head: bool = False) -> None:
        if path in self._hooked:
            return
        fn = self._head_hook if head else self._lora_hook(path)
        self._modules[path].register_forward_hook(fn)
        self._hooked.add(path)

    def _lora_hook(self, path: str):
        def hook(module, inputs, out):
            x = inputs[0]  # [B, S, in]
            for name, rows in self._rows.items():
                factors = self.adapters[name].lora.get(path)
                if factors is None:
                    continue
                a_t, b_t = factors
                if isinstance(rows, slice):
                    part = out[rows].view(-1, out.shape[-1])  # a view: updated in place
                    part.addmm_(x[rows].reshape(-1, x.shape[-1]) @ a_t, b_t)
                else:
                    out.index_add_(0, rows, (x.index_select(0, rows) @ a_t) @ b_t)  # [k, S, out]
            return out
        return hook

    def _head_hook(self, module, inputs, out):
        for name, rows in self._rows.items():
            bias = self.adapters[name].head_bias
            if bias is None:
                continue
            if isinstance(rows, slice):
                out[rows] += bias
            else:
                out.index_add_(0, rows, bias.expand(len(rows), *out.shape[1:-1], -1))  # [k, S, V]
        return out
