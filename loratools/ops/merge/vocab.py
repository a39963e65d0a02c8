"""Adapters trained with added tokens: the user resized the embedding and the head
(resize_token_embeddings(M)) before training, and PEFT saved the resized layers whole
(save_embedding_layers, modules_to_save, or an embedding LoRA's base_layer). Merged as PEFT's
merge_and_unload on a base resized the same way: the embedding and the head get the adapter's
M rows, config.json's vocab_size becomes M. The rows of the added tokens exist only in the model
the adapter was trained on: a token-row tensor of OUT that the adapter does not save is refused
(`base-vocab-size`), never filled in. No torch (validate --base runs the same plan).
"""

from __future__ import annotations

from ...arch import Role
from ...errors import ShapeError
from ..basemap import BaseNameMapper

CODE = "base-vocab-size"


class AddedTokens:
    """The output tensors whose rows are the adapter's (a resized vocabulary), as plan_merge finds them."""

    def __init__(self, mapper: BaseNameMapper):
        self.mapper = mapper
        self.rows: dict[str, tuple[int, ...]] = {}  # output tensor -> its shape in OUT (the adapter's)
        self.base_rows: int | None = None  # the base's vocabulary (rows of its token tensors)

    def token_tensors(self) -> set[str]:
        """Base tensors with one row per token: the token embedding and a stored lm_head."""
        arch = self.mapper.arch
        if arch is None:
            return set()
        paths = [t.path for t in arch.modules if t.role in (Role.TOKEN_EMBED, Role.LM_HEAD)]
        found = {self.mapper.find(f"{p}.weight", "", required=False, lm_head=False) for p in paths}
        return {name for name in found if name is not None}

    def replaces(self, name: str, source: str, want: tuple[int, ...], have: tuple[int, ...]) -> bool:
        """Whether a saved tensor of shape `want` may replace base `source` of shape `have`:
        the same width, another number of rows, on a token tensor (a resized vocabulary)."""
        if not (len(want) == len(have) == 2 and want[1] == have[1] and want[0] != have[0] and source in self.token_tensors()):
            return False
        self.rows[name], self.base_rows = tuple(want), have[0]
        return True

    def takes(self, module, name: str, source: str, have: tuple[int, ...]) -> bool:
        """Whether a LoRA module of another vocabulary than base `source` lands on a tensor the
        adapter replaces with its own rows; refused with the reason when it does not."""
        want = module.weight_shape
        if name in self.rows:
            return self.rows[name] == tuple(want)
        if len(want) == len(have) == 2 and want[1] == have[1] and want[0] != have[0] and source in self.token_tensors():
            raise ShapeError(
                f"module {module.path}: its vocabulary has {want[0]} tokens but base {name} has {have[0]} rows, and the adapter "
                f"does not save the resized {module.path}: the rows of the added tokens exist only in the model it was "
                "trained on (save the adapter with save_embedding_layers=True)", code=CODE)
        return False

    def finish(self, plan, untied: dict[str, str]) -> None:
        """Every token tensor of OUT must have the adapter's rows: written in the adapter's shape;
        config.json gets the new vocab_size (plan.vocab_resized: (N, M))."""
        if not self.rows:
            return
        sizes = sorted({shape[0] for shape in self.rows.values()})
        first = next(iter(self.rows))
        if len(sizes) > 1:
            raise ShapeError(f"the adapter saves token tensors of {' and '.join(map(str, sizes))} rows "
                             f"({', '.join(self.rows)}): not one vocabulary", code=CODE)
        for name in sorted((self.token_tensors() | set(untied)) - set(self.rows)):  # an untied head is OUT's own tensor
            raise ShapeError(
                f"the adapter saves {first} with {sizes[0]} rows (a vocabulary resized from {self.base_rows}) but not "
                f"{name}, whose rows for the added tokens exist only in the model it was trained on (resize_token_embeddings "
                "initialised them there): save the adapter with save_embedding_layers=True, or put both the embedding and "
                "the head in modules_to_save", code=CODE)
        plan.vocab_resized = (self.base_rows, sizes[0])  # (plan_merge wrote the token tensors in self.rows' shapes)


def vocabulary_change(base, adapter) -> dict | None:
    """{"base": N, "adapter": M} when merge takes the adapter on this base with a resized
    vocabulary; None otherwise (no change, or merge refuses it: validate reports why)."""
    from ...errors import LoraToolsError
    from .plan import plan_merge

    try:
        plan = plan_merge(base, adapter)
    except LoraToolsError:
        return None
    if plan.vocab_resized is None:
        return None
    return {"base": plan.vocab_resized[0], "adapter": plan.vocab_resized[1]}
