"""Transformer Engine / FP8 on CPU: the spec choice, the one-line config errors, and that no
tangent GEMM runs inside the primal's FP8 region (checked on a real forward_jvp + backward, with
the project's FP8 entry point engaged; no part of TE is mocked). What needs TE and a Hopper GPU is
``tools/te_checks.py`` (the ``te`` stage of ``tools/gpu_checks.sh``)."""

from __future__ import annotations

import pytest
import torch

from mfmegatron.jvp import fp8
from mfmegatron.jvp.linear import ColumnParallelJVP, ColumnParallelLinear, RowParallelJVP

TE_IMPORTS = fp8.transformer_engine_available()


@pytest.fixture
def single_process():
    from mfmegatron.parallel import initialize_parallel

    initialize_parallel()


def _tiny_model(**overrides):
    from models.flux.config import tiny_flux_config
    from models.flux.parallelize import build_flux_model

    torch.manual_seed(0)
    return build_flux_model(tiny_flux_config(**overrides))


def _tiny_batch(model):
    from models.flux.model import FluxTangents
    from tests.flux_fixtures import flux_batch, flux_inputs

    config = model.config
    batch = flux_batch()
    batch["hidden_states"] = torch.randn(2, 8, config.in_channels)
    batch["encoder_hidden_states"] = torch.randn(2, 6, config.joint_attention_dim)
    batch["pooled_projections"] = torch.randn(2, config.pooled_projection_dim)
    inputs = flux_inputs(batch, timestep_r=batch["timestep"] * 0.5 if config.mean_flow_student else None)
    if not config.guidance_embeds:
        inputs.guidance = None
    tangents = FluxTangents(latents=torch.randn_like(inputs.latents), timestep=torch.ones(2))
    return inputs, tangents


# --------------------------------------------------------------------------- spec selection


def test_spec_selection_builds_local_layers_without_transformer_engine(single_process):
    from models.flux.layer_specs import LOCAL_SPEC, get_flux_layer_spec

    assert get_flux_layer_spec(False) is LOCAL_SPEC
    if TE_IMPORTS and torch.cuda.is_available():
        assert get_flux_layer_spec(None).name == "transformer_engine"
    else:
        # None is "the best available": local on a machine without TE or without CUDA.
        assert get_flux_layer_spec(None) is LOCAL_SPEC
        model = _tiny_model(use_transformer_engine=None)
        assert model.spec_name == "local"
        linears = [m for m in model.modules() if isinstance(m, (ColumnParallelJVP, RowParallelJVP))]
        assert linears and all(type(m).__module__ == "mfmegatron.jvp.linear" for m in linears)
    if not TE_IMPORTS:
        with pytest.raises(ImportError, match="Transformer Engine does not import"):
            get_flux_layer_spec(True)


def test_fp8_settings_are_megatrons_fields_and_build_a_config():
    from megatron.core.enums import Fp8Recipe

    from models.flux.config import tiny_flux_config

    assert fp8.megatron_fp8_settings("off") == {"fp8": None}
    assert fp8.megatron_fp8_settings("delayed") == {"fp8": "hybrid", "fp8_recipe": Fp8Recipe.delayed}
    assert fp8.megatron_fp8_settings("tensorwise") == {"fp8": "hybrid", "fp8_recipe": Fp8Recipe.tensorwise}
    assert fp8.megatron_fp8_settings("blockwise") == {"fp8": "e4m3", "fp8_recipe": Fp8Recipe.blockwise}
    config = tiny_flux_config(**fp8.megatron_fp8_settings("tensorwise"))
    assert config.fp8 == "hybrid" and config.fp8_recipe == Fp8Recipe.tensorwise
    with pytest.raises(ValueError, match="fp8 must be one of"):
        fp8.megatron_fp8_settings("mxfp8")
    # The frozen teacher's weights in FP8: where the weight's own scale is computed at quantization.
    assert [r for r in fp8.FP8_RECIPES if fp8.teacher_weights_in_fp8(r, True)] == ["tensorwise", "blockwise"]
    assert not fp8.teacher_weights_in_fp8("tensorwise", False)


# --------------------------------------------------------------------------- config errors


def _problem(*overrides):
    from mfmegatron.config import load_config
    from mfmegatron.training.config import TrainConfig
    from mfmegatron.training.trainer import precision_problem

    return precision_problem(load_config(TrainConfig, "recipes/flux_tiny_cpu.yaml", list(overrides)))


def test_fp8_off_in_a_recipe_is_the_word_not_yamls_boolean(tmp_path):
    from mfmegatron.config import load_config
    from mfmegatron.training.config import TrainConfig

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  fp8: off\n")
    assert load_config(TrainConfig, recipe).model.fp8 == "off"
    assert load_config(TrainConfig, None, ["model.fp8=off"]).model.fp8 == "off"
    assert load_config(TrainConfig, None, ["model.fp8=tensorwise"]).model.fp8 == "tensorwise"


def test_precision_errors_are_one_line(monkeypatch):
    assert _problem() is None
    assert _problem("model.use_transformer_engine=false") is None
    assert "use_transformer_engine=false" in _problem("model.fp8=delayed", "model.use_transformer_engine=false")
    assert "no Transformer Engine layer spec" in _problem("model.family=hunyuan_image3", "model.fp8=tensorwise")
    if not TE_IMPORTS:
        assert "needs Transformer Engine" in _problem("model.fp8=delayed")
        assert "use_transformer_engine=true but Transformer Engine does not import" in _problem(
            "model.use_transformer_engine=true")
    # The machine, not TE, is what is substituted here: TE "imports", and the GPU is an A100.
    monkeypatch.setattr(fp8, "transformer_engine_import_error", lambda: None)
    assert "needs a CUDA GPU" in fp8.precision_problem("delayed", None, device="cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    problem = fp8.precision_problem("tensorwise", None, device="cuda")
    assert "compute capability >= 8.9" in problem and "A100" in problem and "8.0" in problem
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))
    assert fp8.precision_problem("delayed", True, device="cuda") is None
    assert ">= 9.0" in fp8.precision_problem("blockwise", True, device="cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert fp8.precision_problem("blockwise", None, device="cuda") is None
    for problem in (_problem("model.fp8=delayed", "model.use_transformer_engine=false"),):
        assert "\n" not in problem


@pytest.mark.skipif(TE_IMPORTS and torch.cuda.is_available(), reason="FP8 may run here")
def test_trainer_stops_before_process_groups_or_networks(monkeypatch, capsys):
    """mfmegatron-train with model.fp8 on a machine that cannot run it: exit 2 and one line,
    before the process groups (and so any network) exist."""
    from mfmegatron import train
    from mfmegatron.training import trainer

    def must_not_run(*args, **kwargs):
        raise AssertionError("the precision check must come before initialize_parallel")

    monkeypatch.setattr(trainer, "initialize_parallel", must_not_run)
    assert train.main(["recipes/flux_tiny_cpu.yaml", "model.fp8=tensorwise"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "model.fp8=tensorwise" in error[0]


# --------------------------------------------------------------------------- tangents outside FP8


def test_tangent_gemms_never_run_in_the_primal_fp8_region(single_process):
    """A real forward_jvp + backward of a tiny MeanFlow student with activation recompute: every
    TP linear's primal GEMM entered the project's FP8 entry point (``primal_gemm_region``, where a
    TE layer's autocast is entered), every tangent GEMM ran through ``tangent_gemm``, whose guard
    raises inside a region — so a run that completes had none inside. The counts show both paths
    were engaged: one region per linear and call (and again for each recomputed block's linears),
    one tangent GEMM per linear."""
    model = _tiny_model(mean_flow_student=True, recompute_granularity="full", recompute_method="uniform",
                        recompute_num_layers=1)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, (ColumnParallelJVP, RowParallelJVP))}
    in_blocks = [name for name in linears if name.startswith(("double_blocks.", "single_blocks."))]
    inputs, tangents = _tiny_batch(model)
    fp8.reset_counters()
    out, tout = model.forward_jvp(inputs, tangents)
    assert fp8.counters == {"primal_regions": len(linears), "fp8_primal_regions": 0, "tangent_gemms": len(linears)}
    assert not fp8.in_primal_fp8_region()
    (out.float().square().mean() + 0 * tout.sum()).backward()
    # The backward recomputed every block's primal (its linears' regions again), no tangent.
    assert fp8.counters == {"primal_regions": len(linears) + len(in_blocks), "fp8_primal_regions": 0,
                            "tangent_gemms": len(linears)}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_tangent_moved_into_the_primal_region_fails(single_process):
    """What the structural check catches: a layer whose tangent GEMM sits inside the primal's
    region (as it would if the tangent were computed under the primal's fp8_autocast)."""

    class TangentInside(ColumnParallelLinear):
        def forward_jvp(self, x, tx=None, input_is_gathered=False):
            with fp8.primal_gemm_region(self._primal_autocast(x)):
                y = self._primal_gemm(x)
                ty = fp8.tangent_gemm(tx, self.weight)
            return y, ty

    from models.flux.config import tiny_flux_config

    config = tiny_flux_config()
    layer = TangentInside(8, 16, config=config, init_method=config.init_method, bias=True, gather_output=False)
    x = torch.randn(3, 2, 8)
    with pytest.raises(fp8.TangentInFP8RegionError):
        layer.forward_jvp(x, torch.randn_like(x))
    assert not fp8.in_primal_fp8_region()  # the region unwound on the error
    y, ty = ColumnParallelLinear.forward_jvp(layer, x, torch.randn_like(x))  # the real path passes
    assert ty.shape == y.shape


def test_recompute_phases_enter_and_leave_cleanly():
    """Without TE a no-op; with TE, its activation-recompute context (the first phase stashes,
    the recompute phase takes back: balanced). Its FP8 replay needs CUDA: tools/te_checks.py."""
    with fp8.recompute_phase(first=True):
        pass
    with fp8.recompute_phase(first=False):
        pass
    if TE_IMPORTS:
        from transformer_engine.pytorch.distributed import activation_recompute_forward, in_fp8_activation_recompute_phase

        assert activation_recompute_forward._is_first_fp8_module == [] and not in_fp8_activation_recompute_phase()


@pytest.mark.skipif(not TE_IMPORTS, reason="needs Transformer Engine importable (tools/te_checks.py on a GPU)")
def test_te_spec_builds_megatrons_te_layers_with_the_local_parameters(single_process, monkeypatch):
    """With TE importable: the TE spec builds megatron's TE linears (ours on top), with the local
    spec's parameters (names, shapes, TP attributes), checkpoint keys and LoRA targets, and TE's own
    communication switched off. Without CUDA, TE's constructor is let past its CUDA check (weights
    on CPU via use_cpu_initialization); running them needs CUDA (tools/te_checks.py)."""
    from megatron.core.fp8_utils import get_fp8_recipe

    from mfmegatron.jvp.lora import add_lora
    from mfmegatron.jvp.te_linear import TEColumnParallelLinear, TERowParallelLinear
    from models.flux.config import tiny_flux_config
    from models.flux.layer_specs import get_flux_layer_spec
    from models.flux.parallelize import build_flux_model

    config = tiny_flux_config()
    local = build_flux_model(config, get_flux_layer_spec(False))
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    te_model = build_flux_model(config, get_flux_layer_spec(True))
    monkeypatch.undo()
    assert te_model.spec_name == "transformer_engine"
    linears = [m for m in te_model.modules() if isinstance(m, (ColumnParallelJVP, RowParallelJVP))]
    assert len(linears) == 31 and all(isinstance(m, (TEColumnParallelLinear, TERowParallelLinear)) for m in linears)
    assert all(m.parallel_mode is None and m.tp_size == 1 and not m.sequence_parallel for m in linears)

    def described(model):
        return {n: (tuple(p.shape), getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", None))
                for n, p in model.named_parameters()}

    assert described(te_model) == described(local)
    assert set(te_model.sharded_state_dict()) == set(local.sharded_state_dict())
    assert te_model.single_blocks[0].linear_attn_out.jvp_bias is None  # bias=False: TE's empty bias unused
    assert te_model.single_blocks[0].linear_mlp_out.jvp_bias is te_model.single_blocks[0].linear_mlp_out.bias
    assert len(add_lora(te_model, 4, 8.0)) == 31
    recipes = {r: type(get_fp8_recipe(tiny_flux_config(**fp8.megatron_fp8_settings(r)))).__name__
               for r in ("delayed", "tensorwise", "blockwise")}
    assert recipes == {"delayed": "TEDelayedScaling", "tensorwise": "Float8CurrentScaling",
                       "blockwise": "Float8BlockScaling"}
    # With FP8 on, every TE linear holds its recipe and megatron's amax reduction group.
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fp8_model = build_flux_model(tiny_flux_config(**fp8.megatron_fp8_settings("tensorwise")), get_flux_layer_spec(True))
    monkeypatch.undo()
    layer = fp8_model.double_blocks[0].img_attn.linear_qkv
    assert type(layer.fp8_recipe).__name__ == "Float8CurrentScaling" and layer.amax_reduction_group is not None
    rows = torch.zeros(3, 2, 64)  # 6 rows: not a multiple of 16, so this GEMM would stay bf16
    assert layer._primal_autocast(rows) is None and layer._primal_autocast(torch.zeros(8, 2, 64)) is not None


# --------------------------------------------------------------------------- the GPU stage's script


def test_te_checks_runs_its_cpu_path(tmp_path, capsys, single_process):
    """tools/te_checks.py on CPU: the equality check's plumbing (weights copied between specs,
    forward / forward_jvp / MeanFlow target / input gradient against a float32 reference) with
    the local spec on both sides; the checks that need TE on CUDA are skipped, saying so."""
    from tools import te_checks

    assert te_checks.main(["--device", "cpu", "--checks", "equality", "fp8", "bench", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for key in ("forward", "jvp_output", "jvp_tangent", "target", "input_grad"):
        assert f"PASS equality local bf16 vs local bf16, {key}" in out
    # Local against local: the same numbers on both sides (the comparison itself is exact).
    assert "local vs local bf16 0.000e+00" in out
    assert "SKIP fp8: needs Transformer Engine on CUDA" in out and "SKIP bench" in out
    assert "INFO tangent GEMMs in FP8 (current scaling), target" in out


def test_the_fp8_tangent_alternative_is_an_fp8_gemm():
    """tools/te_checks.fp8_tangent_gemm (the measured alternative to bf16 tangents): the GEMM of
    E4M3-rounded operands with their scales undone — within E4M3's rounding of the exact product,
    and visibly coarser than bf16 (so FP8 really ran)."""
    import torch.nn.functional as F

    from tools.te_checks import fp8_tangent_gemm, relative_error

    g = torch.Generator().manual_seed(0)
    tx = (torch.randn(4, 8, 64, generator=g) * 3).to(torch.bfloat16)
    weight = (torch.randn(48, 64, generator=g) * 0.02).to(torch.bfloat16)
    exact = F.linear(tx.double(), weight.double())
    fp8_error = relative_error(fp8_tangent_gemm(tx, weight), exact)
    bf16_error = relative_error(F.linear(tx, weight), exact)
    assert fp8_error < 0.0625 and fp8_error > 5 * bf16_error
    odd = torch.randn(3, 64, generator=g).to(torch.bfloat16)  # 3 rows: FP8 cannot, stays bf16
    assert torch.equal(fp8_tangent_gemm(odd, weight), F.linear(odd, weight))


def test_bench_refuses_fp8_it_cannot_run_in_one_line(capsys):
    if TE_IMPORTS and torch.cuda.is_available():
        pytest.skip("FP8 may run here")
    from tools import bench_flux_meanflow

    with pytest.raises(SystemExit) as exit_info:
        bench_flux_meanflow.main(["--device", "cpu", "--spec", "te", "--fp8", "delayed"])
    assert exit_info.value.code == 2
    assert "cannot run --spec te --fp8 delayed here" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow  # ~90 s on 2 cores; resume equality itself: tests/test_trainer.py
def test_te_checks_trainer_runs_and_compares_checkpoints_on_cpu(tmp_path, capsys):
    """The trainer check's runs (uninterrupted, and saved then resumed; local layers, no FP8 on
    CPU) and its tensor-by-tensor comparison of the two final dist checkpoints."""
    from tools import te_checks

    assert te_checks.main(["--device", "cpu", "--checks", "trainer", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PASS trainer resume equals uninterrupted" in out and ", 0 differ;" in out
