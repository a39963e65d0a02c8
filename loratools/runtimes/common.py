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

# What a runtime that does not read a field does with it.
INIT_UNREAD = ("does not read init_lora_weights={init!r}: it serves the adapter as trained, which is right only on "
               "the base PEFT rewrote at initialisation")
FEATURE_UNREAD = "does not read {key}: it serves {feature} as a plain LoRA, which is not what PEFT computes"
