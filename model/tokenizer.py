"""A local byte-level BPE tokenizer for the small preset (no download), wrapped for transformers.

Ids 0-3 are ``<unk> <s> </s> <pad>`` (Llama's order for the first three). The prompt markers (``[INST]``,
``[/INST]``, ``<Img>``, ``</Img>``, ``<ImageHere>``) are special tokens, dropped when decoding with
``skip_special_tokens=True``; the grounding markers (``<p>``, ``</p>``, ``<delim>``) and the 101 box tokens
``<0>`` … ``<100>`` are ordinary single tokens, so they survive decoding and the box parser sees them. Byte-level
BPE never needs ``<unk>``: any text round-trips. The same texts and vocabulary size give the same tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from model.prompts import BOX_GRID

logger = logging.getLogger(__name__)

CORE_SPECIAL = ("<unk>", "<s>", "</s>", "<pad>")
PROMPT_SPECIAL = ("[INST]", "[/INST]", "<Img>", "</Img>", "<ImageHere>")
GROUNDING_TOKENS = ("<p>", "</p>", "<delim>")
BOX_TOKENS = tuple(f"<{i}>" for i in range(BOX_GRID + 1))

# A small built-in corpus so the small preset can be built without training texts; training should pass its own.
DEFAULT_CORPUS = (
    "Describe this image in detail",
    "[detection] [refer] where is [identify] what is this [grounding] describe this image in detail [vqa]",
    "FINDINGS: The lungs are clear. There is no focal consolidation, pleural effusion or pneumothorax.",
    "The cardiomediastinal silhouette is within normal limits. No acute osseous abnormality.",
    "IMPRESSION: No acute cardiopulmonary process.",
    "There is a nodule in the right upper lobe. Opacity in the left lower lobe may represent pneumonia.",
    "Cardiomegaly. Small left pleural effusion. Right pneumothorax. Atelectasis at the lung bases.",
    "Is there a pneumothorax? yes no left right bilateral upper middle lower lobe mass fracture",
)


def build_tokenizer(texts: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on *texts* and wrap it; ``len(result) <= vocab_size``."""
    fixed = len(CORE_SPECIAL) + len(PROMPT_SPECIAL) + len(GROUNDING_TOKENS) + len(BOX_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < fixed + len(alphabet):
        raise ValueError(f"vocab_size {vocab_size} must be at least {fixed + len(alphabet)} (markers + 256 bytes)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - (fixed - len(CORE_SPECIAL)),
        min_frequency=2,
        special_tokens=list(CORE_SPECIAL),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in PROMPT_SPECIAL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in GROUNDING_TOKENS + BOX_TOKENS])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    logger.debug("built a byte-level BPE tokenizer with %d tokens", len(wrapped))
    return wrapped
