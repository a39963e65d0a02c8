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
    name: str  # the family, as reported (usually its model_type)
    model_types: tuple[str, ...]  # config.json "model_type" values
    heads: tuple[Head, ...]  # the first one is the default target for conversion
    modules: tuple[ModuleTemplate, ...]
    # Families whose module paths are identical share a naming scheme: module names alone cannot
    # tell them apart (Qwen2 from LLaMA, StarCoder's gpt_bigcode from GPT-2); evidence of the family
    # (the recorded model class, the base's model_type) has to.
    naming: str = ""
    convertible: bool = False  # `convert` knows how to split/join this family's modules
    # (module path, the name a checkpoint stores it under) where they differ: transformers' own
    # renaming on load and save, paths from the model root.
    checkpoint_names: tuple[tuple[str, str], ...] = ()

    @property
    def scheme(self) -> str:
        return self.naming or self.name

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
    naming="llama",
    convertible=True,
)


def _llama_named(name: str, class_stem: str, model_types: tuple[str, ...] = ()) -> Architecture:
    """A family that names its modules exactly as LLaMA does (all nn.Linear): same table, its own classes."""
    heads = tuple(
        Head(h.name, h.prefix, tuple(c.replace("Llama", class_stem, 1) for c in h.classes), h.head_modules) for h in LLAMA.heads
    )
    return Architecture(name, model_types or (name,), heads, LLAMA.modules, naming="llama", convertible=True)


MISTRAL = _llama_named("mistral", "Mistral")
QWEN2 = _llama_named("qwen2", "Qwen2")
QWEN3 = _llama_named("qwen3", "Qwen3")
GEMMA = _llama_named("gemma", "Gemma")
GEMMA2 = _llama_named("gemma2", "Gemma2")
GEMMA3 = _llama_named("gemma3_text", "Gemma3", ("gemma3_text",))
GEMMA3 = Architecture(  # Gemma3ForCausalLM's backbone class is Gemma3TextModel
    GEMMA3.name, GEMMA3.model_types,
    tuple(Head(h.name, h.prefix, tuple(c.replace("Gemma3Model", "Gemma3TextModel") for c in h.classes), h.head_modules) for h in GEMMA3.heads),
    GEMMA3.modules, naming="llama", convertible=True,
)

GRANITE = _llama_named("granite", "Granite")
OLMO2 = _llama_named("olmo2", "Olmo2")


def _family(name: str, class_stem: str, modules: tuple[ModuleTemplate, ...]) -> Architecture:
    """A causal-LM family at `model.` with its own module table. Its attention (and dense MLP) is
    named and stored as LLaMA's, so it shares LLaMA's naming scheme: an adapter on those modules
    alone cannot tell the families apart, and need not (they merge alike)."""
    heads = (
        Head("causal-lm", "model.", (f"{class_stem}ForCausalLM",), ("lm_head",)),
        Head("sequence-classification", "model.", (f"{class_stem}ForSequenceClassification",), ("score",)),
        Head("base", "", (f"{class_stem}Model",)),
    )
    return Architecture(name, (name,), heads, modules + _HEADS, naming="llama")


def _t(role: Role, path: str) -> ModuleTemplate:
    return ModuleTemplate(role, "layers.{layer}." + path, L)


_HEADS = (ModuleTemplate(Role.TOKEN_EMBED, "embed_tokens", E), ModuleTemplate(Role.LM_HEAD, "lm_head", L, in_head=True),
          ModuleTemplate(Role.CLASSIFIER, "score", L, in_head=True))
_ATTN = tuple(_t(role, f"self_attn.{leaf}") for role, leaf in (
    (Role.ATTN_Q, "q_proj"), (Role.ATTN_K, "k_proj"), (Role.ATTN_V, "v_proj"), (Role.ATTN_OUT, "o_proj")))


def _mlp(block: str, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj", roles=(Role.FFN_GATE, Role.FFN_UP, Role.FFN_DOWN)):
    return tuple(_t(role, f"{block}.{leaf}") for role, leaf in zip(roles, (gate, up, down)))


_EXPERT = (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN)
# Experts stored one module per expert (transformers 4's module tree, and the checkpoints of
# every version): "{expert}" is the expert's index. transformers 5 fuses them into 3-D parameters
# (mlp.experts.gate_up_proj, down_proj), which LoRA reaches through target_parameters (arch/experts.py).
_PER_EXPERT = _mlp("mlp.experts.{expert}", roles=_EXPERT)
_MLA = tuple(_t(role, f"self_attn.{leaf}") for role, leaf in (
    (Role.ATTN_Q_A, "q_a_proj"), (Role.ATTN_Q_B, "q_b_proj"), (Role.ATTN_Q, "q_proj"),  # q_proj when q_lora_rank is None
    (Role.ATTN_KV_A, "kv_a_proj_with_mqa"), (Role.ATTN_KV_B, "kv_b_proj"), (Role.ATTN_OUT, "o_proj")))

QWEN2_MOE = _family("qwen2_moe", "Qwen2Moe", _ATTN + _mlp("mlp") + _PER_EXPERT + _mlp("mlp.shared_expert") + (
    _t(Role.ROUTER, "mlp.gate"), _t(Role.ROUTER, "mlp.shared_expert_gate")))
QWEN3_MOE = _family("qwen3_moe", "Qwen3Moe", _ATTN + _mlp("mlp") + _PER_EXPERT + (_t(Role.ROUTER, "mlp.gate"),))
MIXTRAL = _family("mixtral", "Mixtral", _ATTN + (
    # transformers 5's module tree calls the sparse block `mlp`; checkpoints `block_sparse_moe` (arch/renames.py)
    *_mlp("block_sparse_moe.experts.{expert}", "w1", "w3", "w2", _EXPERT), _t(Role.ROUTER, "block_sparse_moe.gate"),
    *_mlp("mlp.experts.{expert}", "w1", "w3", "w2", _EXPERT), _t(Role.ROUTER, "mlp.gate")))
GPT_OSS = _family("gpt_oss", "GptOss", _ATTN + (_t(Role.ROUTER, "mlp.router"),))  # experts: fused 3-D only
_DEEPSEEK_MLP = _mlp("mlp") + _PER_EXPERT + _mlp("mlp.shared_experts") + (_t(Role.ROUTER, "mlp.gate"),)
DEEPSEEK_V3 = _family("deepseek_v3", "DeepseekV3", _MLA + _DEEPSEEK_MLP)
GLM4 = _family("glm4", "Glm4", _ATTN + (_t(Role.FFN_GATE_UP, "mlp.gate_up_proj"), _t(Role.FFN_DOWN, "mlp.down_proj")))
GLM4_MOE = _family("glm4_moe", "Glm4Moe", _ATTN + _DEEPSEEK_MLP)
LLAMA4_TEXT = _family("llama4_text", "Llama4", _ATTN + _mlp("feed_forward") + _mlp("feed_forward.shared_expert") + (
    _t(Role.ROUTER, "feed_forward.router"),))  # routed experts: fused 3-D only


def _multimodal(name: str, class_stem: str, text_roles: tuple[ModuleTemplate, ...] = LLAMA.modules) -> Architecture:
    """A ConditionalGeneration model around a LLaMA-named text decoder. PEFT names its modules after
    transformers' module tree (`model.language_model.`); adapters made on transformers before 4.52
    after the older one (`language_model.model.`, head `language_model.lm_head`; Qwen2-VL: `model.`).
    The vision tower has no roles. Checkpoints may use either layout (arch/renames.py)."""
    cls = (f"{class_stem}ForConditionalGeneration",)
    heads = (Head("image-text-to-text", "model.language_model.", cls, ("lm_head",)),
             Head("image-text-to-text-v4", "language_model.model.", (), ("language_model.lm_head",)))
    modules = tuple(m for m in text_roles if m.role is not Role.CLASSIFIER) + (
        ModuleTemplate(Role.LM_HEAD, "language_model.lm_head", L, in_head=True),)
    return Architecture(name, (name,), heads, modules, naming="llama")


GEMMA3_MM = _multimodal("gemma3", "Gemma3")
MISTRAL3 = _multimodal("mistral3", "Mistral3")
LLAVA = _multimodal("llava", "Llava")


def _qwen_vl(name: str, class_stem: str) -> Architecture:
    """Qwen2-VL's older layout is the CausalLM's own: `model.layers...`, `lm_head`."""
    arch = _multimodal(name, class_stem)
    return Architecture(arch.name, arch.model_types, (arch.heads[0], Head("image-text-to-text-v4", "model.", (), ("lm_head",))),
                        LLAMA.modules, naming="llama")


QWEN2_VL = _qwen_vl("qwen2_vl", "Qwen2VL")
QWEN2_5_VL = _qwen_vl("qwen2_5_vl", "Qwen2_5_VL")

PHI3 = Architecture(
    name="phi3",
    model_types=("phi3",),
    heads=(Head("causal-lm", "model.", ("Phi3ForCausalLM",), ("lm_head",)), Head("base", "", ("Phi3Model",))),
    modules=(
        # q, k, v in one Linear (unequal parts under GQA), gate and up in another
        ModuleTemplate(Role.ATTN_QKV, "layers.{layer}.self_attn.qkv_proj", L),
        ModuleTemplate(Role.ATTN_OUT, "layers.{layer}.self_attn.o_proj", L),
        ModuleTemplate(Role.FFN_GATE_UP, "layers.{layer}.mlp.gate_up_proj", L),
        ModuleTemplate(Role.FFN_DOWN, "layers.{layer}.mlp.down_proj", L),
        ModuleTemplate(Role.TOKEN_EMBED, "embed_tokens", E),
        ModuleTemplate(Role.LM_HEAD, "lm_head", L, in_head=True),
    ),
)

GPT_NEOX = Architecture(
    name="gpt_neox",
    model_types=("gpt_neox",),
    heads=(Head("causal-lm", "gpt_neox.", ("GPTNeoXForCausalLM",), ("embed_out", "lm_head")), Head("base", "", ("GPTNeoXModel",))),
    modules=(
        ModuleTemplate(Role.ATTN_QKV, "layers.{layer}.attention.query_key_value", L),  # interleaved per head
        ModuleTemplate(Role.ATTN_OUT, "layers.{layer}.attention.dense", L),
        ModuleTemplate(Role.FFN_UP, "layers.{layer}.mlp.dense_h_to_4h", L),
        ModuleTemplate(Role.FFN_DOWN, "layers.{layer}.mlp.dense_4h_to_h", L),
        ModuleTemplate(Role.TOKEN_EMBED, "embed_in", E),
        ModuleTemplate(Role.LM_HEAD, "embed_out", L, in_head=True),  # named lm_head by transformers 5
        ModuleTemplate(Role.LM_HEAD, "lm_head", L, in_head=True),
    ),
    checkpoint_names=(("lm_head", "embed_out"),),  # transformers 5 saves GPTNeoXForCausalLM.lm_head as embed_out
)

FALCON = Architecture(
    name="falcon",
    model_types=("falcon",),
    heads=(Head("causal-lm", "transformer.", ("FalconForCausalLM",), ("lm_head",)), Head("base", "", ("FalconModel",))),
    modules=(
        ModuleTemplate(Role.ATTN_QKV, "h.{layer}.self_attention.query_key_value", L),
        ModuleTemplate(Role.ATTN_OUT, "h.{layer}.self_attention.dense", L),
        ModuleTemplate(Role.FFN_UP, "h.{layer}.mlp.dense_h_to_4h", L),
        ModuleTemplate(Role.FFN_DOWN, "h.{layer}.mlp.dense_4h_to_h", L),
        ModuleTemplate(Role.TOKEN_EMBED, "word_embeddings", E),
        ModuleTemplate(Role.LM_HEAD, "lm_head", L, in_head=True),
    ),
)

OPT = Architecture(
    name="opt",
    model_types=("opt",),
    heads=(Head("causal-lm", "model.decoder.", ("OPTForCausalLM",), ("lm_head",)), Head("base", "decoder.", ("OPTModel",))),
    modules=(
        ModuleTemplate(Role.ATTN_Q, "layers.{layer}.self_attn.q_proj", L),
        ModuleTemplate(Role.ATTN_K, "layers.{layer}.self_attn.k_proj", L),
        ModuleTemplate(Role.ATTN_V, "layers.{layer}.self_attn.v_proj", L),
        ModuleTemplate(Role.ATTN_OUT, "layers.{layer}.self_attn.out_proj", L),
        ModuleTemplate(Role.FFN_UP, "layers.{layer}.fc1", L),
        ModuleTemplate(Role.FFN_DOWN, "layers.{layer}.fc2", L),
        ModuleTemplate(Role.TOKEN_EMBED, "embed_tokens", E),
        ModuleTemplate(Role.POS_EMBED, "embed_positions", E),
        ModuleTemplate(Role.LM_HEAD, "lm_head", L, in_head=True),
    ),
)

T5 = Architecture(  # encoder-decoder: block {layer} of the encoder and of the decoder are different modules
    name="t5",
    model_types=("t5", "mt5"),
    heads=(Head("seq2seq-lm", "", ("T5ForConditionalGeneration", "MT5ForConditionalGeneration", "T5Model", "MT5Model"), ("lm_head",)),),
    modules=tuple(
        ModuleTemplate(role, f"{stack}.block.{{layer}}.layer.{sub}", L)
        for stack in ("encoder", "decoder")
        for sub, role in (
            ("0.SelfAttention.q", Role.ATTN_Q), ("0.SelfAttention.k", Role.ATTN_K), ("0.SelfAttention.v", Role.ATTN_V),
            ("0.SelfAttention.o", Role.ATTN_OUT),
            *((("1.EncDecAttention.q", Role.CROSS_ATTN), ("1.EncDecAttention.k", Role.CROSS_ATTN), ("1.EncDecAttention.v", Role.CROSS_ATTN),
               ("1.EncDecAttention.o", Role.CROSS_ATTN)) if stack == "decoder" else ()),
            (f"{1 if stack == 'encoder' else 2}.DenseReluDense.wi", Role.FFN_UP),
            (f"{1 if stack == 'encoder' else 2}.DenseReluDense.wi_0", Role.FFN_GATE),
            (f"{1 if stack == 'encoder' else 2}.DenseReluDense.wi_1", Role.FFN_UP),
            (f"{1 if stack == 'encoder' else 2}.DenseReluDense.wo", Role.FFN_DOWN),
        )
    ) + tuple(
        ModuleTemplate(Role.POS_EMBED, f"{stack}.block.{{layer}}.layer.0.SelfAttention.relative_attention_bias", E)
        for stack in ("encoder", "decoder")
    ) + (
        ModuleTemplate(Role.TOKEN_EMBED, "shared", E),
        ModuleTemplate(Role.TOKEN_EMBED, "encoder.embed_tokens", E),  # tied to shared
        ModuleTemplate(Role.TOKEN_EMBED, "decoder.embed_tokens", E),
        ModuleTemplate(Role.LM_HEAD, "lm_head", L, in_head=True),
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
    naming="gpt2",
    convertible=True,
)

# StarCoder (1): GPT-2's module names, but every layer is an nn.Linear (weight (out, in)) and c_attn
# is q plus one shared k, v head (multi-query). Only the family says which orientation ΔW has.
GPT_BIGCODE = Architecture(
    name="gpt_bigcode",
    model_types=("gpt_bigcode",),
    heads=(
        Head("causal-lm", "transformer.", ("GPTBigCodeForCausalLM",), ("lm_head",)),
        Head("sequence-classification", "transformer.", ("GPTBigCodeForSequenceClassification",), ("score",)),
        Head("token-classification", "transformer.", ("GPTBigCodeForTokenClassification",), ("classifier",)),
        Head("base", "", ("GPTBigCodeModel",)),
    ),
    modules=(
        ModuleTemplate(Role.ATTN_QKV, "h.{layer}.attn.c_attn", L),
        ModuleTemplate(Role.ATTN_OUT, "h.{layer}.attn.c_proj", L),
        ModuleTemplate(Role.FFN_UP, "h.{layer}.mlp.c_fc", L),
        ModuleTemplate(Role.FFN_DOWN, "h.{layer}.mlp.c_proj", L),
        ModuleTemplate(Role.TOKEN_EMBED, "wte", E),
        ModuleTemplate(Role.POS_EMBED, "wpe", E),
        ModuleTemplate(Role.LM_HEAD, "lm_head", L, in_head=True),
        ModuleTemplate(Role.CLASSIFIER, "score", L, in_head=True),
        ModuleTemplate(Role.CLASSIFIER, "classifier", L, in_head=True),
    ),
    naming="gpt2",
)

STARCODER2 = Architecture(
    name="starcoder2",
    model_types=("starcoder2",),
    heads=(Head("causal-lm", "model.", ("Starcoder2ForCausalLM",), ("lm_head",)), Head("base", "", ("Starcoder2Model",))),
    modules=(
        ModuleTemplate(Role.ATTN_Q, "layers.{layer}.self_attn.q_proj", L),
        ModuleTemplate(Role.ATTN_K, "layers.{layer}.self_attn.k_proj", L),
        ModuleTemplate(Role.ATTN_V, "layers.{layer}.self_attn.v_proj", L),
        ModuleTemplate(Role.ATTN_OUT, "layers.{layer}.self_attn.o_proj", L),
        ModuleTemplate(Role.FFN_UP, "layers.{layer}.mlp.c_fc", L),
        ModuleTemplate(Role.FFN_DOWN, "layers.{layer}.mlp.c_proj", L),
        ModuleTemplate(Role.TOKEN_EMBED, "embed_tokens", E),
        ModuleTemplate(Role.LM_HEAD, "lm_head", L, in_head=True),
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
    naming="bert",
    convertible=True,
)

NEMOTRON_H = Architecture(  # hybrid: each layer's `mixer` is Mamba-2, attention or an MLP
    name="nemotron_h",
    model_types=("nemotron_h",),
    heads=(Head("causal-lm", "model.", ("NemotronHForCausalLM",), ("lm_head",)), Head("base", "", ("NemotronHModel",))),
    modules=tuple(ModuleTemplate(role, f"layers.{{layer}}.mixer.{leaf}", L) for role, leaf in (
        (Role.ATTN_Q, "q_proj"), (Role.ATTN_K, "k_proj"), (Role.ATTN_V, "v_proj"), (Role.ATTN_OUT, "o_proj"),
        (Role.FFN_UP, "up_proj"), (Role.FFN_DOWN, "down_proj"), (Role.SSM_IN, "in_proj"), (Role.SSM_OUT, "out_proj"),
    )) + (ModuleTemplate(Role.TOKEN_EMBED, "embeddings", E), ModuleTemplate(Role.LM_HEAD, "lm_head", L, in_head=True)),
    checkpoint_names=(("model", "backbone"),),  # transformers 5 saves NemotronHForCausalLM.model as backbone
)

# Order matters within a naming scheme: the first family is reported when the adapter records no
# family and every family of the scheme stores its weights the same way.
ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, GEMMA2, GEMMA3, GRANITE, OLMO2, PHI3, GPT2, GPT_BIGCODE, STARCODER2, GPT_NEOX,
              FALCON, OPT, T5, BERT, NEMOTRON_H, QWEN2_MOE, QWEN3_MOE, MIXTRAL, GPT_OSS, DEEPSEEK_V3, GLM4, GLM4_MOE,
              LLAMA4_TEXT, GEMMA3_MM, MISTRAL3, LLAVA, QWEN2_VL, QWEN2_5_VL)
}
# The naming schemes `convert` reads and writes (--from / --to), each by its first family.
CONVERT_SCHEMES = ("llama", "gpt2", "bert")


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(ARCHITECTURES)
        raise UnsupportedError(f"unknown architecture {name!r} (known: {known})") from None
