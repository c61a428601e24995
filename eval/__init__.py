"""Frozen evaluation of encoders from anywhere (checkpoint, export, ``timm:<name>`` random init).

tasks (the registry: name, config section, runner; ``EvalRun``) -> encoders (load) -> features (batched extraction
over a ``data.labelled.LabelledSource``) + cache (on disk) -> the registered probes: linear / attentive / knn /
lowshot -> results (JSON records, tables, plots); splits parses SimCLR-format subset files; monitor is the training
kNN monitor; cli is ``jepa eval``.
"""
