"""Wording and PEFT facts the runtime tables share."""

from __future__ import annotations

# Config fields of PEFT LoRA variants the runtimes do not implement: (field, what it is).
FEATURES = (
    ("alora_invocation_tokens", "Activated LoRA (aLoRA)"),
    ("layer_replication", "layer_replication"),
    ("use_bdlora", "block-diagonal LoRA (BD-LoRA)"),
    ("use_qalora", "QALoRA"),
)

MERGE = "serve the merged model instead: loratools merge BASE ADAPTER OUT"
TO_PLAIN = "loratools convert ADAPTER OUT --to-lora writes the equivalent plain LoRA"
TO_SCALING_1 = "loratools convert ADAPTER OUT --to-lora (scaling 1 in every module)"
FROM_DORA = "loratools convert ADAPTER OUT --to-lora --base BASE --rank K writes a plain LoRA (exact at full rank); or " + MERGE
FROM_INITIAL = ("loratools convert ADAPTER OUT --to-lora --initial INITIAL_DIR writes the LoRA of the original base "
                "(PiSSA, OLoRA, CorDA, LoRA-GA; INITIAL_DIR is the adapter PEFT saved before training)")
NO_CONVERSION = "no loratools command converts it; serve it with PEFT, or retrain without it"
IF_EMBEDDING_CHANGED = "if the adapter resized or trained that embedding, " + MERGE

# A convolution's LoRA (PEFT's _ConvNd: lora_A (r, in, *kernel)): no runtime here has a LoRA
# layer for a convolution; each rule gives, as its param, the layers it does have one for.
CONV_UNSERVED = ("applies LoRA to {layers} only: it cannot serve the convolution LoRA of {n} module(s), e.g. {module} "
                 "(an nn.{conv}, lora_A {shape})")
FROM_CONV = ("loratools merge BASE ADAPTER OUT writes the merged weights (as PEFT's merge_and_unload), for a runtime "
             "that serves the model itself")

# What a runtime that does not read a field does with it.
INIT_UNREAD = ("does not read init_lora_weights={init!r}: it serves the adapter as trained, which is right only on "
               "the base PEFT rewrote at initialisation")
FEATURE_UNREAD = "does not read {key}: it serves {feature} as a plain LoRA, which is not what PEFT computes"
