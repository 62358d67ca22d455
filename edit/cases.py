"""A CounterFact record tokenized for editing and evaluation: the extraction's own tokenisation of the
edit prompt and targets (``blens.extract.prepare``), plus the rephrase and neighbourhood prompts."""

from __future__ import annotations

from dataclasses import dataclass

from blens.extract.prepare import PreparedPrompt, prepare, target_id
from blens.extract.records import EditRecord, RecordError


@dataclass(frozen=True)
class EditCase:
    """A record tokenized for editing and evaluation."""

    prompt: PreparedPrompt  # the edit prompt, exactly as extraction tokenizes it
    rephrase_ids: tuple[tuple[int, ...], ...]
    locality_ids: tuple[tuple[int, ...], ...]
    locality_gt_ids: tuple[int, ...]

    @property
    def record(self) -> EditRecord:
        return self.prompt.record

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.prompt.input_ids

    @property
    def target_new_id(self) -> int:
        return self.prompt.target_new_id

    @property
    def target_true_id(self) -> int:
        return self.prompt.target_true_id

    @property
    def sequences(self) -> list[tuple[int, ...]]:
        """Row order of every evaluation batch: edit prompt, rephrases, locality prompts."""
        return [self.prompt_ids, *self.rephrase_ids, *self.locality_ids]


def prepare_case(record: EditRecord, tokenizer, max_tokens: int | None = None) -> EditCase | RecordError:
    """Tokenize one record; a target or prompt the tokenizer cannot handle becomes a RecordError."""

    def error(field_: str, message: str) -> RecordError:
        return RecordError(case_id=record.case_id, field=field_, message=message, source=record.source)

    def ids_of(text: str, field_: str) -> tuple[int, ...] | RecordError:
        ids = tuple(tokenizer(text)["input_ids"])
        if not ids:
            return error(field_, f"{field_} tokenizes to no tokens")
        if max_tokens is not None and len(ids) > max_tokens:
            return error(field_, f"{field_} is {len(ids)} tokens, longer than the model's context of {max_tokens}")
        return ids

    prompt = prepare(record, tokenizer, max_tokens)
    if isinstance(prompt, RecordError):
        return prompt
    rephrase = []
    for text in record.rephrase_prompts:
        ids = ids_of(text, "rephrase_prompts")
        if isinstance(ids, RecordError):
            return ids
        rephrase.append(ids)
    locality, gts = [], []
    for text, gt in zip(record.locality_prompts, record.locality_ground_truths):
        ids = ids_of(text, "locality_prompts")
        if isinstance(ids, RecordError):
            return ids
        gt_id = target_id(tokenizer, gt)
        if gt_id is None:
            return error("locality_ground_truths", f"locality ground truth {gt!r} cannot be produced by the tokenizer")
        locality.append(ids)
        gts.append(gt_id)
    return EditCase(prompt=prompt, rephrase_ids=tuple(rephrase), locality_ids=tuple(locality),
                    locality_gt_ids=tuple(gts))
