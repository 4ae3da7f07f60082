"""The continuous-batching decoder (model/continuous.py) on the small preset, float32 on the CPU: rows that arrive at
different steps, with different prompt and output lengths, get exactly the tokens of one-by-one greedy decoding
(``MiniGPTMed.generate_ids`` on each row alone), with the trained embedded weights (answers that end at EOS) and with
wide random weights (answers that run to their budget); the cache is allocated once."""

from __future__ import annotations

import pytest
import torch

from model import prompts
from model.continuous import ContinuousDecoder, Row
from model.embedded import embedded_available, load_model
from model.imaging import prepare_image
from model.minigpt import MiniGPTMed
from model.phantoms import generate_studies

INSTRUCTIONS = [
    prompts.grounding_instruction(),
    prompts.detection_instruction("nodule"),
    prompts.report_instruction(),
    prompts.detection_instruction("left pleural effusion"),
    prompts.vqa_instruction("is there a fracture of the left clavicle?"),
    prompts.detection_instruction("cardiomegaly"),
    prompts.grounding_instruction(),
]


def phantom_images(size: int, count: int) -> torch.Tensor:
    """(count, 3, size, size): the first image of phantom CR and CT studies, prepared as the model reads them."""
    pixels = []
    for i, study in enumerate(generate_studies(5, count, None)):
        pixels.append(torch.from_numpy(prepare_image(study.datasets[len(study.datasets) // 2], size).pixels))
        assert pixels[-1].shape == (3, size, size), i
    return torch.stack(pixels).float()


def wide_random_model() -> MiniGPTMed:
    """raddraft-small with its LLM weights drawn wide: greedy output depends on the input and rarely hits EOS."""
    torch.manual_seed(3)
    model = MiniGPTMed.from_preset("raddraft-small").eval()
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if param.dim() == 2 and "lora_" not in name:
                param.normal_(0.0, 0.12)
    return model


def one_by_one(model: MiniGPTMed, images: torch.Tensor, limits: list[int]) -> list[list[int]]:
    return [model.generate_ids(images[i:i + 1], [INSTRUCTIONS[i]], max_new_tokens=limits[i])[0]
            for i in range(len(limits))]


def staggered(decoder: ContinuousDecoder, images: torch.Tensor, limits: list[int], arrivals: list[int]
              ) -> tuple[list[list[int]], int]:
    """Rows added at the given decode steps (arrival i: before step arrivals[i]); their tokens and the largest number
    of rows that were in slots at once."""
    embeds = decoder.embed(images, INSTRUCTIONS[: len(limits)])
    rows = [Row(e, limit, owner=i) for i, (e, limit) in enumerate(zip(embeds, limits, strict=True))]
    pointers = [t.data_ptr() for t in decoder.cache.tensors()]
    most, step = 0, 0
    while not all(row.done for row in rows):
        for row, arrival in zip(rows, arrivals, strict=True):
            if arrival == step:
                decoder.add(row)
        decoder.step()
        most = max(most, decoder.active)
        step += 1
        assert [t.data_ptr() for t in decoder.cache.tensors()] == pointers  # never reallocated
    assert decoder.pending == 0
    return [row.tokens for row in rows], most


@pytest.mark.skipif(not embedded_available(), reason="the embedded model is not in this checkout")
def test_trained_model_rows_joining_and_leaving_get_the_one_by_one_answers() -> None:
    model = load_model("embedded").model
    images = phantom_images(model.config.vision.image_size, 7)
    limits = [60, 60, 20, 60, 5, 60, 1]  # alone they stop at 24, 2, 34, 12, 2, 2, 2 tokens
    alone = one_by_one(model, images, limits)
    decoder = ContinuousDecoder(model, slots=3)
    together, most = staggered(decoder, images, limits, arrivals=[0, 0, 2, 3, 3, 9, 11])
    assert together == alone
    assert most == 3  # the slots were full and rows waited for a free one
    ended = [len(ids) < limit for ids, limit in zip(alone, limits, strict=True)]
    assert any(ended) and not all(ended)  # some rows left at EOS, some at their budget
    assert len({len(ids) for ids in alone}) >= 3  # the rows decoded different lengths
    assert decoder.steps < sum(len(ids) for ids in alone)  # rows shared decode steps


def test_random_model_rows_of_every_length_get_the_one_by_one_answers() -> None:
    model = wide_random_model()
    images = torch.randn(5, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    limits = [23, 1, 17, 30, 6]
    alone = one_by_one(model, images, limits)
    assert len({tuple(ids) for ids in alone}) == 5 and sum(map(len, alone)) > 50
    decoder = ContinuousDecoder(model, slots=2, max_len=160)
    together, most = staggered(decoder, images, limits, arrivals=[0, 1, 1, 4, 5])
    assert together == alone and most == 2
    # the same rows again: the slots are reused, the cache is the same
    pointers = [t.data_ptr() for t in decoder.cache.tensors()]
    assert decoder.generate_ids(images, INSTRUCTIONS[:5], limits) == alone
    assert [t.data_ptr() for t in decoder.cache.tensors()] == pointers
    # EOS held back: exactly min_new_tokens … max_new_tokens, as generate_ids
    forced = model.generate_ids(images[:2], INSTRUCTIONS[:2], max_new_tokens=12, min_new_tokens=12)
    assert decoder.generate_ids(images[:2], INSTRUCTIONS[:2], [12, 12], min_new_tokens=12) == forced


def test_rows_and_sizes_are_checked() -> None:
    model = wide_random_model()
    with pytest.raises(ValueError, match="slots 0 must be at least 1"):
        ContinuousDecoder(model, slots=0)
    with pytest.raises(ValueError, match=r"max_len 2000 must be in \[2, llm.max_position_embeddings 1024\]"):
        ContinuousDecoder(model, slots=1, max_len=2000)
    decoder = ContinuousDecoder(model, slots=1, max_len=100)
    [embeds] = decoder.embed(torch.zeros(1, 3, 224, 224), [prompts.grounding_instruction()])
    length = embeds.shape[0]
    with pytest.raises(ValueError, match=f"prompt of {length} tokens \\+ max_new_tokens 90 exceeds the decoder's "
                                         "cache length 100"):
        decoder.add(Row(embeds, 90))
    with pytest.raises(ValueError, match="min_new_tokens 5 must be in"):
        decoder.add(Row(embeds, 4, 5))
    with pytest.raises(ValueError, match=r"got 1 instructions but 2 token budgets"):
        decoder.generate_ids(torch.zeros(1, 3, 224, 224), [prompts.grounding_instruction()], [3, 3])
    assert decoder.pending == 0
