"""What a recipe costs per training step at its layout, and the layouts that fit (``mfmegatron/planner.py``).

  python -m tools.plan recipes/flux_dev_8xh100.yaml --gpus 8
  python -m tools.plan recipes/flux_dev_64xh100.yaml --gpus 64 --gpu h200 alignment.fake_network=full

Prints, for the recipe (with ``key=value`` overrides, as the trainer takes them) on ``--gpus``
GPUs: parameters; per step kind the network evaluations per sample, the model FLOPs, the bytes
one rank sends per collective, the predicted step time (its parts) and MFU; memory per rank; then
every candidate layout (TP 1/2/4/8, PP, SP, distributed optimizer, recompute; the global batch
kept), those that fit first, fastest predicted first; with ``--weak-scaling``, the recipe's layout
at more GPUs (the per-replica batch kept). Nothing is run and no GPU is needed; the
teacher checkpoint need not exist (the preset's architecture stands for it). GB = 1e9 bytes.
The step time is a model: GEMMs at ``--gemm-efficiency`` of peak, collectives at the bus
bandwidth of their link, nothing overlapped, a 1F1B bubble.
"""

from __future__ import annotations

import argparse
import sys


def _print_step(step) -> None:
    print(f"\n{step.kind}: {step.flops / 1e12:,.1f} TFLOP per step"
          f" ({', '.join(f'{name} {flops / 1e12:,.1f}' for name, flops in step.flops_by_network.items() if flops)})")
    for network, calls in step.forwards.items():
        if calls.forward_equivalents:
            print(f"  {network:8s} rows per sample: no-grad {calls.no_grad:g}, no-grad JVP {calls.no_grad_jvp:g},"
                  f" training pass {calls.training:g}, training pass with tangent {calls.training_jvp:g}")
    for key, nbytes in sorted(step.traffic.bytes.items()):
        print(f"  {key:20s} {nbytes / 1e9:9.3f} GB per rank")
    parts = ", ".join(f"{name} {seconds * 1e3:,.0f} ms" for name, seconds in step.time_parts.items() if seconds)
    print(f"  predicted {step.seconds:.3f} s per step, MFU {step.mfu:.1%} ({parts})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job (the world size)")
    parser.add_argument("--gpu", choices=("h100", "h200"), default="h100",
                        help="cluster preset: memory 80 / 141 GB, 989 TFLOP/s bf16, NVLink 450 GB/s, "
                             "50 GB/s between nodes, 8 GPUs a node (default h100)")
    parser.add_argument("--gpu-memory-gb", type=float, help="memory of one GPU (overrides the preset)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of one GPU, TFLOP/s")
    parser.add_argument("--intra-node-gbps", type=float, help="GB/s per GPU inside a node, one direction")
    parser.add_argument("--inter-node-gbps", type=float, help="GB/s per GPU between nodes, one direction")
    parser.add_argument("--gpus-per-node", type=int)
    parser.add_argument("--gemm-efficiency", type=float, help="fraction of peak the FLOPs run at (default 0.425, "
                        "measured: a FLUX flow-matching step on one H200)")
    parser.add_argument("--top", type=int, default=10, help="candidate layouts to list (default 10)")
    parser.add_argument("--no-search", action="store_true", help="only the recipe's own layout")
    parser.add_argument("--weak-scaling", metavar="N,N,...",
                        help="also predict the recipe's layout at these GPU counts, the per-replica batch kept")
    args = parser.parse_intermixed_args(argv)

    import dataclasses

    from mfmegatron.config import ConfigError, load_config
    from mfmegatron.planner import CLUSTERS, UNCOUNTED_RESERVE_GB, plan, search_layouts, weak_scaling
    from mfmegatron.training.config import TrainConfig
    from mfmegatron.warnings_filter import quiet_expected_warnings

    quiet_expected_warnings()
    cluster = CLUSTERS[args.gpu]
    settings = {"gpu_memory_gb": args.gpu_memory_gb, "peak_bf16_tflops": args.peak_tflops,
                "intra_node_gb_per_s": args.intra_node_gbps, "inter_node_gb_per_s": args.inter_node_gbps,
                "gpus_per_node": args.gpus_per_node, "gemm_efficiency": args.gemm_efficiency}
    cluster = dataclasses.replace(cluster, **{k: v for k, v in settings.items() if v is not None})
    try:
        if args.gpus < 1:
            raise ValueError(f"--gpus must be at least 1, got {args.gpus}")
        config = load_config(TrainConfig, args.recipe, args.overrides)
        result = plan(config, args.gpus, cluster)
        rows = [] if args.no_search else search_layouts(config, args.gpus, cluster)
        scaling = []
        if args.weak_scaling:
            counts = args.weak_scaling.split(",")
            if not all(count.isdigit() and int(count) > 0 for count in counts):
                raise ValueError(f"--weak-scaling takes GPU counts such as 8,16,64; got {args.weak_scaling!r}")
            counts = [int(count) for count in counts]
            scaling = weak_scaling(config, counts, cluster)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    print(f"{args.recipe}{' ' + ' '.join(args.overrides) if args.overrides else ''} on {args.gpus} GPUs "
          f"({args.gpu}: {cluster.gpu_memory_gb:g} GB, {cluster.peak_bf16_tflops:g} TFLOP/s at "
          f"{cluster.gemm_efficiency:.0%}): {result.layout}")
    print("parameters: " + ", ".join(f"{name} {count / 1e9:.3f}e9" for name, count in result.parameters.items()))
    for step in result.steps.values():
        _print_step(step)
    print("\nmemory per rank:")
    for line in result.memory.lines():
        print("  " + line)
    verdict = "fits" if result.fits else "does NOT fit"
    print(f"  {cluster.gpu_memory_gb:g} GB GPU, {UNCOUNTED_RESERVE_GB:g} GB kept for what is not counted: {verdict}")
    if rows:
        fitting = sum(1 for row in rows if row[4])
        print(f"\nlayouts ({fitting} of {len(rows)} fit; fastest predicted first):")
        for seconds, mfu, layout, gigabytes, fits in rows[: args.top]:
            print(f"  {seconds:7.3f} s  MFU {mfu:5.1%}  {gigabytes:6.1f} GB  {'fits' if fits else 'too big'}  {layout}")
    if scaling:
        print(f"\nweak scaling of {result.layout} (the per-replica batch kept; predicted):")
        for gpus, seconds, mfu, samples, efficiency in scaling:
            print(f"  {gpus:5d} GPUs  {seconds:7.3f} s  MFU {mfu:5.1%}  {samples:8.2f} samples/s  "
                  f"{efficiency:6.1%} of the first per GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
