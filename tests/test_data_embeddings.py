"""Text encoders and precomputed embeddings: the dummy encoder, the shard round trip of T5 / CLIP
embeddings in each stored dtype (full and trimmed T5 rows), the embedding cache, and the HF
encoder on tiny randomly initialised T5 / CLIP models saved here (also through the builder CLI)."""

from __future__ import annotations

import hashlib
import io
import random

import numpy as np
import pytest
import torch

from mfmegatron.data import (
    CachedTextEncoder,
    DummyTextEncoder,
    HFTextEncoder,
    PromptBatchLoader,
    PromptShardReader,
    build_prompt_shards,
    ensure_embeddings,
)
from tools.build_prompt_shards import main as build_main

PROMPTS = [
    "a red cat on a blue sofa",
    "an astronaut riding a horse on the moon",
    "a city at night, neon, rain",
    "portrait of an old man",
    "sunset over the ocean",
    "a dragon above a castle",
    "dog",
]
D_T5, D_CLIP, LENGTH = 16, 8, 12
HF_PROMPTS = ["dog", "sunset over the ocean", "a red cat on a blue sofa"]
HF_LENGTH = 32


def _encoder():
    return DummyTextEncoder(t5_dim=D_T5, pooled_dim=D_CLIP, max_length=LENGTH, seed=5)


def test_dummy_encoder_is_deterministic_and_prompt_dependent():
    a, b = _encoder().encode(PROMPTS), _encoder().encode(PROMPTS)
    assert a.t5.shape == (7, LENGTH, D_T5) and a.pooled.shape == (7, D_CLIP)
    assert a.t5.dtype == torch.float32 and a.t5_mask.dtype == torch.bool
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a.t5_mask[6].tolist() == [True, True] + [False] * (LENGTH - 2)  # "dog" + EOS
    assert a.t5[6, 5].abs().sum() > 0  # padding positions carry states, as T5's
    swapped = _encoder().encode(["sofa blue a on cat red a"])
    assert not torch.allclose(swapped.t5[0], a.t5[0])
    assert torch.allclose(swapped.pooled[0], a.pooled[0])  # pooled: a mean over tokens
    other_seed = DummyTextEncoder(t5_dim=D_T5, pooled_dim=D_CLIP, max_length=LENGTH, seed=6)
    assert not torch.allclose(other_seed.encode(PROMPTS).t5, a.t5)


def test_dummy_encoder_position_scale():
    # The default must reproduce the embeddings the shipped shapes teacher was trained on: the
    # digests were computed with the encoder before position_scale existed (E[i] + 0.1 P[j]).
    default = _encoder().encode(PROMPTS)
    assert hashlib.sha256(default.t5.numpy().tobytes()).hexdigest() == (
        "e46490ab659c1ea8153ba6ee353248003fca8dbf9f1b26239c86f56f7644c2eb")
    assert hashlib.sha256(default.pooled.numpy().tobytes()).hexdigest() == (
        "1c64a0b0d97f3e0d9c72d409632053355c90415c364a8189da97bf942c727edb")

    def encode(scale, prompts=PROMPTS):
        return DummyTextEncoder(t5_dim=D_T5, pooled_dim=D_CLIP, max_length=LENGTH, seed=5,
                                position_scale=scale).encode(prompts)  # fmt: skip

    assert torch.equal(encode(0.1).t5, default.t5)
    bag = encode(0.0)  # no position term: a token's state is the same wherever it stands
    assert torch.equal(bag.t5[6, 0], encode(0.0, ["a dog"]).t5[0, 1])
    assert not torch.allclose(default.t5[6, 0], _encoder().encode(["a dog"]).t5[0, 1])
    position = default.t5 - bag.t5  # 0.1 P[j], the same in every prompt
    assert position.abs().min() > 0 and torch.allclose(position[0], position[3], atol=1e-6)
    for scale in (1.0, 2.5):
        assert torch.allclose(encode(scale).t5 - bag.t5, position * (scale / 0.1), atol=1e-5)
    assert torch.equal(encode(1.0).pooled, default.pooled)  # pooled is order-free
    assert DummyTextEncoder(position_scale=1.0).describe()["position_scale"] == 1.0


def test_dummy_encoder_context_scale_binds_each_word_to_its_neighbours():
    def encode(prompts, context):
        return DummyTextEncoder(t5_dim=D_T5, pooled_dim=D_CLIP, max_length=LENGTH, seed=5,
                                context_scale=context).encode(prompts)  # fmt: skip

    prompts = ["a cyan triangle above a yellow circle", "a yellow triangle above a cyan circle"]
    plain, half, full = (encode(prompts, c) for c in (0.0, 0.5, 1.0))
    assert torch.equal(plain.t5, _encoder().encode(prompts).t5)  # 0: the embeddings as before
    # Without context the swap moves only the two colour words (their positions); with it, each
    # colour's neighbours ("a" before, the kind after) move too, and nothing further away.
    moved = lambda x: (x.t5[0] - x.t5[1]).abs().sum(-1) > 1e-6  # noqa: E731
    assert moved(plain).nonzero().flatten().tolist() == [1, 5]
    assert moved(half).nonzero().flatten().tolist() == [0, 1, 2, 4, 5, 6]
    # "triangle" after "cyan" against after "yellow": the left rows' difference, scaled.
    triangle = half.t5[0, 2] - half.t5[1, 2]
    assert torch.allclose(full.t5[0, 2] - full.t5[1, 2], 2 * triangle, atol=1e-5)
    assert torch.allclose(full.t5 - plain.t5, 2 * (half.t5 - plain.t5), atol=1e-5)  # linear in c
    assert torch.equal(half.pooled, plain.pooled) and torch.equal(half.t5_mask, plain.t5_mask)
    assert DummyTextEncoder(context_scale=0.5).describe()["context_scale"] == 0.5


@pytest.mark.parametrize("store", ["full", "trim"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_precomputed_embeddings_round_trip(tmp_path, dtype, store):
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    summary = build_prompt_shards([tmp_path / "p.txt"], tmp_path / "out", samples_per_shard=3,
                                  encoder=_encoder(), embed_dtype=dtype, t5_store=store,
                                  encode_batch_size=2)  # fmt: skip
    fields = summary.manifest.fields
    dtype_name = str(torch_dtype).removeprefix("torch.")
    assert fields["t5"] == {"dim": D_T5, "dtype": dtype_name, "store": store, "max_length": LENGTH}
    expected = _encoder().encode(PROMPTS)

    reader = PromptShardReader(tmp_path / "out", shuffle=False, epochs=1)
    samples = list(reader)
    lengths = [s.t5.shape[0] for s in samples]
    real = expected.t5_mask.sum(1).tolist()
    assert lengths == ([LENGTH] * 7 if store == "full" else real)
    assert all(s.t5.dtype == torch_dtype and s.pooled.dtype == torch_dtype for s in samples)

    loader = PromptBatchLoader(
        PromptShardReader(tmp_path / "out", shuffle=False, epochs=1), 7, t5_seq_len=LENGTH, prefetch=0
    )
    batch = next(loader)
    assert batch.prompts == PROMPTS
    assert batch.t5.shape == (7, LENGTH, D_T5) and batch.t5.dtype == torch_dtype
    assert batch.pooled.shape == (7, D_CLIP) and batch.pooled.dtype == torch_dtype
    assert torch.equal(batch.t5_mask, expected.t5_mask)
    want_t5 = expected.t5.to(torch_dtype)
    if store == "trim":
        want_t5 = want_t5 * expected.t5_mask[..., None]  # padding rows come back as zeros
    assert torch.equal(batch.t5, want_t5)
    assert torch.equal(batch.pooled, expected.pooled.to(torch_dtype))
    if dtype == "bf16":  # stored as uint16 bit patterns
        import tarfile

        with tarfile.open(summary.manifest.shards[0].path) as archive:
            raw = np.load(io.BytesIO(archive.extractfile("0000000000.t5.npy").read()))
        assert raw.dtype == np.uint16
    # collate can cast, and truncate / pad to another length
    cast = PromptBatchLoader(PromptShardReader(tmp_path / "out", shuffle=False, epochs=1), 7,
                             t5_seq_len=4, embed_dtype=torch.float32, prefetch=0)  # fmt: skip
    short = next(cast)
    assert short.t5.shape == (7, 4, D_T5) and short.t5.dtype == torch.float32


def test_missing_embeddings_come_from_a_cached_encoder(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    build_prompt_shards([tmp_path / "p.txt"], tmp_path / "out", samples_per_shard=4)
    loader = PromptBatchLoader(PromptShardReader(tmp_path / "out", seed=1), 4, prefetch=0)
    encoder = CachedTextEncoder(_encoder(), max_entries=16)
    direct = _encoder()
    for step in range(4):  # 16 prompts drawn from 7: later steps hit the cache
        batch = next(loader)
        assert batch.t5 is None and batch.pooled is None
        filled = ensure_embeddings(batch, encoder)
        want = direct.encode(batch.prompts)
        assert torch.equal(filled.t5, want.t5) and torch.equal(filled.pooled, want.pooled)
        assert torch.equal(filled.t5_mask, want.t5_mask)
    assert encoder.misses == 7 and encoder.hits == 16 - 7
    small = CachedTextEncoder(_encoder(), max_entries=2)
    small.encode(PROMPTS[:3])
    assert len(small._cache) == 2


# -- the HF encoder on tiny random models -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_flux_text_encoders(tmp_path_factory):
    """A diffusers-layout directory: text_encoder (CLIP) + tokenizer, text_encoder_2 (T5) +
    tokenizer_2, all tiny and randomly initialised."""
    import sentencepiece
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    root = tmp_path_factory.mktemp("flux")
    rng = random.Random(0)
    words = " ".join(PROMPTS).replace(",", "").split()
    corpus = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)]
    (root / "corpus.txt").write_text("\n".join(corpus))
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=40,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    sp = sentencepiece.SentencePieceProcessor(model_file=str(root / "sp.model"))
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(root / "tokenizer_2")
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=D_T5, d_kv=4, d_ff=32,
                                 num_layers=1, num_heads=2))  # fmt: skip
    t5.save_pretrained(root / "text_encoder_2")

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz,":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(root / "tokenizer")
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=D_CLIP, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    ))  # fmt: skip
    clip.save_pretrained(root / "text_encoder")
    return root


def test_hf_encoder_calls_t5_and_clip_as_flux_does(tiny_flux_text_encoders):
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    root = tiny_flux_text_encoders
    encoder = HFTextEncoder.from_flux_checkpoint(root, max_length=HF_LENGTH, dtype=torch.float32)
    out = encoder.encode(HF_PROMPTS)
    assert out.t5.shape == (3, HF_LENGTH, D_T5) and out.pooled.shape == (3, D_CLIP)
    assert (encoder.t5_dim, encoder.pooled_dim, encoder.max_length) == (D_T5, D_CLIP, HF_LENGTH)

    t5_tok = AutoTokenizer.from_pretrained(root / "tokenizer_2")
    clip_tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    t5 = T5EncoderModel.from_pretrained(root / "text_encoder_2")
    clip = CLIPTextModel.from_pretrained(root / "text_encoder")
    ids = t5_tok(HF_PROMPTS, padding="max_length", max_length=HF_LENGTH, truncation=True,
                 return_tensors="pt")  # fmt: skip
    clip_ids = clip_tok(HF_PROMPTS, padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        want_t5 = t5(input_ids=ids.input_ids).last_hidden_state  # no mask, as FLUX's pipeline
        want_pooled = clip(input_ids=clip_ids.input_ids).pooler_output
    torch.testing.assert_close(out.t5, want_t5)
    torch.testing.assert_close(out.pooled, want_pooled)
    assert torch.equal(out.t5_mask, ids.attention_mask.bool())
    assert not out.t5_mask.all()  # padding present, so passing the mask to T5 must matter

    masked = HFTextEncoder(
        root / "text_encoder_2",
        root / "text_encoder",
        t5_tokenizer=root / "tokenizer_2",
        clip_tokenizer=root / "tokenizer",
        max_length=HF_LENGTH,
        dtype=torch.float32,
        t5_attention_mask=True,
    )
    assert not torch.allclose(masked.encode(HF_PROMPTS).t5, out.t5)


def test_builder_cli_precomputes_with_the_hf_encoder(tiny_flux_text_encoders, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    argv = [str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"), "--encoder", "hf",
            "--flux-path", str(tiny_flux_text_encoders), "--max-length", str(HF_LENGTH),
            "--model-dtype", "fp32", "--embed-dtype", "fp32", "--samples-per-shard", "5"]  # fmt: skip
    assert build_main(argv) == 0
    assert "wrote 7 samples in 2 shards" in capsys.readouterr().out
    batch = next(PromptBatchLoader(PromptShardReader(tmp_path / "out", shuffle=False), 7, prefetch=0))
    want = HFTextEncoder.from_flux_checkpoint(tiny_flux_text_encoders, max_length=HF_LENGTH,
                                              dtype=torch.float32).encode(PROMPTS)  # fmt: skip
    torch.testing.assert_close(batch.t5, want.t5)
    torch.testing.assert_close(batch.pooled, want.pooled)
