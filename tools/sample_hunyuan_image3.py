"""Sample latents from an exported HunyuanImage 3.0 few-step student (1, 2, 4 or 8 steps, any K).

  python -m tools.sample_hunyuan_image3 FOLDER --special-tokens special.json --prompt-ids 101,102,103 --steps 4 --out latents.pt
  python -m tools.sample_hunyuan_image3 FOLDER --tokenizer FOLDER/tokenizer.json --prompt "a cat" --steps 4 --out latents.pt

FOLDER: what ``mfmegatron-convert-hunyuan-image3 export`` writes (config.json, safetensors shards
and index). The sequence is the official text-to-image template the student was distilled with
(config.json's ``mfmegatron_sequence_template`` and ``mfmegatron_system_prompt``; for a released
folder, the ``sequence_template`` its generation_config.json names; or ``--sequence-template`` /
``--system-prompt``): ``pretrain``
``<bos> prompt <boi> <img_size> <img_ratio> <timestep> [<guidance> <timestep_r>] <img>×(h·w) <eoi>``,
or ``instruct``, the same with the role text around the prompt and the image (needs
``--tokenizer`` to encode it); the student's tokens are inserted when config.json's student is a
"tokens" one. Special token
ids: ``--special-tokens`` (a JSON object with ImageTokens' fields: bos, pad, boi, eoi, img,
timestep, size, ratio, and guidance / timestep_r for a "tokens" student), or looked up by name in
``--tokenizer`` (``<boi>``, ``<eoi>``, ``<img>``, ``<timestep>``, ``<guidance>``, ``<timestep_r>``,
``<cfg>``, ``<img_size_{--base-size}>``, ``<img_ratio_{--ratio-index}>``, and ``--bos-token`` /
``--pad-token`` names); ids in the JSON win. Those token names are the official tokenizer's
as read in public code, not checked against a released tokenizer.json here.

The output is a torch file with the latents [b, C, h, w] in float32 (the VAE's scaled space: divide
by config.json's ``vae.scaling_factor`` before decoding). Decoding is not done here: the VAE is
not part of this project.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROG = "sample_hunyuan_image3"
TOKEN_FIELDS = ("bos", "pad", "boi", "eoi", "img", "timestep", "size", "ratio", "cfg", "guidance", "timestep_r")


class SampleError(RuntimeError):
    """A problem with the command's inputs: one line, no traceback."""


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise SampleError(f"--prompt-ids {text!r}: expected comma-separated integers, e.g. 101,102,103") from None
    if not ids:
        raise SampleError("--prompt-ids is empty")
    return ids


def _parse_hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SampleError(f"--latent-hw {text!r}: expected HxW, e.g. 64x64 (a 1024² image)") from None
    return h, w


def _generation_config(folder: Path) -> dict:
    """A released checkpoint's generation_config.json (empty when the folder has none)."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise SampleError(f"{path}: not JSON ({error})") from None


def special_tokens(args, tokenizer) -> dict:
    ids = {}
    if tokenizer is not None:
        names = {"bos": args.bos_token, "pad": args.pad_token, "boi": "<boi>", "eoi": "<eoi>", "img": "<img>",
                 "timestep": "<timestep>", "size": f"<img_size_{args.base_size}>",
                 "ratio": None if args.ratio_index is None else f"<img_ratio_{args.ratio_index}>", "cfg": "<cfg>",
                 "guidance": "<guidance>", "timestep_r": "<timestep_r>"}
        for field, name in names.items():
            token = None if name is None else tokenizer.token_to_id(name)
            if token is not None:
                ids[field] = token
    if args.special_tokens:
        path = Path(args.special_tokens)
        if not path.is_file():
            raise SampleError(f"--special-tokens {path}: no such file")
        try:
            given = json.loads(path.read_text())
        except ValueError as error:
            raise SampleError(f"--special-tokens {path}: not JSON ({error})") from None
        unknown = sorted(set(given) - set(TOKEN_FIELDS))
        if unknown:
            raise SampleError(f"--special-tokens {path}: unknown fields {unknown} (known: {', '.join(TOKEN_FIELDS)})")
        ids.update({k: int(v) for k, v in given.items()})
    return ids


def run(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    folder = Path(args.folder)
    if not folder.is_dir():
        raise SampleError(f"{folder}: no such directory")
    if (args.prompt is None) == (args.prompt_ids is None):
        raise SampleError("give exactly one of --prompt (with --tokenizer) or --prompt-ids")
    if args.steps < 1:
        raise SampleError(f"--steps must be at least 1, got {args.steps}")
    tokenizer = None
    if args.tokenizer:
        from tokenizers import Tokenizer

        if not Path(args.tokenizer).is_file():
            raise SampleError(f"--tokenizer {args.tokenizer}: no such file")
        tokenizer = Tokenizer.from_file(args.tokenizer)
    if args.prompt is not None:
        if tokenizer is None:
            raise SampleError("--prompt needs --tokenizer (or give --prompt-ids)")
        prompt = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    else:
        prompt = _parse_ids(args.prompt_ids)
    hw = _parse_hw(args.latent_hw)

    import torch

    from mfmegatron.conversion import DTYPES, torch_dtype
    from models.hunyuan_image3.sampling import load_exported_student, sample_student
    from models.hunyuan_image3.sequence import PRETRAIN, ImageTokens, build_image_sequences
    from models.hunyuan_image3.state_dict_adapter import SEQUENCE_TEMPLATE_FIELD
    from models.hunyuan_image3.tokenizer import PIXELS_PER_LATENT, ratio_index, text_template

    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    log(f"{PROG}: loading {folder} ({args.dtype})")
    model = load_exported_student(folder, torch_dtype(DTYPES.get(args.dtype, args.dtype)))
    config = model.config
    recorded = SEQUENCE_TEMPLATE_FIELD in json.loads((folder / "config.json").read_text())
    generation = _generation_config(folder)
    template_name = args.sequence_template or (config.sequence_template if recorded else None)
    if template_name is None and generation.get("sequence_template") in ("pretrain", "instruct"):
        # A released checkpoint names its template in generation_config.json (instruct for the
        # Instruct and Instruct-Distil, pretrain for the base model).
        template_name = generation["sequence_template"]
        log(f"{PROG}: the {template_name} template, as generation_config.json names it")
    elif template_name is None:
        # A folder naming no template (neither our config.json field nor generation_config.json).
        template_name = "pretrain"
        log(f"{PROG}: config.json records no {SEQUENCE_TEMPLATE_FIELD}: using the pretrain template (the base "
            "model's); pass --sequence-template instruct for an Instruct model")
    if args.ratio_index is None:
        # The official image processor's choice for a given size: the nearest bucket by h / w
        # (the Instruct release's, with its extra buckets, for the instruct template).
        args.ratio_index = ratio_index(hw[0] * PIXELS_PER_LATENT, hw[1] * PIXELS_PER_LATENT, args.base_size,
                                       template_name)
    ids = special_tokens(args, tokenizer)
    student_tokens = config.is_student and config.student_conditioning == "tokens"
    needed = ["bos", "pad", "boi", "eoi", "img", "timestep", "size", "ratio"]
    needed += [f for f, on in (("guidance", config.cfg_distilled), ("timestep_r", config.use_meanflow)) if student_tokens and on]
    missing = [f for f in needed if f not in ids]
    if missing:
        raise SampleError(f"special token ids missing: {', '.join(missing)} (give --special-tokens JSON or a --tokenizer "
                          "that names them)")
    tokens = ImageTokens(**{f: ids.get(f) for f in TOKEN_FIELDS})
    names = [n for n, on in (("guidance", config.cfg_distilled), ("timestep_r", config.use_meanflow)) if on]
    system_prompt = config.system_prompt if args.system_prompt is None else args.system_prompt
    named = generation.get("use_system_prompt")
    if args.system_prompt is None and not recorded and named not in (None, "None", "none", ""):
        # The official pipeline maps this name to a prompt text this project does not carry.
        log(f"{PROG}: generation_config.json asks for the official system prompt {named!r}, whose text this "
            "sampler does not have: sampling without one (pass its text with --system-prompt)")
    if tokenizer is None and (template_name != "pretrain" or system_prompt):
        raise SampleError(f"the {template_name} template{' and the system prompt' if system_prompt else ''} need "
                          "--tokenizer to encode their text")
    template = PRETRAIN if tokenizer is None else text_template(tokenizer, template_name, system_prompt)
    log(f"{PROG}: {template_name} template{' with a system prompt' if system_prompt else ''}")
    sequence = build_image_sequences([prompt] * args.batch, hw, tokens, student_tokens=names if student_tokens else False,
                                     template=template)
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.batch, config.latent_channels, *hw, generator=generator)

    def progress(k, total, sigma, sigma_next):
        log(f"{PROG}: step {k + 1}/{total}: σ {sigma:.4f} -> {sigma_next:.4f}")

    guidance = args.guidance if config.cfg_distilled else None
    latents = sample_student(model, sequence, noise, args.steps, guidance, shift=args.shift, on_step=progress)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"latents": latents, "steps": args.steps, "guidance": guidance, "shift": args.shift,
                "seed": args.seed, "prompt_ids": prompt}, out)
    seconds = time.perf_counter() - started
    log(f"{PROG}: wrote {out}: latents {tuple(latents.shape)} in {seconds:.1f} s (decode with the VAE, not part "
        "of this project)")
    return {"latents": latents, "seconds": seconds}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("folder", metavar="FOLDER", help="an exported student folder (config.json + safetensors)")
    parser.add_argument("--prompt", help="prompt text (needs --tokenizer)")
    parser.add_argument("--prompt-ids", metavar="ID,ID,..", help="prompt token ids, comma-separated")
    parser.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json (Hugging Face tokenizers)")
    parser.add_argument("--special-tokens", metavar="FILE", help="JSON object of special token ids (see above)")
    parser.add_argument("--bos-token", default="<|startoftext|>", help="the <bos> token's name in --tokenizer")
    parser.add_argument("--pad-token", default="<pad>", help="the pad token's name in --tokenizer")
    parser.add_argument("--base-size", type=int, default=1024, help="<img_size_N> token (default 1024)")
    parser.add_argument("--ratio-index", type=int, default=None,
                        help="<img_ratio_K>: K, the official aspect-ratio bucket (default: the bucket nearest "
                             "to --latent-hw's height / width around --base-size, as the official image processor "
                             "picks it, the Instruct release's four extra buckets 33-36 included under the "
                             "instruct template; 16 for a square)")
    parser.add_argument("--sequence-template", choices=["pretrain", "instruct"], default=None,
                        help="the text template (default: the one config.json records, else the one a released "
                             "folder's generation_config.json names, else pretrain)")
    parser.add_argument("--system-prompt", default=None,
                        help="system prompt text (default: the one config.json records, else none; '' for none)")
    parser.add_argument("--latent-hw", default="64x64", metavar="HxW", help="latent grid (default 64x64: 1024²)")
    parser.add_argument("--steps", type=int, default=4, help="network evaluations (default 4)")
    parser.add_argument("--guidance", type=float, default=5.0, help="guidance scale w for a cfg_distilled student (default 5)")
    parser.add_argument("--shift", type=float, default=None,
                        help="shift the σ grid by sσ/(1+(s−1)σ); 3 = the official distil scheduler (default: none)")
    parser.add_argument("--batch", type=int, default=1, help="samples (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--out", required=True, metavar="FILE", help="where to write the latents (torch.save)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def main(argv: list[str] | None = None) -> int:
    from mfmegatron.conversion import is_user_error
    from mfmegatron.warnings_filter import quiet_expected_warnings

    quiet_expected_warnings()
    try:
        run(argv)
    except Exception as error:  # noqa: BLE001
        if not isinstance(error, (SampleError, ValueError)) and not is_user_error(error):
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
