"""The commands (info, validate, merge, svd, resize, convert, combine, extract, export) and the
helpers they share (basemap, dequant, initial, lowrank, rounding, device, choices, base_report).
A command imports helpers and the merge engine (merge/), never another command."""
