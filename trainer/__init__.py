"""The near-line trainer (issue 6): incremental SFT from the training-samples stream, prequential
evaluation, gated publish to Triton with lineage, automatic and manual rollback.

``samples`` decodes the stream's TrainingSamples, ``core`` is the Kafka-free trainer
(test-then-train, gate, probation), ``prequential`` the rolling windows, ``paired`` the
gate's paired test of two models' AUC on the same events, ``onnx_export``
the fast checked export, ``publish`` the repository operations, ``state`` the durable
snapshots and lineage, ``service`` the Kafka loop around them.
"""
