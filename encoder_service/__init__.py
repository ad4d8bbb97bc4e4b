"""The encoder service: CLIP vectors for texts and images over gRPC."""
