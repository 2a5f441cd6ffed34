"""Few-step sampling with the HunyuanImage 3.0 student, and loading an exported student.

``sample_student`` starts from noise at σ = 1 and takes one average-velocity Euler step per
interval of a decreasing σ grid ``1 = σ_0 > σ_1 > ... > σ_K = 0``::

    z <- z − (σ_k − σ_{k+1}) · u(z, σ_r = σ_{k+1}, σ = σ_k; w)

in float32 (float64 stays float64) whatever the network's dtype: K network evaluations, no CFG
batch (the student was distilled from the guided teacher; w enters through ``guidance_emb``).
The grid is ``mfmegatron.sampling.few_step``'s (uniform, or a custom one, validated there).
``shift``: the official scheduler (``FlowMatchDiscreteScheduler``, its ``shift`` ≠ 1) shifts the
uniform grid by ``σ' = sσ / (1 + (s − 1)σ)`` and, for a MeanFlow model, feeds the next *shifted*
point as ``timestep_r``; ``shift=3.0`` (the released generation default) reproduces that grid. The
default here is no shift (``shift=None``): the grid our MeanFlow students are sampled on
elsewhere in the project. (The official distil pipeline rounds ``1000·w`` to bf16 before
``guidance_emb``; we keep it in float32.) A student without ``use_meanflow`` takes plain Euler steps with its
instantaneous velocity.

``load_exported_student(folder, dtype)``: a world-of-one model from a folder our converter exports
(config.json, ``model.safetensors`` or its shards and index, the released key names).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from mfmegatron.sampling.few_step import check_time_grid, uniform_time_grid

# The released generation config's flow shift (shared/HUNYUAN_IMAGE3.md).
OFFICIAL_FLOW_SHIFT = 3.0


def shifted_time_grid(grid: Sequence[float], shift: float) -> list[float]:
    """``σ' = shift·σ / (1 + (shift − 1)·σ)`` on every point (1 and 0 stay)."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return [shift * t / (1 + (shift - 1) * t) for t in grid]


def student_time_grid(num_steps: int | None = None, time_grid: Sequence[float] | None = None,
                      shift: float | None = None) -> list[float]:
    """The σ grid: ``num_steps`` uniform steps or a custom ``time_grid`` (exactly one), then the
    shift if given."""
    if (num_steps is None) == (time_grid is None):
        raise ValueError("give exactly one of num_steps or time_grid")
    grid = uniform_time_grid(num_steps) if time_grid is None else check_time_grid(time_grid)
    return grid if shift is None else check_time_grid(shifted_time_grid(grid, shift))


def sample_student(model, sequence, noise: torch.Tensor, num_steps: int | None, guidance,
                   time_grid: Sequence[float] | None = None, shift: float | None = None,
                   on_step: Callable[[int, int, float, float], None] | None = None) -> torch.Tensor:
    """Latents [b, C, h, w] (float32, or float64 for float64 noise) from ``noise`` at σ = 1.

    ``model``: a whole ``HunyuanImage3Model`` (one process); ``sequence``: its
    ``ImageSequence`` (with the student's tokens for a "tokens" student); ``guidance``: w, a
    number or [b] (None for a student without ``cfg_distilled``); ``num_steps`` or ``time_grid``
    (then pass ``num_steps=None``); ``shift``: see the module docstring; ``on_step(k, K, σ, σ_next)``
    is called before each network evaluation (progress)."""
    if not (model.pre_process and model.post_process):
        raise ValueError("sample_student needs the whole model in this process (no pipeline stages)")
    config = model.config
    grid = student_time_grid(num_steps, time_grid, shift)
    batch = noise.shape[0]
    state_dtype = torch.promote_types(noise.dtype, torch.float32)
    device = noise.device
    w = None
    if config.cfg_distilled:
        if guidance is None:
            raise ValueError("this student is cfg_distilled: give the guidance scale w")
        w = torch.as_tensor(guidance, dtype=state_dtype, device=device)
        w = w.expand(batch).clone() if w.dim() == 0 else w
        if w.shape != (batch,):
            raise ValueError(f"guidance must be a number or [{batch}], got {tuple(w.shape)}")
    elif guidance is not None:
        raise ValueError("this model is not cfg_distilled: it takes no guidance scale (CFG needs a [cond; uncond] batch)")
    param_dtype = next(model.parameters()).dtype
    z = noise.to(state_dtype)
    with torch.no_grad():
        for k, (sigma, sigma_next) in enumerate(zip(grid[:-1], grid[1:])):
            if on_step is not None:
                on_step(k, len(grid) - 1, sigma, sigma_next)
            t = torch.full((batch,), sigma, dtype=state_dtype, device=device)
            r = torch.full((batch,), sigma_next, dtype=state_dtype, device=device)
            u = model.velocity(sequence, z.to(param_dtype), t, sigma_r=r if config.use_meanflow else None,
                               guidance=w).to(state_dtype)
            z = z - (sigma - sigma_next) * u
    return z


def load_exported_student(folder, dtype=torch.float32):
    """A whole ``HunyuanImage3Model`` (world of one, megatron's parallel state set up if it is
    not) from an exported folder: config.json (with ``cfg_distilled`` / ``use_meanflow`` and our
    ``mfmegatron_student_conditioning`` for a student), ``model.safetensors.index.json`` and its
    shards or one ``model.safetensors``. Every converted key must be present (one-line
    ``CheckpointMismatchError`` / ``ConversionError`` otherwise); keys the conversion does not
    map (VAE, vision tower) are ignored. The router weight stays float32 (as released)."""
    from megatron.core import parallel_state

    from mfmegatron.conversion import ConversionError, SafetensorsSource, hf_folder_files, start_parallel
    from models.hunyuan_image3.model import HunyuanImage3Model
    from models.hunyuan_image3.parallelize import load_weights
    from models.hunyuan_image3.state_dict_adapter import (
        check_key_sets,
        config_from_hf,
        is_converted_key,
        key_pairs,
        swap_glu_halves,
    )

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder}: no config.json; expected a folder exported by mfmegatron-convert-hunyuan-image3")
    hf_config = json.loads(config_path.read_text())
    source = SafetensorsSource(hf_folder_files(folder, "model.safetensors", str(folder)))
    if not parallel_state.model_parallel_is_initialized():
        start_parallel()
    config = config_from_hf(
        hf_config, params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=True, perform_initialization=False,
    )
    pairs = key_pairs(config, image_head=True)
    check_key_sets({k for k in source.shapes if is_converted_key(k, image_head=True)}, [hf for hf, _, _ in pairs],
                   f"the exported folder {folder}")
    released_of = {ours: (hf, swap) for hf, ours, swap in pairs}
    model = HunyuanImage3Model(config)

    def get_full(key):
        released, swap = released_of[key]
        tensor = source.get(released)
        return swap_glu_halves(tensor) if swap else tensor

    try:
        load_weights(model, get_full)
    finally:
        source.release()
    return model.eval()


__all__ = [
    "OFFICIAL_FLOW_SHIFT",
    "sample_student",
    "load_exported_student",
    "shifted_time_grid",
    "student_time_grid",
]
