"""BART-JANUS pretraining data: sources -> tokenize -> pack -> shards (+manifest), on-the-fly
encoder/decoder span masking, and a deterministic, resumable data-parallel loader.

Entry points: `python -m data_pipeline.build`, `python -m data_pipeline.stats`,
`data_pipeline.loader.build_pretrain_loader`. See data_pipeline/README.md.
"""
