"""HunyuanImage 3.0's parameter counts, read off the modules built on the meta device.

    python -m tools.hunyuan_image3_sizes [--preset hunyuan-image3|tiny]

Builds the whole model (every layer and expert, no memory) in a world of one and prints the
language model's total, its parts, the parameters one token passes through in the decoder layers
(attention, router, norms, the shared expert and top-k routed experts), and the image head
(patch embedding, final layer, the three timestep embedders) when the config builds it.
"""

from __future__ import annotations

import argparse


def trunk_sizes(preset: str = "hunyuan-image3") -> dict[str, int]:
    from mfmegatron.parallel import parallel_context
    from models.hunyuan_image3.config import HUNYUAN_IMAGE3_CONFIGS
    from models.hunyuan_image3.model import parameter_counts
    from models.hunyuan_image3.parallelize import meta_full_model

    config = HUNYUAN_IMAGE3_CONFIGS[preset]()
    with parallel_context():
        counts = parameter_counts(meta_full_model(config))
    counts["layers_count"] = config.num_layers
    return counts


def main(argv=None) -> int:
    from models.hunyuan_image3.config import HUNYUAN_IMAGE3_CONFIGS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="hunyuan-image3", choices=sorted(HUNYUAN_IMAGE3_CONFIGS))
    args = parser.parse_args(argv)
    counts = trunk_sizes(args.preset)
    layers = counts["layers_count"]
    rows = [
        ("language model total", counts["total"]),
        (f"decoder layers ({layers})", counts["layers"]),
        ("word embeddings (wte)", counts["word_embeddings"]),
        ("output layer (lm_head)", counts["output_layer"]),
        ("final norm (ln_f)", counts["final_layernorm"]),
        ("activated per token in the layers", counts["activated_per_token_layers"]),
        ("  of which per layer", counts["activated_per_token_layers"] // layers),
    ]
    if counts.get("image_path"):
        rows.append(("image head", counts["image_path"]))
        rows += [(f"  {name[len('image_path.'):]}", value) for name, value in counts.items()
                 if name.startswith("image_path.")]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>16,}  ({value / 1e9:.2f}B)")
    if not counts.get("image_path"):
        print("image head: not built by this config (config.image_path=False)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
