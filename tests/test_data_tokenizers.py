"""Tokenizers on a tiny sentencepiece model trained here: ids, EOS, padding, truncation, mask;
checked against transformers' T5 tokenizer built from the same pieces, and a CLIP-style HF
tokenizer behind the same interface."""

from __future__ import annotations

import random

import pytest
import torch

from mfmegatron.data import HFTokenizer, SentencePieceTokenizer, TokenizedBatch, Tokenizer

WORDS = (
    "a photo of cat dog red blue green astronaut riding horse on the moon in style painting city "
    "night sky mountain river forest portrait woman man old young glowing neon street rain sunset"
).split()
TEXTS = [
    "a photo of a cat riding a horse",
    "dog",
    "Astronaut  riding a horse, on the moon at night!",
    "",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece

    root = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    (root / "corpus.txt").write_text("\n".join(lines))
    # T5's layout: pad=0, eos=1, unk=2, no BOS.
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "tiny"),
        vocab_size=48, hard_vocab_limit=False,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    return root / "tiny.model"


def test_ids_eos_padding_and_mask(sp_model):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    tok = SentencePieceTokenizer(sp_model, max_length=48)
    assert isinstance(tok, Tokenizer) and (tok.pad_id, tok.eos_id) == (0, 1)
    batch = tok(TEXTS)
    assert isinstance(batch, TokenizedBatch)
    assert batch.input_ids.shape == (4, 48) and batch.input_ids.dtype == torch.long
    assert batch.attention_mask.dtype == torch.bool
    for row, text in enumerate(TEXTS):
        expected = processor.encode(text) + [1]
        n = len(expected)
        assert n < 48
        assert batch.input_ids[row, :n].tolist() == expected
        assert batch.attention_mask[row].tolist() == [True] * n + [False] * (48 - n)
        assert (batch.input_ids[row, n:] == 0).all()
    assert batch.input_ids[3, 0].item() == 1  # the empty prompt is just EOS
    assert tok.decode(batch.input_ids[0]) == TEXTS[0]


def test_truncation_keeps_the_eos_last(sp_model):
    tok = SentencePieceTokenizer(sp_model, max_length=6)
    full = SentencePieceTokenizer(sp_model, max_length=100).encode([TEXTS[2]])[0]
    assert len(full) > 6
    batch = tok([TEXTS[2]])
    assert batch.input_ids[0].tolist() == full[:5] + [1]
    assert batch.attention_mask.all()


def test_longest_padding_and_no_eos(sp_model):
    tok = SentencePieceTokenizer(sp_model, max_length=64, padding="longest", add_eos=False)
    batch = tok(TEXTS[:2])
    assert batch.input_ids.shape[1] == len(tok.encode(TEXTS[:1])[0])
    assert 1 not in batch.input_ids[1].tolist()


def test_same_ids_as_transformers_t5_tokenizer(sp_model):
    import sentencepiece
    from transformers import T5Tokenizer

    processor = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    pieces = [
        (processor.id_to_piece(i), processor.get_score(i))
        for i in range(processor.get_piece_size())
    ]
    reference = T5Tokenizer(vocab=pieces, extra_ids=0)
    for length in (48, 6):
        ours = SentencePieceTokenizer(sp_model, max_length=length)(TEXTS)
        theirs = HFTokenizer(reference, max_length=length)(TEXTS)
        assert torch.equal(ours.input_ids, theirs.input_ids), length
        assert torch.equal(ours.attention_mask, theirs.attention_mask), length


def test_a_clip_style_hf_tokenizer_behind_the_interface(tmp_path):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(tmp_path)
    tok = HFTokenizer.from_pretrained(tmp_path, max_length=8)  # local files only
    assert isinstance(tok, Tokenizer) and tok.pad_id == 1
    batch = tok(["a cat", "dog rides far away"])
    assert batch.input_ids.shape == (2, 8)
    a, c, t_end = vocab["a</w>"], vocab["c"], vocab["t</w>"]
    assert batch.input_ids[0].tolist() == [0, a, c, vocab["a"], t_end, 1, 1, 1]
    assert batch.attention_mask[0].tolist() == [True] * 6 + [False] * 2
    # truncated, still BOS ... EOS
    assert batch.input_ids[1, 0].item() == 0 and batch.input_ids[1, -1].item() == 1
    assert batch.attention_mask[1].all()
