"""Frozen evaluation of encoders from anywhere (checkpoint, export, ``timm:<name>`` random init).

tasks (the registry: name, config section, runner; ``EvalRun``) -> encoders (load) -> features (batched extraction
over a ``data.labelled.LabelledSource``: image folders, or clip sources seen as clips x crops per video) + cache
(on disk) -> the registered probes: linear / attentive / knn / lowshot, one per label column -> results (JSON
records, tables, plots); splits parses SimCLR-format subset files; monitor is the training kNN monitor; cli is
``jepa eval``.
"""
