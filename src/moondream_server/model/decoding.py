"""Decode loops of every task, written as generators ("programs").

A program yields the input embeddings [n, dim] it wants fed next and receives the model's
output for the last fed position (raw hidden state and logits). It returns its result when it
stops. Whoever drives it owns the cache and the batching: ``Moondream`` drives one program at a
time, the engine drives many in one forward pass. The loops follow the reference's order of
operations so that greedy outputs are identical.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from moondream_server.model.config import TokenizerConfig
from moondream_server.model.detokenize import Decode, Detokenizer
from moondream_server.model.region import RegionModel, size_from_bin
from moondream_server.model.sampling import TextSettings, choose
from moondream_server.model.text import TextModel

FinishReason = Literal["stop", "length"]
SpatialRef = Sequence[float]


@dataclass
class StepOutput:
    hidden: torch.Tensor  # [dim] raw last-block hidden state of the last fed position
    logits: torch.Tensor  # [vocab] float32 logits of that position


Program = Generator[torch.Tensor, StepOutput, "TaskResult"]


@dataclass
class TextOutput:
    text: str
    finish_reason: FinishReason
    tokens: list[int]


@dataclass
class TaskResult:
    """What a program returns; fields not relevant to the task stay empty."""

    text: TextOutput | None = None
    reasoning_text: str | None = None
    grounding: list[dict[str, object]] = field(default_factory=list)
    objects: list[dict[str, float]] = field(default_factory=list)
    prompt_tokens: int = 0


@dataclass
class Context:
    """What programs need from the model, besides the forward pass their driver runs."""

    text: TextModel
    region: RegionModel
    ids: TokenizerConfig
    decode: Decode
    generator: torch.Generator | None = None

    def embed(self, token_ids: Sequence[int]) -> torch.Tensor:
        return self.text.embed(list(token_ids))

    def coordinate_embedding(self, value: torch.Tensor) -> torch.Tensor:
        """Embedding [1, dim] of one coordinate given as a 0-d tensor."""
        return self.region.encode_coordinate(value.reshape(1, 1).to(self.text.wte.dtype))

    def decode_coordinate(self, hidden: torch.Tensor) -> torch.Tensor:
        """0-d float32 coordinate = argmax bin / bins, as the reference."""
        logits = self.region.decode_coordinate(hidden)
        return torch.argmax(logits, dim=-1).float() / logits.shape[-1]


def prompt_embeddings(
    ctx: Context, ids: Sequence[int], spatial_refs: Sequence[SpatialRef] | None = None
) -> torch.Tensor:
    """Token embeddings, with coordinate/size slots replaced by the spatial references."""
    emb = ctx.embed(ids)
    if not spatial_refs:
        return emb
    coords: list[float] = []
    sizes: list[list[float]] = []
    for ref in spatial_refs:
        if len(ref) == 2:
            coords += [ref[0], ref[1]]
        else:
            coords += [(ref[0] + ref[2]) / 2, (ref[1] + ref[3]) / 2]
            sizes.append([ref[2] - ref[0], ref[3] - ref[1]])
    dtype, device = emb.dtype, emb.device
    id_tensor = torch.tensor(list(ids), device=device)
    coord_emb = ctx.region.encode_coordinate(torch.tensor(coords, dtype=dtype, device=device).view(-1, 1))
    emb[id_tensor == ctx.ids.coord_id] = coord_emb
    if sizes:
        emb[id_tensor == ctx.ids.size_id] = ctx.region.encode_size(
            torch.tensor(sizes, dtype=dtype, device=device)
        )
    return emb


def spatial_slots(ids: TokenizerConfig, spatial_refs: Sequence[SpatialRef] | None) -> list[int]:
    slots: list[int] = []
    for ref in spatial_refs or ():
        slots += [ids.coord_id, ids.coord_id] if len(ref) == 2 else [ids.coord_id, ids.coord_id, ids.size_id]
    return slots


def generate_text(
    ctx: Context,
    prompt: torch.Tensor,
    settings: TextSettings,
    context_left: int,
    on_text: Callable[[str], None] | None = None,
) -> Generator[torch.Tensor, StepOutput, TextOutput]:
    """Prefill the prompt, then sample until EOS or the token budget (answer id suppressed)."""
    max_tokens = min(settings.max_tokens, context_left - prompt.shape[0])
    if max_tokens < 0:
        raise ValueError("the prompt does not fit in the model's context")
    detok = Detokenizer(ctx.decode)
    pieces: list[str] = []

    def emit(piece: str) -> None:
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

    out = yield prompt
    token = choose(out.logits, settings.temperature, settings.top_p, ctx.generator)
    tokens: list[int] = []
    while token != ctx.ids.eos_id and len(tokens) < max_tokens:
        tokens.append(token)
        emit(detok.push(token))
        if len(tokens) == max_tokens:
            break  # the reference decodes once more here, but never uses the result
        out = yield ctx.embed([token])
        logits = out.logits.clone()
        logits[ctx.ids.answer_id] = float("-inf")
        token = choose(logits, settings.temperature, settings.top_p, ctx.generator)
    emit(detok.flush())
    finish: FinishReason = "stop" if token == ctx.ids.eos_id else "length"
    return TextOutput("".join(pieces), finish, tokens)


def caption_program(
    ctx: Context,
    length: str,
    settings: TextSettings,
    context_left: int,
    on_text: Callable[[str], None] | None = None,
) -> Program:
    ids = list(ctx.ids.templates["caption"][length])  # the length is checked by CaptionTask
    text = yield from generate_text(ctx, ctx.embed(ids), settings, context_left, on_text)
    return TaskResult(text=text, prompt_tokens=len(ids))


def query_prompt_ids(
    ctx: Context,
    question_ids: Sequence[int],
    spatial_refs: Sequence[SpatialRef] | None,
    *,
    with_image: bool,
) -> list[int]:
    template = ctx.ids.templates["query"]
    bos = [] if with_image else [ctx.ids.bos_id]
    return bos + list(template["prefix"]) + spatial_slots(ctx.ids, spatial_refs) + list(question_ids)


def check_question_fits(
    ctx: Context,
    question_ids: Sequence[int],
    spatial_refs: Sequence[SpatialRef] | None,
    context_left: int,
    *,
    with_image: bool,
    reasoning: bool,
) -> None:
    """Raise ValueError, naming the limit, when the question leaves no room for an answer token.

    Counted on token ids, before anything is embedded: an over-long question costs its
    tokenization only, never a [tokens, dim] tensor."""
    suffix = ctx.ids.templates["query"]["suffix"]
    fixed = len(query_prompt_ids(ctx, (), spatial_refs, with_image=with_image)) + 2 * len(suffix)
    room = context_left - fixed - (1 if reasoning else 0) - 1  # at least one token to answer
    if len(question_ids) > room:
        refs = f" and {len(spatial_refs)} spatial_refs" if spatial_refs else ""
        where = ("with an image" if with_image else "without an image") + refs
        raise ValueError(
            f"the question is {len(question_ids):,} tokens long; at most {max(room, 0):,} tokens fit "
            f"in the model's context {where}"
        )


def check_object_fits(
    ctx: Context, task: Literal["detect", "point"], object_ids: Sequence[int], context_left: int
) -> None:
    """Raise ValueError, naming the limit, when the object leaves no room for one answer."""
    template = ctx.ids.templates[task]
    per_object = 3 if task == "detect" else 2
    room = context_left - len(template["prefix"]) - len(template["suffix"]) - per_object
    if len(object_ids) > room:
        raise ValueError(
            f"the object is {len(object_ids):,} tokens long; at most {max(room, 0):,} tokens fit "
            f"in the model's context"
        )


def query_program(
    ctx: Context,
    question_ids: Sequence[int],
    settings: TextSettings,
    context_left: int,
    *,
    with_image: bool,
    reasoning: bool = False,
    spatial_refs: Sequence[SpatialRef] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Program:
    suffix = list(ctx.ids.templates["query"]["suffix"])
    ids = query_prompt_ids(ctx, question_ids, spatial_refs, with_image=with_image) + suffix
    if not reasoning:
        # Moondream2 was trained with the answer id doubled at the end of the prompt.
        ids += suffix
        prompt = prompt_embeddings(ctx, ids, spatial_refs)
        text = yield from generate_text(ctx, prompt, settings, context_left, on_text)
        return TaskResult(text=text, prompt_tokens=len(ids))
    ids.append(ctx.ids.thinking_id)
    prompt = prompt_embeddings(ctx, ids, spatial_refs)
    budget = context_left - len(ids) - len(suffix)
    reasoning_text, grounding, used = yield from _reason(ctx, prompt, settings, budget)
    answer_prompt = ctx.embed(suffix)
    text = yield from generate_text(ctx, answer_prompt, settings, context_left - len(ids) - used, on_text)
    return TaskResult(
        text=text, reasoning_text=reasoning_text, grounding=grounding, prompt_tokens=len(ids) + len(suffix)
    )


def _reason(
    ctx: Context, prompt: torch.Tensor, settings: TextSettings, budget: int
) -> Generator[torch.Tensor, StepOutput, tuple[str, list[dict[str, object]], int]]:
    """The grounded reasoning phase: runs until the answer id; coordinate tokens get coordinates."""
    ids = ctx.ids
    max_tokens = max(0, min(settings.max_tokens, budget))
    out = yield prompt
    hidden = out.hidden
    token = choose(out.logits, settings.temperature, settings.top_p, ctx.generator)
    text_chunks: list[list[int]] = [[]]
    coord_chunks: list[list[float]] = [[]]
    fed = 0
    while token != ids.answer_id and fed < max_tokens:
        if token in (ids.start_ground_points_id, ids.end_ground_id):
            text_chunks.append([])
            coord_chunks.append([])
        text_chunks[-1].append(token)
        if token == ids.coord_id:
            coord = ctx.decode_coordinate(hidden)
            coord_chunks[-1].append(coord.item())
            emb = ctx.coordinate_embedding(coord)
        else:
            emb = ctx.embed([token])
        out = yield emb
        fed += 1
        hidden = out.hidden
        logits = out.logits.clone()
        logits[ids.eos_id] = float("-inf")
        logits[ids.size_id] = float("-inf")
        token = choose(logits, settings.temperature, settings.top_p, ctx.generator)

    texts = [ctx.decode(chunk) for chunk in text_chunks]
    grounding: list[dict[str, object]] = []
    start = 0
    for text, coords in zip(texts, coord_chunks, strict=True):
        if len(coords) > 1:
            points = [(coords[i], coords[i + 1]) for i in range(0, len(coords) - 1, 2)]
            grounding.append({"start_idx": start, "end_idx": start + len(text), "points": points})
        start += len(text)
    return "".join(texts), grounding, fed


def region_program(
    ctx: Context,
    task: Literal["detect", "point"],
    object_ids: Sequence[int],
    max_objects: int,
    context_left: int,
) -> Program:
    """Detect (boxes) or point: coordinates decoded from hidden states, fed back as embeddings."""
    template = ctx.ids.templates[task]
    ids = list(template["prefix"]) + list(object_ids) + list(template["suffix"])
    per_object = 3 if task == "detect" else 2
    max_objects = max(0, min(max_objects, (context_left - len(ids)) // per_object))
    out = yield ctx.embed(ids)
    objects: list[dict[str, float]] = []
    while int(torch.argmax(out.logits).item()) != ctx.ids.eos_id and len(objects) < max_objects:
        x = ctx.decode_coordinate(out.hidden)
        out = yield ctx.coordinate_embedding(x)
        y = ctx.decode_coordinate(out.hidden)
        if task == "detect":
            out = yield ctx.coordinate_embedding(y)
            size_logits = ctx.region.decode_size(out.hidden)
            w, h = size_from_bin(torch.argmax(size_logits, dim=-1))
            xc, yc, wf, hf = x.item(), y.item(), w.item(), h.item()
            objects.append(
                {"x_min": xc - wf / 2, "y_min": yc - hf / 2, "x_max": xc + wf / 2, "y_max": yc + hf / 2}
            )
            size = torch.stack([w, h]).to(ctx.text.wte.dtype)
            out = yield ctx.region.encode_size(size).view(1, -1)
        else:
            objects.append({"x": x.item(), "y": y.item()})
            out = yield ctx.coordinate_embedding(y)
    return TaskResult(objects=objects, prompt_tokens=len(ids))
