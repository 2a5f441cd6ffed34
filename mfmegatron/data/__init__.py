"""Prompt data for data-free distillation: WebDataset prompt shards, an exactly resumable
per-data-parallel-rank reader, tokenizers, text encoders and an embedding cache.

Image shards and image batches (Pillow, or NVIDIA DALI when installed) for ``z_source="data"``
live in :mod:`mfmegatron.data.images`, imported separately so that nothing here needs them.
"""

from mfmegatron.data.batching import (
    PromptBatch,
    PromptBatchLoader,
    collate_prompts,
    ensure_embeddings,
)
from mfmegatron.data.builder import (
    BuildProgress,
    BuildSummary,
    PromptRecord,
    build_prompt_shards,
    read_prompts,
    write_manifest,
)
from mfmegatron.data.encoders import (
    CachedTextEncoder,
    DummyTextEncoder,
    HFTextEncoder,
    TextEmbeddings,
    TextEncoder,
    build_text_encoder,
)
from mfmegatron.data.format import Manifest, ShardInfo, ShardWriter, scan_shard
from mfmegatron.data.reader import (
    NoReadableSamplesError,
    PromptSample,
    PromptShardReader,
    ShardReadWarning,
    data_parallel_rank_and_size,
    gather_state_dict,
    merge_state_dicts,
)
from mfmegatron.data.tokenizers import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizedBatch,
    Tokenizer,
)

__all__ = [
    "BuildProgress",
    "BuildSummary",
    "CachedTextEncoder",
    "DummyTextEncoder",
    "HFTextEncoder",
    "HFTokenizer",
    "Manifest",
    "NoReadableSamplesError",
    "PromptBatch",
    "PromptBatchLoader",
    "PromptRecord",
    "PromptSample",
    "PromptShardReader",
    "SentencePieceTokenizer",
    "ShardInfo",
    "ShardReadWarning",
    "ShardWriter",
    "TextEmbeddings",
    "TextEncoder",
    "TokenizedBatch",
    "Tokenizer",
    "build_prompt_shards",
    "build_text_encoder",
    "collate_prompts",
    "data_parallel_rank_and_size",
    "ensure_embeddings",
    "gather_state_dict",
    "merge_state_dicts",
    "read_prompts",
    "scan_shard",
    "write_manifest",
]
