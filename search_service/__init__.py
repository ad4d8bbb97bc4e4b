"""The search service: ingest into Milvus and search it, calling the encoder."""
