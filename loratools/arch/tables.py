"""Per-architecture module tables. Each family has its own table; nothing is shared across
families, so a leaf name that means different things in two families (or twice in one, like
GPT-2's c_proj or BERT's dense) is always resolved by its full path."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedError
from .roles import Layout, Role

L, C, E = Layout.LINEAR, Layout.CONV1D, Layout.EMBEDDING


@dataclass(frozen=True)
class ModuleTemplate:
    role: Role
    path: str  # relative to the backbone prefix (or to the model root when in_head); "{layer}" = block index
    layout: Layout
    fused: tuple[Role, ...] = ()  # for fused modules: the roles stacked along the output, in order
    in_head: bool = False  # lives outside the backbone (lm_head, classifier...)


@dataclass(frozen=True)
class Head:
    """A family of model classes that share where the backbone sits in the module tree."""

    name: str  # short name used by --prefix and reported by info
    prefix: str  # backbone prefix, e.g. "model." for LlamaForCausalLM, "" for LlamaModel
    classes: tuple[str, ...]  # transformers class names with this layout
    head_modules: tuple[str, ...] = ()  # root-level module paths that only this head has


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values
    heads: tuple[Head, ...]  # the first one is the default target for conversion
    modules: tuple[ModuleTemplate, ...]

    def head(self, name: str) -> Head:
        for head in self.heads:
            if head.name == name:
                return head
        known = ", ".join(h.name for h in self.heads)
        raise UnsupportedError(f"{self.name} has no head {name!r} (known: {known})")

    def head_for_class(self, class_name: str) -> Head | None:
        for head in self.heads:
            if class_name in head.classes:
                return head
        return None

    def template(self, role: Role) -> ModuleTemplate | None:
        for module in self.modules:
            if module.role is role:
                return module
        return None


LLAMA = Architecture(
    name="llama",
    model_types=("llama",),
    heads=(
        Head("causal-lm", "model.", ("LlamaForCausalLM",), ("lm_head",)),
        Head("sequence-classification", "model.", ("LlamaForSequenceClassification",), ("score",)),
        Head("token-classification", "model.", ("LlamaForTokenClassification",), ("score",)),
        Head("question-answering", "model.", ("LlamaForQuestionAnswering",), ("qa_outputs",)),
        Head("base", "", ("LlamaModel",)),
    ),
    modules=(
        ModuleTemplate(Role.ATTN_Q, "layers.{layer}.self_attn.q_proj", L),
        ModuleTemplate(Role.ATTN_K, "layers.{layer}.self_attn.k_proj", L),
        ModuleTemplate(Role.ATTN_V, "layers.{layer}.self_attn.v_proj", L),
        ModuleTemplate(Role.ATTN_OUT, "layers.{layer}.self_attn.o_proj", L),
        ModuleTemplate(Role.FFN_UP, "layers.{layer}.mlp.up_proj", L),
        ModuleTemplate(Role.FFN_GATE, "layers.{layer}.mlp.gate_proj", L),
        ModuleTemplate(Role.FFN_DOWN, "layers.{layer}.mlp.down_proj", L),
        ModuleTemplate(Role.TOKEN_EMBED, "embed_tokens", E),
        ModuleTemplate(Role.LM_HEAD, "lm_head", L, in_head=True),
        ModuleTemplate(Role.CLASSIFIER, "score", L, in_head=True),
        ModuleTemplate(Role.CLASSIFIER, "qa_outputs", L, in_head=True),
    ),
)

GPT2 = Architecture(
    name="gpt2",
    model_types=("gpt2",),
    heads=(
        Head("causal-lm", "transformer.", ("GPT2LMHeadModel", "GPT2DoubleHeadsModel"), ("lm_head",)),
        Head("sequence-classification", "transformer.", ("GPT2ForSequenceClassification",), ("score",)),
        Head("token-classification", "transformer.", ("GPT2ForTokenClassification",), ("classifier",)),
        Head("question-answering", "transformer.", ("GPT2ForQuestionAnswering",), ("qa_outputs",)),
        Head("base", "", ("GPT2Model",)),
    ),
    modules=(
        # c_attn is one Conv1D whose output is q, k and v concatenated (3 * n_embd), in that order.
        ModuleTemplate(Role.ATTN_QKV, "h.{layer}.attn.c_attn", C, fused=(Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V)),
        ModuleTemplate(Role.ATTN_OUT, "h.{layer}.attn.c_proj", C),
        ModuleTemplate(Role.FFN_UP, "h.{layer}.mlp.c_fc", C),
        ModuleTemplate(Role.FFN_DOWN, "h.{layer}.mlp.c_proj", C),
        ModuleTemplate(Role.TOKEN_EMBED, "wte", E),
        ModuleTemplate(Role.POS_EMBED, "wpe", E),
        ModuleTemplate(Role.LM_HEAD, "lm_head", L, in_head=True),  # an nn.Linear, tied to wte
        ModuleTemplate(Role.CLASSIFIER, "score", L, in_head=True),
        ModuleTemplate(Role.CLASSIFIER, "classifier", L, in_head=True),
        ModuleTemplate(Role.CLASSIFIER, "qa_outputs", L, in_head=True),
    ),
)

BERT = Architecture(
    name="bert",
    model_types=("bert",),
    heads=(
        Head(
            "sequence-classification",
            "bert.",
            ("BertForSequenceClassification", "BertForMultipleChoice", "BertForNextSentencePrediction"),
            ("classifier",),
        ),
        Head("token-classification", "bert.", ("BertForTokenClassification",), ("classifier",)),
        Head("question-answering", "bert.", ("BertForQuestionAnswering",), ("qa_outputs",)),
        Head(
            "masked-lm",
            "bert.",
            ("BertForMaskedLM", "BertForPreTraining", "BertLMHeadModel"),
            ("cls.predictions.transform.dense", "cls.predictions.decoder"),
        ),
        Head("base", "", ("BertModel",)),
    ),
    modules=(
        ModuleTemplate(Role.ATTN_Q, "encoder.layer.{layer}.attention.self.query", L),
        ModuleTemplate(Role.ATTN_K, "encoder.layer.{layer}.attention.self.key", L),
        ModuleTemplate(Role.ATTN_V, "encoder.layer.{layer}.attention.self.value", L),
        ModuleTemplate(Role.ATTN_OUT, "encoder.layer.{layer}.attention.output.dense", L),
        ModuleTemplate(Role.FFN_UP, "encoder.layer.{layer}.intermediate.dense", L),
        ModuleTemplate(Role.FFN_DOWN, "encoder.layer.{layer}.output.dense", L),
        ModuleTemplate(Role.TOKEN_EMBED, "embeddings.word_embeddings", E),
        ModuleTemplate(Role.POS_EMBED, "embeddings.position_embeddings", E),
        ModuleTemplate(Role.TOKEN_TYPE_EMBED, "embeddings.token_type_embeddings", E),
        ModuleTemplate(Role.POOLER, "pooler.dense", L),
        ModuleTemplate(Role.CLASSIFIER, "classifier", L, in_head=True),
        ModuleTemplate(Role.CLASSIFIER, "qa_outputs", L, in_head=True),
        ModuleTemplate(Role.LM_HEAD_TRANSFORM, "cls.predictions.transform.dense", L, in_head=True),
        ModuleTemplate(Role.LM_HEAD, "cls.predictions.decoder", L, in_head=True),
    ),
)

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (LLAMA, GPT2, BERT)}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(ARCHITECTURES)
        raise UnsupportedError(f"unknown architecture {name!r} (known: {known})") from None
