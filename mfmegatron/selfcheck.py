"""Verify that the parallel stack works on this machine or cluster.

    python -m mfmegatron.selfcheck --tp 2                 # spawns 2 local ranks (gloo on CPU)
    torchrun --nproc-per-node 8 -m mfmegatron.selfcheck --tp 2 --pp 2 --ep 2

Each check runs on every rank; rank 0 prints a table of pass/fail with timings. Checks that need a
parallel dimension of size > 1 are skipped when it is 1. The exit status is non-zero if any check
failed on any rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mfmegatron.parallel import ParallelConfig, ParallelInfo, initialize_parallel, run_on_ranks
from mfmegatron.warnings_filter import quiet_expected_warnings


@dataclass
class CheckResult:
    name: str
    status: str  # "pass", "FAIL" or "skip"
    seconds: float
    detail: str


def _gather_cat(tensor: torch.Tensor, group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _check_collectives(info: ParallelInfo) -> str:
    from megatron.core import parallel_state as ps

    groups = {
        "world": None,
        "tp": ps.get_tensor_model_parallel_group(),
        "pp": ps.get_pipeline_model_parallel_group(),
        "dp": ps.get_data_parallel_group(),
        "ep": ps.get_expert_model_parallel_group(),
    }
    for name, group in groups.items():
        value = torch.ones(1, device=info.device)
        dist.all_reduce(value, group=group)
        expected = dist.get_world_size(group)
        if value.item() != expected:
            raise AssertionError(f"all_reduce over {name} gave {value.item()}, expected {expected}")
    return "all_reduce over world/tp/pp/dp/ep groups"


def _check_tensor_parallel_linears(info: ParallelInfo, sequence_parallel: bool) -> str:
    """Column→Row parallel linears against a dense pair built from the gathered weights."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    tp = info.tensor_parallel_size
    config = ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
    )
    hidden, ffn, seq, batch = 64, 128, 8 * tp, 2
    column = tensor_parallel.ColumnParallelLinear(
        hidden, ffn, config=config, init_method=torch.nn.init.xavier_normal_, bias=True,
        gather_output=False,
    ).to(info.device)
    row = tensor_parallel.RowParallelLinear(
        ffn, hidden, config=config, init_method=torch.nn.init.xavier_normal_, bias=True,
        input_is_parallel=True, skip_bias_add=False,
    ).to(info.device)
    generator = torch.Generator().manual_seed(0)
    x_full = torch.randn(seq, batch, hidden, generator=generator).to(info.device)
    tp_group, tp_rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    x = (x_full.chunk(tp, dim=0)[tp_rank] if sequence_parallel else x_full).clone().requires_grad_()
    out, _ = row(F.gelu(column(x)[0]))
    out.square().sum().backward()

    dense_column = torch.nn.Linear(hidden, ffn).to(info.device)
    dense_row = torch.nn.Linear(ffn, hidden).to(info.device)
    with torch.no_grad():
        dense_column.weight.copy_(_gather_cat(column.weight, tp_group, 0))
        dense_column.bias.copy_(_gather_cat(column.bias, tp_group, 0))
        dense_row.weight.copy_(_gather_cat(row.weight, tp_group, 1))
        dense_row.bias.copy_(row.bias)
    x_dense = x_full.clone().requires_grad_()
    out_dense = dense_row(F.gelu(dense_column(x_dense)))
    out_dense.square().sum().backward()
    if sequence_parallel:
        out = _gather_cat(out.detach(), tp_group, 0)
        x_grad = _gather_cat(x.grad, tp_group, 0)
    else:
        out, x_grad = out.detach(), x.grad
    torch.testing.assert_close(out, out_dense.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_grad, x_dense.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        _gather_cat(column.weight.grad, tp_group, 0), dense_column.weight.grad, rtol=1e-4, atol=1e-4
    )
    return f"output and grads equal a dense nn.Linear pair (tp={tp})"


def _check_pipeline_p2p(info: ParallelInfo) -> str:
    """Send a tensor forward through every stage and back, as the 1F1B schedule does."""
    from megatron.core import parallel_state as ps

    rank = ps.get_pipeline_model_parallel_rank()
    stages = ps.get_pipeline_model_parallel_world_size()
    next_rank = ps.get_pipeline_model_parallel_next_rank()
    prev_rank = ps.get_pipeline_model_parallel_prev_rank()
    value = torch.full((4,), float(rank), device=info.device)
    received = torch.empty_like(value)
    ops = [
        dist.P2POp(dist.isend, value, next_rank),
        dist.P2POp(dist.irecv, received, prev_rank),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    expected = float((rank - 1) % stages)
    if not torch.all(received == expected):
        raise AssertionError(f"stage {rank} received {received.tolist()}, expected {expected}")
    return f"ring send/recv across {stages} stages"


def _check_expert_alltoall(info: ParallelInfo) -> str:
    from megatron.core import parallel_state as ps

    group = ps.get_expert_model_parallel_group()
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    send = torch.arange(size, dtype=torch.float32, device=info.device) + 100 * rank
    receive = torch.empty_like(send)
    dist.all_to_all_single(receive, send, group=group)
    expected = torch.arange(size, dtype=torch.float32, device=info.device) * 100 + rank
    torch.testing.assert_close(receive, expected)
    return f"all_to_all across {size} expert-parallel ranks"


def _check_ddp_gradients(info: ParallelInfo) -> str:
    """megatron DDP averages gradients over data-parallel replicas that saw different data."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True
    )
    torch.manual_seed(0)
    module = torch.nn.Linear(8, 8).to(info.device)
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(), module=module
    )
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    x = torch.full((2, 8), float(dp_rank + 1), device=info.device)
    model(x).sum().backward()
    model.finish_grad_sync()
    mean_input = sum(range(1, dp_size + 1)) / dp_size
    expected = torch.full((8, 8), 2 * mean_input, device=info.device)
    torch.testing.assert_close(module.weight.main_grad, expected)
    return f"gradients averaged over {dp_size} data-parallel replicas"


def _check_bf16_matmul(info: ParallelInfo) -> str:
    size, repeats = 8192, 10
    a = torch.randn(size, size, device=info.device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=info.device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    return f"{2 * size**3 / seconds / 1e12:.0f} TFLOP/s bf16 ({size}^3 matmul, {torch.cuda.get_device_name()})"


def _checks(info: ParallelInfo) -> list[tuple[str, Callable[[], str] | None, str]]:
    """(name, check or None to skip, reason to skip)."""
    tp, pp, ep, dp = (
        info.tensor_parallel_size, info.pipeline_parallel_size, info.expert_parallel_size,
        info.data_parallel_size,
    )
    cuda = info.device.type == "cuda"
    return [
        ("collectives", lambda: _check_collectives(info), ""),
        ("tensor parallel linears", (lambda: _check_tensor_parallel_linears(info, False)) if tp > 1 else None, "tp=1"),
        ("sequence parallel linears", (lambda: _check_tensor_parallel_linears(info, True)) if tp > 1 else None, "tp=1"),
        ("pipeline p2p", (lambda: _check_pipeline_p2p(info)) if pp > 1 else None, "pp=1"),
        ("expert all-to-all", (lambda: _check_expert_alltoall(info)) if ep > 1 else None, "ep=1"),
        ("DDP gradient averaging", (lambda: _check_ddp_gradients(info)) if dp > 1 else None, "dp=1"),
        ("bf16 matmul throughput", (lambda: _check_bf16_matmul(info)) if cuda else None, "no CUDA"),
    ]


def run_checks(config: ParallelConfig) -> list[CheckResult]:
    """Runs on one rank of an already launched world; returns this rank's results."""
    start = time.perf_counter()
    try:
        info = initialize_parallel(config)
    except Exception as error:  # noqa: BLE001  (reported as a failed check)
        return [CheckResult("initialize parallel", "FAIL", time.perf_counter() - start, str(error))]
    results = [CheckResult("initialize parallel", "pass", time.perf_counter() - start, info.describe())]
    for name, check, skip_reason in _checks(info):
        if check is None:
            results.append(CheckResult(name, "skip", 0.0, skip_reason))
            continue
        start = time.perf_counter()
        try:
            detail, status = check(), "pass"
        except Exception as error:  # noqa: BLE001
            detail, status = f"{type(error).__name__}: {error}".splitlines()[0], "FAIL"
            if os.environ.get("MFMEGATRON_SELFCHECK_TRACEBACK"):
                traceback.print_exc()
        results.append(CheckResult(name, status, time.perf_counter() - start, detail))
    return results


def format_table(per_rank: list[list[CheckResult]]) -> str:
    """One row per check; a check passes only if it passed on every rank."""
    rows = []
    for index, first in enumerate(per_rank[0]):
        statuses = {ranks[index].status for ranks in per_rank if index < len(ranks)}
        failed = [r for r, ranks in enumerate(per_rank) if index < len(ranks) and ranks[index].status == "FAIL"]
        status = "FAIL" if failed else ("skip" if statuses == {"skip"} else "pass")
        seconds = max(ranks[index].seconds for ranks in per_rank if index < len(ranks))
        detail = per_rank[failed[0]][index].detail if failed else first.detail
        if failed:
            detail = f"ranks {failed}: {detail}"
        rows.append((first.name, status, f"{seconds * 1000:.0f} ms" if status != "skip" else "-", detail))
    widths = [max(len(row[i]) for row in rows + [("check", "result", "time", "")]) for i in range(3)]
    lines = [f"{'check':<{widths[0]}}  {'result':<{widths[1]}}  {'time':>{widths[2]}}  detail"]
    lines += [f"{n:<{widths[0]}}  {s:<{widths[1]}}  {t:>{widths[2]}}  {d}" for n, s, t, d in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mfmegatron.selfcheck", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="ranks to spawn locally when not started by torchrun (default: tp * pp * ep)",
    )
    args = parser.parse_args(argv)
    quiet_expected_warnings()
    config = ParallelConfig(
        tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, expert_parallel_size=args.ep
    )

    if "WORLD_SIZE" in os.environ:  # under torchrun / srun: this process is one rank
        results = run_checks(config)
        gathered: list[list[CheckResult]] = [None] * dist.get_world_size() if dist.is_initialized() else [results]
        if dist.is_initialized():
            dist.all_gather_object(gathered, results)
        if int(os.environ.get("RANK", "0")) == 0:
            print(format_table(gathered))
        failed = any(r.status == "FAIL" for ranks in gathered for r in ranks)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 1 if failed else 0

    world_size = args.nproc or args.tp * args.pp * args.ep
    print(f"spawning {world_size} local ranks ({'CUDA' if torch.cuda.is_available() else 'CPU, gloo'})...", flush=True)
    gathered = run_on_ranks(run_checks, world_size, config, timeout=600)
    print(format_table(gathered))
    return 1 if any(r.status == "FAIL" for ranks in gathered for r in ranks) else 0


if __name__ == "__main__":
    sys.exit(main())
