"""Frozen evaluation of encoders from anywhere (checkpoint, export, ``timm:<name>`` random init).

encoders (load) -> features (batched extraction) + cache (on disk) -> linear / attentive / knn / lowshot probes
-> results (JSON records, tables, plots); splits parses SimCLR-format subset files; cli is ``jepa eval``.
"""
