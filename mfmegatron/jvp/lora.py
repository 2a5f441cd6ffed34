"""LoRA for the tensor-parallel linears, and a second network on shared frozen weights.

The alignment loss's fake network can be LoRA on the teacher: ``share_parameters`` makes a freshly
built copy use the teacher's own weight tensors, and ``add_lora`` attaches a trainable ``LoRA`` to
each of its Column/RowParallelLinear layers (``mfmegatron/jvp/linear.py`` adds its output in
``forward_jvp``/``partial_jvp`` and saves its split factor sharded like the weight).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel

from mfmegatron.jvp.linear import ColumnParallelJVP, RowParallelJVP


class LoRA(torch.nn.Module):
    """A low-rank update ``scale · B A`` of a frozen TP linear, computed as a side path.

    The factors are split like the weight they adapt, and the factor kept whole on every TP rank
    gets its gradient summed over TP (megatron's copy-to-TP region: identity forward, all-reduce
    backward). That is what makes the gradients equal a dense LoRA at any TP / SP layout:

    - column-parallel (W split by output rows): ``A [r, in]`` whole, ``B [out/tp, r]`` split. The
      input's gradient must come out as the main GEMM's does: whole without SP (megatron
      all-reduces it there), partial with SP (the sequence gather's backward reduce-scatters it).
      So without SP the all-reduce goes on ``h = x Aᵀ``, with SP on ``A`` itself.
    - row-parallel (W split by input columns): ``A [r, in/tp]`` split, ``B [out, r]`` whole; the
      update is added to the partial output before the layer's one reduction.

    ``B`` starts at zero, so the adapted layer starts equal to the frozen one.
    """

    def __init__(self, kind: str, a: torch.Tensor, out_features: int, alpha: float):
        super().__init__()
        if kind not in ("column", "row"):
            raise ValueError(f"kind must be 'column' or 'row', got {kind!r}")
        self.kind = kind
        rank = a.shape[0]
        self.scale = alpha / rank
        self.a = torch.nn.Parameter(a)
        self.b = torch.nn.Parameter(a.new_zeros(out_features, rank))

    def add_to_column_output(self, y, ty, x, tx, sequence_parallel: bool):
        def delta(inputs):
            if sequence_parallel:
                h = F.linear(inputs, tensor_parallel.copy_to_tensor_model_parallel_region(self.a))
            else:
                h = tensor_parallel.copy_to_tensor_model_parallel_region(F.linear(inputs, self.a))
            return F.linear(h, self.b) * self.scale

        return self._add(delta, y, ty, x, tx)

    def add_to_row_partial_output(self, y, ty, x, tx):
        def delta(inputs):
            b = tensor_parallel.copy_to_tensor_model_parallel_region(self.b)
            return F.linear(F.linear(inputs, self.a), b) * self.scale

        return self._add(delta, y, ty, x, tx)

    @staticmethod
    def _add(delta, y, ty, x, tx):
        y = y + delta(x)
        if ty is not None:
            with torch.no_grad():
                ty = ty + delta(tx)
        return y, ty

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.a.shape[0]}, scale={self.scale:g}"


def add_lora(model: torch.nn.Module, rank: int, alpha: float, seed: int = 0,
             global_name: Callable[[str], str] | None = None,
             include: Callable[[str], bool] | None = None) -> list[str]:
    """Attaches a ``LoRA`` to every Column/RowParallelLinear of ``model`` (``include``: only to
    those whose module name it accepts); returns their names.

    ``A`` is drawn whole (uniform, ±1/sqrt(in_features), as torch's Linear) from a generator
    seeded by ``seed`` and the layer's name in the whole model (``global_name`` maps a pipeline
    stage's module name to it), then split, so every TP / PP layout starts alike.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    names = []
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, (ColumnParallelJVP, RowParallelJVP)):  # local or TE layers
            continue
        if include is not None and not include(name):
            continue
        weight = layer.weight
        out_local, in_local = weight.shape
        kind = "column" if isinstance(layer, ColumnParallelJVP) else "row"
        in_full = in_local if kind == "column" else in_local * tp_size
        whole_model_name = global_name(name) if global_name is not None else name
        generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(whole_model_name.encode())) % 2**63)
        bound = 1.0 / math.sqrt(in_full)
        a = torch.empty(rank, in_full).uniform_(-bound, bound, generator=generator)
        if kind == "row":
            a = a[:, tp_rank * in_local:(tp_rank + 1) * in_local]
        a = a.to(device=weight.device, dtype=weight.dtype).contiguous()
        layer.lora = LoRA(kind, a, out_local, alpha)
        names.append(name)
    return names


def share_parameters(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Makes every parameter of ``target`` the very tensor of ``source`` at the same name (a
    second network on one set of weights; ``target``'s own are released). Same architecture."""
    source_params = dict(source.named_parameters())
    target_names = [name for name, _ in target.named_parameters()]
    if sorted(target_names) != sorted(source_params):
        raise ValueError("share_parameters needs two networks with the same parameter names")
    for module_name, module in target.named_modules():
        for name in list(module._parameters):
            if module._parameters[name] is not None:
                module._parameters[name] = source_params[f"{module_name}.{name}" if module_name else name]
