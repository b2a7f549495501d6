"""Data: instruction records, prompt templates, SFT/prompt datasets and collators, the packed pre-training
corpus, and the seeded resumable rank-sharded sampler (DESIGN §3).

Modules: ``records`` (reading and validating sets), ``templates`` (reference / chat / raw prompts),
``instruction`` (tokenisation, datasets, dev split, report), ``collate`` (padding), ``pretrain``
(corpus packing and memory-mapped reading), ``sampler`` (ResumableSampler, InfiniteBatches).
"""

from .collate import IGNORE_INDEX, PromptCollator, SFTCollator, resolve_pad_id
from .instruction import (DataReport, DataStats, InstructionData, PromptDataset, SFTDataset, TokenizedExample,
                          build_instruction_data, build_prompt_dataset, sft_item, tokenize_records)
from .pretrain import (PackedCorpus, corpus_key, iter_documents, load_or_pack_corpus, pack_corpus,
                       resolve_sources, token_dtype)
from .records import (NAMED_SETS, DataError, Record, load_records, load_train_records, parse_record,
                      read_json_objects, train_sources)
from .sampler import InfiniteBatches, ResumableSampler, infinite_batches, shard_indices
from .templates import (REFERENCE_TEMPLATE, REFERENCE_TEMPLATE_WITH_INPUT, TEMPLATE_MODES, chat_prompt,
                        reference_prompt, render_prompt)

__all__ = [
    "IGNORE_INDEX", "PromptCollator", "SFTCollator", "resolve_pad_id",
    "DataReport", "DataStats", "InstructionData", "PromptDataset", "SFTDataset", "TokenizedExample",
    "build_instruction_data", "build_prompt_dataset", "sft_item", "tokenize_records",
    "PackedCorpus", "corpus_key", "iter_documents", "load_or_pack_corpus", "pack_corpus", "resolve_sources",
    "token_dtype",
    "NAMED_SETS", "DataError", "Record", "load_records", "load_train_records", "parse_record", "read_json_objects",
    "train_sources",
    "InfiniteBatches", "ResumableSampler", "infinite_batches", "shard_indices",
    "REFERENCE_TEMPLATE", "REFERENCE_TEMPLATE_WITH_INPUT", "TEMPLATE_MODES", "chat_prompt", "reference_prompt",
    "render_prompt",
]
